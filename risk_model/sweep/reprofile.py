"""Re-profile a ladder corpus with the current featurizer (after a change to a spectral column).

Every model is rebuilt from its config (``model_table.rebuild``: the weights the sweep profiled) and
profiled again with the settings its rows record. The per-layer table and the runs' per-model
aggregates (``featurize.schema.aggregate``) are replaced; every column is compared with the stored
one, so the report says which columns moved and by how much. With ``check`` models, each of the first
``check`` models is profiled a second time with 2 BLAS/torch threads and the probe in micro-batches of
3 examples: the largest relative difference per column is the same-machine reproducibility.

Resumable: finished models are kept in ``OUT/reprofile-parts/`` and skipped when run again; the corpus
files are written (atomically) only once every model is done.

    python -m risk_model.sweep.reprofile datasets/corpus-v2 --check 60 --report benchmarks/results/reprofile_v2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

PARTS = "reprofile-parts"


def _profile_rows(model, cfg, *, threads: int = 1, batch_size: int = 16) -> pd.DataFrame:
    """The per-layer profile table of ``model`` with the sweep's settings for ``cfg``."""
    import torch
    from threadpoolctl import threadpool_limits

    import featurize
    from featurize.capture import collect_snapshots, discover_blocks, make_probe
    from featurize.profile import SpectralProfile, layer_stats

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads), torch.random.fork_rng(devices=[]):
            if batch_size == 16:  # exactly the sweep's call
                prof = featurize.profile(model, n_samples=cfg.profile_samples, seed=cfg.seed,
                                         rank=cfg.profile_rank, kreiss_grid=cfg.kreiss_grid or None)
                return prof.layers
            torch.manual_seed(cfg.seed)
            _, mods = discover_blocks(model, None, seed=cfg.seed)
            probe = make_probe(model, cfg.profile_samples, seed=cfg.seed)
            snaps = collect_snapshots(model, probe, blocks=mods, n_samples=cfg.profile_samples, seed=cfg.seed,
                                      batch_size=batch_size)
            rows = [dict(layer=i, name=n, **layer_stats(X, Y, rank=cfg.profile_rank, seed=cfg.seed,
                                                           kreiss_grid=cfg.kreiss_grid or None))
                    for i, (n, X, Y) in enumerate(zip(snaps.names, snaps.X, snaps.Y))]
            return SpectralProfile.from_rows(rows).layers
    finally:
        torch.set_num_threads(before)


def _rel(a: pd.DataFrame, b: pd.DataFrame, cols) -> dict[str, float]:
    """Largest relative difference per column (NaN in both places counts as equal)."""
    out = {}
    for c in cols:
        x, y = a[c].to_numpy(float), b[c].to_numpy(float)
        both = np.isnan(x) & np.isnan(y)
        d = np.abs(x - y) / np.maximum(np.abs(x), 1e-12)
        d[both] = 0.0
        out[c] = float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if len(d) else 0.0
    return out


def reprofile(corpus: str | Path, *, check: int = 0, progress: bool = True) -> dict:
    """Re-profile ``corpus`` in place (module docstring); returns the report."""
    import featurize
    from featurize.schema import CORE_AGGREGATED, EXTRA_AGGREGATED, aggregate

    from .model_table import model_rows, rebuild
    from .runner import write_parquet_atomic

    corpus = Path(corpus)
    runs = pd.read_parquet(corpus / "runs.parquet")
    layers_old = pd.read_parquet(corpus / "layers.parquet")
    models = model_rows(runs)
    parts = corpus / PARTS
    parts.mkdir(exist_ok=True)
    numeric = [c for c in featurize.PROFILE_COLUMNS if c not in ("layer", "name", "degenerate", "rank")]
    repro = {kind: {c: 0.0 for c in numeric} for kind in ("live", "degenerate")}
    n_checked, t0 = 0, time.perf_counter()
    for k, (_, row) in enumerate(models.iterrows()):
        mid = row["model_id"]
        part = parts / f"{mid}.parquet"
        want_check = k < check
        if part.exists() and not want_check:
            continue
        model, cfg = rebuild(row)
        if not part.exists():
            try:
                lay = _profile_rows(model, cfg)
            except (featurize.CaptureError, np.linalg.LinAlgError, ValueError):
                lay = pd.DataFrame(columns=featurize.PROFILE_COLUMNS)
            lay = lay.copy()
            lay.insert(0, "model_id", mid)
            write_parquet_atomic(lay, part, "layers")
        if want_check:
            lay = pd.read_parquet(part)
            if len(lay):
                other = _profile_rows(model, cfg, threads=2, batch_size=3)
                for kind, sel in (("live", ~lay["degenerate"].to_numpy(bool)), ("degenerate", lay["degenerate"].to_numpy(bool))):
                    for c, v in _rel(lay[sel], other[sel], numeric).items():
                        repro[kind][c] = max(repro[kind][c], v)
                n_checked += 1
        if progress and (k + 1) % 20 == 0:
            print(f"[reprofile] {k + 1}/{len(models)} models, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    new = pd.concat([pd.read_parquet(parts / f"{m}.parquet") for m in models["model_id"]], ignore_index=True)
    key = ["model_id", "layer"]
    old_k = layers_old.set_index(key).sort_index()
    new_k = new.set_index(key).sort_index()
    common = old_k.index.intersection(new_k.index)
    moved = _rel(old_k.loc[common].reset_index(), new_k.loc[common].reset_index(), numeric)
    kr_old, kr_new = old_k.loc[common, "kreiss"].to_numpy(float), new_k.loc[common, "kreiss"].to_numpy(float)
    ratio = kr_new / kr_old

    # the runs' per-model aggregates, from the new layer table (the one aggregation rule)
    cols = CORE_AGGREGATED + EXTRA_AGGREGATED
    agg = {m: aggregate(g, columns=cols) for m, g in new.groupby("model_id")}
    runs = runs.copy()
    for name in [f"{c}_{s}" for c in cols for s in ("mean", "max", "min", "std")]:
        if name in runs.columns:
            runs[name] = [agg[m][name] if m in agg else v for m, v in zip(runs["model_id"], runs[name])]
    write_parquet_atomic(new, corpus / "layers.parquet", "layers")
    write_parquet_atomic(runs, corpus / "runs.parquet", "runs")
    report = dict(
        corpus=str(corpus), models=int(len(models)), layers=int(len(new)), layers_compared=int(len(common)),
        seconds=round(time.perf_counter() - t0, 1),
        max_rel_change_vs_stored=moved,
        kreiss_ratio_new_over_old=dict(
            min=float(np.nanmin(ratio)), median=float(np.nanmedian(ratio)), max=float(np.nanmax(ratio)),
            frac_changed_over_1e_6=float(np.mean(np.abs(ratio - 1) > 1e-6)),
            frac_changed_over_1pct=float(np.mean(np.abs(ratio - 1) > 1e-2)),
            frac_lower=float(np.mean(ratio < 1 - 1e-6))),
        reproducibility=dict(models_checked=n_checked, perturbation="2 BLAS + torch threads, probe in micro-batches of 3",
                             max_rel_diff_live_layers=repro["live"],
                             max_rel_diff_degenerate_layers=repro["degenerate"]),
    )
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus")
    ap.add_argument("--check", type=int, default=0, help="models profiled twice for the reproducibility check")
    ap.add_argument("--report", default=None, help="write the report here (JSON)")
    a = ap.parse_args(argv)
    rep = reprofile(a.corpus, check=a.check)
    text = json.dumps(rep, indent=2)
    if a.report:
        Path(a.report).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
