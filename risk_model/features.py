"""Feature matrix: init-time profile aggregates + the training config (DESIGN §8).

The profile does not depend on the learning rate; the label does. So the config-aware predictor
sees both: the aggregates ``{col}_{mean,max,min,std}`` of ``featurize.AGGREGATED`` and of
``EXTRA_AGGREGATED`` (per-layer columns of the profile that the featurizer does not aggregate:
the residual update ratio and the masses over all modes; same rule, non-degenerate layers), plus
``n_layers``/``n_degenerate``, and the config as ``log10_lr``, ``warmup``, ``log2_batch_size``,
``steps``, ``d_model`` (width) and a one-hot of the optimizer (``opt_<name>``, vocabulary fixed at
fit time).

Kept free of scikit-learn, xgboost and mlflow: ``risk predict`` imports it.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: Config features besides the optimizer one-hot, in order.
CONFIG_FEATURES = ["log10_lr", "warmup", "log2_batch_size", "steps", "d_model"]
#: Feature magnitudes are clipped here (float32-safe; trees only see the order).
FEATURE_LIMIT = 1e30
#: Paper's config-free score.
PAPER_SCORE = "m_near_mean"


#: Per-layer profile columns aggregated here besides ``featurize.AGGREGATED`` (ours).
EXTRA_AGGREGATED = ["update_ratio", "m_exp_all", "m_near_all", "m_mid_all", "m_con_all"]
STATS = ("mean", "max", "min", "std")


def config_first(name: str) -> int:
    """Sort key putting config features (the user's knobs) before profile features."""
    return 0 if name in CONFIG_FEATURES or name.startswith("opt_") else 1


def profile_feature_names() -> list[str]:
    from featurize.profile import AGGREGATED

    return [f"{c}_{s}" for c in AGGREGATED + EXTRA_AGGREGATED for s in STATS] + ["n_layers", "n_degenerate"]


def profile_aggregates(prof) -> dict:
    """The profile's own aggregates plus those of ``EXTRA_AGGREGATED``, by the corpus's rule."""
    from .corpus import aggregate_layers

    extra = aggregate_layers(prof.layers.assign(run_id=0), extra_only=True)
    return dict(prof.aggregates, **{k: float(v) for k, v in extra.iloc[0].items()})


def config_feature_names(optimizers: list[str]) -> list[str]:
    return CONFIG_FEATURES + [f"opt_{o}" for o in optimizers]


def feature_names(optimizers: list[str], *, with_config: bool = True) -> list[str]:
    """All feature names in matrix order."""
    return profile_feature_names() + (config_feature_names(optimizers) if with_config else [])


def build_features(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The feature frame, columns ``names``, from a table of runs (corpus rows or a predict request).

    Parameters
    ----------
    table : DataFrame with the profile aggregates and raw config columns (``lr``, ``warmup``,
        ``batch_size``, ``steps``, ``d_model``, ``n_layers``, ``optimizer``)
    names : list of str, from ``feature_names``

    Returns
    -------
    DataFrame of shape (n_rows, len(names)), float; ±inf are missing (NaN) and magnitudes are clipped
    to ``FEATURE_LIMIT`` (κ(V) of a near-defective layer can exceed float32, which XGBoost uses)
    """
    cols: dict[str, np.ndarray] = {}
    n_rows = len(table)
    for n in names:
        if n == "log10_lr":
            lr = table["lr"].to_numpy(dtype=float)
            if (lr <= 0).any():
                raise ValueError(f"learning rates must be > 0, got {lr[lr <= 0][0]}")
            cols[n] = np.log10(lr)
        elif n == "log2_batch_size":
            cols[n] = np.log2(table["batch_size"].to_numpy(dtype=float))
        elif n.startswith("opt_"):
            cols[n] = (table["optimizer"].astype(str).str.lower() == n[4:]).to_numpy(dtype=float)
        elif n in table:
            cols[n] = pd.to_numeric(table[n], errors="coerce").to_numpy(dtype=float)
        elif n.rsplit("_", 1)[0] in EXTRA_AGGREGATED:
            cols[n] = np.full(n_rows, np.nan)  # a corpus without a layer table: XGBoost treats it as missing
        else:
            raise ValueError(f"feature {n!r} cannot be built: column missing from the input")
    arr = np.column_stack([cols[n] for n in names]) if names else np.empty((n_rows, 0))
    arr[np.isinf(arr)] = np.nan
    np.clip(arr, -FEATURE_LIMIT, FEATURE_LIMIT, out=arr)
    return pd.DataFrame(arr, index=table.index, columns=list(names))


def request_table(aggregates: dict, *, lrs: list[float], optimizer: str, warmup: float, batch_size: float,
                  steps: float, d_model: float) -> pd.DataFrame:
    """One row per learning rate: the model's profile aggregates + a training config."""
    rows = []
    for lr in lrs:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lr must be a positive number, got {lr}")
        rows.append(dict(aggregates, lr=float(lr), optimizer=optimizer, warmup=float(warmup),
                         batch_size=float(batch_size), steps=float(steps), d_model=float(d_model)))
    return pd.DataFrame(rows)


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
