"""Sweep throughput: runs per hour for d_model=64, n_layers=4, 300 steps on this machine.

Runs a small timed sweep (``--runs`` runs of one GPT pre-LN config with different seeds, AdamW
lr 1e-3, seq 32, batch 16, init profile with 512 token states) through ``run_sweep`` with
``--workers`` joblib processes, and writes ``benchmarks/results/sweep.json``. The load average
before and after is recorded: on a shared machine other jobs slow the sweep down.

    python benchmarks/sweep.py --runs 8 --workers 2
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
n_runs = {runs}
sampler = "random"
seed = 0
seeds_per_config = {runs}

[grid]
family = "gpt"
norm = "pre_ln"
d_model = 64
n_layers = 4
n_heads = 4
mlp_ratio = {mlp_ratio}
seq_len = 32
batch_size = 16
steps = {steps}
optimizer = "adamw"
lr = 1e-3
warmup = 10
profile_samples = 512
kreiss_grid = "{kreiss_grid}"
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mlp-ratio", type=int, default=2, help="as in corpus-v1")
    ap.add_argument("--kreiss-grid", default="31x12", help="as in corpus-v1; '' = featurizer default")
    ap.add_argument("--note", default="", help="free text stored with the result")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweep.json")
    args = ap.parse_args()

    from risk_model.sweep.runner import load_corpus, run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        spec = tmp / "spec.toml"
        spec.write_text(SPEC.format(runs=args.runs, steps=args.steps, mlp_ratio=args.mlp_ratio,
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
                    mlp_ratio=args.mlp_ratio, profile_samples=512, kreiss_grid=args.kreiss_grid),
        runs=int(summary["ran"]),
        failed=int(summary["failed"]),
        workers=args.workers,
        wall_seconds=round(wall, 2),
        runs_per_hour=round(3600 * summary["ran"] / wall, 1),
        target_runs_per_hour=600,
        seconds_per_run_mean=round(float(runs["seconds"].mean()), 2),
        profile_seconds_mean=round(float(runs["profile_seconds"].mean()), 2),
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
