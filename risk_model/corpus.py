"""The labelled corpus (DESIGN §7): schema, validation, merging of sweep outputs, loading.

A corpus directory holds ``runs.parquet`` (one row per training run: config, labels, baselines,
provenance, usually the profile aggregates) and ``layers.parquet`` (the init-time profile, one row
per run and residual block: ``run_id``, ``PROFILE_COLUMNS``). Aggregates are recomputed from the
layer table when it is there, with the featurizer's own rule (non-degenerate layers), so training
features are the ones ``risk predict`` computes.

Examples
--------
>>> corpus = load_corpus(["datasets/corpus-v1"])              # doctest: +SKIP
>>> corpus.runs.shape, corpus.hash[:12]                       # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from featurize.schema import AGGREGATED, CORE_AGGREGATED, aggregate, aggregate_names

from .errors import CorpusError

#: Columns every corpus ``runs`` table must have.
ID_COLUMNS = ["run_id", "config_id"]
CONFIG_COLUMNS = [
    "family", "norm", "d_model", "n_layers", "n_heads", "init_scale", "task", "optimizer", "lr",
    "warmup", "batch_size", "steps", "seed",
]
LABEL_COLUMNS = ["diverged"]
#: The paper's gradient baselines (Table 2), recorded by the sweep trainer.
BASELINE_COLUMNS = ["grad_norm_step1", "grad_norm_step100", "grad_norm_var_1_100", "loss_spikes_1_500"]
REQUIRED_RUN_COLUMNS = ID_COLUMNS + CONFIG_COLUMNS + LABEL_COLUMNS + BASELINE_COLUMNS
NUMERIC_CONFIG = ["d_model", "n_layers", "n_heads", "init_scale", "lr", "warmup", "batch_size", "steps", "seed"]


def aggregate_columns() -> list[str]:
    """Names of the profile aggregates every corpus carries: ``{col}_{mean,max,min,std}`` of
    ``CORE_AGGREGATED``."""
    return aggregate_names(CORE_AGGREGATED)


def aggregate_layers(layers: pd.DataFrame) -> pd.DataFrame:
    """Per-run profile aggregates from a long layer table, by ``featurize.schema.aggregate``'s rule
    (the rule a profile's own aggregates follow).

    Parameters
    ----------
    layers : DataFrame with ``run_id``, ``degenerate`` and the ``AGGREGATED`` columns, one row per
        (run, layer); missing ``EXTRA_AGGREGATED`` columns give NaN aggregates

    Returns
    -------
    DataFrame indexed by run_id (sorted) with ``aggregate_names()`` and ``n_degenerate`` (the run's
    ``n_layers`` comes from the runs table as a config column)
    """
    cols = [c for c in AGGREGATED if c in layers.columns] + ["degenerate"]
    rows, ids = [], []
    for rid, g in layers.groupby("run_id", sort=True):
        table = {c: g[c].to_numpy() for c in cols}
        agg = aggregate(table)
        agg.pop("n_layers")
        rows.append(agg)
        ids.append(rid)
    out = pd.DataFrame(rows, index=pd.Index(ids, name="run_id"),
                       columns=aggregate_names() + ["n_degenerate"])
    out["n_degenerate"] = out["n_degenerate"].astype(int)
    return out


@dataclass
class ValidationReport:
    """What happened to the rows of one source: kept, rejected (with reasons), duplicates dropped."""

    source: str
    n_rows: int = 0
    n_kept: int = 0
    bad: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["run_id", "reason"]))
    duplicates: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.source}: {self.n_rows} rows, {self.n_kept} kept, {len(self.bad)} rejected, "
               f"{len(self.duplicates)} duplicate run ids dropped"]
        for r in self.bad.itertuples(index=False):
            out.append(f"  rejected {r.run_id}: {r.reason}")
        return out


@dataclass
class Corpus:
    """Validated runs with their profile aggregates, the layer table and the per-source reports."""

    runs: pd.DataFrame
    layers: pd.DataFrame | None
    reports: list[ValidationReport]
    sources: list[str]

    @property
    def hash(self) -> str:
        return corpus_hash(self.runs)

    @property
    def profile_settings(self) -> dict:
        """n_samples / rank / Kreiss search grid the corpus profiles were made with (the sweep's
        defaults when absent). The probe seed varied with the run seed in the sweep; 0 is used at
        predict time."""
        out = {"n_samples": 512, "rank": 32, "seed": 0, "kreiss_grid": ""}
        for col, key in (("profile_samples", "n_samples"), ("profile_rank", "rank")):
            if col in self.runs and self.runs[col].notna().any():
                out[key] = int(self.runs[col].mode().iloc[0])
        if "kreiss_grid" in self.runs and self.runs["kreiss_grid"].notna().any():
            out["kreiss_grid"] = str(self.runs["kreiss_grid"].mode().iloc[0])
        return out


def corpus_hash(runs: pd.DataFrame) -> str:
    """sha256 of the sorted (run_id, diverged, lr) triples: identifies the labelled set of runs."""
    df = runs[["run_id", "diverged", "lr"]].copy()
    df = df.sort_values("run_id")
    text = "\n".join(f"{r}\t{int(d)}\t{float(l):.6g}" for r, d, l in df.itertuples(index=False))
    return hashlib.sha256(text.encode()).hexdigest()


def _read_parts(parts: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A sweep still running: its finished runs are ``parts/<run_id>.runs.parquet`` (+ ``.layers``)."""
    run_files = sorted(parts.glob("*.runs.parquet"))
    runs = pd.concat([pd.read_parquet(f) for f in run_files], ignore_index=True)
    layer_files = [f.with_name(f.name.replace(".runs.", ".layers.")) for f in run_files]
    layer_frames = [pd.read_parquet(f) for f in layer_files if f.exists()]
    return runs, (pd.concat(layer_frames, ignore_index=True) if layer_frames else None)


def _layers_per_run(runs: pd.DataFrame, layers: pd.DataFrame | None) -> pd.DataFrame | None:
    """A ladder corpus profiles each model once (layers keyed by ``model_id``): give every run of
    the model its model's layer rows, so the layer table is keyed by ``run_id`` as elsewhere."""
    if layers is None or "run_id" in layers.columns or "model_id" not in layers.columns:
        return layers
    if "model_id" not in runs.columns:
        raise CorpusError("layers.parquet is keyed by model_id but runs.parquet has no model_id column")
    return runs[["run_id", "model_id"]].merge(layers, on="model_id", how="inner")


def read_source(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(runs, layers)`` of a corpus directory (or a runs.parquet path); layers may be None.

    A sweep folder without a consolidated runs.parquet yet is read from its ``parts/``.
    Per-step curves (list columns) are dropped: nothing here uses them. Layers of a ladder
    corpus (keyed by ``model_id``) are given to each of the model's runs.
    """
    runs, layers = read_tables(path)
    return runs, _layers_per_run(runs, layers)


CURVES = ("loss_curve", "grad_norm_curve")


def read_tables(path: str | Path, *, curves: bool = False) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(runs, layers)`` of a corpus directory (or a runs.parquet path) as stored: the one reader
    of corpus files. ``curves``: keep the per-step list columns. ``layers`` is None without a layer
    table. A sweep folder without a consolidated runs.parquet yet is read from its ``parts/``."""
    path = Path(path)
    drop = () if curves else CURVES
    runs_path = path / "runs.parquet" if path.is_dir() else path
    if not runs_path.exists() and path.is_dir() and any((path / "parts").glob("*.runs.parquet")):
        runs, layers = _read_parts(path / "parts")
        return runs.drop(columns=[c for c in drop if c in runs]), layers
    if not runs_path.exists():
        raise CorpusError(f"{path}: no runs.parquet (give a corpus directory made by `risk sweep`)")
    try:
        runs = pd.read_parquet(runs_path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise CorpusError(f"{runs_path}: not a readable parquet file ({e.__class__.__name__})") from e
    layers_path = runs_path.with_name("layers.parquet")
    try:
        layers = pd.read_parquet(layers_path) if layers_path.exists() else None
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise CorpusError(f"{layers_path}: not a readable parquet file ({e.__class__.__name__})") from e
    return runs.drop(columns=[c for c in drop if c in runs]), layers


def check_columns(runs: pd.DataFrame, layers: pd.DataFrame | None, source: str) -> None:
    """Raise ``CorpusError`` naming every missing required column."""
    missing = [c for c in REQUIRED_RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise CorpusError(f"{source}: runs table is missing required columns: {', '.join(missing)}")
    if layers is not None:
        need = ["run_id", "layer", "degenerate"] + CORE_AGGREGATED
        lmiss = [c for c in need if c not in layers.columns]
        if lmiss:
            raise CorpusError(f"{source}: layers table is missing required columns: {', '.join(lmiss)}")
    elif not all(c in runs.columns for c in aggregate_columns()):
        miss = [c for c in aggregate_columns() if c not in runs.columns]
        raise CorpusError(f"{source}: no layers.parquet and the runs table lacks profile aggregates "
                          f"({', '.join(miss[:4])}{', ...' if len(miss) > 4 else ''})")


def validate_rows(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``runs`` (already holding the aggregates) into kept rows and rejected rows + reason.

    A row is rejected when its run id is empty, its label is missing or not 0/1, a numeric config
    value is missing or not a number, lr <= 0, steps/batch_size/n_layers/d_model < 1, warmup < 0, or
    it has no init profile (every aggregate missing).
    """
    reasons = pd.Series("", index=runs.index, dtype=object)

    def flag(mask, why):
        mask = pd.Series(mask, index=runs.index).fillna(False).astype(bool)
        reasons[mask & (reasons == "")] = why

    flag(runs["run_id"].isna() | (runs["run_id"].astype(str).str.strip() == ""), "empty run_id")
    lab = pd.to_numeric(runs["diverged"], errors="coerce")
    flag(~lab.isin([0, 1]), "label 'diverged' must be 0/1")
    for c in NUMERIC_CONFIG:
        v = pd.to_numeric(runs[c], errors="coerce")
        flag(~np.isfinite(v.astype(float)), f"{c} is missing or not a number")
    flag(pd.to_numeric(runs["lr"], errors="coerce") <= 0, "lr must be > 0")
    for c in ("steps", "batch_size", "n_layers", "d_model"):
        flag(pd.to_numeric(runs[c], errors="coerce") < 1, f"{c} must be >= 1")
    flag(pd.to_numeric(runs["warmup"], errors="coerce") < 0, "warmup must be >= 0")
    for c in ("family", "norm", "optimizer", "config_id"):
        flag(runs[c].isna(), f"{c} is missing")
    aggs = runs[aggregate_columns()].apply(pd.to_numeric, errors="coerce")
    flag(aggs.isna().all(axis=1), "no init profile (layers missing for this run)")
    flag(aggs["m_near_mean"].isna(), "m_near_mean is missing")
    bad = reasons != ""
    rejected = pd.DataFrame({"run_id": runs.loc[bad, "run_id"].astype(str), "reason": reasons[bad]})
    return runs.loc[~bad], rejected.reset_index(drop=True)


def _with_aggregates(runs: pd.DataFrame, layers: pd.DataFrame | None) -> pd.DataFrame:
    runs = runs.copy()
    if layers is None:
        if "n_degenerate" not in runs:
            runs["n_degenerate"] = 0
        return runs
    aggs = aggregate_layers(layers)
    drop = [c for c in aggs.columns if c in runs.columns]
    runs = runs.drop(columns=drop)
    return runs.merge(aggs, left_on="run_id", right_index=True, how="left")


def _coerce_types(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    for c in NUMERIC_CONFIG:
        runs[c] = pd.to_numeric(runs[c], errors="coerce").astype(float)
    runs["diverged"] = pd.to_numeric(runs["diverged"], errors="coerce").astype(int)
    for c in ("run_id", "config_id", "family", "norm", "optimizer", "task"):
        runs[c] = runs[c].astype(str)
    for c in BASELINE_COLUMNS:
        runs[c] = pd.to_numeric(runs[c], errors="coerce").astype(float)
    # cross-validation groups: a model's learning rates (ladder corpora) or a config's seeds
    group = runs["model_id"] if "model_id" in runs.columns else runs["config_id"]
    runs["group_id"] = group.astype(str)
    return runs.reset_index(drop=True)


def is_ladder_corpus(path: str | Path) -> bool:
    """True when ``path`` holds a ladder corpus (corpus-v2, corpus-v3): a ``layers.parquet`` beside a
    ``runs.parquet`` whose runs carry ``model_id`` (the ladder they belong to)."""
    import pyarrow.parquet as pq

    path = Path(path)
    return (path / "runs.parquet").exists() and (path / "layers.parquet").exists() and \
        "model_id" in pq.read_schema(path / "runs.parquet").names


def not_ladder_corpora(paths) -> list[str]:
    """The ``paths`` that are not ladder corpora (``is_ladder_corpus``), as given."""
    return [str(p) for p in paths if not is_ladder_corpus(p)]


def load_corpus(paths: list[str | Path] | str | Path) -> Corpus:
    """Load, validate and merge one or more corpus directories (the first is the base).

    Every source must carry ``REQUIRED_RUN_COLUMNS`` (``CorpusError`` names the missing ones).
    Rows failing ``validate_rows`` are dropped and reported with their reason; a run id already
    seen (in an earlier source or earlier in the same one) is dropped as a duplicate.

    Returns
    -------
    Corpus
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise CorpusError("no corpus given")
    frames, layer_frames, reports = [], [], []
    seen: set[str] = set()
    for p in paths:  # read and check every source before merging any
        runs, layers = read_source(p)
        check_columns(runs, layers, str(p))
        frames.append((str(p), runs, layers))
    kept_runs = []
    for src, runs, layers in frames:
        rep = ValidationReport(source=src, n_rows=len(runs))
        full = _with_aggregates(runs, layers)
        good, bad = validate_rows(full)
        rep.bad = bad
        ids = good["run_id"].astype(str)
        dup = ids.duplicated() | ids.isin(seen)
        rep.duplicates = ids[dup].tolist()
        good = good.loc[~dup.to_numpy()]
        seen.update(good["run_id"].astype(str))
        rep.n_kept = len(good)
        reports.append(rep)
        kept_runs.append(_coerce_types(good))
        if layers is not None:
            layer_frames.append(layers[layers["run_id"].astype(str).isin(set(good["run_id"].astype(str)))])
    runs = pd.concat(kept_runs, ignore_index=True)
    if runs.empty:
        raise CorpusError(f"no valid runs in {', '.join(map(str, paths))}")
    layers_all = pd.concat(layer_frames, ignore_index=True) if layer_frames else None
    return Corpus(runs=runs, layers=layers_all, reports=reports, sources=[str(p) for p in paths])
