"""Known recipes: what `risk predict` answers for GPT-2 at init under llm.c's published recipe
(AdamW, warmup 700, 18,865 steps, batch 512, clip 1.0, weight decay 0.1, cosine decay; trained at
6e-4), across GPT-2 sizes at that one recipe.

Targets (issue 20): P(failed) at 6e-4 < 0.2; max_safe_lr in [6e-4, 2e-2]; max_safe_lr falls as the
width grows. Each network is built at init from its Hugging Face config (no download).

Run: ``python benchmarks/known_recipes.py [--predictor DIR] [--out results/known_recipes.json]``
(about 1–3 CPU-minutes per size).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package when this file is run as a script
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "known_recipes.json"
SIZES = {"gpt2 (124M)": (768, 12, 12), "gpt2-medium (350M)": (1024, 24, 16), "gpt2-large (774M)": (1280, 36, 20)}
RECIPE = dict(optimizer="adamw", warmup=700, steps=18865, batch_size=512, grad_clip=1.0, weight_decay=0.1,
              schedule="cosine", beta2=0.95, eps=1e-8)
LR = 6e-4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictor", type=Path, default=None, help="predictor bundle (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of: " + ", ".join(SIZES))
    a = ap.parse_args(argv)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from risk_model.serve import Request, assess_network, load_bundle

    bundle = load_bundle(a.predictor)
    rows = []
    for name in a.sizes.split(","):
        d, L, h = SIZES[name]
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=d, n_layer=L, n_head=h)).eval()
        t = time.perf_counter()
        res = assess_network(model, bundle=bundle, request=Request(lrs=[LR], **RECIPE))
        p = res.predictions[0]
        rows.append(dict(network=name, d_model=d, n_layers=L, p_failed_at_6e_4=p.p_failed, p_diverged_at_6e_4=p.p_divergence,
                         max_safe_lr=res.max_safe_lr, max_safe_lr_interval=res.max_safe_lr_interval,
                         recommended_lr=res.recommended_lr, recommended_lr_interval=res.recommended_lr_interval,
                         outside_corpus=res.outside_corpus, seconds=round(time.perf_counter() - t, 1)))
        print(f"{name}: P(failed)@6e-4 {p.p_failed:.3f}, max_safe_lr {res.max_safe_lr:.3g}, "
              f"recommended {res.recommended_lr:.3g} ({rows[-1]['seconds']} s)", flush=True)
        del model
    safe = [r["max_safe_lr"] for r in rows]
    out = dict(benchmark="known_recipes", recipe=dict(RECIPE, lr=LR, source="karpathy/llm.c GPT-2 124M"),
               predictor=bundle.version, rows=rows,
               targets=dict(p_failed_below_0_2=rows[0]["p_failed_at_6e_4"] < 0.2,
                            max_safe_in_6e_4_to_2e_2=6e-4 <= rows[0]["max_safe_lr"] <= 2e-2,
                            max_safe_falls_with_width=all(x > y for x, y in zip(safe, safe[1:]))))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2, default=float))
    print(json.dumps(out["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
