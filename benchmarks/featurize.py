"""Featurizer speed: seconds per layer of the full profile and of the DMD step vs PyDMD.

Snapshots come from one random residual MLP block (h ↦ h + W2 gelu(W1 h)) on Gaussian token states,
N = 2048, for d ∈ {256, 512, 768, 1024}. For each d we time:

- ``profile_rank32``: everything `featurize.profile` computes for one layer with the default
  (paper) rank-32 randomized whitened DMD: whitening, DMD, ResDMD, masses, ρ, κ(V), Kreiss.
- ``profile_full``: the same with full DMD (m = d eigenvalues).
  Measured for d ≤ 512 only: its Kreiss search on a d×d operator takes minutes beyond that.
- ``dmd_ours`` vs ``dmd_pydmd``: the DMD step alone on the same snapshots (no centring, full rank):
  ours (whitened, eigenvectors and ResDMD residuals included) against
  ``pydmd.DMD(svd_rank=-1).fit(X, Y)``, and the largest eigenvalue mismatch (whitening is a
  similarity transform, so the eigenvalues must agree).

Writes benchmarks/results/featurize.json. Usage: python benchmarks/featurize.py [--dims 256 512]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import sys

sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]  # this file shadows the package

import numpy as np  # noqa: E402

from featurize.dmd import dmd  # noqa: E402
from featurize.profile import layer_stats  # noqa: E402

OUT = Path(__file__).parent / "results" / "featurize.json"


def snapshots(d: int, n: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d, n))  # (d, N)
    W1 = rng.standard_normal((4 * d, d)) / np.sqrt(d)
    W2 = rng.standard_normal((d, 4 * d)) / np.sqrt(4 * d)
    H = W1 @ X
    gelu = 0.5 * H * (1 + np.tanh(0.79788456 * (H + 0.044715 * H**3)))
    return X, X + 0.5 * (W2 @ gelu)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def match_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance from an eigenvalue of a to its nearest eigenvalue of b (and back)."""
    D = np.abs(a[:, None] - b[None, :])
    return float(max(D.min(axis=1).max(), D.min(axis=0).max()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 512, 768, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import pydmd

    rows = []
    for d in args.dims:
        X, Y = snapshots(d)
        row = dict(d=d, n=X.shape[1])
        row["profile_rank32_s"] = best_of(lambda: layer_stats(X, Y, rank=32), args.repeat)
        row["profile_full_s"] = best_of(lambda: layer_stats(X, Y, rank=None), 1) if d <= 512 else None
        row["dmd_ours_s"] = best_of(lambda: dmd(X, Y, rank=None, center=False), args.repeat)

        def fit_pydmd():
            m = pydmd.DMD(svd_rank=-1, exact=True)
            m.fit(X, Y)
            return m

        row["dmd_pydmd_s"] = best_of(fit_pydmd, args.repeat)
        row["speedup_vs_pydmd"] = row["dmd_pydmd_s"] / row["dmd_ours_s"]
        ours = dmd(X, Y, rank=None, center=False).eigenvalues
        row["eig_max_abs_diff_vs_pydmd"] = match_error(ours, np.asarray(fit_pydmd().eigs))
        rows.append(row)
        print(json.dumps(row))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(
        machine=dict(cpus=os.cpu_count(), platform=platform.platform(), numpy=np.__version__,
                     pydmd=pydmd.__version__ if hasattr(pydmd, "__version__") else "?"),
        note="best of --repeat runs (profile_full: one run); other processes may share the CPU",
        rows=rows), indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
