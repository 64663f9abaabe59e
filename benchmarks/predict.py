"""Wall-clock of `risk --help` and `risk predict` from a cold start (fresh processes), against
`python -c "import torch"` measured in the same run.

Targets: `risk predict CKPT --lr 1e-3` on a 6-layer d=256 checkpoint ≤ 1.5 × the wall time of
`python -c "import torch"` (issue 10; the ratio cancels most of the machine's speed and load);
`risk --help` ≤ 0.5 s.

    python benchmarks/predict.py [--predictor DIR] [--repeats 5]

Writes benchmarks/results/predict.json. Each timing is a separate `risk` process (interpreter start,
imports, model load, the init-feature forward and backward pass, one forward pass for all probe
seeds, DMD and Kreiss constant per layer and seed on the machine's cores, prediction); the median
over repeats is reported with its CPU time and the machine's load average (before and after the
timed runs), since the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def interleaved(cmds: dict[str, list[str]], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU times of each command, run in turn ``repeats`` times (so load changes hit all alike)."""
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    cpus: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for k, cmd in cmds.items():
            w, _, c = timed(cmd, 1)
            walls[k] += w
            cpus[k] += c
    return walls, cpus


def timed(cmd: list[str], repeats: int) -> tuple[list[float], str, list[float]]:
    """Wall times, the last stdout, and CPU times (user + system, all threads) of ``repeats`` runs."""
    walls, cpus, out = [], [], ""
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.strip()[:300]}")
        out = res.stdout
    return walls, out, cpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictor", default=None, help="predictor bundle (default: the shipped models/default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict.json"))
    args = ap.parse_args()

    import torch

    from risk_model.zoo import build_model, save_checkpoint

    risk = shutil.which("risk") or str(Path(sys.executable).with_name("risk"))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build_model(dict(family="gpt", norm="pre_ln", d_model=256, n_layers=6, n_heads=8, block_size=64))
        ckpt = save_checkpoint(model, Path(tmp) / "gpt_d256_L6.pt")
        extra = ["--predictor", args.predictor] if args.predictor else []
        predict = [risk, "predict", str(ckpt), "--lr", "1e-3", "--json", *extra]
        _, out, _ = timed(predict, 1)  # warms the file cache for both, and gives the output
        load_before = os.getloadavg()[0]
        walls, cpus = interleaved({"torch": [sys.executable, "-c", "import torch"], "predict": predict}, args.repeats)
        help_walls, _, _ = timed([risk, "--help"], args.repeats)
        free_walls, _, _ = timed([risk, "predict", str(ckpt), "--json", *extra], max(1, args.repeats // 2))
    res = json.loads(out)
    ratios = [p / t for p, t in zip(walls["predict"], walls["torch"])]
    result = {
        "predict_over_import_torch": {"median": statistics.median(ratios), "all": ratios, "target": 1.5,
                                      "how": "each repeat: `python -c 'import torch'` then `risk predict`"},
        "import_torch_s": {"median": statistics.median(walls["torch"]), "all": walls["torch"]},
        "risk_predict_lr_s": {"median": statistics.median(walls["predict"]), "all": walls["predict"]},
        "import_torch_cpu_s": {"median": statistics.median(cpus["torch"]), "all": cpus["torch"],
                               "how": "user + system CPU time of the process, all its threads"},
        "risk_predict_lr_cpu_s": {"median": statistics.median(cpus["predict"]), "all": cpus["predict"]},
        "risk_help_s": {"median": statistics.median(help_walls), "all": help_walls, "target": 0.5},
        "risk_predict_config_free_s": {"median": statistics.median(free_walls), "all": free_walls},
        "model": "zoo gpt pre_ln d_model=256 n_layers=6 (random init), --lr 1e-3",
        "predictor": res["predictor"],
        "p_divergence": res["predictions"][0]["p_divergence"],
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_before": load_before, "loadavg_1m": os.getloadavg()[0],
                    "python": platform.python_version(),
                    "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v["median"] for k, v in result.items() if isinstance(v, dict) and "median" in v}, indent=2))


if __name__ == "__main__":
    main()
