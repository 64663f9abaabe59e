"""Cost of the Kreiss step per layer, the current search against the one before issue 17, side by side.

The operators are the rank-32 whitened DMD operators of a 6-layer d = 256 zoo GPT (pre-LN) for 3 probe
seeds: the 18 layer-profiles of ``risk predict``. Each operator is timed with both searches in turn
(interleaved, so machine load hits both alike), at the default grid and at the shipped predictor's
31 × 12 grid. The earlier search is read from git (``OLD_COMMIT``), so the comparison needs a checkout
with history. Writes ``benchmarks/results/kreiss.json``.

    python benchmarks/kreiss.py
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/featurize.py would shadow the featurize package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import numpy as np  # noqa: E402
import torch  # noqa: E402
OLD_COMMIT = "669120f"  # main before the Kreiss fix


def _old_module():
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:featurize/spectra.py"], check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from .schema import CONTRACTIVE, EXPANSIVE, NEAR_LOW", "from featurize.schema import CONTRACTIVE, EXPANSIVE, NEAR_LOW")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "kreiss_old_spectra.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("kreiss_old_spectra", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def operators() -> list[np.ndarray]:
    from featurize.capture import collect_snapshots, make_probe
    from featurize.dmd import dmd
    from risk_model.zoo import build_model

    torch.manual_seed(0)
    model = build_model(dict(d_model=256, n_layers=6, n_heads=8, block_size=64, vocab_size=256))
    ops = []
    for seed in range(3):
        probe = make_probe(model, 2048, seed=seed)
        snaps = collect_snapshots(model, probe, n_samples=2048, seed=seed)
        ops += [dmd(X, Y, rank=32, seed=seed).A for X, Y in zip(snaps.X, snaps.Y)]
    return ops


def main() -> None:
    import featurize.spectra as new

    from threadpoolctl import threadpool_limits

    old = _old_module()
    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # CPU time of one thread for both searches
    ops = operators()
    out = dict(operators=len(ops), shape=list(ops[0].shape), network="zoo gpt pre_ln d=256 L=6, 3 probe seeds",
               old_commit=OLD_COMMIT, load_average_before=os.getloadavg()[0], grids={})
    for grid in [(61, 21), (31, 12)]:
        t_old, t_new, k_old, k_new = [], [], [], []
        for A in ops:
            t = time.process_time()
            k_old.append(old.kreiss_constant(A, n_theta=grid[0], n_r=grid[1]))
            t_old.append(time.process_time() - t)
            t = time.process_time()
            k_new.append(new.kreiss_constant(A, n_theta=grid[0], n_r=grid[1]))
            t_new.append(time.process_time() - t)
        ratio = np.array(k_new) / np.array(k_old)
        out["grids"][f"{grid[0]}x{grid[1]}"] = dict(
            cpu_s_per_layer_old=float(np.mean(t_old)), cpu_s_per_layer_new=float(np.mean(t_new)),
            cpu_s_18_layers_old=float(np.sum(t_old)), cpu_s_18_layers_new=float(np.sum(t_new)),
            speedup=float(np.sum(t_old) / np.sum(t_new)),
            k_new_over_old=dict(min=float(ratio.min()), median=float(np.median(ratio)), max=float(ratio.max())))
    out["load_average_after"] = os.getloadavg()[0]
    res = ROOT / "benchmarks" / "results" / "kreiss.json"
    res.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
