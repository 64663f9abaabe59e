"""The divergence label, in one place: the sweep trainer labels runs with it, serving applies it to
the initial weights (dead at init). Needs nothing but the standard library."""
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
