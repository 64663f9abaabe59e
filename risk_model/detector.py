"""Stop a failing run early: a failure detector that reads, step by step, what a training loop
already has (the loss and the gradient norm) and answers whether the run is failing now, P(failed by
the end) and why.

The target is the ``failed`` label of ``risk_model.labels`` (a run diverged, or lost more than half
of what its model's best run learned, or its model never learns): the detector learns, from stored
training curves, which curve prefixes end in a failed run. Three parts:

- **Hard rules** (no fitting): a step that meets the paper's divergence rule
  (``labels.divergence_reason``: non-finite loss or gradient norm, loss > 50, gradient norm > 500)
  is failing at once, with P = 1 and the reason ``"non-finite"``, ``"loss blow-up"`` or
  ``"gradient explosion"``.
- **A logistic model of P(failed by the end)** on features of the curve so far, all scale-free and
  measured in steps (so any spacing of the points works): the fraction of the planned steps done,
  the smoothed loss over its running minimum, the fraction of its progress the run has lost, the
  progress so far, the smoothed log gradient norm against its start and its running minimum and,
  when the task's marginal (best context-free) loss ``R`` is given, how far the best loss so far is
  above ``R``. Each feature also enters multiplied by the fraction done.
- **A lost-progress stop**: a run that has learned (progress ≥ ``LOST_FLOOR`` of its initial loss)
  and has lost ``lost_stop_`` (≥ ½) of that progress is failing, reason ``"lost progress"``.

The run is *failing* when P reaches ``p_stop_`` or the lost-progress stop fires. Both thresholds
are chosen at fit time (``lost_stop_`` with half of the budget, then ``p_stop_`` with the rest) so
that at most ``false_alarm`` of the runs that must not be stopped (by default the runs that did not
fail) are ever stopped. Under ``p_stop_`` the reason is the feature group that contributes most to
the logit: ``"loss blow-up"``, ``"lost progress"``, ``"gradient explosion"`` or ``"no progress"``.

A failing verdict is kept: later steps do not revive a run.

Pure Python per step (the model is a dot product): about 0.1 ms per call (benchmarks/detector_overhead.py).

Two optional inputs enter as features when a detector is fitted with them: the task's marginal
loss R (``use_marginal``; ``marginal_loss`` computes it from a sample of the training targets) and
the pre-flight P(failed) at the run's learning rate (``use_prior``: what ``risk predict`` said before
the first step, held out when fitting, ``detector_eval.preflight_priors``).

The shipped detector (``models/default/detector/detector.json``) is fitted on corpus-v2 (300-step
runs, 50 stored points each) and reads neither; its held-out scores are in ``reports/detector.md``.
A variant that reads the prior and/or R ships beside it (``detector_prior.json``, …) only where it
measured better held out (``benchmarks/detector.py --prior``), and ``load_default`` then picks the
richest one a run can feed.

Examples
--------
>>> det = FailureDetector.load_default()                                         # doctest: +SKIP
>>> watch = det.watch(total_steps=3000)                                          # doctest: +SKIP
>>> for step in range(1, 3001):                                                  # doctest: +SKIP
...     loss, gn = train_step()
...     v = watch.update(step, loss, gn)
...     if v.failing:
...         print(f"stopping at step {step}: {v.reason} (P(failed) {v.p_failed:.2f})"); break
"""
from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .labels import divergence_reason

FORMAT = "divergence-risk-failure-detector"
FORMAT_VERSION = 1

#: the reasons a verdict can give (None while not failing)
REASONS = ("non-finite", "loss blow-up", "gradient explosion", "lost progress", "no progress",
           "behind siblings")  # the last: the sweep-aware rule, risk_model.ladder_watch
#: the number each reason is logged as (``risk/reason``)
REASON_CODES = {None: 0, **{r: i for i, r in enumerate(REASONS, 1)}}
_HARD_REASON = {"nonfinite": "non-finite", "loss": "loss blow-up", "grad_norm": "gradient explosion"}

#: base features (each also enters multiplied by the fraction of steps done) and their reason group
BASE_FEATURES = {
    "blowup": "loss blow-up",            # ln(smoothed loss / its running minimum), in [0, 3]
    "lost": "lost progress",             # (smoothed loss − min) / max(initial loss − min, LOST_FLOOR · initial), in [0, 5]
    "progress": "no progress",           # (initial loss − min) / initial loss, in [−1, 1]
    "grad_growth": "gradient explosion",  # smoothed ln grad norm − ln initial grad norm, in [−20, 20]
    "grad_rise": "gradient explosion",    # smoothed ln grad norm − its running minimum, in [0, 20]
}
MARGINAL_FEATURES = {
    "gap_marginal": "no progress",       # (min − R) / R, in [−0.5, 1]
    "above_marginal": "no progress",     # (smoothed loss − R) / R, in [−0.5, 1]
}
#: the pre-flight prediction (``use_prior``): no reason group of its own (a verdict's reason is read
#: from the curve's groups only)
PRIOR_FEATURES = {
    "prior": None,                       # logit of the pre-flight P(failed) at the run's LR, in [−8, 8]
}
#: the pre-flight P(failed) is clipped to [PRIOR_CLIP, 1 − PRIOR_CLIP] before its logit
PRIOR_CLIP = 1 / (1 + math.exp(8.0))
_EPS = 1e-12
#: progress below this fraction of the initial loss counts as this much in ``lost`` (an early bump of a
#: run that has not learned yet is not progress lost)
LOST_FLOOR = 0.1
#: the ``lost`` stop is never set below this (half the progress lost, as in the labels)
LOST_MIN = 0.5


@dataclass
class Verdict:
    """What the detector says after one step."""

    step: int
    failing: bool
    p_failed: float              # P(the run has failed by its end); 1.0 under a hard rule
    reason: str | None           # one of REASONS when failing, else None
    features: dict = field(default_factory=dict)

    def metrics(self, prefix: str = "risk/") -> dict:
        """``{prefix}p_failed``, ``{prefix}failing`` (0/1) and ``{prefix}reason`` as numbers, for
        loggers that take only numbers (MLflow metrics): the reason is its code in
        ``REASON_CODES`` (0 while not failing). A P that is not known (hard rules only) is left out."""
        out = {prefix + "failing": float(self.failing), prefix + "reason": float(REASON_CODES[self.reason])}
        if math.isfinite(self.p_failed):
            out[prefix + "p_failed"] = float(self.p_failed)
        return out

    def message(self) -> str:
        """The verdict in words, one line."""
        p = f" (P(failed by the end) {self.p_failed:.2f})" if math.isfinite(self.p_failed) else ""
        if not self.failing:
            return f"step {self.step}: not failing{p}"
        return f"run failing at step {self.step}: {self.reason}{p}"


@dataclass
class RunCurve:
    """One run's curve for fitting and evaluation: the values at explicit steps (any spacing).

    steps, loss, grad_norm : sequences of shape (n_points,), steps 1-based and increasing
    total_steps : the planned number of steps of the run
    marginal_loss : the task's best context-free loss R, optional
    prior : the pre-flight P(failed) at the run's learning rate (``risk predict``'s p_failed,
        held out when fitting), optional
    """

    steps: list
    loss: list
    grad_norm: list
    total_steps: int
    marginal_loss: float | None = None
    prior: float | None = None


def check_marginal(marginal_loss) -> None:
    """A stated marginal loss must be a positive number of nats (None: not stated)."""
    if marginal_loss is not None and not (isinstance(marginal_loss, (int, float)) and math.isfinite(marginal_loss)
                                          and marginal_loss > 0):
        raise ValueError(f"marginal_loss must be a positive number of nats, got {marginal_loss!r}")


def _feature_names(use_marginal: bool, use_prior: bool = False) -> list[str]:
    base = (list(BASE_FEATURES) + (list(MARGINAL_FEATURES) if use_marginal else [])
            + (list(PRIOR_FEATURES) if use_prior else []))
    return ["frac"] + base + [f"frac*{b}" for b in base]


def _groups(use_marginal: bool, use_prior: bool = False) -> dict[str, str]:
    g = dict(BASE_FEATURES, **(MARGINAL_FEATURES if use_marginal else {}), **(PRIOR_FEATURES if use_prior else {}))
    out = {"frac": None}
    for b, r in g.items():
        out[b] = out[f"frac*{b}"] = r
    return out


class RunWatch:
    """The detector applied to one run, step by step (from ``FailureDetector.watch``).

    ``update(step, loss, grad_norm)`` returns a ``Verdict``. Without a fitted model
    (``detector=None``) only the hard rules act, and ``total_steps`` may be None.
    """

    def __init__(self, detector, total_steps: int, marginal_loss: float | None = None, smooth: float = 0.05,
                 prior: float | None = None):
        if total_steps is None and detector is not None:
            raise ValueError("the fitted detector needs the planned number of steps (total_steps)")
        if total_steps is not None and not (isinstance(total_steps, (int, float)) and total_steps >= 1
                                            and math.isfinite(total_steps)):
            raise ValueError(f"total_steps must be a positive number of steps, got {total_steps!r}")
        check_marginal(marginal_loss)
        if prior is not None and not (isinstance(prior, (int, float)) and 0 <= prior <= 1):
            raise ValueError(f"prior must be a probability in [0, 1], got {prior!r}")
        self.detector = detector
        self.prior = prior
        self.total_steps = None if total_steps is None else float(total_steps)
        self.marginal_loss = marginal_loss
        self.window = 1.0 if total_steps is None else max(1.0, smooth * self.total_steps)
        self._win: deque = deque()
        self._sum_l = self._sum_g = 0.0
        self._l0 = self._g0 = None
        self._min_l = self._min_g = math.inf
        self._last_step = -math.inf
        self.verdict: Verdict | None = None

    @property
    def failing(self) -> bool:
        return self.verdict is not None and self.verdict.failing

    def features(self, step: float) -> dict:
        """The feature values after the latest update (``step`` sets the fraction done)."""
        ls = self._sum_l / len(self._win)
        lg = self._sum_g / len(self._win)
        l0, m = self._l0, self._min_l
        f = {
            "frac": min(step / self.total_steps, 1.0),
            "blowup": _clip(math.log(max(ls, _EPS) / max(m, _EPS)), 0.0, 10.0),
            "lost": _clip((ls - m) / max(l0 - m, LOST_FLOOR * abs(l0), _EPS), 0.0, 5.0),
            "progress": _clip((l0 - m) / max(abs(l0), _EPS), -1.0, 1.0),
            "grad_growth": _clip(lg - self._g0, -20.0, 20.0),
            "grad_rise": _clip(lg - self._min_g, 0.0, 20.0),
        }
        R = self.marginal_loss
        if R is not None:
            f["gap_marginal"] = _clip((m - R) / R, -0.5, 1.0)
            f["above_marginal"] = _clip((ls - R) / R, -0.5, 1.0)
        if self.prior is not None:
            q = _clip(float(self.prior), PRIOR_CLIP, 1.0 - PRIOR_CLIP)
            f["prior"] = math.log(q / (1.0 - q))
        return f

    def update(self, step, loss, grad_norm) -> Verdict:
        """Read one step's loss and gradient norm (before clipping); returns the verdict.

        Steps must increase; a step at or below the last one is ignored (the last verdict is
        returned). Once failing, the verdict stays.
        """
        if self.failing:
            return self.verdict
        step = float(step)
        if step <= self._last_step:
            return self.verdict
        self._last_step = step
        loss, grad_norm = float(loss), float(grad_norm)
        hard = divergence_reason(loss, grad_norm)
        if hard is not None:
            self.verdict = Verdict(int(step), True, 1.0, _HARD_REASON[hard])
            return self.verdict
        lg = math.log(max(grad_norm, _EPS))
        if self._l0 is None:
            self._l0, self._g0 = loss, lg
        self._win.append((step, loss, lg))
        self._sum_l += loss
        self._sum_g += lg
        while step - self._win[0][0] >= self.window:
            _, a, b = self._win.popleft()
            self._sum_l -= a
            self._sum_g -= b
        self._min_l = min(self._min_l, self._sum_l / len(self._win))
        self._min_g = min(self._min_g, self._sum_g / len(self._win))
        feats = {} if self.total_steps is None else self.features(step)
        det = self.detector
        if det is None:
            self.verdict = Verdict(int(step), False, math.nan, None, feats)
            return self.verdict
        p, contrib = det._proba_one(feats)
        late = feats["frac"] >= det.min_fraction
        if late and feats["progress"] >= LOST_FLOOR and feats["lost"] >= det.lost_stop_:
            self.verdict = Verdict(int(step), True, p, "lost progress", feats)
            return self.verdict
        failing = p >= det.p_stop_ and late
        reason = None
        if failing:
            groups = {}
            for name, c in contrib.items():
                g = det.groups_[name]
                if g is not None:
                    groups[g] = groups.get(g, 0.0) + c
            reason = max(groups, key=groups.get)
        self.verdict = Verdict(int(step), failing, p, reason, feats)
        return self.verdict


class FailureDetector:
    """P(failed by the end) of a training run from its curve so far, and when to stop it.

    Parameters
    ----------
    use_marginal : bool, default False
        Use the task's marginal loss R (``RunCurve.marginal_loss``, ``watch(marginal_loss=)``) as
        features; every run must then give it.
    use_prior : bool, default False
        Use the pre-flight P(failed) at the run's learning rate (``RunCurve.prior``,
        ``watch(prior=)``) as a feature: the curve then updates what ``risk predict`` said before
        the first step. Every run must give it; fit it on held-out pre-flight predictions.
    false_alarm : float, default 0.01
        The largest fraction of the runs that must not be stopped that may reach ``p_stop_`` at
        some step of their curves (on the fitting data).
    min_fraction : float, default 0.0
        The model stops no run before this fraction of its planned steps (the hard rules act from
        step 1).
    smooth : float, default 0.05
        Width of the trailing smoothing window, as a fraction of the planned steps.
    C : float, default 1.0
        Inverse L2 strength of the logistic regression (standardised features).

    Attributes
    ----------
    feature_names_ : list of str
    mean_, scale_ : list of float, the standardisation
    coef_ : list of float, intercept_ : float
    p_stop_ : float, P(failed) at or above which a run is failing
    lost_stop_ : float, the ``lost`` feature at or above which a run is failing ("lost progress"),
        at least ``LOST_MIN``
    groups_ : dict, feature -> reason group
    n_runs_ : int
    """

    def __init__(self, *, use_marginal=False, use_prior=False, false_alarm=0.01, min_fraction=0.0, smooth=0.05,
                 C=1.0):
        self.use_marginal = use_marginal
        self.use_prior = use_prior
        self.min_fraction = min_fraction
        self.false_alarm = false_alarm
        self.smooth = smooth
        self.C = C

    # ------------------------------------------------------------------ fitting
    def _check_params(self):
        if not 0 <= self.false_alarm < 1:
            raise ValueError(f"false_alarm must be in [0, 1), got {self.false_alarm!r}")
        if not 0 <= self.min_fraction < 1:
            raise ValueError(f"min_fraction must be in [0, 1), got {self.min_fraction!r}")
        if not 0 < self.smooth <= 1:
            raise ValueError(f"smooth must be in (0, 1], got {self.smooth!r}")

    def trajectory(self, curve: RunCurve, fitted: bool = True) -> list[Verdict]:
        """The verdict at every point of ``curve`` (failing verdicts are kept, as in a run)."""
        watch = RunWatch(self if fitted else None, curve.total_steps,
                         curve.marginal_loss if self.use_marginal else None, self.smooth,
                         prior=curve.prior if self.use_prior else None)
        out = []
        for s, l, g in zip(curve.steps, curve.loss, curve.grad_norm):
            if fitted and watch.failing:
                out.append(watch.verdict)
                continue
            # unfitted: stream every point (the hard rule latches; the rest of the curve is not seen)
            out.append(watch.update(s, l, g))
            if watch.failing and not fitted:
                break
        return out

    def fit(self, X, y, keep_running=None, sample_weight=None):
        """Fit on runs' curves.

        Parameters
        ----------
        X : list of RunCurve, shape (n_runs,)
        y : array-like of bool, shape (n_runs,): the run failed (``labels.failed``)
        keep_running : array-like of bool, shape (n_runs,), optional
            Runs that must not be stopped, over which ``false_alarm`` is counted (default: the runs
            that did not fail).
        sample_weight : array-like of float, shape (n_runs,), optional
            Each run's weight in the logistic fit (default 1; a run's points share it). The
            stopping thresholds count runs, unweighted.

        Returns
        -------
        self
        """
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        self._check_params()
        y = np.asarray(y, dtype=bool)
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} runs, y {len(y)}")
        if y.all() or not y.any():
            raise ValueError("y must hold both failed and not failed runs")
        keep = ~y if keep_running is None else np.asarray(keep_running, dtype=bool)
        sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if sw.shape != y.shape or not (np.isfinite(sw).all() and (sw >= 0).all() and sw.sum() > 0):
            raise ValueError("sample_weight must hold one finite weight ≥ 0 per run, not all 0")
        if self.use_marginal and any(c.marginal_loss is None for c in X):
            raise ValueError("use_marginal=True needs every RunCurve's marginal_loss")
        if self.use_prior and any(c.prior is None for c in X):
            raise ValueError("use_prior=True needs every RunCurve's prior")
        names = _feature_names(self.use_marginal, self.use_prior)
        rows, labels, weights = [], [], []
        for curve, yi, wi in zip(X, y, sw):
            pts = [v for v in self.trajectory(curve, fitted=False) if not v.failing]
            for v in pts:
                rows.append(_design(v.features, names))
                labels.append(yi)
                weights.append(wi / len(pts))
        M = np.asarray(rows, dtype=float)
        used = M[np.asarray(weights) > 0]  # a run of weight 0 is as if it were not there
        mean, scale = used.mean(axis=0), used.std(axis=0)
        scale[scale == 0] = 1.0
        lr = LogisticRegression(C=self.C, max_iter=2000)
        lr.fit((M - mean) / scale, np.asarray(labels), sample_weight=np.asarray(weights))
        self.feature_names_ = names
        self.groups_ = _groups(self.use_marginal, self.use_prior)
        self.mean_ = [float(v) for v in mean]
        self.scale_ = [float(v) for v in scale]
        self.coef_ = [float(v) for v in lr.coef_[0]]
        self.intercept_ = float(lr.intercept_[0])
        self.n_runs_ = int(len(X))
        # the two stopping thresholds, so that at most false_alarm of the keep-running runs are ever
        # stopped: lost_stop_ with half of that budget, then p_stop_ with what is left of it
        self.lost_stop_ = self.p_stop_ = math.inf
        soft = [[v for v in self.trajectory(c) if v.reason is None and v.features["frac"] >= self.min_fraction]
                for c, k in zip(X, keep) if k]
        budget = int(math.floor(self.false_alarm * len(soft)))
        lost_peaks = [max((v.features["lost"] for v in t if v.features["progress"] >= LOST_FLOOR), default=0.0)
                      for t in soft]
        self.lost_stop_ = max(_threshold(lost_peaks, budget // 2), LOST_MIN)
        rest = [t for t, lp in zip(soft, lost_peaks) if lp < self.lost_stop_]
        self.p_stop_ = _threshold([max((v.p_failed for v in t), default=0.0) for t in rest],
                                  budget - (len(soft) - len(rest)))
        return self

    # ------------------------------------------------------------------ use
    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError("this FailureDetector is not fitted yet: call fit() or load()")

    def _proba_one(self, feats: dict) -> tuple[float, dict]:
        z = self.intercept_
        contrib = {}
        for name, mu, sd, w in zip(self.feature_names_, self.mean_, self.scale_, self.coef_):
            c = w * (_value(feats, name) - mu) / sd
            contrib[name] = c
            z += c
        p = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
        return p, contrib

    def watch(self, total_steps: int, marginal_loss: float | None = None, prior: float | None = None) -> RunWatch:
        """A ``RunWatch`` for one run of ``total_steps`` planned steps.

        Raises
        ------
        ValueError : ``use_marginal`` and no ``marginal_loss``, ``use_prior`` and no ``prior``, or a
            bad ``total_steps``
        """
        self._check_fitted()
        if self.use_marginal and marginal_loss is None:
            raise ValueError("this detector was fitted with the marginal loss: pass marginal_loss")
        if self.use_prior and prior is None:
            raise ValueError("this detector was fitted with the pre-flight P(failed): pass prior")
        return RunWatch(self, total_steps, marginal_loss if self.use_marginal else None, self.smooth,
                        prior=prior if self.use_prior else None)

    def detect(self, curve: RunCurve) -> Verdict | None:
        """The first failing verdict along a curve, None if it never fails."""
        self._check_fitted()
        return next((v for v in self.trajectory(curve) if v.failing), None)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        self._check_fitted()
        return dict(format=FORMAT, format_version=FORMAT_VERSION,
                    params=dict(use_marginal=self.use_marginal, use_prior=self.use_prior,
                                false_alarm=self.false_alarm,
                                min_fraction=self.min_fraction, smooth=self.smooth,
                                C=self.C),
                    feature_names=self.feature_names_, mean=self.mean_, scale=self.scale_, coef=self.coef_,
                    intercept=self.intercept_, p_stop=self.p_stop_, lost_stop=self.lost_stop_, n_runs=self.n_runs_)

    @classmethod
    def from_dict(cls, d: dict) -> "FailureDetector":
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} document (format {d.get('format')!r}, "
                             f"version {d.get('format_version')!r})")
        det = cls(**d["params"])  # saved before use_prior existed: its default, False
        names = _feature_names(det.use_marginal, det.use_prior)
        if d["feature_names"] != names:
            raise ValueError(f"feature names {d['feature_names']} are not this version's {names}")
        det.feature_names_ = names
        det.groups_ = _groups(det.use_marginal, det.use_prior)
        det.mean_, det.scale_, det.coef_ = list(d["mean"]), list(d["scale"]), list(d["coef"])
        det.intercept_, det.p_stop_, det.n_runs_ = float(d["intercept"]), float(d["p_stop"]), int(d["n_runs"])
        det.lost_stop_ = float(d["lost_stop"])
        return det

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "FailureDetector":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def load_default(cls, *, prior: bool = False, marginal: bool = False) -> "FailureDetector":
        """The shipped detector (``models/default/detector/``) for a run that can give the pre-flight
        P(failed) (``prior``) and/or the task's marginal loss (``marginal``): the richest shipped
        variant that reads only what the run gives (``detector.json`` reads neither and is always
        there; a variant ships only where it measured better, ``benchmarks/detector.py --prior``)."""
        for p, m in ((True, True), (True, False), (False, True)):
            if (prior or not p) and (marginal or not m):
                path = default_detector_path(use_prior=p, use_marginal=m)
                if path.is_file():
                    return cls.load(path)
        return cls.load(default_detector_path())


def default_detector_path(*, use_prior: bool = False, use_marginal: bool = False) -> Path:
    """``models/default/detector/detector[_prior][_marginal].json``."""
    from .serve import default_predictor_path

    name = "detector" + ("_prior" if use_prior else "") + ("_marginal" if use_marginal else "") + ".json"
    return default_predictor_path() / "detector" / name


def marginal_loss(targets, vocab_size: int | None = None) -> float:
    """The task's marginal loss R: the entropy (nats) of the target tokens' frequencies, the
    cross-entropy of the best predictor that ignores the context (as the corpora define it,
    ``sweep.tasks.unigram_entropy``). Give a large sample of the training targets (a tensor, an
    array or a list of ints, any shape); ``vocab_size`` only checks the ids.

    Raises
    ------
    ValueError : no targets, or ids that are negative or not below ``vocab_size``
    """
    import numpy as np

    if hasattr(targets, "detach"):
        targets = targets.detach().cpu().numpy()
    t = np.asarray(targets).reshape(-1)
    if t.size == 0:
        raise ValueError("marginal_loss needs at least one target token")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"marginal_loss needs integer token ids, got dtype {t.dtype}")
    if t.min() < 0 or (vocab_size is not None and t.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size if vocab_size is not None else 'vocab'}), "
                         f"got {int(t.min())}..{int(t.max())}")
    counts = np.bincount(t.astype(np.int64)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _threshold(peaks, allowed: int) -> float:
    """The smallest value that at most ``allowed`` of ``peaks`` reach."""
    peaks = sorted(peaks, reverse=True)
    if allowed < 0 or not peaks:
        return math.inf if allowed < 0 else 0.0
    if allowed >= len(peaks):
        return 0.0
    return math.nextafter(peaks[allowed], math.inf)


def _clip(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _value(feats: dict, name: str) -> float:
    if name.startswith("frac*"):
        return feats["frac"] * feats[name[5:]]
    return feats[name]


def _design(feats: dict, names: list[str]) -> list[float]:
    return [_value(feats, n) for n in names]
