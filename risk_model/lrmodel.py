"""Predictor v3: the learning rates of a recipe — where training fails, where it diverges, which is best.

The model (DESIGN §8 v3, docs/method.md)
    Every network with its training recipe has three learning rates on the ladder: ``lr_fail``
    (the smallest LR whose run *failed*, ``labels.failed``), ``lr_diverge`` (the paper's label) and
    ``lr_best`` (the LR of the best final loss). Each is interval-censored by the ladder's rungs
    (``labels.ladder_summary``). For each target t we model

        ln lr_t = z(x)·β_t + g_t(u(x)) + b_t + s_t·ε,    ε standard logistic,

    where z = [optimizer one-hot, synthetic task, ln width, ln depth, ln steps, ln batch, ln seq_len] (the scale
    axes centred) is a *linear* scale part — it keeps moving outside the corpus's range of widths,
    depths, horizons and batches, where trees are flat; served with the task term at 0 (real data);
    with ``slope_rows`` the exponents of the axes those networks vary (the full-ladder corpus's scale
    ladders) are fitted on them alone — and g_t are boosted trees (XGBoost ``survival:aft``, fitted with
    the linear part as base margin) on dimensionless features u only (init scale × √width, update
    ratios, relative gradients, recipe fractions, the spectral profile). β has a Gaussian prior
    (sd ``slope_prior_sd`` per unit of ln axis) and its Laplace posterior covariance Σ widens the
    interval as a network moves away from the corpus: s_eff² = s² + 3/π² · max(0, zᵀΣz − mean
    over the corpus). An axis that does not vary in the corpus (steps in corpus-v2) keeps its prior:
    slope 0 and a widening interval — we do not invent its effect.

    (b_t, s_t) are fitted on out-of-fold margins whose folds hold out whole architecture classes
    (``groups``), so the probabilities are calibrated on networks of classes the trees did not see:
    by maximum likelihood of the runs' binary labels (``failed``, ``diverged``), or, for lr_best, of
    its bracket.

    P(failed | lr) = max(F((ln lr − μ_fail)/s_fail), F((ln lr − μ_div)/s_div)) (a diverged run has
    failed; the max of two monotone curves is monotone), P(diverged | lr) = F((ln lr − μ_div)/s_div).
    ``max_safe_lr`` = the largest LR with P(failed) < threshold; the recommended LR is the median of
    lr_best, capped at ``max_safe_lr``.

Serving needs numpy only: trees are evaluated by ``booster.TreeEnsemble`` from their JSON, during
fitting as well (one prediction path). The training-side helpers (``ladder_targets``,
``network_table``) import pandas lazily.
"""
from __future__ import annotations

import json
import math

import numpy as np

from .init_features import GROUPS as PARAM_GROUPS
from .init_features import curvature_feature_names, forward_feature_names

OPTIMIZERS = ("adamw", "lion", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
#: the scale axes of the linear part: (feature column, recipe key)
SCALE_AXES = (("ln_d_model", "d_model"), ("ln_n_layers", "n_layers"), ("ln_steps", "steps"),
              ("ln_batch_size", "batch_size"), ("ln_seq_len", "seq_len"))
SCALE_COLUMNS = [c for c, _ in SCALE_AXES]
#: the scale axes of predictors saved before the sequence axis (their ``scale_axes``)
LEGACY_SCALE_COLUMNS = SCALE_COLUMNS[:4]
#: optimizer hyper-parameters of the corpus-v2 trainer (``sweep/trainer.py``): AdamW β2 0.95, eps
#: torch's 1e-8; Lion β2 0.99, no eps; SGD neither. Used when a corpus has no such column.
CORPUS_BETA2 = {"adamw": 0.95, "lion": 0.99}
CORPUS_EPS = {"adamw": 1e-8}
TARGETS = ("fail", "best", "diverge")
#: a scale axis takes its slope from the ``slope_rows`` of a fit when they hold this many distinct
#: values of it (``LogLRModel._fit_scale``): two suffice, since a full-ladder model read at two
#: horizons (or one architecture at two widths) is a within-architecture contrast that identifies
#: the exponent, which a pooled fit across corpora does not (leave-largest-out, fitted on 300 and
#: 1000 steps: median |log10 error| of lr_fail 0.84 with 2, 1.06 with 3; docs/method.md)
MIN_LADDER_VALUES = 2
#: the corpus tasks whose data are generated (``sweep.tasks``); the others (byte-level text, digits)
#: are real data. The linear part has a term for a synthetic task, and ``risk predict`` answers for
#: real data (term 0): corpus-v2, synthetic only, then still teaches the architecture and optimizer
#: effects while real data set the level.
SYNTHETIC_TASKS = ("assoc_recall", "synthetic_lm")
#: the corpus tasks on images (``sweep.tasks`` reads them here): a sequence length does not apply
IMAGE_TASKS = ("digits",)
TASK_COLUMN = "task_synthetic"
#: the block-structure term of the linear part: ln of the serial residual stages per block
#: (``featurize.capture.residual_stages``: 2 for attention-then-MLP, 1 for a parallel block or a
#: single mixer). Held out by class on corpus-v2 + corpus-v3 it moved the median |log10 error| of
#: lr_fail from 0.41 to 0.34 on corpus-v3's networks that learn (docs/method.md)
STRUCTURE_COLUMN = "ln_residual_stages"
#: a ladder read at a shorter horizon than its runs' full length has the id ``<model_id>@<steps>``
#: (``heldout_v3.horizon_ladders``); its init-time profile is its model's
HORIZON_SEP = "@"


def parent_model_id(model_id) -> str:
    """The model a ladder belongs to: ``model_id`` without its ``@<steps>`` horizon."""
    return str(model_id).split(HORIZON_SEP)[0]


#: the recipe knobs of ``risk predict`` and the feature columns each one moves (``recipe_features``)
KNOB_FEATURES = {
    "warmup": ("warmup_fraction",), "grad_clip": ("grad_clip",), "weight_decay": ("weight_decay",),
    "schedule": tuple(f"schedule_{s}" for s in SCHEDULES), "beta2": ("log10_one_minus_beta2",),
    "eps": ("log10_eps",), "optimizer": tuple(f"opt_{o}" for o in OPTIMIZERS),
}


def _config_names() -> list[str]:
    return ([f"opt_{o}" for o in OPTIMIZERS] + [f"schedule_{s}" for s in SCHEDULES]
            + ["warmup_fraction", "grad_clip", "weight_decay", "log10_one_minus_beta2", "log10_eps"]
            + [f"log10_rms_w_sqrt_d_{g}" for g in ("embed", "out", "hidden")] + ["log10_rms_w_gain"])


def _gradient_names() -> list[str]:
    return ["log10_grad_rms"] + [f"log10_grad_rel_{g}" for g in PARAM_GROUPS]


def _spectral_names() -> list[str]:
    from .threshold import FEATURE_GROUPS as V2

    return list(V2["spectral"])


#: Tree feature groups, dimensionless (no width, depth, steps, batch or parameter count) but for
#: the LR-valued curvature group.
FEATURE_GROUPS: dict[str, list[str]] = {
    "config": _config_names(),
    "forward": forward_feature_names(),
    "gradient": _gradient_names(),
    "spectral": _spectral_names(),
    # ours, a candidate: ln of the edge-of-stability LR and of the line search's overshoot and
    # minimiser along the first update (LR-valued, not dimensionless: they carry their own scale)
    "curvature": curvature_feature_names(),
}


def _f(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def recipe_features(*, optimizer: str, warmup: float, steps: float, grad_clip: float, weight_decay: float,
                    batch_size: float, d_model: float, n_layers: float, schedule: str = "constant",
                    beta2: float | None = None, eps: float | None = None,
                    task: str | None = None, seq_len: float | None = None) -> dict[str, float]:
    """The scale columns and the dimensionless config features of a recipe.

    ``task`` None: real data (``TASK_COLUMN`` 0), the case of every user's network.

    ``seq_len``: tokens per training sequence (batch counts sequences); None: unknown (NaN, which
    the model places at the corpus centre and serving flags).

    ``beta2``/``eps`` None: the corpus trainer's value for the optimizer (``CORPUS_BETA2``,
    ``CORPUS_EPS``; NaN where the optimizer has none).

    >>> f = recipe_features(optimizer="adamw", warmup=30, steps=300, grad_clip=1.0, weight_decay=0.0,
    ...                     batch_size=16, d_model=64, n_layers=4)
    >>> round(f["warmup_fraction"], 3), round(f["ln_d_model"], 3), f["schedule_constant"]
    (0.1, 4.159, 1.0)
    """
    opt = optimizer.lower()
    b2 = CORPUS_BETA2.get(opt, math.nan) if beta2 is None else float(beta2)
    e = CORPUS_EPS.get(opt, math.nan) if eps is None else float(eps)
    out = {f"opt_{o}": float(opt == o) for o in OPTIMIZERS}
    out[TASK_COLUMN] = float(task in SYNTHETIC_TASKS)
    out.update({f"schedule_{s}": float(schedule == s) for s in SCHEDULES})
    out.update(warmup_fraction=_f(warmup) / max(_f(steps), 1.0), grad_clip=_f(grad_clip),
               weight_decay=_f(weight_decay),
               log10_one_minus_beta2=math.log10(1 - b2) if math.isfinite(b2) and b2 < 1 else math.nan,
               log10_eps=math.log10(e) if math.isfinite(e) and e > 0 else math.nan)
    for col, key in SCALE_AXES:
        v = _f(dict(d_model=d_model, n_layers=n_layers, steps=steps, batch_size=batch_size, seq_len=seq_len)[key])
        out[col] = math.log(v) if math.isfinite(v) and v > 0 else math.nan
    return out


def init_scale_features(init: dict, d_model: float) -> dict[str, float]:
    """Dimensionless init-time features from ``init_features.init_features``: RMS(W)·√d per matrix
    group (1 for a 1/√d init), the gain RMS, the RMS gradient per parameter and ‖g‖/‖W‖ per group,
    and the forward group as measured."""
    half_log_d = 0.5 * math.log10(d_model) if d_model and d_model > 0 else math.nan
    out = {f"log10_rms_w_sqrt_d_{g}": _f(init.get(f"log10_rms_w_{g}")) + half_log_d
           for g in ("embed", "out", "hidden")}
    out["log10_rms_w_gain"] = _f(init.get("log10_rms_w_gain"))
    out["log10_grad_rms"] = _f(init.get("log10_grad_norm")) - 0.5 * _f(init.get("log10_n_params"))
    for g in PARAM_GROUPS:
        out[f"log10_grad_rel_{g}"] = _f(init.get(f"log10_grad_rel_{g}"))
    for c in forward_feature_names():
        out[c] = _f(init.get(c))
    st = _f(init.get("residual_stages"))
    out[STRUCTURE_COLUMN] = math.log(st) if math.isfinite(st) and st > 0 else math.nan
    return out


# ==================================================================== training-side tables
def ladder_targets(runs):
    """Per model, the v3 labels of its ladder (``labels.ladder_summary``, final_loss as the eval
    loss) as censoring bounds, and per run the ``failed`` label.

    Returns
    -------
    (models, failed) : DataFrame indexed by model_id with ``fail_lo``/``fail_hi``,
        ``best_lo``/``best_hi``, ``div_lo``/``div_hi`` (0 / inf when censored; ``best`` bounds are
        the geometric midpoints to the neighbouring rungs; NaN for a model that never learns),
        ``lr_best``, ``lr_fail_min``, ``lr_fail_lo``, ``lr_diverge_min``, ``never_learns``; and a
        Series of ``failed`` aligned with ``runs``
    """
    import pandas as pd

    from .labels import ladder_summary

    rows, failed = [], pd.Series(False, index=runs.index)
    for mid, g in runs.groupby("model_id", sort=True):
        s = ladder_summary(g["lr"].to_numpy(float), g["final_loss"].to_numpy(float),
                           g["diverged"].to_numpy(bool), float(g["marginal_loss"].iloc[0]))
        failed.loc[g.index] = s["failed"]
        nan0 = lambda v: 0.0 if not math.isfinite(v) else v  # noqa: E731
        naninf = lambda v: math.inf if not math.isfinite(v) else v  # noqa: E731
        if s["never_learns"] or not math.isfinite(s["lr_best"]):
            blo = bhi = math.nan
        else:
            b = s["lr_best"]
            blo = math.sqrt(b * s["lr_best_lo"]) if math.isfinite(s["lr_best_lo"]) else 0.0
            bhi = math.sqrt(b * s["lr_best_hi"]) if math.isfinite(s["lr_best_hi"]) else math.inf
        rows.append(dict(model_id=mid, fail_lo=nan0(s["lr_fail_lo"]), fail_hi=naninf(s["lr_fail_min"]),
                         best_lo=blo, best_hi=bhi, div_lo=nan0(s["lr_diverge_lo"]),
                         div_hi=naninf(s["lr_diverge_min"]), lr_best=s["lr_best"], lr_fail_min=s["lr_fail_min"],
                         lr_fail_lo=s["lr_fail_lo"], lr_diverge_min=s["lr_diverge_min"],
                         lr_diverge_lo=s["lr_diverge_lo"], never_learns=s["never_learns"]))
    return pd.DataFrame(rows).set_index("model_id"), failed


def _col(row, key, default=math.nan):
    v = row.get(key, default) if hasattr(row, "get") else default
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _seq_len(model_row, run_row):
    """Tokens per sequence of a corpus network; None for an image task (its patches, not
    ``seq_len``, are the tokens)."""
    if str(_col(run_row, "task", "")) in IMAGE_TASKS:
        return None
    v = _col(run_row, "seq_len", None)
    return _col(model_row, "seq_len", None) if v is None else v


def network_table(models, layers, runs):
    """One row per network of a ladder corpus: ids, family, the v3 targets (``ladder_targets``) and
    every feature (scale columns + ``FEATURE_GROUPS``). Reads ``schedule``, ``beta2``, ``eps`` when
    the corpus has them (corpus-v3), else the corpus-v2 trainer's values."""
    import pandas as pd

    from .threshold import spectral_features

    targets, _ = ladder_targets(runs)
    spec = {mid: spectral_features(g.sort_values("layer")) for mid, g in layers.groupby("model_id")}
    per_model = runs.groupby("model_id").first()
    rows = []
    for _, m in models.iterrows():
        mid = m["model_id"]
        r = per_model.loc[mid] if mid in per_model.index else m
        opt = str(m["optimizer"])
        row = dict(model_id=mid, family=m["family"], norm=m.get("norm"), optimizer=opt,
                   dead_at_init=bool(m["dead_at_init"]), d_model=float(m["d_model"]),
                   n_layers=float(m["n_layers"]), steps=float(m["steps"]), batch_size=float(m["batch_size"]),
                   seq_len=_f(_seq_len(m, r)))
        row.update(recipe_features(optimizer=opt, warmup=m["warmup"], steps=m["steps"], grad_clip=m["grad_clip"],
                                   weight_decay=m["weight_decay"], batch_size=m["batch_size"], d_model=m["d_model"],
                                   n_layers=m["n_layers"], schedule=str(_col(r, "schedule", "constant")),
                                   beta2=_col(r, "beta2", None), eps=_col(r, "eps", None),
                                   task=_col(r, "task", None), seq_len=row["seq_len"]))
        row.update(init_scale_features({k: m[k] for k in m.index}, float(m["d_model"])))
        row.update({c: _f(m.get(c)) for c in curvature_feature_names()})   # NaN where not measured
        row.update(spec.get(mid, spec.get(parent_model_id(mid),
                                          {c: math.nan for c in FEATURE_GROUPS["spectral"]})))
        if mid in targets.index:
            row.update(targets.loc[mid].to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


# ==================================================================== the estimator
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def _log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def _interval_nll(eta, lo, hi, scale):
    """−Σ log P(ln lo < T ≤ ln hi) for T = eta + scale·logistic, and its gradient in eta.
    lo = 0 / hi = inf are censored ends."""
    a = np.where(lo > 0, (np.log(np.where(lo > 0, lo, 1.0)) - eta) / scale, -np.inf)
    b = np.where(np.isfinite(hi), (np.log(np.where(np.isfinite(hi), hi, 1.0)) - eta) / scale, np.inf)
    Fa, Fb = _sigmoid(a), _sigmoid(b)
    both = np.isfinite(a) & np.isfinite(b)
    logp = np.where(np.isfinite(b) & ~np.isfinite(a), _log_sigmoid(b),
                    np.where(np.isfinite(a) & ~np.isfinite(b), _log_sigmoid(-a),
                             np.log(np.clip(Fb - Fa, 1e-300, None))))
    fa = np.where(np.isfinite(a), Fa * (1 - Fa), 0.0)
    fb = np.where(np.isfinite(b), Fb * (1 - Fb), 0.0)
    # d logp / d eta = -(fb - fa) / (scale P)
    P = np.where(both, np.clip(Fb - Fa, 1e-300, None), np.where(np.isfinite(b), Fb, 1 - Fa))
    dlogp = -(fb - fa) / (scale * np.clip(P, 1e-300, None))
    return -float(np.sum(logp)), -dlogp


class LogLRModel:
    """ln lr_t = z·β + trees(u) + b + s·logistic, for one interval-censored target (module docstring).

    Parameters
    ----------
    groups : tree feature groups (keys of ``FEATURE_GROUPS``)
    scale_part : bool, default True
        The linear part in ln width/depth/steps/batch. False: only optimizer intercepts are linear
        and the scale columns go to the trees (the v2 form, flat outside the corpus; kept to measure
        what the linear part buys).
    slope_prior_sd : prior sd of each scale slope (per unit of ln axis)
    task_term : bool, default True
        A linear term for a synthetic task (``TASK_COLUMN``, prior sd ``task_prior_sd``); served
        at 0 (real data). False: the form of predictors saved before it existed.
    task_prior_sd : prior sd of the task term (ln units)
    structure_term : bool, default True
        A linear term in ``STRUCTURE_COLUMN`` (prior sd ``structure_prior_sd`` per ln unit; an
        unmeasured network sits at the corpus centre). False: the form of predictors saved before it.
    scale_axes : the scale columns of the linear part (``SCALE_COLUMNS``; predictors saved before
        the sequence axis load with ``LEGACY_SCALE_COLUMNS``)
    extra_columns : further linear columns (candidate features measured in ln LR units, e.g. a probe's
        ln LR), centred, prior sd ``slope_prior_sd``; an unmeasured network sits at the corpus centre.
        Default none (the form of every shipped predictor so far)
    n_estimators, max_depth, learning_rate, min_child_weight, subsample : booster settings
    aft_scale : the AFT noise scale the trees are fitted with (the served scale is ``scale_``)
    n_backfit : rounds of (linear | trees) backfitting
    n_splits : folds of the out-of-fold margins (``groups`` of fit: whole classes held out)
    random_state : seed of the booster

    Fitted attributes
    -----------------
    feature_names_, tree_features_ : list of str
    coef_, cov_ : β and its Laplace posterior covariance; ``design_center_``: centring of z
    trees_ : booster.TreeEnsemble (``booster_json_``: its JSON)
    shift_, scale_ : b and s; ``base_var_``: the corpus's mean zᵀΣz
    oof_margin_ : out-of-fold z·β + trees per training network (before b)
    """

    def __init__(self, groups=("config", "forward", "gradient"), *, scale_part=True, slope_prior_sd=0.5,
                 task_term=True, task_prior_sd=2.0, structure_term=True, structure_prior_sd=2.0,
                 scale_axes=tuple(SCALE_COLUMNS), extra_columns=(), n_estimators=100, max_depth=2,
                 learning_rate=0.05, min_child_weight=5.0, subsample=0.8, aft_scale=1.0, n_backfit=2, n_splits=5, random_state=0):
        self.groups = groups
        self.scale_part = scale_part
        self.slope_prior_sd = slope_prior_sd
        self.task_term = task_term
        self.task_prior_sd = task_prior_sd
        self.structure_term = structure_term
        self.structure_prior_sd = structure_prior_sd
        self.scale_axes = scale_axes
        self.extra_columns = extra_columns
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.min_child_weight = min_child_weight
        self.subsample = subsample
        self.aft_scale = aft_scale
        self.n_backfit = n_backfit
        self.n_splits = n_splits
        self.random_state = random_state

    PARAMS = ("groups", "scale_part", "slope_prior_sd", "task_term", "task_prior_sd", "structure_term",
              "structure_prior_sd", "scale_axes", "extra_columns", "n_estimators",
              "max_depth",
              "learning_rate", "min_child_weight", "subsample", "aft_scale", "n_backfit", "n_splits", "random_state")

    def get_params(self) -> dict:
        return {k: (list(getattr(self, k)) if k in ("groups", "scale_axes", "extra_columns") else getattr(self, k))
                for k in self.PARAMS}

    # ------------------------------------------------------------------ matrices
    @property
    def linear_columns_(self) -> list[str]:
        return ([f"opt_{o}" for o in OPTIMIZERS] + ([TASK_COLUMN] if self.task_term else [])
                + ([STRUCTURE_COLUMN] if self.structure_term else [])
                + (list(self.scale_axes) if self.scale_part else []) + list(self.extra_columns))

    def _columns(self, X, names) -> np.ndarray:
        n = len(next(iter(X.values()))) if isinstance(X, dict) else len(X)
        cols = [np.asarray(X[c], dtype=float).reshape(-1) if c in X else np.full(n, np.nan) for c in names]
        M = np.column_stack(cols) if cols else np.zeros((n, 0))
        return np.where(np.isfinite(M), np.clip(M, -1e30, 1e30), np.nan)

    def _design(self, X) -> np.ndarray:
        Z = self._columns(X, self.linear_columns_)
        Z = Z - self.design_center_
        return np.nan_to_num(Z, nan=0.0)  # an unknown axis sits at the corpus centre (and is flagged by serve)

    # ------------------------------------------------------------------ pieces
    def _prior_var(self) -> np.ndarray:
        var = {f"opt_{o}": 100.0 for o in OPTIMIZERS}
        var[TASK_COLUMN] = self.task_prior_sd ** 2
        var[STRUCTURE_COLUMN] = self.structure_prior_sd ** 2
        return np.array([var.get(c, self.slope_prior_sd ** 2) for c in self.linear_columns_])

    def _fit_linear(self, Z, offset, lo, hi, cols=None):
        """β (and its Laplace covariance) of the columns ``cols`` of the design (all: None), given
        in ``Z``, with ``offset`` fixed."""
        from scipy.optimize import minimize

        pv = self._prior_var() if cols is None else self._prior_var()[cols]

        def f(beta):
            nll, g = _interval_nll(offset + Z @ beta, lo, hi, self.aft_scale)
            return nll + 0.5 * np.sum(beta ** 2 / pv), Z.T @ g + beta / pv

        x0 = np.zeros(Z.shape[1])
        res = minimize(f, x0, jac=True, method="L-BFGS-B", options=dict(maxiter=500, gtol=1e-8))
        beta = res.x
        # Laplace: the Hessian by central differences of the analytic gradient
        H = np.zeros((len(beta), len(beta)))
        h = 1e-5
        for j in range(len(beta)):
            e = np.zeros(len(beta))
            e[j] = h
            H[:, j] = (f(beta + e)[1] - f(beta - e)[1]) / (2 * h)
        H = 0.5 * (H + H.T)
        return beta, np.linalg.inv(H + 1e-9 * np.eye(len(beta)))

    def _fit_trees(self, U, base, lo, hi):
        import xgboost as xgb

        from .booster import TreeEnsemble

        d = xgb.DMatrix(U, feature_names=self.tree_features_, base_margin=base)
        d.set_float_info("label_lower_bound", lo)
        d.set_float_info("label_upper_bound", hi)
        params = {"objective": "survival:aft", "eval_metric": "aft-nloglik", "aft_loss_distribution": "logistic",
                  "aft_loss_distribution_scale": self.aft_scale, "tree_method": "hist",
                  "max_depth": self.max_depth, "eta": self.learning_rate, "min_child_weight": self.min_child_weight,
                  "subsample": self.subsample, "seed": self.random_state, "nthread": 1}
        b = xgb.train(params, d, num_boost_round=self.n_estimators)
        return TreeEnsemble.from_json(b.save_raw("json").decode())

    @staticmethod
    def _tree_part(trees, U) -> np.ndarray:
        if trees is None or U.shape[1] == 0:
            return np.zeros(len(U))
        return trees.predict_margin(U).astype(float) - float(trees.base_margin)

    def _ladder_axes(self, Z, slope_rows) -> list[int]:
        """Indices of the scale columns whose slope is taken from the ``slope_rows`` alone: those
        with at least ``MIN_LADDER_VALUES`` distinct values there."""
        if slope_rows is None or not np.any(slope_rows):
            return []
        return [j for j, c in enumerate(self.linear_columns_) if c in self.scale_axes
                and len(np.unique(np.round(Z[slope_rows, j], 9))) >= MIN_LADDER_VALUES]

    def _fit_scale(self, Z, offset, lo, hi, slope_rows):
        """The linear part: with ``slope_rows``, the slopes of the axes they vary
        (``_ladder_axes``) are fitted on those rows (with their own intercepts), then held while the
        other columns are fitted on every row; without, everything on every row."""
        axes = self._ladder_axes(Z, slope_rows)
        if not axes:
            return self._fit_linear(Z, offset, lo, hi)
        sr = np.asarray(slope_rows, bool)
        b1, c1 = self._fit_linear(Z[sr], offset[sr], lo[sr], hi[sr])
        rest = [j for j in range(Z.shape[1]) if j not in axes]
        b2, c2 = self._fit_linear(Z[:, rest], offset + Z[:, axes] @ b1[axes], lo, hi, cols=rest)
        beta, cov = np.zeros(Z.shape[1]), np.zeros((Z.shape[1], Z.shape[1]))
        beta[axes], beta[rest] = b1[axes], b2
        cov[np.ix_(axes, axes)], cov[np.ix_(rest, rest)] = c1[np.ix_(axes, axes)], c2
        return beta, cov

    def _fit_core(self, Z, U, lo, hi, slope_rows=None):
        """β, Σ and trees by backfitting; returns (beta, cov, trees)."""
        t = np.zeros(len(Z))
        trees = None
        for _ in range(max(1, self.n_backfit)):
            beta, cov = self._fit_scale(Z, t, lo, hi, slope_rows)
            if U.shape[1] and self.n_estimators > 0:
                trees = self._fit_trees(U, Z @ beta, lo, hi)
                t = self._tree_part(trees, U)
        return beta, cov, trees

    # ------------------------------------------------------------------ fit
    def fit(self, X, lr_low, lr_high, *, runs_model_index=None, runs_lr=None, runs_y=None, groups=None,
            slope_rows=None):
        """Fit on networks ``X`` (rows) with the target in (lr_low, lr_high] (0 / inf: censored).

        ``slope_rows`` (boolean per row, e.g. the networks of a full-ladder corpus with its scale
        ladders): the slope of each scale axis these rows vary is fitted on them alone
        (``_fit_scale``), so a larger corpus that barely varies an axis, or measures it on another
        label, does not pull the exponent.

        With ``runs_*`` (network row index, lr, binary label per run) the calibration (b, s) is
        fitted by the runs' likelihood; without, by the intervals' likelihood. ``groups`` (e.g.
        the architecture class of each network) keeps a group inside one fold of the out-of-fold
        margins the calibration is fitted on.
        """
        from scipy.optimize import minimize

        lo = np.asarray(lr_low, dtype=float)
        hi = np.asarray(lr_high, dtype=float)
        keep = np.isfinite(lo) | np.isfinite(hi)
        if not keep.all():
            raise ValueError("lr_low/lr_high must not both be NaN: drop networks without a target")
        tree = [c for g in self.groups for c in FEATURE_GROUPS[g]]
        self.tree_features_ = tree + ([] if self.scale_part else list(self.scale_axes))
        self.feature_names_ = self.linear_columns_ + [c for c in self.tree_features_ if c not in self.linear_columns_]
        Zraw = self._columns(X, self.linear_columns_)
        # one-hots and the task term are not centred: 0 is the optimizer's real-data level
        uncentred = np.isin(self.linear_columns_, [f"opt_{o}" for o in OPTIMIZERS] + [TASK_COLUMN])
        seen = np.isfinite(Zraw).sum(axis=0)   # an axis with no value (no sequence length given) centres at 0
        mean = np.where(seen > 0, np.nansum(Zraw, axis=0) / np.maximum(seen, 1), 0.0)
        self.design_center_ = np.where(uncentred, 0.0, mean)
        Z = self._design(X)
        U = self._columns(X, self.tree_features_)
        g = np.arange(len(Z)) if groups is None else np.asarray(groups)
        sr = None if slope_rows is None else np.asarray(slope_rows, bool)
        oof = np.full(len(Z), np.nan)
        from sklearn.model_selection import GroupKFold

        k = min(self.n_splits, len(np.unique(g)))
        if k >= 2:
            for tr, te in GroupKFold(n_splits=k).split(Z, groups=g):
                beta, _, trees = self._fit_core(Z[tr], U[tr], lo[tr], hi[tr], None if sr is None else sr[tr])
                oof[te] = Z[te] @ beta + self._tree_part(trees, U[te])
        self.coef_, self.cov_, self.trees_ = self._fit_core(Z, U, lo, hi, sr)
        self.ladder_axes_ = [self.linear_columns_[j] for j in self._ladder_axes(Z, sr)]
        if not np.isfinite(oof).all():  # too few groups for folds: in-sample margins
            oof = self._margin(Z, U)
        self.oof_margin_ = oof
        if runs_y is not None:
            ri = np.asarray(runs_model_index, dtype=int)
            z_lr = np.log(np.asarray(runs_lr, dtype=float))
            y = np.asarray(runs_y, dtype=float)

            def nll(theta):
                p = np.clip(_sigmoid((z_lr - oof[ri] - theta[0]) / np.exp(theta[1])), 1e-9, 1 - 1e-9)
                return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        else:
            def nll(theta):
                return _interval_nll(oof + theta[0], lo, hi, math.exp(theta[1]))[0] / len(oof)
        res = minimize(nll, x0=np.array([0.0, 0.0]), method="Nelder-Mead",
                       options=dict(xatol=1e-7, fatol=1e-10, maxiter=4000))
        self.shift_, self.scale_ = float(res.x[0]), float(np.exp(res.x[1]))
        self.base_var_ = float(np.mean(np.einsum("ij,jk,ik->i", Z, self.cov_, Z)))
        self.booster_json_ = self.trees_.to_json() if self.trees_ is not None else None
        return self

    # ------------------------------------------------------------------ prediction
    def _margin(self, Z, U) -> np.ndarray:
        return Z @ self.coef_ + self._tree_part(self.trees_, U)

    def predict_log_lr(self, X) -> dict[str, np.ndarray]:
        """Per network: ``mu`` (median of ln lr_t), ``scale`` (s_eff, widened by the linear part's
        uncertainty beyond the corpus's mean) and ``linear_sd`` (sd of z·β, ln units)."""
        Z = self._design(X)
        U = self._columns(X, self.tree_features_)
        var = np.einsum("ij,jk,ik->i", Z, self.cov_, Z)
        extra = np.maximum(0.0, var - self.base_var_)
        return dict(mu=self._margin(Z, U) + self.shift_,
                    scale=np.sqrt(self.scale_ ** 2 + 3.0 / math.pi ** 2 * extra), linear_sd=np.sqrt(var))

    # ------------------------------------------------------------------ JSON (no pickle)
    def to_dict(self) -> dict:
        return dict(kind="log_lr_v3", params=self.get_params(), feature_names=self.feature_names_,
                    tree_features=self.tree_features_, coef=self.coef_.tolist(), cov=self.cov_.tolist(),
                    design_center=self.design_center_.tolist(), shift=self.shift_, scale=self.scale_,
                    base_var=self.base_var_, ladder_axes=list(getattr(self, "ladder_axes_", [])),
                    booster=json.loads(self.booster_json_) if self.booster_json_ else None)

    @classmethod
    def from_dict(cls, d: dict) -> "LogLRModel":
        from .booster import TreeEnsemble

        if d.get("kind") != "log_lr_v3":
            raise ValueError(f"not a v3 log-LR model (kind {d.get('kind')!r})")
        p = dict(d["params"])
        p["groups"] = tuple(p["groups"])
        p.setdefault("task_term", False)  # saved before the task term existed
        p.setdefault("structure_term", False)  # saved before the structure term existed
        p["scale_axes"] = tuple(p.get("scale_axes", LEGACY_SCALE_COLUMNS))  # saved before the sequence axis
        p["extra_columns"] = tuple(p.get("extra_columns", ()))  # saved before extra columns existed
        m = cls(**p)
        m.feature_names_, m.tree_features_ = list(d["feature_names"]), list(d["tree_features"])
        m.coef_, m.cov_ = np.asarray(d["coef"], float), np.asarray(d["cov"], float)
        m.design_center_ = np.asarray(d["design_center"], float)
        m.shift_, m.scale_, m.base_var_ = float(d["shift"]), float(d["scale"]), float(d["base_var"])
        m.ladder_axes_ = list(d.get("ladder_axes", []))
        m.booster_json_ = json.dumps(d["booster"]) if d.get("booster") else None
        m.trees_ = TreeEnsemble.from_json(m.booster_json_) if m.booster_json_ else None
        return m


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class LRPredictor:
    """The three v3 targets of one recipe: ``fail_``, ``best_``, ``diverge_`` (``LogLRModel`` each).

    Parameters
    ----------
    groups : tree feature groups; ``**model_kw``: passed to every ``LogLRModel``

    Attributes
    ----------
    fail_, best_, diverge_ : fitted ``LogLRModel``
    metadata_ : dict (version, metrics, feature ranges, corpus ranges of the scale axes, …)
    """

    def __init__(self, groups=("config", "forward", "gradient"), **model_kw):
        self.groups = groups
        self.model_kw = model_kw

    def fit(self, nets, runs_model_index, runs_lr, runs_failed, runs_diverged, groups=None,
            slope_rows=None) -> "LRPredictor":
        """``nets``: ``network_table`` rows (targets and features); runs: row index into ``nets``,
        lr, ``failed`` and ``diverged`` per run; ``groups``: the architecture class per network;
        ``slope_rows``: the networks whose ladders set the scale exponents (``LogLRModel.fit``)."""
        ri = np.asarray(runs_model_index, dtype=int)
        g = None if groups is None else np.asarray(groups)
        sr = None if slope_rows is None else np.asarray(slope_rows, bool)
        mk = lambda: LogLRModel(groups=self.groups, **self.model_kw)  # noqa: E731
        self.fail_ = mk().fit(nets, nets["fail_lo"], nets["fail_hi"], runs_model_index=ri, runs_lr=runs_lr,
                              runs_y=runs_failed, groups=g, slope_rows=sr)
        self.diverge_ = mk().fit(nets, nets["div_lo"], nets["div_hi"], runs_model_index=ri, runs_lr=runs_lr,
                                 runs_y=runs_diverged, groups=g, slope_rows=sr)
        learns = np.isfinite(np.asarray(nets["best_lo"], float))
        sub = nets[learns] if hasattr(nets, "iloc") else {k: np.asarray(v)[learns] for k, v in nets.items()}
        self.best_ = mk().fit(sub, np.asarray(nets["best_lo"], float)[learns],
                              np.asarray(nets["best_hi"], float)[learns],
                              groups=None if g is None else g[learns], slope_rows=None if sr is None else sr[learns])
        self.metadata_ = getattr(self, "metadata_", {})
        return self

    def predict(self, X, lrs=(), threshold: float = 0.2, interval: float = 0.8, widen: float = 1.0) -> dict:
        """Per network (arrays of shape (n,)): ``max_safe_lr`` with ``max_safe_lo``/``max_safe_hi``
        (the central ``interval`` of lr_fail), ``recommended_lr`` (median lr_best, capped at
        max_safe_lr) with ``recommended_lo``/``recommended_hi``, ``lr_best`` (uncapped), and for
        ``lrs`` the arrays (n, len(lrs)) ``p_failed`` and ``p_diverged``. ``widen`` multiplies every
        scale (a network outside every class seen)."""
        f, b, d = (m.predict_log_lr(X) for m in (self.fail_, self.best_, self.diverge_))
        for r in (f, b, d):
            r["scale"] = r["scale"] * widen
        q = (1 - interval) / 2
        lt = _logit(threshold)
        safe = np.minimum(np.exp(f["mu"] + f["scale"] * lt), np.exp(d["mu"] + d["scale"] * lt))
        best = np.exp(b["mu"])
        out = dict(max_safe_lr=safe, max_safe_lo=np.exp(f["mu"] + f["scale"] * _logit(q)),
                   max_safe_hi=np.exp(f["mu"] + f["scale"] * _logit(1 - q)),
                   lr_best=best, recommended_lr=np.minimum(best, safe),
                   recommended_lo=np.exp(b["mu"] + b["scale"] * _logit(q)),
                   recommended_hi=np.exp(b["mu"] + b["scale"] * _logit(1 - q)),
                   mu_fail=f["mu"], scale_fail=f["scale"], mu_diverge=d["mu"], scale_diverge=d["scale"],
                   mu_best=b["mu"], scale_best=b["scale"], linear_sd_fail=f["linear_sd"])
        out["recommended_lo"] = np.minimum(out["recommended_lo"], out["recommended_lr"])
        lr = np.log(np.atleast_1d(np.asarray(lrs, dtype=float)))[None, :] if len(lrs) else np.zeros((1, 0))
        pd_ = _sigmoid((lr - d["mu"][:, None]) / d["scale"][:, None])
        pf = np.maximum(_sigmoid((lr - f["mu"][:, None]) / f["scale"][:, None]), pd_)
        out.update(p_failed=pf, p_diverged=pd_)
        return out

    def reads(self, knob: str) -> bool:
        """Whether any of the three models reads a feature that the recipe ``knob`` moves
        (``KNOB_FEATURES``); False: changing it cannot change the answer."""
        cols = set(self.fail_.feature_names_) | set(self.best_.feature_names_) | set(self.diverge_.feature_names_)
        return any(c in cols for c in KNOB_FEATURES[knob])

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return dict(kind="lr_predictor_v3", groups=list(self.groups), model_kw=self.model_kw,
                    fail=self.fail_.to_dict(), best=self.best_.to_dict(), diverge=self.diverge_.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "LRPredictor":
        if d.get("kind") != "lr_predictor_v3":
            raise ValueError(f"not a v3 LR predictor (kind {d.get('kind')!r})")
        m = cls(groups=tuple(d["groups"]), **d.get("model_kw", {}))
        m.fail_, m.best_, m.diverge_ = (LogLRModel.from_dict(d[k]) for k in ("fail", "best", "diverge"))
        return m

    def save(self, path):
        """Write ``lr_predictor.json`` and ``metadata.json`` into directory ``path``."""
        from pathlib import Path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "lr_predictor.json").write_text(json.dumps(self.to_dict()))
        (path / "metadata.json").write_text(json.dumps(getattr(self, "metadata_", {}), indent=2, default=float))
        return path

    @classmethod
    def load(cls, path) -> "LRPredictor":
        """Read a directory written by ``save``; ``PredictorError`` names a missing or corrupt file."""
        from pathlib import Path

        from .errors import PredictorError

        path = Path(path)
        docs = {}
        for name in ("lr_predictor.json", "metadata.json"):
            f = path / name
            try:
                docs[name] = json.loads(f.read_text())
            except FileNotFoundError:
                raise PredictorError(f"{f}: missing (a v3 predictor directory holds lr_predictor.json and "
                                     "metadata.json)") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PredictorError(f"{f}: not valid JSON ({e})") from None
        try:
            m = cls.from_dict(docs["lr_predictor.json"])
        except (KeyError, TypeError, ValueError) as e:
            raise PredictorError(f"{path / 'lr_predictor.json'}: not a v3 predictor ({e})") from None
        m.metadata_ = docs["metadata.json"]
        return m
