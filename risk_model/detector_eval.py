"""Evaluation of the failure detector (``risk_model.detector``) on stored training curves, against
the stopping rules people use, leave-one-class-out.

Per run: ``failed`` from ``labels.ladder_summary`` over its model's ladder (the final train loss
stands in for the eval loss on corpus-v2), ``unstable`` from ``labels.unstable``. The runs that must
not be stopped (*keep-running*) are those that did not fail and ended within 5% of their model's
best loss (``final_loss ≤ 1.05 · best_loss``). For a stopping rule applied to each curve, point by
point:

- recall: the fraction of failed runs it stops;
- steps saved: (planned steps − step of the stop) / planned steps, median over the failed runs it
  stops (``saved_median``) and over all failed runs, 0 for a missed one (``saved_median_all``);
- false alarms: the fraction of keep-running runs it stops.

Leave-one-class-out: for each class (``family``) the detector is fitted, and its stopping threshold
chosen, on the other classes only; the simple rules have no fitted part.

Simple rules (what they do, applied to the same points):

- ``nan``: stop at the first non-finite loss (fastai's ``TerminateOnNaNCallback``: ``isinf or isnan``).
- ``k×min``: loss > k × the lowest loss seen before.
- ``lightning_dt``: Lightning ``EarlyStopping(check_finite=True, divergence_threshold=D)`` on the
  training loss at every point, patience off: stop when the loss is non-finite or above D, with D
  the run's initial loss times a factor (Lightning takes an absolute D; this is one way to set it).
- ``fastai_div``: fastai ``LRFinder``'s stop: the smoothed loss (fastai ``AvgSmoothLoss``, EMA with
  β = 0.98 per step, debiased; over a gap of Δ steps β^Δ) above 4 × its best value so far.
- ``divergence_rule``: the paper's rule (``labels.divergence_reason``), the detector's hard part alone.
"""
from __future__ import annotations

import math

import numpy as np

from . import labels
from .detector import FailureDetector, RunCurve

CLASS_COLUMN = "family"
NEAR_BEST = 0.05
KINDS = ("diverged", "lost progress", "never learns")


def curve_steps(steps_run: int, n_points: int) -> list[int]:
    """1-based steps of a stored curve: the sweep trainer keeps 50 evenly spaced points over the steps
    run, first and last included, all of them when fewer (``sweep.trainer.downsample``)."""
    if steps_run <= 50:
        idx = list(range(steps_run))
    else:
        idx = sorted(set(int(v) for v in np.linspace(0, steps_run - 1, 50).round().astype(int)))
    if len(idx) != n_points:
        raise ValueError(f"a curve of {n_points} points does not match {steps_run} steps run")
    return [i + 1 for i in idx]


def label_runs(runs):
    """Per-run labels (a copy of ``runs`` with added columns): ``failed``, ``best_loss``,
    ``never_learns``, ``unstable``, ``keep_running`` and ``kind`` (ok / diverged / lost progress /
    never learns)."""
    df = runs.reset_index(drop=True).copy()
    failed = np.zeros(len(df), bool)
    best = np.full(len(df), math.nan)
    never = np.zeros(len(df), bool)
    for _, g in df.groupby("model_id", sort=False):
        s = labels.ladder_summary(g["lr"].tolist(), g["final_loss"].tolist(), g["diverged"].tolist(),
                                  float(g["marginal_loss"].iloc[0]))
        failed[g.index] = s["failed"]
        best[g.index] = s["best_loss"]
        never[g.index] = s["never_learns"]
    df["failed"], df["best_loss"], df["never_learns"] = failed, best, never
    df["unstable"] = [labels.unstable(c, bool(d)) for c, d in zip(df["loss_curve"], df["diverged"])]
    df["keep_running"] = ~df["failed"] & (df["final_loss"] <= (1 + NEAR_BEST) * df["best_loss"])
    df["kind"] = np.where(~df["failed"], "ok", np.where(df["diverged"], "diverged",
                                                          np.where(df["never_learns"], "never learns",
                                                                   "lost progress")))
    return df


def run_curves(df) -> list[RunCurve]:
    out = []
    for r in df.itertuples():
        loss = [float(v) for v in r.loss_curve]
        out.append(RunCurve(curve_steps(int(r.steps_run), len(loss)), loss, [float(v) for v in r.grad_norm_curve],
                            int(r.steps), float(r.marginal_loss)))
    return out


# ---------------------------------------------------------------------------------- simple rules
def _first(curve: RunCurve, hit) -> int | None:
    for s, l, g in zip(curve.steps, curve.loss, curve.grad_norm):
        if hit(s, l, g):
            return int(s)
    return None


def rule_nan(curve):
    return _first(curve, lambda s, l, g: not math.isfinite(l))


def rule_divergence(curve):
    return _first(curve, lambda s, l, g: labels.divergence_reason(l, g) is not None)


def rule_k_min(k):
    def rule(curve):
        best = math.inf
        for s, l in zip(curve.steps, curve.loss):
            if not math.isfinite(l) or l > k * best:
                return int(s)
            best = min(best, l)
        return None

    return rule


def rule_lightning(factor):
    def rule(curve):
        limit = factor * curve.loss[0]
        return _first(curve, lambda s, l, g: not math.isfinite(l) or l > limit)

    return rule


def rule_fastai(beta=0.98, factor=4.0):
    def rule(curve):
        val, w, best, prev = 0.0, 0.0, math.inf, 0
        for s, l in zip(curve.steps, curve.loss):
            if not math.isfinite(l):
                return int(s)  # the smoothed loss is non-finite too: > 4 × best is False, NaN stays;
                # fastai's recorder would carry NaN; TerminateOnNaN stops here
            b = beta ** (s - prev)
            val, w, prev = b * val + (1 - b) * l, b * w + (1 - b), s
            sm = val / w
            if sm > factor * best:
                return int(s)
            best = min(best, sm)
        return None

    return rule


SIMPLE_RULES = {
    "nan": rule_nan,
    "1.5x_min": rule_k_min(1.5),
    "2x_min": rule_k_min(2.0),
    "4x_min": rule_k_min(4.0),
    "lightning_dt_1.5x_init": rule_lightning(1.5),
    "lightning_dt_2x_init": rule_lightning(2.0),
    "fastai_div_4x_best": rule_fastai(),
    "divergence_rule": rule_divergence,
}


# ---------------------------------------------------------------------------------- scoring
def score(stops, df) -> dict:
    """Metrics of stop steps (None = never stopped), one per run of ``df``."""
    stop = np.array([math.nan if s is None else float(s) for s in stops])
    hit = ~np.isnan(stop)
    saved = np.where(hit, (df["steps"].to_numpy(float) - stop) / df["steps"].to_numpy(float), 0.0)
    failed = df["failed"].to_numpy(bool)
    keep = df["keep_running"].to_numpy(bool)
    unst = df["unstable"].to_numpy(bool)
    out = dict(n_failed=int(failed.sum()), n_keep_running=int(keep.sum()),
               recall=_frac(hit[failed]),
               saved_median=float(np.median(saved[failed & hit])) if (failed & hit).any() else math.nan,
               saved_median_all=float(np.median(saved[failed])) if failed.any() else math.nan,
               false_alarm=_frac(hit[keep]), n_false_alarm=int(hit[keep].sum()),
               recall_unstable=_frac(hit[unst]))
    kinds = df["kind"].to_numpy()
    out["recall_by_kind"] = {k: _frac(hit[kinds == k]) for k in KINDS}
    return out


def _frac(mask) -> float:
    return float(np.mean(mask)) if len(mask) else math.nan


def evaluate(runs, *, detector_params=None, rules=None) -> dict:
    """Leave-one-class-out evaluation of the detector and the simple rules.

    Returns ``{"classes": [...], "methods": {name: {"per_class": {cls: metrics}, "pooled": metrics}},
    "thresholds": {cls: p_stop}, "labels": counts}``.
    """
    df = label_runs(runs)
    curves = run_curves(df)
    params = dict(detector_params or {})
    rules = SIMPLE_RULES if rules is None else rules
    classes = sorted(df[CLASS_COLUMN].unique())
    stops = {name: [None] * len(df) for name in ["detector", *rules]}
    thresholds = {}
    reasons = [None] * len(df)
    for cls in classes:
        test = np.flatnonzero(df[CLASS_COLUMN].to_numpy() == cls)
        train = np.flatnonzero(df[CLASS_COLUMN].to_numpy() != cls)
        det = FailureDetector(**params).fit([curves[i] for i in train], df["failed"].to_numpy()[train],
                                            keep_running=df["keep_running"].to_numpy()[train])
        thresholds[cls] = det.p_stop_
        for i in test:
            v = det.detect(curves[i])
            stops["detector"][i] = None if v is None else v.step
            reasons[i] = None if v is None else v.reason
    for name, rule in rules.items():
        stops[name] = [rule(c) for c in curves]
    methods = {}
    cls_col = df[CLASS_COLUMN].to_numpy()
    for name, st in stops.items():
        per = {}
        for cls in classes:
            m = cls_col == cls
            per[cls] = score([s for s, k in zip(st, m) if k], df[m])
        methods[name] = dict(per_class=per, pooled=score(st, df))
    counts = dict(runs=int(len(df)), failed=int(df["failed"].sum()), keep_running=int(df["keep_running"].sum()),
                  by_kind={k: int((df["kind"] == k).sum()) for k in ("ok", *KINDS)},
                  unstable=int(df["unstable"].sum()))
    fl = df["failed"].to_numpy()
    stopped_reasons = {}
    for r, f in zip(reasons, fl):
        if r is not None:
            key = "failed" if f else "not failed"
            stopped_reasons.setdefault(key, {}).setdefault(r, 0)
            stopped_reasons[key][r] += 1
    return dict(classes=classes, methods=methods, thresholds=thresholds, labels=counts,
                detector_reasons=stopped_reasons,
                detector_params=dict(FailureDetector(**params).__dict__))
