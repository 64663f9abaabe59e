"""Sweep throughput: runs per hour for d_model=64, n_layers=4, 300 steps on this machine.

Runs a small timed ladder sweep, as corpus-v2 is made (``--models`` GPT pre-LN models of different
seeds, each profiled once with 512 token states, then trained on a 4-rung AdamW ladder 1e-4 … 3e-3,
seq 32, batch 16, 300 steps) through ``run_sweep`` with ``--workers`` joblib processes, and writes
``benchmarks/results/sweep.json``. The load average before and after is recorded: on a shared
machine other jobs slow the sweep down.

    python benchmarks/sweep.py --models 4 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/featurize.py would shadow the featurize package (here and in the joblib workers)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

SPEC = """
name = "bench"
kind = "ladder"
n_models = {models}
seed = 0

[model]
family = "gpt"
norm = "pre_ln"
d_model = 64
n_layers = 4
n_heads = 4
mlp_ratio = {mlp_ratio}
seq_len = 32
profile_samples = 512
kreiss_grid = "{kreiss_grid}"

[train]
batch_size = 16
steps = {steps}
optimizer = "adamw"
warmup = 10

[ladder]
adamw = [1e-4, 3e-4, 1e-3, 3e-3]
start = 0
min_runs = 4
"""
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=4, help="models (4 runs each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mlp-ratio", type=int, default=4)
    ap.add_argument("--kreiss-grid", default="31x12", help="as in corpus-v2; '' = featurizer default")
    ap.add_argument("--note", default="", help="free text stored with the result")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweep.json")
    args = ap.parse_args()

    from risk_model.sweep.runner import load_corpus, run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        spec = tmp / "spec.toml"
        spec.write_text(SPEC.format(models=args.models, steps=args.steps, mlp_ratio=args.mlp_ratio,
                                    kreiss_grid=args.kreiss_grid))
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        summary = run_sweep(spec, tmp / "out", workers=args.workers, progress=False)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        runs, _ = load_corpus(tmp / "out")
        errors = (tmp / "out" / "errors.jsonl").read_text() if (tmp / "out" / "errors.jsonl").exists() else ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = dict(
        benchmark="sweep",
        config=dict(d_model=64, n_layers=4, steps=args.steps, seq_len=32, batch_size=16,
                    mlp_ratio=args.mlp_ratio, profile_samples=512, kreiss_grid=args.kreiss_grid,
                    design="ladder: one profile per model, 4 AdamW rungs 1e-4 … 3e-3"),
        models=int(summary["planned"]),
        runs=int(summary["ran"]),
        failed=int(summary["failed"]),
        workers=args.workers,
        wall_seconds=round(wall, 2),
        runs_per_hour=round(3600 * summary["ran"] / wall, 1),
        target_runs_per_hour=1000,
        seconds_per_run_mean=round(float(runs["seconds"].mean()), 2),
        profile_seconds_per_model=round(float(runs.groupby("model_id")["profile_seconds"].first().mean()), 2),
        diverged=int(runs["diverged"].sum()),
        cpu_count=os.cpu_count(),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in load_after],
        machine=platform.platform(),
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        note=args.note,
        errors=errors.splitlines()[:3],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
