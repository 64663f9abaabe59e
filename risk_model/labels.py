"""The run labels, in one place: the paper's divergence rule (the sweep trainer labels runs with it,
serving applies it to the initial weights: dead at init) and ours, ``failed`` and ``unstable`` (corpus-v3).
Needs nothing but the standard library."""
from __future__ import annotations

import math

#: a run diverged at the first step whose task loss exceeds this ...
LOSS_LIMIT = 50.0
#: ... or whose gradient norm (before any clipping) exceeds this, or where either is non-finite.
GRAD_LIMIT = 500.0


def divergence_reason(loss: float, grad_norm: float) -> str | None:
    """``"nonfinite"``, ``"loss"`` or ``"grad_norm"`` when one step's loss and gradient norm meet the
    divergence label (checked in that order), else None.

    >>> divergence_reason(3.2, 1.0) is None, divergence_reason(60.0, 1.0), divergence_reason(3.0, float("nan"))
    (True, 'loss', 'nonfinite')
    """
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return "nonfinite"
    if loss > LOSS_LIMIT:
        return "loss"
    if grad_norm > GRAD_LIMIT:
        return "grad_norm"
    return None


# ---------------------------------------------------------------------------------------------------
# corpus-v3 labels (ours): what a user calls a wasted run. DESIGN §7 and docs/method.md define them.
# ---------------------------------------------------------------------------------------------------

#: a run above the model's best LR fails when its final eval loss has lost more than this fraction
#: of what the best run learned: loss > B + LOST_FRACTION · (R − B).
LOST_FRACTION = 0.5
#: the model never learns when its best final eval loss B ≥ (1 − NEVER_LEARNS_MARGIN) · R.
NEVER_LEARNS_MARGIN = 0.02
#: a run below the model's best LR is too slow (the full-ladder walk goes no lower) when its final
#: eval loss is above B + TOO_SLOW_FRACTION · (R − B): it learned less than half of what the best learned.
TOO_SLOW_FRACTION = 0.5
#: a run is unstable when its smoothed loss ends more than this fraction of its progress above its minimum.
UNSTABLE_FRACTION = 0.5
#: the smoothing window of ``unstable``, as a fraction of the curve's points (at least one point).
SMOOTH_FRACTION = 0.1


def never_learns(best_loss: float, marginal_loss: float) -> bool:
    """True when the model's best final eval loss ``B`` is within ``NEVER_LEARNS_MARGIN`` of the task's
    marginal loss ``R`` (or not finite): no run of its ladder learned anything.

    >>> never_learns(5.5, 5.54), never_learns(2.0, 5.54)
    (True, False)
    """
    return not math.isfinite(best_loss) or best_loss >= (1.0 - NEVER_LEARNS_MARGIN) * marginal_loss


def lost_limit(best_loss: float, marginal_loss: float, fraction: float = LOST_FRACTION) -> float:
    """``B + fraction · (R − B)``: the loss above which a run has lost more than ``fraction`` of what
    the best run (loss ``B``) learned against the task's marginal loss ``R``. ``failed`` uses it with
    ``LOST_FRACTION`` on the final loss; the sweep-aware stop rule (``risk_model.ladder_watch``) with
    its fitted fraction on the loss so far.

    >>> lost_limit(2.0, 6.0), lost_limit(2.0, 6.0, 0.75)
    (4.0, 5.0)
    """
    return best_loss + fraction * (marginal_loss - best_loss)


def failed(diverged: bool, lr: float, final_loss: float, best_lr: float, best_loss: float,
           marginal_loss: float) -> bool:
    """The ``failed`` label of one run of a ladder.

    A run fails when it diverged (the paper's rule), or its model never learns
    (:func:`never_learns`), or it ran at an LR above the model's best LR ``best_lr`` and its final
    eval loss is above ``B + ½(R − B)``: it lost more than half of what the best run learned.
    Slow runs below the best LR are not failures. A non-finite final loss counts as lost.

    >>> failed(False, 0.3, 5.4, 1e-2, 2.0, 5.54), failed(False, 1e-4, 5.4, 1e-2, 2.0, 5.54)
    (True, False)
    """
    if diverged or never_learns(best_loss, marginal_loss):
        return True
    if lr <= best_lr:
        return False
    return not math.isfinite(final_loss) or final_loss > lost_limit(best_loss, marginal_loss)


def too_slow(final_loss: float, best_loss: float, marginal_loss: float) -> bool:
    """True when a run's final eval loss is above ``B + TOO_SLOW_FRACTION · (R − B)`` (or not
    finite): it learned less than half of what the model's best run learned. The full-ladder walk
    (``risk_model.sweep.full_ladder``) stops going down there; it is not a failure.

    >>> too_slow(5.0, 2.0, 5.54), too_slow(3.0, 2.0, 5.54)
    (True, False)
    """
    return not math.isfinite(final_loss) or final_loss > lost_limit(best_loss, marginal_loss, TOO_SLOW_FRACTION)


def _smooth(values) -> list[float]:
    """Trailing mean over ``max(1, round(SMOOTH_FRACTION · n))`` points; non-finite values stay non-finite."""
    vals = [float(v) for v in values]
    w = max(1, round(SMOOTH_FRACTION * len(vals)))
    out, acc = [], 0.0
    for i, v in enumerate(vals):
        acc += v
        if i >= w:
            acc -= vals[i - w]
        out.append(acc / min(i + 1, w) if math.isfinite(acc) else math.inf)
    return out


def unstable(loss_curve, diverged: bool = False) -> bool:
    """The ``unstable`` label of one run, from its own loss curve (evenly spaced points, first = the
    initial loss): the smoothed loss (:func:`_smooth`) ends more than ``UNSTABLE_FRACTION`` of its
    progress (first point minus the smoothed minimum) above that minimum. A diverged run, or one
    whose curve is non-finite, is unstable; a curve that never went below its start is not.

    >>> unstable([5, 4, 3, 2, 2, 2, 2, 2, 2, 2]), unstable([5, 4, 3, 2, 3, 4, 5, 5, 5, 5])
    (False, True)
    """
    if diverged:
        return True
    s = _smooth(loss_curve)
    if not s or not all(math.isfinite(v) for v in s):
        return True
    lo = min(s)
    progress = float(loss_curve[0]) - lo
    if progress <= 0:
        return False
    return s[-1] - lo > UNSTABLE_FRACTION * progress


def ladder_summary(lrs, final_losses, diverged, marginal_loss: float) -> dict:
    """Per-model labels of one ladder: the best LR and the first failed and diverged LRs, bracketed.

    Parameters
    ----------
    lrs, final_losses, diverged : sequences of shape (n_runs,)
        Each run's learning rate, final eval loss and the paper's ``diverged``.
    marginal_loss : float
        The task's ``R``.

    Returns
    -------
    dict with ``best_loss`` (B), ``lr_best`` and ``lr_best_lo``/``lr_best_hi`` (the neighbouring
    rungs run, NaN at an end), ``never_learns``, ``failed`` (per run, in the input order),
    ``lr_fail_min`` (smallest failed LR above ``lr_best``; NaN if none) with ``lr_fail_lo`` (largest
    not-failed LR below it), and ``lr_diverge_min`` with ``lr_diverge_lo`` likewise.
    A model that never learns fails at every LR: ``lr_fail_min`` is its smallest LR.
    """
    runs = sorted(zip((float(x) for x in lrs), (float(x) for x in final_losses), (bool(x) for x in diverged),
                      range(len(lrs))))
    ok = [(lv, lr) for lr, lv, dv, _ in runs if not dv and math.isfinite(lv)]
    best_loss, lr_best = min(ok) if ok else (math.inf, math.nan)
    nl = never_learns(best_loss, marginal_loss)
    fl = [failed(dv, lr, lv, lr_best, best_loss, marginal_loss) for lr, lv, dv, _ in runs]
    grid = [r[0] for r in runs]

    def first(flags, after=-math.inf):
        for k, (lr, f) in enumerate(zip(grid, flags)):
            if f and lr > after:
                lo = max((g for g, f2 in zip(grid[:k], flags[:k]) if not f2), default=math.nan)
                return lr, lo
        return math.nan, max((g for g, f2 in zip(grid, flags) if not f2), default=math.nan)

    fail_min, fail_lo = first(fl, -math.inf if nl else lr_best)
    div_min, div_lo = first([r[2] for r in runs])
    if math.isnan(lr_best):
        best_lo = best_hi = math.nan
    else:
        k = grid.index(lr_best)
        best_lo = grid[k - 1] if k > 0 else math.nan
        best_hi = grid[k + 1] if k + 1 < len(grid) else math.nan
    per_run = [False] * len(runs)
    for (_, _, _, i), f in zip(runs, fl):
        per_run[i] = f
    return dict(best_loss=best_loss, lr_best=lr_best, lr_best_lo=best_lo, lr_best_hi=best_hi,
                never_learns=nl, failed=per_run, lr_fail_min=fail_min, lr_fail_lo=fail_lo,
                lr_diverge_min=div_min, lr_diverge_lo=div_lo)
