"""The profile's schema: per-layer columns, mass bands and the one per-layer → per-model aggregation.

Needs numpy only (no torch, scipy or pandas), so that serving a predictor can read it without
loading the featurizer's heavy parts.

Examples
--------
>>> import numpy as np
>>> layers = {"m_near": np.array([0.2, 0.4]), "degenerate": np.array([False, False])}
>>> aggregate(layers, columns=["m_near"])["m_near_mean"]
0.30000000000000004
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np

# ------------------------------------------------------------------- mass bands (DESIGN §4)
#: |λ| above this is expansive (M>1); the upper edge of the near-unit band (τ_u of KSS).
EXPANSIVE = 1.05
#: lower edge of the near-unit band (M≈1: NEAR_LOW ≤ |λ| ≤ EXPANSIVE; τ_l of KSS).
NEAR_LOW = 0.90
#: |λ| below this is contractive (M<1); between it and NEAR_LOW is the intermediate band.
CONTRACTIVE = 0.80

# ------------------------------------------------------------------- per-layer table
#: Fixed column schema of ``SpectralProfile.layers``. Masses (m_*) are over the ResDMD-reliable
#: modes (over all modes when none is reliable); m_*_all are over all modes.
PROFILE_COLUMNS: list[str] = [
    "layer", "name", "m_exp", "m_near", "m_mid", "m_con", "rho", "kappa_v", "kreiss",
    "eta_nl", "reliable_fraction", "degenerate",
    "m_exp_all", "m_near_all", "m_mid_all", "m_con_all", "update_ratio", "rank",
]
#: Per-layer quantities every corpus layer table carries (the paper's and the DMD's).
CORE_AGGREGATED: list[str] = [
    "m_exp", "m_near", "m_mid", "m_con", "rho", "kappa_v", "kreiss", "eta_nl", "reliable_fraction",
]
#: Further per-layer quantities (ours): the residual update ratio and the masses over all modes.
EXTRA_AGGREGATED: list[str] = ["update_ratio", "m_exp_all", "m_near_all", "m_mid_all", "m_con_all"]
#: Every per-layer quantity that is aggregated across layers, in feature order.
AGGREGATED: list[str] = CORE_AGGREGATED + EXTRA_AGGREGATED
#: The aggregation statistics, in feature order.
STATS: tuple[str, ...] = ("mean", "max", "min", "std")
#: κ(V) and Kreiss are capped here so that features stay finite (ours).
CAP = 1e12
#: ‖Y − X‖_F / ‖X‖_F below this: the residual branch is (nearly) off, the layer is degenerate.
DEGENERATE_UPDATE = 1e-4


def aggregate_names(columns: list[str] | None = None) -> list[str]:
    """``{col}_{stat}`` for every column (default ``AGGREGATED``) and statistic, in feature order."""
    return [f"{c}_{s}" for c in (AGGREGATED if columns is None else columns) for s in STATS]


def aggregate(layers: Mapping, columns: list[str] | None = None) -> dict[str, float]:
    """Per-model aggregates of a per-layer table: the one rule, used by profiles and corpora alike.

    mean/max/min/std (ddof 0) of every column over the non-degenerate layers (every layer when all
    are degenerate), ignoring missing values; +inf counts as missing.

    Parameters
    ----------
    layers : mapping column -> array-like of shape (n_layers,)
        A dict of arrays or a DataFrame; needs ``degenerate``. A missing column gives NaN aggregates.
    columns : list of str, default ``AGGREGATED``

    Returns
    -------
    dict with ``aggregate_names(columns)`` plus ``n_layers`` and ``n_degenerate``
    """
    columns = AGGREGATED if columns is None else columns
    deg = np.asarray(layers["degenerate"], dtype=bool)
    n = deg.shape[0]
    use = ~deg if (~deg).any() else np.ones(n, dtype=bool)
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as they should
        for col in columns:
            if col in layers:
                v = np.asarray(layers[col], dtype=float)[use]
                v = np.where(v == np.inf, np.nan, v)
            else:
                v = np.full(int(use.sum()), np.nan)
            ok = ~np.isnan(v)
            if ok.any():
                w = v[ok]
                stats = (w.mean(), w.max(), w.min(), w.std())
            else:
                stats = (np.nan,) * 4
            for s, val in zip(STATS, stats):
                out[f"{col}_{s}"] = float(val)
    out["n_layers"] = int(n)
    out["n_degenerate"] = int(deg.sum())
    return out
