"""Sweep throughput, side by side in one run: the plain (v2-style) runner vs the corpus-v3 runner.

Both label the same runs: the v3 runner walks full ladders (``kind = "full_ladder"``) of
``--models`` small GPT models on the text_bytes task, each run of ``--steps`` steps read at the
horizons ``--horizons`` as well, with ``--workers`` joblib workers. The plain runner then trains
every row the v3 runner produced as a separate run of its own ``steps`` (the v2 design: one run
per label, one process), and its labels are compared with the v3 rows (held-out and train loss,
divergence, curves, and the per-model ``ladder_summary`` labels). Runs per CPU-hour: rows ÷ the
CPU time of the processes that trained them (``time.process_time``; one torch thread each); runs
per hour: rows ÷ wall time. The v2 runner (``trainer.train_run``) profiled the network at init in
every run, so the plain side does too, in ``train_run``'s order (build, task, profile, train); its
CPU time is reported with and without that profile (``plain`` / ``plain_train_only``), and the v3
runner's includes its one profile per model. Writes ``benchmarks/results/sweep.json``.

    python benchmarks/sweep.py --models 2 --workers 2
"""
from __future__ import annotations

import argparse
import json
import math
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
kind = "full_ladder"
[ladder]
adamw = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
start = 3
extra_rung = true
max_runs = 10
horizons = {horizons}
[[stage]]
name = "bench"
n_models = {models}
seed = 0
[stage.model]
family = "gpt"
norm = "pre_ln"
d_model = 32
n_layers = 2
n_heads = 2
mlp_ratio = 4
seq_len = 32
profile_samples = 256
kreiss_grid = "31x12"
[stage.train]
task = "text_bytes"
batch_size = 8
steps = {steps}
warmup = 10
eval_batches = 4
"""


def plain_rows(rows) -> tuple[list[dict], float, float, float]:
    """Each row's config as a separate run in this process, as ``trainer.train_run`` (the v2 runner)
    does it: build, task, init profile, train. Returns (labels, cpu s, wall s, cpu s of the profiles)."""
    import torch

    from risk_model.sweep.archs import build_network
    from risk_model.sweep.spec import RunConfig
    from risk_model.sweep.trainer import init_profile, make_run_task, run_labels, train, v3_labels

    torch.set_num_threads(1)
    fields = set(RunConfig.__dataclass_fields__)
    out = []
    prof_cpu = 0.0
    c0, w0 = time.process_time(), time.perf_counter()
    for _, r in rows.iterrows():
        cfg = RunConfig(**{k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in fields})
        torch.manual_seed(cfg.seed)
        model = build_network(cfg.model_args())
        task = make_run_task(cfg)
        cp = time.process_time()
        init_profile(model, cfg)
        prof_cpu += time.process_time() - cp
        res = train(model, cfg, task)
        out.append({**run_labels(res, task), **v3_labels(res, cfg.steps), "run_id": r["run_id"]})
    return out, time.process_time() - c0, time.perf_counter() - w0, prof_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--horizons", default="60,200")
    ap.add_argument("--note", default="", help="free text stored with the result")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweep.json")
    args = ap.parse_args()

    import pandas as pd

    from risk_model.labels import ladder_summary
    from risk_model.sweep.runner import load_corpus, run_sweep

    hz = [int(h) for h in args.horizons.split(",") if h]
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        spec = tmp / "spec.toml"
        spec.write_text(SPEC.format(models=args.models, steps=args.steps, horizons=hz))
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        summary = run_sweep(spec, tmp / "out", workers=args.workers, progress=False)
        v3_wall = time.perf_counter() - t0
        runs, _ = load_corpus(tmp / "out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plain, p_cpu, p_wall, p_prof = plain_rows(runs)
    load_after = os.getloadavg()
    p = pd.DataFrame(plain).set_index("run_id").loc[runs["run_id"]]
    v = runs.set_index("run_id")
    same = {}
    for col in ("final_eval_loss", "final_train_loss", "diverged", "diverge_step", "update_rms_ratio"):
        a, b = v[col].to_numpy(), p[col].to_numpy()
        same[col] = bool(all((x == y) or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
                             for x, y in zip(a, b)))
    same["loss_curve_10"] = all(list(x) == list(y) for x, y in zip(v["loss_curve_10"], p["loss_curve_10"]))
    # per-model labels from the plain runs, each (model, steps) ladder on its own
    lab_same = True
    for (mid, steps), g in v.reset_index().groupby(["model_id", "steps"]):
        pg = p.loc[g["run_id"]]
        s = ladder_summary(list(g["lr"]), list(pg["final_eval_loss"]), list(pg["diverged"]),
                           float(g["marginal_loss"].iloc[0]))
        lab_same &= list(g["failed"]) == s["failed"] and all(
            (g[k].iloc[0] == s[k]) or (math.isnan(g[k].iloc[0]) and math.isnan(s[k]))
            for k in ("lr_best", "lr_fail_min", "lr_fail_lo", "lr_diverge_min"))
    same["failed_and_per_model_labels"] = bool(lab_same)
    n = len(runs)
    v3_cpu = summary["cpu_seconds"]
    result = dict(
        benchmark="sweep",
        config=dict(d_model=32, n_layers=2, seq_len=32, batch_size=8, task="text_bytes", steps=args.steps,
                    horizons=hz, eval_batches=4, design="full_ladder (up to first failed, extra rung)"),
        models=args.models, rows=n, rows_per_steps=runs.groupby("steps").size().to_dict(),
        trained_runs=int((runs["steps"] == args.steps).sum()),
        v3=dict(workers=args.workers, wall_seconds=round(v3_wall, 2), cpu_seconds=round(v3_cpu, 2),
                runs_per_cpu_hour=round(3600 * n / v3_cpu, 1), runs_per_hour=round(3600 * n / v3_wall, 1)),
        plain=dict(workers=1, wall_seconds=round(p_wall, 2), cpu_seconds=round(p_cpu, 2),
                   runs_per_cpu_hour=round(3600 * n / p_cpu, 1), runs_per_hour=round(3600 * n / p_wall, 1),
                   profile_cpu_seconds=round(p_prof, 2)),
        plain_train_only=dict(cpu_seconds=round(p_cpu - p_prof, 2),
                              runs_per_cpu_hour=round(3600 * n / (p_cpu - p_prof), 1)),
        speedup_per_cpu_hour=round(p_cpu / v3_cpu, 2), speedup_per_wall_hour=round(p_wall / v3_wall, 2),
        speedup_per_cpu_hour_train_only=round((p_cpu - p_prof) / v3_cpu, 2),
        labels_identical=same,
        cpu_count=os.cpu_count(),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in load_after],
        machine=platform.platform(), python=platform.python_version(),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), note=args.note,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
