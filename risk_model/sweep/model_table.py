"""``models.parquet`` of a ladder corpus: one row per model, its stability boundary and its
init-time ``forward`` and ``gradient`` features (``risk_model.init_features``).

Models are rebuilt from their config (``torch.manual_seed(seed)``, then ``archs.build_network``),
so features can be added without retraining. The rebuilt model's loss on the run's first batch is
compared with the stored ``init_loss``: the relative difference is kept in
``rebuild_loss_rel_err`` and ``rebuild_ok`` says whether it is within ``REBUILD_TOL``. Resumable: models already
in the table are kept.

    python -m risk_model.sweep.model_table datasets/corpus-v2 [--curvature]

``--curvature`` also fills the candidate curvature group (``add_curvature``; about 1–4 CPU-s per
corpus-v2 model).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from .ladder import MODEL_KEYS

MODELS = "models.parquet"
#: per-model columns copied from the runs table (constant within a model)
MODEL_COLUMNS = (["model_id"] + list(MODEL_KEYS)
                 + ["task", "optimizer", "warmup", "grad_clip", "weight_decay", "batch_size", "steps",
                    "kss_alpha", "kss_every", "profile_samples", "profile_rank", "kreiss_grid",
                    "n_params", "lr_stable_max", "lr_diverge_min", "bracketed", "n_rungs_run"])


#: relative difference of the rebuilt model's initial loss from the stored one above which the
#: rebuild is not trusted (float reductions differ between processes far below this)
REBUILD_TOL = 1e-3


def model_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per model: ``MODEL_COLUMNS`` plus ``dead_at_init`` and the runs' LRs."""
    if "horizon_of" in runs:  # a full-ladder corpus: the model's recipe is its full-length run's
        runs = runs[runs["horizon_of"].isna() | (runs["steps"] == runs["horizon_of"])]
    g = runs.groupby("model_id", sort=True)
    out = g.first()[[c for c in MODEL_COLUMNS if c != "model_id" and c in runs.columns]].copy()
    out["dead_at_init"] = g["dead_at_init"].any()
    out["init_loss"] = g["init_loss"].first()
    return out.reset_index()


def rebuild(row: pd.Series):
    """The model of a corpus row at its initial weights, and its run config."""
    import torch

    from .archs import build_network
    from .spec import RunConfig

    fields = set(RunConfig.__dataclass_fields__)
    cfg = RunConfig(**{k: (row[k].item() if hasattr(row[k], "item") else row[k])
                       for k in fields if k in row.index})
    torch.manual_seed(cfg.seed)
    return build_network(cfg.model_args()), cfg


def features_of(row: pd.Series) -> dict:
    """``init_features`` of one corpus model, after checking the rebuild reproduces ``init_loss``."""
    import torch

    from ..init_features import init_features
    from .archs import logits_of
    from .trainer import make_run_task

    model, cfg = rebuild(row)
    task = make_run_task(cfg)
    x, y = task.batch()
    with torch.no_grad():
        loss = float(task.loss(logits_of(model(x)), y))
    stored = float(row["init_loss"])
    rel = abs(loss - stored) / abs(stored) if math.isfinite(loss) and math.isfinite(stored) else 0.0
    if math.isfinite(loss) != math.isfinite(stored):
        rel = math.inf
    # recorded, not hidden: a network whose rebuild does not reproduce the stored initial loss
    # (``rebuild_ok`` False: relative error > REBUILD_TOL) is left out of training predictors
    return {**init_features(model, seed=0), "rebuild_loss_rel_err": rel, "rebuild_ok": bool(rel <= REBUILD_TOL)}


def curvature_of(row: pd.Series) -> dict:
    """``init_features.curvature_features`` of one corpus model at its initial weights, for its
    optimizer (the candidate ``curvature`` group; on the serving probe, as ``risk predict`` would)."""
    from ..init_features import curvature_features

    model, cfg = rebuild(row)
    return curvature_features(model, optimizer=cfg.optimizer, eps=cfg.eps, seed=0)


def add_curvature(corpus: str | Path, progress: bool = True, every: int = 25) -> pd.DataFrame:
    """Fill the curvature columns of ``corpus/models.parquet`` for the models that lack them
    (resumable: the table is written atomically every ``every`` models)."""
    from ..init_features import curvature_feature_names
    from ..serve import single_threaded
    from .runner import write_parquet_atomic

    path = Path(corpus) / MODELS
    table = pd.read_parquet(path)
    cols = curvature_feature_names() + ["curvature_top_eig", "seconds_eos", "seconds_line"]
    for c in cols:
        if c not in table.columns:
            table[c] = math.nan
    todo = [i for i in table.index if not math.isfinite(float(table.at[i, "seconds_line"]))]
    with single_threaded():
        for k, i in enumerate(todo):
            row = table.loc[i]
            feats = curvature_of(row) if not bool(row.get("dead_at_init", False)) else {}
            for c in cols:
                table.at[i, c] = feats.get(c, math.nan)
            if not feats:
                table.at[i, "seconds_line"] = 0.0        # dead at init: nothing to measure, marked done
            if (k + 1) % every == 0 or k + 1 == len(todo):
                write_parquet_atomic(table, path, "models")
                if progress:
                    print(f"[curvature] {k + 1}/{len(todo)}", file=sys.stderr, flush=True)
    return table


def structure_of(row: pd.Series) -> float:
    """``residual_stages`` of one corpus model (``featurize.capture.residual_stages``, measured on
    the rebuilt network as ``init_features`` measures it when serving)."""
    from ..init_features import init_features

    model, _ = rebuild(row)
    return float(init_features(model, seed=0)["residual_stages"])


def build_model_table(corpus: str | Path, progress: bool = True) -> pd.DataFrame:
    """Compute (or extend) ``corpus/models.parquet``; returns the table."""
    from ..serve import single_threaded
    from .runner import load_corpus, write_parquet_atomic

    corpus = Path(corpus)
    runs, _ = load_corpus(corpus)
    rows = model_rows(runs)
    path = corpus / MODELS
    have = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["model_id"])
    todo = rows[~rows["model_id"].isin(set(have["model_id"]))]
    feats = []
    with single_threaded():                      # features must not depend on the thread count
        for i, (_, r) in enumerate(todo.iterrows()):
            feats.append({"model_id": r["model_id"], **features_of(r)})
            if progress and (i + 1) % 25 == 0:
                print(f"[models] {i + 1}/{len(todo)}", file=sys.stderr, flush=True)
        # a table written before the structure feature existed: measure it on every model once
        if len(have) and "residual_stages" not in have.columns:
            have = have.copy()
            have["residual_stages"] = [structure_of(r) for _, r in have.iterrows()]
            feats_added = True
        else:
            feats_added = False
    new = todo.merge(pd.DataFrame(feats), on="model_id") if feats else None
    if new is None:
        table = have.copy()
    else:
        table = pd.concat([have, new], ignore_index=True) if len(have) else new
    table = table[table["model_id"].isin(set(rows["model_id"]))].reset_index(drop=True)
    # the per-model columns always follow the runs (features are kept): a table written before a
    # rule here changed (e.g. the full-length run's steps) is brought up to date
    fresh = rows.set_index("model_id")
    cols = [c for c in fresh.columns if c in table.columns]
    before = table[cols].copy()
    for c in cols:
        table[c] = table["model_id"].map(fresh[c]).astype(fresh[c].dtype)
    changed = not before.astype(str).equals(table[cols].astype(str))
    if feats or feats_added or changed or len(table) != len(have):  # nothing new: leave the file as it is
        write_parquet_atomic(table, path, "models")
    return table


if __name__ == "__main__":
    t = build_model_table(sys.argv[1])
    if "--curvature" in sys.argv[2:]:
        t = add_curvature(sys.argv[1])
    print(f"{len(t)} models in {Path(sys.argv[1]) / MODELS}")
