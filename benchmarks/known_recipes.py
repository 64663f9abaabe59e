"""Known recipes: what `risk predict` answers for GPT-2 at init under llm.c's published recipe
(AdamW, warmup 700, 18,865 steps, batch 512 of 1024 tokens, clip 1.0, weight decay 0.1, cosine decay; trained at
6e-4), across GPT-2 sizes at that one recipe.

Targets (issue 20): P(failed) at 6e-4 < 0.2; max_safe_lr in [6e-4, 2e-2]; max_safe_lr falls as the
width grows. Each network is built at init from its Hugging Face config (no download).

Beside them, other published recipes that are known to train, each at its published LR (a sanity
check, not a target: P(failed) there should be low, and max_safe_lr at or above it):
nanoGPT's shakespeare-char (a 6-layer d = 384 GPT, lr 1e-3) and Pythia-160M (GPT-NeoX, lr 6e-4).

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
RECIPE = dict(optimizer="adamw", warmup=700, steps=18865, batch_size=512, seq_len=1024, grad_clip=1.0,
              weight_decay=0.1,
              schedule="cosine", beta2=0.95, eps=1e-8)
LR = 6e-4
#: name: (builder, published recipe with its lr); sources: karpathy/nanoGPT config/train_shakespeare_char.py,
#: EleutherAI/pythia models/160M/pythia-160m.yml
PUBLISHED = {
    "nanoGPT shakespeare-char (d 384, 6 layers)": ("gpt2", dict(n_embd=384, n_layer=6, n_head=6, vocab_size=65,
                                                             n_positions=256),
                                                  dict(optimizer="adamw", warmup=100, steps=5000, batch_size=64, seq_len=256,
                                                       grad_clip=1.0, weight_decay=0.1, schedule="cosine", beta2=0.99,
                                                       eps=1e-8, lr=1e-3)),
    "Pythia-160M (GPT-NeoX, d 768, 12 layers)": ("neox", dict(hidden_size=768, num_hidden_layers=12,
                                                               num_attention_heads=12, intermediate_size=3072,
                                                               vocab_size=50304),
                                                  dict(optimizer="adamw", warmup=1430, steps=143000, batch_size=1024, seq_len=2048,
                                                       grad_clip=1.0, weight_decay=0.01, schedule="cosine",
                                                       beta2=0.95, eps=1e-8, lr=6e-4)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictor", type=Path, default=None, help="predictor bundle (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of: " + ", ".join(SIZES))
    ap.add_argument("--no-published", action="store_true", help="only the GPT-2 sizes")
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
    published = []
    for name, (kind, cfg, recipe) in ({} if a.no_published else PUBLISHED).items():
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        torch.manual_seed(0)
        model = (GPT2LMHeadModel(GPT2Config(**cfg)) if kind == "gpt2" else GPTNeoXForCausalLM(GPTNeoXConfig(**cfg))).eval()
        recipe = dict(recipe)
        lr = recipe.pop("lr")
        t = time.perf_counter()
        res = assess_network(model, bundle=bundle, request=Request(lrs=[lr], **recipe))
        p = res.predictions[0]
        published.append(dict(network=name, recipe=dict(recipe, lr=lr), p_failed_at_published_lr=p.p_failed,
                              max_safe_lr=res.max_safe_lr, recommended_lr=res.recommended_lr,
                              recommended_lr_interval=res.recommended_lr_interval,
                              seconds=round(time.perf_counter() - t, 1)))
        print(f"{name}: P(failed)@{lr:g} {p.p_failed:.3f}, max_safe_lr {res.max_safe_lr:.3g}, "
              f"recommended {res.recommended_lr:.3g} ({published[-1]['seconds']} s)", flush=True)
        del model
    safe = [r["max_safe_lr"] for r in rows]
    out = dict(benchmark="known_recipes", recipe=dict(RECIPE, lr=LR, source="karpathy/llm.c GPT-2 124M"),
               predictor=bundle.version, rows=rows, published=published,
               targets=dict(p_failed_below_0_2=rows[0]["p_failed_at_6e_4"] < 0.2,
                            max_safe_in_6e_4_to_2e_2=6e-4 <= rows[0]["max_safe_lr"] <= 2e-2,
                            max_safe_falls_with_width=all(x > y for x, y in zip(safe, safe[1:]))))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2, default=float))
    print(json.dumps(out["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
