"""Curvature of a loss at the current weights: the edge-of-stability quantities and a line search.

Three measurements, each of a scalar loss ``loss_fn()`` over the trainable parameters θ (flattened,
n entries):

``hessian_top_eig``
    λ_max(H), the top eigenvalue of the Hessian ∇²L(θ), by Lanczos on Hessian–vector products
    (double backward: Hv = ∇(∇L·v)). Plain gradient descent is stable on a quadratic while
    lr < 2/λ_max (with heavy-ball momentum μ: lr < 2(1 + μ)/λ_max).
``preconditioned_top_eig``
    λ_max(P⁻¹H) for a diagonal preconditioner P (Adam's √v̂ + ε), as the top eigenvalue of the
    symmetric P^{-1/2} H P^{-1/2}. Adam with β1 is stable on a quadratic while
    lr < (2 + 2β1) / ((1 − β1) λ_max(P⁻¹H)) — 38/λ for β1 = 0.9 (Cohen et al., 2022, "Adaptive
    gradient methods at the edge of stability").
``line_search``
    L(θ − η u) along a fixed update direction u (the optimizer's first update per unit LR) on a
    log grid of η, then bisection in ln η: the smallest η at which the loss is back above L(θ)
    past the grid's minimiser (``overshoot``: the first step already undoes itself beyond it) and
    the grid's minimiser.
    Forward passes only, so it works where double backward does not.

Lanczos runs in float64 with re-orthogonalisation (``lanczos_top``); its start vector is
drawn from a private generator (``seed``), so the caller's RNG is untouched. Every function leaves
the parameters as it found them (the line search restores θ exactly from a copy) and gradients
where they were.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: the line search's grid of η (per unit of the direction u): 1e-6 … 10, half-decade steps
LINE_GRID = tuple(10.0 ** (k / 2) for k in range(-12, 3))


@dataclass(frozen=True)
class LineSearch:
    """Result of ``line_search``: ``overshoot`` (smallest η with L(θ − ηu) > L(θ), inf when no grid
    point is above; NaN when the loss is not finite at θ), ``argmin`` (the grid's minimiser),
    ``loss0`` = L(θ), ``loss_min`` = the grid's minimum, ``n_forward`` (forward passes used)."""
    overshoot: float
    argmin: float
    loss0: float
    loss_min: float
    n_forward: int


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """∇L(θ) flattened, shape (n,), float64; the parameters' ``.grad`` are left untouched."""
    ps = _params(model)
    gs = torch.autograd.grad(loss_fn(), ps, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(ps, gs)])


def _hvp_operator(model: nn.Module, loss_fn: Callable[[], torch.Tensor]):
    """v (n,) ↦ H v (n,), float64, by double backward through one graph of the loss."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ps = _params(model)
    with sdpa_kernel(SDPBackend.MATH):      # the fused CPU attention kernels have no double backward
        loss = loss_fn()
    gs = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(ps, gs) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in ps]
    live = [g is not None and g.requires_grad for g in gs]

    def hv(v: torch.Tensor) -> torch.Tensor:
        chunks = list(torch.split(v, sizes))
        dot = sum((g * c.reshape(g.shape).to(g.dtype)).sum()
                  for (p, g), c in zip(pairs, [c for c, ok in zip(chunks, live) if ok]))
        hs = torch.autograd.grad(dot, [p for p, _ in pairs], retain_graph=True, allow_unused=True)
        it = iter(hs)
        out = [(next(it) if ok else None) for ok in live]
        return torch.cat([(torch.zeros(s, dtype=torch.float64) if h is None else h.reshape(-1).double())
                          for h, s in zip(out, sizes)])

    return hv, sum(sizes)


def lanczos_top(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, iters: int = 20, seed: int = 0,
                memory: float = 4e8) -> float:
    """The largest eigenvalue of a symmetric operator ``matvec`` on R^n (Lanczos, ``iters`` steps,
    re-orthogonalisation against every earlier vector while they fit in ``memory`` bytes, else
    against the last two; the top Ritz value). Exact when ``iters`` ≥ the operator's rank."""
    keep = iters if n * iters * 8 <= memory else 2
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64)
    q /= q.norm()
    Q = [q]
    alphas, betas = [], []
    for j in range(min(iters, n)):
        w = matvec(Q[-1])
        a = float(w @ Q[-1])
        alphas.append(a)
        for _ in range(2):                             # re-orthogonalisation (twice is enough)
            for qi in Q:
                w = w - (w @ qi) * qi
        b = float(w.norm())
        if not math.isfinite(b):
            return math.nan
        if b <= 1e-12 * max(1.0, abs(a)) or j == min(iters, n) - 1:
            break
        betas.append(b)
        Q.append(w / b)
        if len(Q) > keep:       # large n: against the last ``keep`` vectors only (the top Ritz
            Q.pop(0)            # value still converges; lost orthogonality only duplicates it)
    T = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    return float(np.linalg.eigvalsh(T)[-1])


def hessian_top_eig(model: nn.Module, loss_fn: Callable[[], torch.Tensor], *, iters: int = 20,
                    seed: int = 0) -> float:
    """λ_max of ∇²L at the current weights (module docstring). Raises RuntimeError where the model
    does not support double backward."""
    hv, n = _hvp_operator(model, loss_fn)
    return lanczos_top(hv, n, iters=iters, seed=seed)


def preconditioned_top_eig(model: nn.Module, loss_fn: Callable[[], torch.Tensor], precond: torch.Tensor, *,
                           iters: int = 20, seed: int = 0) -> float:
    """λ_max(P⁻¹H) for the diagonal ``precond`` P (shape (n,), positive), as λ_max(P^{-1/2} H P^{-1/2})."""
    hv, n = _hvp_operator(model, loss_fn)
    s = precond.double().rsqrt()                                        # (n,)
    return lanczos_top(lambda v: s * hv(s * v), n, iters=iters, seed=seed)


def adam_preconditioner(grads: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """Adam's √v̂ + ε after one step per gradient in ``grads`` (each (n,)) with bias correction and
    equal weights: √(mean g²) + ε, shape (n,)."""
    v = torch.stack([g.double() ** 2 for g in grads]).mean(0)
    return v.sqrt() + eps


@torch.no_grad()
def line_search(model: nn.Module, loss_fn: Callable[[], torch.Tensor], direction: torch.Tensor, *,
                grid: Sequence[float] = LINE_GRID, bisect: int = 8) -> LineSearch:
    """L(θ − η·direction) on ``grid`` and ``bisect`` bisection steps in ln η between the last grid
    point at or below L(θ) and the first above it (module docstring). θ is restored exactly."""
    ps = _params(model)
    saved = [p.detach().clone() for p in ps]
    sizes = [p.numel() for p in ps]
    chunks = [c.reshape(p.shape) for c, p in zip(torch.split(direction, sizes), ps)]
    n_fwd = 0

    def at(eta: float) -> float:
        nonlocal n_fwd
        for p, p0, c in zip(ps, saved, chunks):
            p.copy_(p0 - eta * c.to(p.dtype))
        n_fwd += 1
        v = float(loss_fn())
        return v if math.isfinite(v) else math.inf

    try:
        loss0 = float(loss_fn())
        n_fwd += 1
        if not math.isfinite(loss0):
            return LineSearch(math.nan, math.nan, loss0, math.nan, n_fwd)
        vals = [at(e) for e in grid]
        k = int(np.argmin(vals))
        above = [i for i, v in enumerate(vals) if v > loss0 and i >= k]   # past the minimiser
        over = math.inf
        if above:
            i = above[0]
            hi = math.log(grid[i])
            lo = math.log(grid[i - 1]) if i > 0 else hi - 2 * math.log(10.0)
            for _ in range(bisect):
                mid = 0.5 * (lo + hi)
                if at(math.exp(mid)) > loss0:
                    hi = mid
                else:
                    lo = mid
            over = math.exp(hi)
        return LineSearch(over, float(grid[k]), loss0, float(vals[k]), n_fwd)
    finally:
        for p, p0 in zip(ps, saved):
            p.copy_(p0)
