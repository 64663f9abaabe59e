"""Feature matrix: init-time profile aggregates + the training config (DESIGN §8).

The profile does not depend on the learning rate; the label does. So the config-aware predictor
sees both: the aggregates ``{col}_{mean,max,min,std}`` of every per-layer column in
``featurize.schema.AGGREGATED`` (one rule, ``featurize.schema.aggregate``), plus
``n_layers``/``n_degenerate``, and the config as ``log10_lr``, ``warmup``, ``log2_batch_size``,
``steps``, ``d_model`` (width) and a one-hot of the optimizer (``opt_<name>``, vocabulary fixed at
fit time).

Kept free of pandas, scikit-learn, xgboost and mlflow: ``risk predict`` imports it.
"""
from __future__ import annotations

import math

import numpy as np

from featurize.schema import EXTRA_AGGREGATED, aggregate_names

#: Config features besides the optimizer one-hot, in order.
CONFIG_FEATURES = ["log10_lr", "warmup", "log2_batch_size", "steps", "d_model"]
#: Feature magnitudes are clipped here (float32-safe; trees only see the order).
FEATURE_LIMIT = 1e30
#: Paper's config-free score.
PAPER_SCORE = "m_near_mean"


def config_first(name: str) -> int:
    """Sort key putting config features (the user's knobs) before profile features."""
    return 0 if name in CONFIG_FEATURES or name.startswith("opt_") else 1


def profile_feature_names() -> list[str]:
    return aggregate_names() + ["n_layers", "n_degenerate"]


def config_feature_names(optimizers: list[str]) -> list[str]:
    return CONFIG_FEATURES + [f"opt_{o}" for o in optimizers]


def feature_names(optimizers: list[str], *, with_config: bool = True) -> list[str]:
    """All feature names in matrix order."""
    return profile_feature_names() + (config_feature_names(optimizers) if with_config else [])


def n_rows(table) -> int:
    """Rows of a DataFrame or of a mapping column -> array (every column the same length)."""
    if hasattr(table, "index"):
        return len(table.index)
    return len(np.atleast_1d(np.asarray(next(iter(table.values()))))) if len(table) else 0


def feature_matrix(table, names: list[str]) -> np.ndarray:
    """The feature matrix, columns ``names``, from a table of runs (corpus rows or a predict request).

    Parameters
    ----------
    table : DataFrame, or mapping column -> array-like of shape (n_rows,)
        The profile aggregates and raw config columns (``lr``, ``warmup``, ``batch_size``,
        ``steps``, ``d_model``, ``n_layers``, ``optimizer``).
    names : list of str, from ``feature_names``

    Returns
    -------
    ndarray of shape (n_rows, len(names)), float; ±inf are missing (NaN) and magnitudes are clipped
    to ``FEATURE_LIMIT`` (κ(V) of a near-defective layer can exceed float32, which XGBoost uses)
    """
    n = n_rows(table)
    cols: list[np.ndarray] = []
    for name in names:
        if name == "log10_lr":
            lr = np.asarray(table["lr"], dtype=float)
            if (lr <= 0).any():
                raise ValueError(f"learning rates must be > 0, got {lr[lr <= 0][0]}")
            col = np.log10(lr)
        elif name == "log2_batch_size":
            col = np.log2(np.asarray(table["batch_size"], dtype=float))
        elif name.startswith("opt_"):
            opt = np.char.lower(np.asarray(table["optimizer"]).astype(str))
            col = (opt == name[4:]).astype(float)
        elif name in table:
            col = _to_float(table[name])
        elif name.rsplit("_", 1)[0] in EXTRA_AGGREGATED:
            col = np.full(n, np.nan)  # a corpus without a layer table: XGBoost treats it as missing
        else:
            raise ValueError(f"feature {name!r} cannot be built: column missing from the input")
        cols.append(np.broadcast_to(col, (n,)))
    arr = np.column_stack(cols).astype(float) if names else np.empty((n, 0))
    arr[np.isinf(arr)] = np.nan
    np.clip(arr, -FEATURE_LIMIT, FEATURE_LIMIT, out=arr)
    return arr


def _to_float(values) -> np.ndarray:
    """Numbers as floats; anything that is not a number becomes NaN (as ``pd.to_numeric(errors="coerce")``)."""
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        import pandas as pd

        return pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce").to_numpy(dtype=float)


def build_features(table, names: list[str]):
    """``feature_matrix`` as a DataFrame (columns ``names``, the table's index when it has one)."""
    import pandas as pd

    return pd.DataFrame(feature_matrix(table, names), index=getattr(table, "index", None), columns=list(names))


def request_table(aggregates: dict, *, lrs: list[float], optimizer: str, warmup: float, batch_size: float,
                  steps: float, d_model: float) -> dict[str, np.ndarray]:
    """One row per learning rate: the model's profile aggregates + a training config, as
    ``{column: array of shape (len(lrs),)}`` (what ``feature_matrix`` reads; no pandas)."""
    for lr in lrs:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lr must be a positive number, got {lr}")
    n = len(lrs)
    table = {k: np.full(n, np.nan if v is None else v) for k, v in aggregates.items()}
    table.update(lr=np.asarray(lrs, dtype=float), optimizer=np.full(n, optimizer),
                 warmup=np.full(n, float(warmup)), batch_size=np.full(n, float(batch_size)),
                 steps=np.full(n, float(steps)), d_model=np.full(n, float(d_model)))
    return table


def infer_width(model) -> int | None:
    """Residual width d of a network: its config (d_model / n_embd / hidden_size), else its first
    embedding's dimension."""
    from torch import nn

    for obj in (getattr(model, "cfg", None), getattr(model, "config", None)):
        for attr in ("d_model", "n_embd", "hidden_size"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, int) and v > 0:
                return v
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return int(emb.embedding_dim) if emb is not None else None


#: Families of the sweep zoo whose blocks hold no attention (a predictor trained on one of them
#: covers attention-free networks).
ATTENTION_FREE_FAMILIES = frozenset({"mamba"})


def training_domain_problem(model, families=()) -> str | None:
    """Why ``model`` lies outside what the predictor was trained on (token-embedding language models,
    transformers unless an attention-free family such as mamba was in the corpus, image transformers
    when an image family such as vit was), or None.

    Parameters
    ----------
    model : nn.Module
    families : iterable of str
        The training corpus's model families (predictor metadata ``families``).
    """
    from torch import nn

    from .zoo import IMAGE_FAMILIES

    families = sorted(families or ())
    what = f"the {', '.join(families)} networks" if families else "transformer language models"
    name = type(model).__name__
    has_attention = any(isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
                        for m in model.modules())
    if not any(isinstance(m, nn.Embedding) for m in model.modules()):
        if has_attention and set(families) & set(IMAGE_FAMILIES):
            return None  # an image transformer, and the corpus holds one (vit)
        return f"{name} has no token embedding: it is not one of {what} the predictor was trained on"
    if not has_attention and not (set(families) & ATTENTION_FREE_FAMILIES):
        return f"{name} has no attention layers: it is not one of {what} the predictor was trained on"
    return None
