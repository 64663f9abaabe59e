"""Predictor v2: the critical learning rate of a network, and P(divergence) as a threshold in it.

The model
    Each network (architecture + init + training recipe) has a critical learning rate lr*: runs
    below it are stable, runs above diverge. We model ln lr* = f(x) + b + s·ε with ε standard
    logistic, so

        P(divergence | x, lr) = σ((ln lr − f(x) − b) / s)

    is monotone in the learning rate by construction and keeps rising beyond the corpus's LR
    range. f is a gradient-boosted regressor (XGBoost ``survival:aft``) fitted on the *interval-
    censored* boundaries of the corpus's LR ladders: lr* ∈ (lr_stable_max, lr_diverge_min], right-
    censored (lr_stable_max, ∞) when the top rung was stable, left-censored (0, lr_diverge_min]
    when even the bottom rung diverged. (b, s) are fitted afterwards on out-of-fold f (grouped
    K-fold) by maximum likelihood of the observed run labels, so the probabilities are calibrated
    on networks the booster did not see.

    ``max_safe_lr(threshold)`` = exp(f + b + s·logit(threshold)), the largest LR with P below the
    threshold; its 80% interval is that of lr*: exp(f + b + s·logit(0.1 … 0.9)).

Features (named groups, all at initialisation, no optimizer step; no family or norm label)
    config   : optimizer one-hot, warmup fraction, clipping, weight decay, log2 batch, steps,
               log2 width, depth, log10 parameter count, measured log10 RMS of the weights per
               group (``init_features``)
    forward  : ``init_features.forward_feature_names()``
    gradient : ``init_features`` gradient norms per group (ours)
    spectral : RKSP profile aggregates over all layers and over the first/middle/last third of
               depth
Missing features (a group not computed, a network without an embedding) are NaN, which the
booster routes by its learned default.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from featurize.schema import aggregate

from .init_features import GROUPS as PARAM_GROUPS
from .init_features import forward_feature_names

OPTIMIZERS = ("adamw", "lion", "sgd")
SPECTRAL_COLUMNS = ["m_exp", "m_near", "m_con", "rho", "kappa_v", "kreiss", "eta_nl",
                    "reliable_fraction"]
THIRDS = ("early", "mid", "late")


def _config_names() -> list[str]:
    return ([f"opt_{o}" for o in OPTIMIZERS]
            + ["warmup_fraction", "grad_clip", "weight_decay", "log2_batch_size", "steps",
               "log2_d_model", "n_layers", "log10_n_params"]
            + [f"log10_rms_w_{g}" for g in PARAM_GROUPS])


def _spectral_names() -> list[str]:
    out = []
    for c in SPECTRAL_COLUMNS:
        out += [f"{c}_mean", f"{c}_max", f"{c}_min"]
        out += [f"{c}_{t}" for t in THIRDS]
    return out + ["n_degenerate_fraction"]


FEATURE_GROUPS: dict[str, list[str]] = {
    "config": _config_names(),
    "forward": forward_feature_names(),
    "gradient": ["log10_grad_norm"] + [f"log10_grad_{g}" for g in PARAM_GROUPS]
                + [f"log10_grad_rel_{g}" for g in PARAM_GROUPS],
    "spectral": _spectral_names(),
}


def spectral_features(layers) -> dict[str, float]:
    """Spectral group of one network from its per-layer profile (a DataFrame or dict of arrays in
    depth order): mean/max/min over the non-degenerate layers and the mean over each third of depth
    (relative depth, so networks of different depth compare)."""
    agg = aggregate(layers, columns=SPECTRAL_COLUMNS)  # mean/max/min over the non-degenerate layers
    deg = np.asarray(layers["degenerate"], dtype=bool)
    n = deg.shape[0]
    idx = np.arange(n)
    thirds = np.array_split(idx, 3) if n >= 3 else [idx, idx, idx]
    out: dict[str, float] = {}
    for c in SPECTRAL_COLUMNS:
        for stat in ("mean", "max", "min"):
            out[f"{c}_{stat}"] = agg[f"{c}_{stat}"]
        v = np.asarray(layers[c], dtype=float) if c in layers else np.full(n, np.nan)
        for t, part in zip(THIRDS, thirds):  # every layer of the third, degenerate or not
            w = v[part][np.isfinite(v[part])]
            out[f"{c}_{t}"] = float(w.mean()) if w.size else math.nan
    for c in ("kappa_v", "kreiss"):  # heavy-tailed: compare orders of magnitude
        for k in [k for k in out if k.startswith(c + "_")]:
            out[k] = math.log10(out[k]) if out[k] > 0 else math.nan
    out["n_degenerate_fraction"] = float(deg.mean()) if n else math.nan
    return out


def config_features(*, optimizer: str, warmup: float, steps: float, grad_clip: float,
                    weight_decay: float, batch_size: float, d_model: float, n_layers: float,
                    init: dict) -> dict[str, float]:
    """Config group: the user's training recipe and what is read off the network (``init`` holds
    ``log10_n_params`` and ``log10_rms_w_*`` from ``init_features``)."""
    out = {f"opt_{o}": float(optimizer == o) for o in OPTIMIZERS}
    out.update(warmup_fraction=float(warmup) / max(float(steps), 1.0), grad_clip=float(grad_clip),
               weight_decay=float(weight_decay), log2_batch_size=math.log2(max(float(batch_size), 1.0)),
               steps=float(steps), log2_d_model=math.log2(max(float(d_model), 1.0)),
               n_layers=float(n_layers), log10_n_params=float(init.get("log10_n_params", math.nan)))
    for g in PARAM_GROUPS:
        out[f"log10_rms_w_{g}"] = float(init.get(f"log10_rms_w_{g}", math.nan))
    return out


def _logistic_cdf(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


@dataclass
class CriticalLRModel:
    """ln lr* = f(x) + b + s·logistic noise; f by XGBoost AFT on interval-censored boundaries.

    Parameters
    ----------
    groups : feature groups used (keys of ``FEATURE_GROUPS``)
    n_estimators, max_depth, learning_rate, min_child_weight, subsample : booster settings
    n_splits : grouped folds for the out-of-fold f that (b, s) are fitted on
    random_state : seed of the folds and the booster

    Fitted attributes
    -----------------
    feature_names_ : list of str
    booster_ : xgboost.Booster (or ``booster_json_``: its JSON, when loaded)
    shift_, scale_ : b and s
    oof_log_lr_ : out-of-fold f + b per training network (ln lr*)
    """

    groups: tuple[str, ...] = ("config", "forward", "gradient", "spectral")
    n_estimators: int = 400
    max_depth: int = 3
    learning_rate: float = 0.05
    min_child_weight: float = 2.0
    subsample: float = 0.8
    n_splits: int = 5
    random_state: int = 0
    feature_names_: list = field(default_factory=list, init=False, repr=False)

    def _params(self) -> dict:
        return {"objective": "survival:aft", "eval_metric": "aft-nloglik",
                "aft_loss_distribution": "logistic", "aft_loss_distribution_scale": 1.0,
                "tree_method": "hist", "max_depth": self.max_depth, "eta": self.learning_rate,
                "min_child_weight": self.min_child_weight, "subsample": self.subsample,
                "seed": self.random_state, "nthread": 1}

    def _matrix(self, X) -> np.ndarray:
        """Features in model order from a DataFrame or a mapping column -> array."""
        n = len(next(iter(X.values()))) if isinstance(X, dict) else len(X)
        cols = [np.asarray(X[c], dtype=float).reshape(-1) if c in X else np.full(n, np.nan)
                for c in self.feature_names_]
        M = np.column_stack(cols) if cols else np.zeros((len(X), 0))
        return np.where(np.isfinite(M), np.clip(M, -1e30, 1e30), np.nan)

    def _fit_booster(self, M, lo, hi):
        import xgboost as xgb

        d = xgb.DMatrix(M, feature_names=self.feature_names_)
        d.set_float_info("label_lower_bound", lo)
        d.set_float_info("label_upper_bound", hi)
        return xgb.train(self._params(), d, num_boost_round=self.n_estimators)

    @staticmethod
    def _margin(booster, M, names) -> np.ndarray:
        import xgboost as xgb

        return booster.predict(xgb.DMatrix(M, feature_names=names), output_margin=True)

    def fit(self, X, lr_low, lr_high, *, runs_model_index, runs_lr, runs_diverged,
            groups=None) -> "CriticalLRModel":
        """Fit f on networks ``X`` (one row each) with lr* ∈ (lr_low, lr_high] (0 / inf when
        censored), then (b, s) on the runs (network row index, lr, diverged) with out-of-fold f.

        ``groups`` (default: one per network) keeps related networks in one fold.
        """
        from scipy.optimize import minimize
        from sklearn.model_selection import GroupKFold

        self.feature_names_ = [c for g in self.groups for c in FEATURE_GROUPS[g]]
        M = self._matrix(X)
        lo = np.asarray(lr_low, dtype=float)
        hi = np.asarray(lr_high, dtype=float)
        n = len(M)
        g = np.arange(n) if groups is None else np.asarray(groups)
        oof = np.full(n, np.nan)
        k = min(self.n_splits, len(np.unique(g)))
        for tr, te in GroupKFold(n_splits=k, shuffle=True, random_state=self.random_state).split(M, groups=g):
            b = self._fit_booster(M[tr], lo[tr], hi[tr])
            oof[te] = self._margin(b, M[te], self.feature_names_)
        ri = np.asarray(runs_model_index, dtype=int)
        z_lr = np.log(np.asarray(runs_lr, dtype=float))
        y = np.asarray(runs_diverged, dtype=float)

        def nll(theta):
            b, log_s = theta
            p = np.clip(_logistic_cdf((z_lr - oof[ri] - b) / np.exp(log_s)), 1e-9, 1 - 1e-9)
            return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

        res = minimize(nll, x0=np.array([0.0, 0.0]), method="Nelder-Mead",
                       options=dict(xatol=1e-6, fatol=1e-9, maxiter=2000))
        self.shift_, self.scale_ = float(res.x[0]), float(np.exp(res.x[1]))
        self.oof_log_lr_ = oof + self.shift_
        self.booster_ = self._fit_booster(M, lo, hi)
        self.booster_json_ = None
        return self

    # ------------------------------------------------------------------ prediction
    def log_critical_lr(self, X) -> np.ndarray:
        """f(x) + b: the median of ln lr* per network. A loaded model evaluates its trees in numpy
        (``booster.TreeEnsemble``; no xgboost import), a freshly fitted one with xgboost."""
        M = self._matrix(X)
        if getattr(self, "booster_", None) is None:
            from .booster import TreeEnsemble

            if getattr(self, "_trees", None) is None:
                self._trees = TreeEnsemble.from_json(self.booster_json_)
            return self._trees.predict_margin(M).astype(float) + self.shift_
        return self._margin(self.booster_, M, self.feature_names_) + self.shift_

    def proba_at(self, X, lr) -> np.ndarray:
        """P(divergence) of each network at each LR: array (n_networks, n_lr)."""
        z = self.log_critical_lr(X)[:, None]
        return _logistic_cdf((np.log(np.atleast_1d(np.asarray(lr, dtype=float)))[None, :] - z) / self.scale_)

    def max_safe_lr(self, X, threshold: float = 0.5, interval: float = 0.8) -> dict[str, np.ndarray]:
        """Largest LR with P < ``threshold``, and the central ``interval`` of lr* per network."""
        z = self.log_critical_lr(X)
        q = (1 - interval) / 2
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        return dict(max_safe_lr=np.exp(z + self.scale_ * logit(threshold)),
                    low=np.exp(z + self.scale_ * logit(q)), high=np.exp(z + self.scale_ * logit(1 - q)))

    # ------------------------------------------------------------------ JSON (no pickle)
    def to_dict(self) -> dict:
        raw = self.booster_.save_raw("json").decode() if getattr(self, "booster_", None) is not None \
            else self.booster_json_
        return dict(kind="critical_lr_aft", groups=list(self.groups), feature_names=self.feature_names_,
                    shift=self.shift_, scale=self.scale_, booster=json.loads(raw),
                    params=dict(n_estimators=self.n_estimators, max_depth=self.max_depth,
                                learning_rate=self.learning_rate, n_splits=self.n_splits,
                                random_state=self.random_state))

    @classmethod
    def from_dict(cls, d: dict) -> "CriticalLRModel":
        if d.get("kind") != "critical_lr_aft":
            raise ValueError(f"not a critical-LR model (kind {d.get('kind')!r})")
        m = cls(groups=tuple(d["groups"]), **d.get("params", {}))
        m.feature_names_ = list(d["feature_names"])
        m.shift_, m.scale_ = float(d["shift"]), float(d["scale"])
        m.booster_ = None
        m.booster_json_ = json.dumps(d["booster"])
        m._trees = None
        return m

    def save(self, path) -> "Path":
        """Write ``critical_lr.json`` (plus ``metadata.json`` from ``metadata_``) into directory ``path``."""
        from pathlib import Path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "critical_lr.json").write_text(json.dumps(self.to_dict()))
        (path / "metadata.json").write_text(json.dumps(getattr(self, "metadata_", {}), indent=2))
        return path

    @classmethod
    def load(cls, path) -> "CriticalLRModel":
        """Read a directory written by ``save``; ``PredictorError`` names a missing or corrupt file."""
        from pathlib import Path

        from .errors import PredictorError

        path = Path(path)
        for name in ("critical_lr.json", "metadata.json"):
            f = path / name
            try:
                d = json.loads(f.read_text())
            except FileNotFoundError:
                raise PredictorError(f"{f}: missing (a critical-LR predictor directory holds "
                                     "critical_lr.json and metadata.json)") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PredictorError(f"{f}: not valid JSON ({e})") from None
            if name == "critical_lr.json":
                try:
                    m = cls.from_dict(d)
                except (KeyError, TypeError, ValueError) as e:
                    raise PredictorError(f"{f}: not a critical-LR model ({e})") from None
            else:
                m.metadata_ = d
        return m
