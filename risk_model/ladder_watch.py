"""Stop a failing run of a learning-rate sweep early, from its siblings.

The single-run detector (``risk_model.detector``) cannot know the model's best loss ``B``, so it
misses most failures of the "plateau high" kind: a run that learns, but ends far above what its best
sibling reaches (the ``failed`` label's second clause). In an LR sweep the siblings are there.
A ``LadderWatch`` is shared by the runs of one sweep (one network and task, several LRs); each run
asks it, step by step, whether it is failing. A run is *failing*

- at once, under the paper's divergence rule (``labels.divergence_reason``: non-finite loss or
  gradient norm, loss > 50, gradient norm > 500); or
- when, at a recorded point (every ``every`` steps), its LR is above the LR of the sibling whose
  smoothed loss is lowest at that step (``B_t``, the lowest over the runs of the sweep, itself
  included, of their latest smoothed loss at or before the step), and its own smoothed loss is above
  ``labels.lost_limit(B_t, R, theta)`` (``B_t + θ (R − B_t)``, R the task's marginal loss), for
  ``persist`` × its planned points in a row (at least ``min_points``), and not before ``fmin`` ×
  its planned steps, and only once ``B_t`` is at least ``min_gap`` × R below R (where the sweep
  has learned little, the noise of the training loss is as large as the gap). Reason
  ``"behind siblings"``.

The smoothed loss is the trailing mean of the last ``smooth_points`` recorded points. A run that has
stopped failing, or that ended (``LadderRun.close``), counts in ``B_t`` only up to its last point.
A sibling that is still running counts with its latest point, so runs of one sweep may run one
after another (a sequential sweep: every earlier sibling is complete) or side by side in one
process. The verdict's ``p_failed`` is, when failing, the held-out precision of the rule (the share
of stopped runs that had failed, ``LadderRule.precision``) and NaN otherwise: the rule does not
give a probability before it fires.

The rule's parameters (``LadderRule``) are chosen on corpus-v3's stored curves, leave-one-class-out,
by ``benchmarks/ladder_rule.py`` (most recall with at most 2% false alarms on runs that ended within
5% of their model's best loss); the shipped ones are in ``models/default/detector/ladder.json``
(``LadderRule.load_default``) and their held-out scores in the README.

Examples
--------
>>> watch = LadderWatch(marginal_loss=5.54)                     # one per sweep  # doctest: +SKIP
>>> for lr in (1e-3, 3e-3, 1e-2, 3e-2):                                          # doctest: +SKIP
...     run = watch.run(lr, total_steps=3000)
...     for step in range(1, 3001):
...         loss, gn = train_step()
...         if run.update(step, loss, gn).failing:
...             print(run.verdict.message()); break
...     run.close()

Pure Python; ``update`` costs a few microseconds per sibling at a recorded point.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .detector import _HARD_REASON, Verdict, check_marginal
from .labels import divergence_reason, lost_limit

FORMAT = "divergence-risk-ladder-rule"
FORMAT_VERSION = 1
#: the reason of a verdict of the sibling rule (``detector.REASONS`` holds it)
REASON = "behind siblings"


@dataclass(frozen=True)
class LadderRule:
    """The parameters of the sibling rule (module docstring). ``precision`` is the held-out share
    of stopped runs that had failed (the verdict's P(failed) once failing); NaN when not measured."""

    theta: float = 0.6
    fmin: float = 0.2
    persist: float = 0.05
    min_gap: float = 0.0
    smooth_points: int = 3
    every: int = 10
    min_points: int = 3
    precision: float = math.nan

    def __post_init__(self):
        for name, lo, hi in (("theta", 0.0, 1.0), ("fmin", 0.0, 1.0), ("persist", 0.0, 1.0), ("min_gap", 0.0, 1.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and lo <= v <= hi):
                raise ValueError(f"LadderRule.{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
        for name in ("smooth_points", "every", "min_points"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"LadderRule.{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.precision, (int, float)) and (math.isnan(self.precision) or 0 <= self.precision <= 1)):
            raise ValueError(f"LadderRule.precision must be a probability or NaN, got {self.precision!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precision"] = None if math.isnan(self.precision) else self.precision
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "rule": d}

    @classmethod
    def from_dict(cls, d: dict) -> "LadderRule":
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("rule"), dict):
            raise ValueError(f"not a ladder rule file (format {FORMAT!r} expected)")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"ladder rule format_version {d.get('format_version')!r}; this version reads {FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        extra = set(d["rule"]) - known
        if extra:
            raise ValueError(f"unknown ladder rule key(s): {', '.join(sorted(extra))}")
        rule = dict(d["rule"])
        if rule.get("precision") is None:
            rule["precision"] = math.nan
        return cls(**rule)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "LadderRule":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a ladder rule ({e})") from e
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def load_default(cls) -> "LadderRule":
        """The shipped rule, ``models/default/detector/ladder.json``."""
        return cls.load(default_rule_path())


def default_rule_path() -> Path:
    """``models/default/detector/ladder.json``."""
    from .detector import default_detector_path

    return default_detector_path().with_name("ladder.json")


class LadderWatch:
    """The runs of one LR sweep (module docstring). ``run(lr, total_steps)`` adds a run and returns
    its ``LadderRun``.

    Parameters
    ----------
    marginal_loss : float
        The task's marginal (best context-free) loss R in nats (``detector.marginal_loss`` of a sample
        of the training targets).
    rule : LadderRule, str or Path, optional
        The rule or its JSON file; the shipped one when omitted.
    """

    def __init__(self, marginal_loss: float, rule: LadderRule | str | Path | None = None):
        if marginal_loss is None:
            raise ValueError("LadderWatch needs the task's marginal_loss (risk_model.detector.marginal_loss)")
        check_marginal(marginal_loss)
        if rule is None:
            rule = LadderRule.load_default()
        elif not isinstance(rule, LadderRule):
            rule = LadderRule.load(rule)
        self.marginal_loss = float(marginal_loss)
        self.rule = rule
        self.runs: list[LadderRun] = []

    def run(self, lr: float, total_steps: int) -> "LadderRun":
        """Add a run at peak learning rate ``lr`` of ``total_steps`` planned steps."""
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive learning rate, got {lr!r}")
        if not (isinstance(total_steps, (int, float)) and math.isfinite(total_steps) and total_steps >= 1):
            raise ValueError(f"total_steps must be a positive number of steps, got {total_steps!r}")
        r = LadderRun(self, float(lr), float(total_steps))
        self.runs.append(r)
        return r

    def best(self, step: float) -> tuple[float, float]:
        """``(B_t, lr)``: the lowest smoothed loss over the runs at or before ``step`` and its run's LR
        (``(inf, nan)`` when no run has a point there). Ties go to the lower LR."""
        best, lr = math.inf, math.nan
        for r in self.runs:
            v = r.value_at(step)
            if v is not None and (v < best or (v == best and r.lr < lr)):
                best, lr = v, r.lr
        return best, lr


class LadderRun:
    """One run of a ``LadderWatch``; ``update(step, loss, grad_norm)`` returns a ``detector.Verdict``.

    ``record`` and ``judge`` are its two halves (a replay of stored curves records every run's point
    before judging any, so that the order of the runs does not matter)."""

    def __init__(self, watch: LadderWatch, lr: float, total_steps: float):
        rule = watch.rule
        self.watch, self.lr, self.total_steps = watch, lr, total_steps
        planned = math.ceil(total_steps / rule.every)
        self.need = max(rule.min_points, round(rule.persist * planned))
        self.start_step = rule.fmin * total_steps
        self._steps: list[float] = []      # (n_points,) steps of the recorded points
        self._smooth: list[float] = []     # (n_points,) smoothed loss at them
        self._raw: list[float] = []        # (n_points,) loss at them
        self._run = 0
        self._last = -math.inf
        self.ended = False
        self.verdict = None

    @property
    def failing(self) -> bool:
        return self.verdict is not None and self.verdict.failing

    def value_at(self, step: float) -> float | None:
        """The smoothed loss at this run's latest point at or before ``step``; None when there is
        none, or when the run has ended (stopped, or ``close``) before ``step``."""
        k = bisect.bisect_right(self._steps, step)
        if k == 0:
            return None
        if self.ended and step > self._steps[-1]:
            return None
        return self._smooth[k - 1]

    def close(self) -> None:
        """The run ended (finished or stopped): its curve counts in ``B_t`` only up to its last point."""
        self.ended = True

    def record(self, step, loss, grad_norm) -> bool:
        """Read one step; True when it is a recorded point still to be judged (``judge``). A step
        under the divergence rule makes the run failing at once (and returns False)."""
        if self.failing or self.ended:
            return False
        step, loss, grad_norm = float(step), float(loss), float(grad_norm)
        if step <= self._last:
            return False
        self._last = step
        hard = divergence_reason(loss, grad_norm)
        if hard is not None:
            self.verdict = Verdict(int(step), True, 1.0, _HARD_REASON[hard])
            self.ended = True
            return False
        if self._steps and step < self._steps[-1] + self.watch.rule.every:
            return False
        k = self.watch.rule.smooth_points
        self._raw.append(loss)
        window = self._raw[-k:]
        self._steps.append(step)
        self._smooth.append(sum(window) / len(window))
        return True

    def judge(self):
        """The verdict at the latest recorded point (``record`` returned True)."""
        if self.failing:
            return self.verdict
        step, s = self._steps[-1], self._smooth[-1]
        rule = self.watch.rule
        best, lr_best = self.watch.best(step)
        limit = lost_limit(best, self.watch.marginal_loss, rule.theta) if math.isfinite(best) else math.inf
        learned = best <= (1.0 - rule.min_gap) * self.watch.marginal_loss
        behind = self.lr > lr_best and s > limit and step >= self.start_step and learned
        self._run = self._run + 1 if behind else 0
        feats = {"best_loss": best, "best_lr": lr_best, "limit": limit, "smoothed_loss": s}
        if self._run >= self.need:
            self.verdict = Verdict(int(step), True, rule.precision, REASON, feats)
            self.ended = True
        else:
            self.verdict = Verdict(int(step), False, math.nan, None, feats)
        return self.verdict

    def update(self, step, loss, grad_norm):
        """Read one step's loss and gradient norm (before clipping); returns the verdict (None
        before the first recorded point). Once failing, the verdict stays."""
        if self.record(step, loss, grad_norm):
            return self.judge()
        return self.verdict


def replay(ladder, rule: LadderRule, marginal_loss: float, every: int = 10) -> list[tuple[float, str] | None]:
    """Replay one ladder's stored curves side by side (point by point, every run recorded before
    any is judged) and return, per run, ``(stop step, reason)`` or None when never stopped.

    ``ladder``: a sequence of dicts with ``lr``, ``steps``, ``loss_curve`` and ``grad_norm_curve``
    (points at steps 1, 1 + every, 1 + 2·every, …; corpus-v3's ``*_curve_10``) and optionally
    ``diverged`` with ``diverge_step``: a run that diverged between stored points counts as stopped
    at ``diverge_step`` (the watch, reading every step, stops it there)."""
    watch = LadderWatch(marginal_loss, rule)
    runs = [watch.run(float(r["lr"]), float(r["steps"])) for r in ladder]
    n = max((len(r["loss_curve"]) for r in ladder), default=0)
    for t in range(n):
        step = 1 + every * t
        todo = []
        for run, r in zip(runs, ladder):
            lc, gc = r["loss_curve"], r["grad_norm_curve"]
            if t < len(lc):
                if run.record(step, lc[t], gc[t] if t < len(gc) else 0.0):
                    todo.append(run)
            elif not run.ended:
                run.close()
        for run in todo:
            run.judge()
    out = []
    for run, r in zip(runs, ladder):
        if run.failing:
            out.append((float(run.verdict.step), run.verdict.reason))
        elif r.get("diverged"):
            ds = r.get("diverge_step")
            ds = float(ds) if ds is not None and math.isfinite(float(ds)) else 1 + every * (len(r["loss_curve"]) - 1)
            out.append((ds, "diverged"))
        else:
            out.append(None)
    return out


def replay_runs(runs, rule: LadderRule, every: int = 10):
    """``replay`` of every model's ladder in a runs table (corpus-v3's columns: ``model_id``, ``lr``,
    ``steps``, ``marginal_loss``, ``loss_curve_10``, ``grad_norm_curve_10``, ``diverged``,
    ``diverge_step``): a pandas Series on the table's index, each run's stop step (NaN: never stopped)."""
    import pandas as pd

    stop = pd.Series(float("nan"), index=runs.index)
    for _, g in runs.groupby("model_id"):
        ladder = [dict(lr=r.lr, steps=r.steps, loss_curve=r.loss_curve_10, grad_norm_curve=r.grad_norm_curve_10,
                       diverged=r.diverged, diverge_step=r.diverge_step) for r in g.itertuples()]
        for idx, s in zip(g.index, replay(ladder, rule, float(g.marginal_loss.iloc[0]), every)):
            if s is not None:
                stop[idx] = s[0]
    return stop
