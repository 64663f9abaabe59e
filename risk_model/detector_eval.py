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

Corpora (``prepare``). corpus-v2: every row is a run, ``final_loss`` (train) is the label loss, the
curve is the 50 stored points. corpus-v3 (it has ``horizon_of`` and ``final_eval_loss``): each
training run is stored once per horizon (``steps`` 300 and 1000, the shorter row a prefix of the
longer run's curve); only the full-length row (``steps == horizon_of``) is kept, so no run's curve
counts twice, and its held-out ``final_eval_loss`` is the label loss (as in the corpus's own
``failed``, ``full_ladder.label_ladder``). Its curve is every stored point: the points every 10 steps
(``loss_curve_10``, steps 1, 11, 21, …) and the 50 evenly spaced ones (``loss_curve``, which end at the
last step run, a diverged run's diverge step), merged by step.

``evaluate`` fits leave-one-class-out; ``evaluate_fixed`` scores one fitted detector (the shipped
one) on every run. Both score the same simple rules on the same curves.
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


def is_v3(runs) -> bool:
    """A corpus-v3 frame: one row per run and horizon, with held-out eval losses."""
    return "horizon_of" in runs.columns and "final_eval_loss" in runs.columns


def _merged_curve(r) -> tuple[list[int], list[float], list[float]]:
    pts = {}
    l10, g10 = list(r.loss_curve_10), list(r.grad_norm_curve_10)
    for k, (l, g) in enumerate(zip(l10, g10)):
        pts[1 + 10 * k] = (float(l), float(g))
    loss = [float(v) for v in r.loss_curve]
    for s, l, g in zip(curve_steps(int(r.steps_run), len(loss)), loss, r.grad_norm_curve):
        pts[s] = (l, float(g))  # the float64 value where both hold the step
    steps = sorted(pts)
    if steps[-1] > int(r.steps_run):
        raise ValueError(f"run {r.run_id}: a stored point at step {steps[-1]} after its {r.steps_run} steps run")
    return steps, [pts[s][0] for s in steps], [pts[s][1] for s in steps]


def prepare(runs, corpus: str | None = None):
    """The runs of one corpus in the form ``label_runs`` and ``run_curves`` read (a copy): the
    columns ``corpus``, ``label_loss`` and the curve (``curve_step``, ``curve_loss``, ``curve_grad``).
    A corpus-v3 frame keeps only its full-length rows (module doc). A frame already prepared is
    returned as it is."""
    if "label_loss" in runs.columns:
        return runs
    v3 = is_v3(runs)
    df = runs.reset_index(drop=True)
    if v3:
        df = df[df["steps"] == df["horizon_of"]].reset_index(drop=True)
        if df["run_id"].duplicated().any():
            raise ValueError("corpus-v3: a run has more than one full-length row")
    df = df.copy()
    df["corpus"] = corpus if corpus is not None else ("corpus-v3" if v3 else "corpus-v2")
    df["label_loss"] = df["final_eval_loss" if v3 else "final_loss"].astype(float)
    if v3:
        cs = [_merged_curve(r) for r in df.itertuples()]
    else:
        cs = [(curve_steps(int(r.steps_run), len(r.loss_curve)), [float(v) for v in r.loss_curve],
               [float(v) for v in r.grad_norm_curve]) for r in df.itertuples()]
    df["curve_step"] = [c[0] for c in cs]
    df["curve_loss"] = [c[1] for c in cs]
    df["curve_grad"] = [c[2] for c in cs]
    # ``unstable`` is read from the curve its corpus defines it on (corpus-v3: every 10th step)
    df["unstable_curve"] = df["loss_curve_10" if v3 else "loss_curve"]
    return df


def label_runs(runs):
    """Per-run labels (a copy of ``prepare(runs)`` with added columns): ``failed``, ``best_loss``,
    ``never_learns``, ``unstable``, ``keep_running`` and ``kind`` (ok / diverged / lost progress /
    never learns). The ladders are per ``corpus`` and ``model_id``, on ``label_loss``; a column of the
    same name in the corpus (corpus-v3 stores its own ``failed``) is replaced: ``label_check`` compares."""
    df = prepare(runs).copy()
    failed = np.zeros(len(df), bool)
    best = np.full(len(df), math.nan)
    never = np.zeros(len(df), bool)
    for _, g in df.groupby(["corpus", "model_id"], sort=False):
        s = labels.ladder_summary(g["lr"].tolist(), g["label_loss"].tolist(), g["diverged"].tolist(),
                                  float(g["marginal_loss"].iloc[0]))
        failed[g.index] = s["failed"]
        best[g.index] = s["best_loss"]
        never[g.index] = s["never_learns"]
    if "failed" in df.columns:
        df["stored_failed"] = df["failed"].astype(bool)
    df["failed"], df["best_loss"], df["never_learns"] = failed, best, never
    df["unstable"] = [labels.unstable(c, bool(d)) for c, d in zip(df["unstable_curve"], df["diverged"])]
    df["keep_running"] = ~df["failed"] & (df["label_loss"] <= (1 + NEAR_BEST) * df["best_loss"])
    df["kind"] = np.where(~df["failed"], "ok", np.where(df["diverged"], "diverged",
                                                          np.where(df["never_learns"], "never learns",
                                                                   "lost progress")))
    return df


def label_check(df) -> dict | None:
    """How the recomputed ``failed`` compares with the corpus's stored one (None if it stores none)."""
    if "stored_failed" not in df.columns:
        return None
    diff = df["stored_failed"].to_numpy(bool) != df["failed"].to_numpy(bool)
    return dict(runs=int(len(df)), stored_failed=int(df["stored_failed"].sum()), disagree=int(diff.sum()),
                disagree_run_ids=df.loc[diff, "run_id"].tolist())


def preflight_priors(df, corpus_dirs, *, groups=(), threshold: float = 0.2) -> np.ndarray:
    """The pre-flight P(failed) of each run of ``df`` (``label_runs`` of one or more corpora), held
    out as the detector is: predictor v3 (``heldout_v3``, tree groups ``groups``) fitted
    leave-one-class-out on the ladder corpora ``corpus_dirs``, each class's runs scored by the fit
    that did not see that class. Shape (len(df),); NaN where the run's network is not in the
    predictor's table (dead at init, or a rebuild that did not reproduce its initial loss)."""
    import pandas as pd

    from .heldout_v3 import heldout_predictions, load_v3, loco_splits

    nets, runs, _ = load_v3(corpus_dirs)
    pred = heldout_predictions(nets, runs, tuple(groups), split=loco_splits(nets), threshold=threshold)
    key = pd.Series(pred["p_failed"], index=pd.MultiIndex.from_arrays([runs["model_id"], runs["lr"].astype(float)]))
    key = key[~key.index.duplicated()]
    return np.array([key.get((m, float(lr)), math.nan) for m, lr in zip(df["model_id"], df["lr"])], dtype=float)


def run_curves(df) -> list[RunCurve]:
    """The runs' ``RunCurve``s; a ``prior`` column (the held-out pre-flight P(failed),
    ``preflight_priors``) goes into ``RunCurve.prior``."""
    df = prepare(df)
    priors = df["prior"].to_numpy(float) if "prior" in df.columns else [None] * len(df)
    return [RunCurve(list(r.curve_step), list(r.curve_loss), list(r.curve_grad), int(r.steps),
                     float(r.marginal_loss), None if p is None else float(p))
            for r, p in zip(df.itertuples(), priors)]


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


def _counts(df) -> dict:
    return dict(runs=int(len(df)), failed=int(df["failed"].sum()), keep_running=int(df["keep_running"].sum()),
                by_kind={k: int((df["kind"] == k).sum()) for k in ("ok", *KINDS)},
                unstable=int(df["unstable"].sum()), models=int(df.groupby(["corpus", "model_id"]).ngroups))


def _results(df, classes, stops, reasons) -> dict:
    """Per-class and pooled metrics of every rule's stops; per corpus too when ``df`` pools corpora."""
    cls_col = df[CLASS_COLUMN].to_numpy()
    corpora = sorted(df["corpus"].unique())

    def split(st, mask):
        return score([s for s, k in zip(st, mask) if k], df[mask])

    methods = {}
    for name, st in stops.items():
        per = {cls: split(st, cls_col == cls) for cls in classes}
        methods[name] = dict(per_class=per, pooled=score(st, df))
        if len(corpora) > 1:
            methods[name]["per_corpus"] = {
                c: dict(pooled=split(st, df["corpus"].to_numpy() == c),
                        per_class={cls: split(st, (df["corpus"].to_numpy() == c) & (cls_col == cls))
                                   for cls in classes if ((df["corpus"].to_numpy() == c) & (cls_col == cls)).any()})
                for c in corpora}
    fl = df["failed"].to_numpy()
    stopped_reasons = {}
    for r, f in zip(reasons, fl):
        if r is not None:
            key = "failed" if f else "not failed"
            stopped_reasons.setdefault(key, {}).setdefault(r, 0)
            stopped_reasons[key][r] += 1
    out = dict(classes=classes, corpora=corpora, methods=methods, labels=_counts(df),
               detector_reasons=stopped_reasons)
    if len(corpora) > 1:
        out["labels_per_corpus"] = {c: _counts(df[df["corpus"] == c]) for c in corpora}
    chk = label_check(df)
    if chk is not None:
        out["label_check"] = chk
    return out


def corpus_weights(df) -> np.ndarray:
    """Per-run weights that give each corpus of ``df`` the same total weight (mean 1)."""
    c = df["corpus"].to_numpy()
    names, counts = np.unique(c, return_counts=True)
    per = dict(zip(names, len(c) / (len(names) * counts)))
    return np.array([per[x] for x in c], dtype=float)


def evaluate(runs, *, detector_params=None, rules=None, balance: bool = False) -> dict:
    """Leave-one-class-out evaluation of the detector and the simple rules.

    ``runs``: one corpus's frame, or ``label_runs`` of several corpora concatenated (pooled: each
    held-out class is held out of every corpus). ``balance``: each corpus weighs the same in the
    detector's fit (``corpus_weights``).

    Returns ``{"classes": [...], "methods": {name: {"per_class": {cls: metrics}, "pooled": metrics}},
    "thresholds": {cls: p_stop}, "labels": counts}`` (and ``per_corpus`` under each method when pooled).
    """
    df = runs if "keep_running" in runs.columns else label_runs(runs)
    curves = run_curves(df)
    weights = corpus_weights(df) if balance else None
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
                                            keep_running=df["keep_running"].to_numpy()[train],
                                            sample_weight=None if weights is None else weights[train])
        thresholds[cls] = det.p_stop_
        for i in test:
            v = det.detect(curves[i])
            stops["detector"][i] = None if v is None else v.step
            reasons[i] = None if v is None else v.reason
    for name, rule in rules.items():
        stops[name] = [rule(c) for c in curves]
    out = _results(df, classes, stops, reasons)
    out["thresholds"] = thresholds
    out["detector_params"] = dict(FailureDetector(**params).__dict__)
    return out


def evaluate_fixed(det: FailureDetector, runs, *, rules=None) -> dict:
    """One fitted detector (e.g. the shipped one) and the simple rules on every run of ``runs``,
    per class and pooled; nothing is fitted. Same structure as ``evaluate`` (``thresholds`` holds the
    detector's own ``p_stop`` for every class)."""
    df = runs if "keep_running" in runs.columns else label_runs(runs)
    curves = run_curves(df)
    rules = SIMPLE_RULES if rules is None else rules
    classes = sorted(df[CLASS_COLUMN].unique())
    stops, reasons = {"detector": []}, []
    for c in curves:
        v = det.detect(c)
        stops["detector"].append(None if v is None else v.step)
        reasons.append(None if v is None else v.reason)
    for name, rule in rules.items():
        stops[name] = [rule(c) for c in curves]
    out = _results(df, classes, stops, reasons)
    out["thresholds"] = {cls: det.p_stop_ for cls in classes}
    out["detector_params"] = dict(det.to_dict()["params"], p_stop=det.p_stop_, lost_stop=det.lost_stop_,
                                  n_runs=det.n_runs_)
    return out
