"""The candidate curvature group (issue 20 item 3): what it costs and whether it earns its place.

1. Cost on GPT-2 124M (Hugging Face ``GPT2LMHeadModel``, random init, seed 0) in memory, one torch
   thread: ``init_features`` (one forward + backward, what ``risk predict`` always does), then
   ``curvature_features`` for AdamW (Lanczos on P⁻¹H, 10 Hessian–vector products; the line search
   along the first Adam update) and for SGD (Lanczos on H).
2. Held-out value on a ladder corpus whose ``models.parquet`` carries the curvature columns
   (``python -m risk_model.sweep.model_table CORPUS --curvature``): the leave-one-class-out AUROC of
   the fail model on ``failed`` with the curvature group against the linear part alone, paired
   bootstrap over networks (``heldout_v3.ablation`` with that one candidate), and the same for the
   line-search features alone and the edge-of-stability feature alone.

Run: ``python benchmarks/curvature.py --corpus datasets/corpus-v2`` (about 15 CPU-minutes);
``--skip-cost`` / ``--skip-ablation``. Writes ``benchmarks/results/curvature.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package when this file is run as a script
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

OUT = Path(__file__).parent / "results" / "curvature.json"


def cost() -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from risk_model.init_features import curvature_features, init_features

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    out = dict(model="GPT2LMHeadModel(GPT2Config()) random init", n_params=sum(p.numel() for p in model.parameters()))
    t = time.process_time()
    init_features(model)
    out["init_features_cpu_s"] = time.process_time() - t
    for opt in ("adamw", "sgd"):
        t0, c0 = time.perf_counter(), time.process_time()
        f = curvature_features(model, optimizer=opt)
        out[opt] = dict(cpu_s=time.process_time() - c0, wall_s=time.perf_counter() - t0,
                        eos_wall_s=f["seconds_eos"], line_wall_s=f["seconds_line"],
                        **{k: f[k] for k in ("ln_lr_eos", "ln_lr_overshoot", "ln_lr_line_min", "line_gain",
                                              "curvature_top_eig")})
        print(opt, out[opt], flush=True)
    return out


def value(corpus: str, n_boot: int) -> dict:
    import numpy as np

    from risk_model import heldout_v3
    from risk_model import lrmodel

    nets, runs, _ = heldout_v3.load_v3(corpus)
    have = np.isfinite(nets["ln_lr_line_min"].to_numpy(float)) if "ln_lr_line_min" in nets else np.zeros(len(nets), bool)
    out = dict(corpus=corpus, networks=int(len(nets)), with_curvature=int(have.sum()),
               eos_finite=int(np.isfinite(nets["ln_lr_eos"].to_numpy(float)).sum()))
    full = list(lrmodel.FEATURE_GROUPS["curvature"])
    variants = {"curvature": full, "line search only": ["ln_lr_overshoot", "ln_lr_line_min", "line_gain"],
                "edge of stability only": ["ln_lr_eos"]}
    out["ablation"] = {}
    for name, cols in variants.items():
        lrmodel.FEATURE_GROUPS["curvature"] = cols
        try:
            t = time.process_time()
            abl = heldout_v3.ablation(nets, runs, candidates=("curvature",), n_boot=n_boot)
            step = abl["steps"][0]
            out["ablation"][name] = dict(columns=cols, delta_auroc=step["delta"], ci=list(step["ci"]),
                                         earns_its_place=bool(step["ci"][0] > 0), pooled=abl["pooled"],
                                         cpu_s=time.process_time() - t)
            print(name, out["ablation"][name], flush=True)
        finally:
            lrmodel.FEATURE_GROUPS["curvature"] = full
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="datasets/corpus-v2")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-ablation", action="store_true")
    a = ap.parse_args()
    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not a.skip_cost:
        res["cost_gpt2_124m"] = cost()
    if not a.skip_ablation:
        res["value"] = value(a.corpus, a.n_boot)
    OUT.write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
