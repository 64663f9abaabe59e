"""Koopman Spectral Shaping (KSS): a differentiable spectral regularizer for training (DESIGN §9).

Per layer, the rank-r randomized DMD eigenvalues ``λ_j`` of the block's token states are computed
in torch from the training forward pass, so the loss has a gradient with respect to the weights:

    L_layer = Σ_j σ(T(|λ_j| − τ_u)) · softplus(|λ_j| − τ_u)²  +  β (m_soft − γ)²
    m_soft  = (1/r) Σ_j σ(T(|λ_j| − τ_l)) · σ(T(τ_u − |λ_j|))

with T = 20, τ_u = 1.05, τ_l = 0.90. The first term pushes expansive modes back inside the unit
band; the second steers the soft near-unit mass towards γ. The training objective is
``task_loss + α · mean(L_layer over a random half of the blocks)``, applied every ``every`` steps.

Two properties of this formula worth knowing (they follow from T = 20 on a band 0.15 wide):
the unstable term is not zero inside the band (an eigenvalue at |λ| = 0.97 costs 0.072, about a
tenth of one at 1.30), and a single eigenvalue's soft band membership is at most ≈ 0.67 (at the
band centre), so ``m_soft`` is well below the hard near-unit fraction of DESIGN §4.

The differentiable DMD follows ``featurize.dmd`` (DESIGN §3): centre X and Y on their own means,
project onto the top-r principal directions of X (randomized range finder, computed without
gradient), whiten within that subspace, ``Â = Ỹ X̃ᵀ (X̃ X̃ᵀ + ridge)⁻¹``, eigenvalues by
``torch.linalg.eigvals``. Snapshots here are rows, ``(N, d)``, as they come out of a forward pass.
The snapshots are first divided by their RMS (a common scalar, so the eigenvalues are unchanged).
``rank=None``, or ``rank ≥ d``, uses the full numerical rank (exact eigen-decomposition of the
covariance, no randomization).

Bounded gradient **(ours)**. Each layer's loss ℓ is invariant to scaling X and Y together, so its
natural gradient scale is ℓ'/‖(X, Y)‖; whitening, however, multiplies the gradient in the
low-variance directions of X by 1/σ_min, and on the residual stream of LayerNorm models (large,
anisotropic, harmlessly growing) this produced penalty gradients of ~3e3 that tripped the sweep
trainer's divergence check (grad norm > 500) on their own. The gradient reaching the snapshots is
therefore rescaled, by one common factor (direction kept), so that

    ‖(∂ℓ/∂X, ∂ℓ/∂Y)‖_F · ‖(X, Y)‖_F ≤ G,    G = ``max_grad`` = 1 by default,

and a non-finite gradient is zeroed. The eigenvalues and the loss value are untouched.

The mean direction. With ``center=True`` (default, as DESIGN §3) the operator is fitted to the
centred states, so growth of the mean token state across a block is invisible to it; with
``center=False`` the fit is Y ≈ Â X without intercept and the mean's growth appears as an
eigenvalue. Rank-r truncation likewise misses growth in low-variance directions (``rank=None`` sees
them). Neither option lowered divergence in our CPU pilots (No-Norm, d = 64, L = 4, AdamW at lr
1.5e-2 and 2e-2): every variant we tried was within the run-to-run spread that a negligible
perturbation (α = 1e-4) also produces, and strong settings (α = 1, every step; also with the
penalty restricted to each block's own parameters) made nearly every run diverge. In those models
the blocks are strongly expansive (ρ 2–4) by step 25 in runs that train fine, because the stream
starts tiny and the tied head needs it large: the penalty fights what the task needs. See
``benchmarks/results/kss.json``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .capture import CaptureError, _first_tensor, find_blocks
from .dmd import EPS, RANK_RTOL
from .schema import EXPANSIVE, NEAR_LOW

__all__ = ["KoopmanSpectralShaping", "band_penalty", "dmd_eigenvalues", "kss_loss"]

TEMPERATURE = 20.0  # T: sharpness of the soft band edges
TAU_UPPER = EXPANSIVE  # τ_u: |λ| above this is expansive
TAU_LOWER = NEAR_LOW  # τ_l: lower edge of the near-unit band
#: Cap on ‖∂L/∂Â‖_F relative to ‖∂L/∂λ‖₂. The two are equal for a normal Â; a near-defective Â
#: (ill-conditioned eigenvectors) would otherwise turn a modest penalty into a gradient spike.
MAX_GRAD_GAIN = 30.0
#: Bound G on the penalty's gradient reaching the snapshots (see ``kss_loss``):
#: ‖∂ℓ/∂(X, Y)‖_F · ‖(X, Y)‖_F ≤ G for each layer's loss ℓ.
MAX_SNAPSHOT_GRAD = 1.0
POWER_ITERATIONS = 2
OVERSAMPLE = 10


def band_penalty(
    eigenvalues: torch.Tensor, *, gamma: float = 0.4, beta: float = 1.0
) -> torch.Tensor:
    """KSS loss of one layer from its eigenvalues.

    Parameters
    ----------
    eigenvalues : Tensor of shape (r,), complex or real
        DMD eigenvalues of the layer (only ``|λ|`` is used).
    gamma : float, default 0.4
        Target soft near-unit mass γ.
    beta : float, default 1.0
        Weight β of the mass term.

    Returns
    -------
    Tensor of shape (), real, differentiable with respect to ``eigenvalues``.

    Examples
    --------
    >>> lam = torch.tensor([1.3, 0.97, 0.5, 0.5])
    >>> round(float(band_penalty(lam)), 4)
    0.803
    """
    if eigenvalues.ndim != 1 or eigenvalues.numel() == 0:
        raise ValueError(f"eigenvalues must be a non-empty 1-D tensor, got shape {tuple(eigenvalues.shape)}")
    mod = eigenvalues.abs()  # (r,)
    over = mod - TAU_UPPER
    unstable = (torch.sigmoid(TEMPERATURE * over) * F.softplus(over) ** 2).sum()
    in_band = torch.sigmoid(TEMPERATURE * (mod - TAU_LOWER)) * torch.sigmoid(-TEMPERATURE * over)
    m_soft = in_band.mean()
    return unstable + beta * (m_soft - gamma) ** 2


@torch.no_grad()
def _principal_basis(
    Xc: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top principal directions of centred rows ``Xc`` (N, d) and their whitening scales.

    Returns ``P`` of shape (d, m) with orthonormal columns and ``scale`` of shape (m,), ``m ≤ rank``
    after dropping the numerical null space, as ``featurize.dmd.whitening_basis`` does.
    """
    n, d = Xc.shape
    cov_trace = float((Xc * Xc).sum()) / (n - 1)
    ridge = EPS * cov_trace / d
    if rank >= min(d, n - 1):
        evals, evecs = torch.linalg.eigh(Xc.T @ Xc / (n - 1))  # ascending
        evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    else:
        k = min(rank + OVERSAMPLE, d)
        omega = torch.randn(k, n, generator=generator, dtype=Xc.dtype).to(Xc.device)  # (k, N)
        Q = torch.linalg.qr(Xc.T @ omega.T)[0]  # (d, k)
        for _ in range(POWER_ITERATIONS):
            Q = torch.linalg.qr(Xc.T @ (Xc @ Q))[0]
        B = Xc @ Q  # (N, k)
        evals, Ub = torch.linalg.eigh(B.T @ B / (n - 1))  # (k,), (k, k), ascending
        evals, evecs = evals.flip(0)[:rank], Q @ Ub.flip(1)[:, :rank]  # (rank,), (d, rank)
    keep = evals > RANK_RTOL * evals[0].clamp_min(1e-300)
    return evecs[:, keep], (evals[keep].clamp_min(0) + ridge).rsqrt()


def _guard_gradient(A: torch.Tensor, lam: torch.Tensor) -> None:
    """Zero a non-finite gradient of ``A`` and cap its norm at ``MAX_GRAD_GAIN · ‖∂L/∂λ‖``."""
    seen: dict[str, torch.Tensor] = {}

    def on_lam(g: torch.Tensor) -> None:
        seen["norm"] = torch.linalg.vector_norm(g)

    def on_A(g: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(g).all()
        g = torch.where(finite, g, torch.zeros_like(g))
        cap = MAX_GRAD_GAIN * seen.get("norm", torch.linalg.vector_norm(g)).nan_to_num(0.0)
        norm = torch.linalg.vector_norm(g)
        return g * torch.clamp(cap / (norm + 1e-30), max=1.0)

    lam.register_hook(on_lam)
    A.register_hook(on_A)


class _BoundGradient(torch.autograd.Function):
    """Identity on (X, Y); on the way back, zero a non-finite gradient and rescale (gX, gY) by one
    common factor so that ``‖(gX, gY)‖_F · ‖(X, Y)‖_F ≤ limit`` (the direction is kept)."""

    @staticmethod
    def forward(ctx, X, Y, limit):
        ctx.limit = float(limit)
        ctx.size = float(torch.sqrt((X.detach() ** 2).sum() + (Y.detach() ** 2).sum()))
        return X.view_as(X), Y.view_as(Y)

    @staticmethod
    def backward(ctx, gX, gY):
        gX = torch.zeros_like(gX) if gX is None else gX
        gY = torch.zeros_like(gY) if gY is None else gY
        finite = torch.isfinite(gX).all() & torch.isfinite(gY).all()
        gX = torch.where(finite, gX, torch.zeros_like(gX))
        gY = torch.where(finite, gY, torch.zeros_like(gY))
        norm = torch.sqrt((gX ** 2).sum() + (gY ** 2).sum())
        factor = torch.clamp(ctx.limit / (ctx.size * norm + 1e-30), max=1.0)
        return gX * factor, gY * factor, None


def bound_gradient(X: torch.Tensor, Y: torch.Tensor, limit: float = MAX_SNAPSHOT_GRAD):
    """Pass (X, Y) through unchanged; cap the gradient that flows back into them.

    The backward pass rescales ``(∂ℓ/∂X, ∂ℓ/∂Y)`` by one common factor ≤ 1 so that
    ``‖(∂ℓ/∂X, ∂ℓ/∂Y)‖_F ≤ limit / ‖(X, Y)‖_F``, and zeroes a non-finite gradient.
    """
    return _BoundGradient.apply(X, Y, limit)


def dmd_eigenvalues(
    X: torch.Tensor, Y: torch.Tensor, *, rank: int | None = 32, center: bool = True, seed: int = 0
) -> torch.Tensor:
    """Whitened rank-r DMD eigenvalues of one layer, differentiable with respect to X and Y.

    Parameters
    ----------
    X, Y : Tensor of shape (N, d)
        Token states entering and leaving the block (row ``i`` of both from the same token).
    rank : int or None, default 32
        Number r of eigenvalues (``min(r, d, N − 1)``, fewer when X is rank-deficient); ``None``
        keeps the whole numerical range.
    center : bool, default True
        Centre X and Y on their own means first (DESIGN §3). ``False`` keeps the mean, so that a
        growth of the mean token state shows up as an eigenvalue (the affine-free fit Y ≈ Â X).
    seed : int, default 0
        Seed of the randomized range finder.

    Returns
    -------
    Tensor of shape (m,), complex128. Gradients reach X and Y through the projected snapshots;
    the principal basis and whitening scales are treated as constants.

    Examples
    --------
    >>> X = torch.randn(500, 3, dtype=torch.float64)
    >>> A = torch.diag(torch.tensor([0.5, 0.95, 1.2], dtype=torch.float64))
    >>> dmd_eigenvalues(X, X @ A.T).abs().sort().values
    tensor([0.5000, 0.9500, 1.2000], dtype=torch.float64)
    """
    if X.ndim != 2 or X.shape != Y.shape:
        raise ValueError(f"X and Y must both have shape (N, d), got {tuple(X.shape)} and {tuple(Y.shape)}")
    n, d = X.shape
    if n < 2:
        raise ValueError(f"need at least 2 token states, got {n}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive int or None, got {rank}")
    X = X.to(torch.float64)
    Y = Y.to(torch.float64)
    if center:
        X = X - X.mean(dim=0, keepdim=True)  # (N, d)
        Y = Y - Y.mean(dim=0, keepdim=True)  # (N, d)
    scale0 = torch.sqrt((X.detach() ** 2).mean()).clamp_min(1e-300)  # RMS; leaves λ unchanged
    Xc, Yc = X / scale0, Y / scale0  # (N, d)
    gen = torch.Generator().manual_seed(seed)
    P, scale = _principal_basis(Xc.detach(), min(rank or d, d), gen)  # (d, m), (m,)
    m = P.shape[1]
    if m == 0:
        raise ValueError("snapshots have zero variance: nothing to decompose")
    Xt = (Xc @ P) * scale  # (N, m), whitened
    Yt = (Yc @ P) * scale  # (N, m)
    G = Xt.T @ Xt  # (m, m), ≈ (N − 1) I
    G = G + 1e-8 * (G.diagonal().mean().detach() + 1e-300) * torch.eye(m, dtype=G.dtype, device=G.device)
    A = torch.linalg.solve(G, Xt.T @ Yt).T  # (m, m), Â = Ỹ X̃ᵀ (X̃ X̃ᵀ)⁻¹ in column convention
    lam = torch.linalg.eigvals(A)  # (m,)
    if A.requires_grad:
        _guard_gradient(A, lam)
    return lam


def kss_loss(
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    rank: int | None = 32,
    center: bool = True,
    gamma: float = 0.4,
    beta: float = 1.0,
    max_grad: float | None = MAX_SNAPSHOT_GRAD,
    seed: int = 0,
) -> torch.Tensor:
    """KSS loss of one layer from its snapshot pairs (not yet multiplied by α).

    Parameters
    ----------
    X, Y : Tensor of shape (N, d)
        Token states entering and leaving the block.
    rank : int or None, default 32
        Rank r of the randomized DMD (``None``: full numerical rank).
    center : bool, default True
        Centre the snapshots first (see ``dmd_eigenvalues``).
    gamma, beta : float
        Target soft near-unit mass γ and weight β of the mass term (see ``band_penalty``).
    max_grad : float or None, default ``MAX_SNAPSHOT_GRAD`` (1.0)
        Bound G on the gradient reaching the snapshots: ``‖∂ℓ/∂(X, Y)‖_F ≤ G / ‖(X, Y)‖_F`` (one
        common rescaling, direction kept; see ``bound_gradient``). ``None`` leaves it unbounded.
    seed : int, default 0
        Seed of the randomized range finder.

    Returns
    -------
    Tensor of shape (), in the dtype of ``Y``. A zero tensor (still attached to the graph) when the
    snapshots are non-finite or the DMD system is singular, so a diverging run keeps going until
    its own divergence check stops it.

    Examples
    --------
    >>> X = torch.randn(256, 8, requires_grad=True)
    >>> W = torch.eye(8) * 1.3
    >>> loss = kss_loss(X, X @ W.T)
    >>> loss.backward()
    >>> bool(torch.isfinite(X.grad).all())
    True
    """
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        return Y.new_zeros(())
    zero = (Y.sum() * 0.0) if Y.requires_grad else Y.new_zeros(())
    if max_grad is not None:
        X, Y = bound_gradient(X, Y, max_grad)
    try:
        lam = dmd_eigenvalues(X, Y, rank=rank, center=center, seed=seed)
    except torch.linalg.LinAlgError:
        return zero
    loss = band_penalty(lam, gamma=gamma, beta=beta)
    if not torch.isfinite(loss):
        return zero
    return loss.to(Y.dtype)


class KoopmanSpectralShaping:
    """Adds the KSS regularizer to a training loop through forward hooks on the residual blocks.

    On every ``every``-th step (counted by calls to ``penalty()``, starting with the first),
    forward hooks on a random ``layer_fraction`` of the blocks keep ``n_tokens`` randomly chosen
    token states entering and leaving each, with their autograd graph; ``penalty()`` turns them into
    ``alpha · mean_l kss_loss(X_l, Y_l)``. On the other steps no hook is attached (no overhead) and
    ``penalty()`` is a zero tensor. Snapshots are taken only from forward passes run with
    gradients enabled, so evaluation under ``torch.no_grad()`` is left alone.

    Parameters
    ----------
    model : nn.Module
    alpha : float, default 0.15
        Weight α of the regularizer (``0`` turns it off).
    every : int, default 10
        Apply the penalty on one step in ``every``.
    rank : int or None, default 32
        Rank r of the randomized DMD (``min(r, d)``; ``None``: full rank).
    layer_fraction : float, default 0.5
        Fraction of the blocks sampled at each application (at least one block).
    n_tokens : int, default 256
        Token states kept per sampled block (all of them when the batch holds fewer).
    gamma : float, default 0.4
        Target soft near-unit mass γ.
    beta : float, default 1.0
        Weight β of the mass term.
    blocks : str, optional
        Dotted name of the block container; discovered with ``featurize.capture.find_blocks``.
    seed : int, default 0
        Seeds the layer and token sampling and the range finder.
    center : bool, default True (keyword-only)
        Centre the snapshots (``False``: the mean token state is part of the fitted operator).
    max_grad : float or None, default 1.0 (keyword-only)
        Bound G on each layer's penalty gradient reaching its snapshots (see ``kss_loss``).

    Raises
    ------
    ValueError
        On an out-of-range argument.
    featurize.CaptureError
        When the model has no discoverable residual blocks.

    Examples
    --------
    >>> kss = KoopmanSpectralShaping(model, alpha=0.15, every=10)     # doctest: +SKIP
    >>> for x, y in loader:                                            # doctest: +SKIP
    ...     loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + kss.penalty()
    ...     opt.zero_grad(); loss.backward(); opt.step()
    >>> kss.remove()                                                   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 0.15,
        every: int = 10,
        rank: int | None = 32,
        layer_fraction: float = 0.5,
        n_tokens: int = 256,
        gamma: float = 0.4,
        beta: float = 1.0,
        blocks: str | None = None,
        seed: int = 0,
        *,
        center: bool = True,
        max_grad: float | None = MAX_SNAPSHOT_GRAD,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                                 or rank < 1):
            raise ValueError(f"rank must be an int >= 1 or None, got {rank!r}")
        if max_grad is not None and not (isinstance(max_grad, (int, float)) and max_grad > 0):
            raise ValueError(f"max_grad must be a number > 0 or None, got {max_grad!r}")
        if not 0 < layer_fraction <= 1:
            raise ValueError(f"layer_fraction must be in (0, 1], got {layer_fraction!r}")
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 2:
            raise ValueError(f"n_tokens must be an int >= 2, got {n_tokens!r}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.container, self.blocks = find_blocks(model, blocks)
        self.alpha = float(alpha)
        self.every = int(every)
        self.rank = None if rank is None else int(rank)
        self.center = bool(center)
        self.max_grad = None if max_grad is None else float(max_grad)

        self.layer_fraction = float(layer_fraction)
        self.n_tokens = int(n_tokens)
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)
        self._step = 0
        self._removed = False
        self._sampled: set[int] = set()
        self._snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []
        self._plan_step()

    @property
    def step(self) -> int:
        """Number of ``penalty()`` calls so far (the index of the current training step)."""
        return self._step

    @property
    def active(self) -> bool:
        """Whether the penalty applies on the current step."""
        return self.alpha > 0 and not self._removed and self._step % self.every == 0

    def _plan_step(self) -> None:
        """Hook the blocks sampled for the current step; no hooks at all on the other steps."""
        self._detach()
        if self.active:
            L = len(self.blocks)
            k = max(1, math.ceil(L * self.layer_fraction - 1e-9))
            self._sampled = {int(i) for i in self._rng.choice(L, size=k, replace=False)}
            self._handles = [
                self.blocks[i].register_forward_hook(self._make_hook(i), with_kwargs=True)
                for i in sorted(self._sampled)
            ]

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._snapshots.clear()
        self._sampled = set()

    def _make_hook(self, i: int):
        def hook(module, args, kwargs, output):
            if i not in self._sampled or not torch.is_grad_enabled():
                return None
            x = _first_tensor(args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None)))
            y = _first_tensor(output)
            if x is None or y is None or x.shape != y.shape:
                raise CaptureError(
                    f"block {i} ({type(module).__name__}) does not map a tensor to one of the same "
                    "shape: name the residual-block container with blocks="
                )
            xf = x.reshape(-1, x.shape[-1])  # (B*T, d)
            yf = y.reshape(-1, y.shape[-1])  # (B*T, d)
            total = xf.shape[0]
            if total > self.n_tokens:
                idx = torch.as_tensor(self._rng.choice(total, size=self.n_tokens, replace=False))
                idx = idx.to(xf.device)
                xf, yf = xf[idx], yf[idx]  # (n_tokens, d)
            self._snapshots[i] = (xf, yf)
            return None

        return hook

    def penalty(self) -> torch.Tensor:
        """The regularizer for the forward pass just run, then advance the step counter.

        Returns
        -------
        Tensor of shape (): ``alpha · mean over the sampled blocks of kss_loss`` on an active
        step, a zero tensor otherwise.

        Raises
        ------
        RuntimeError
            On an active step when no sampled block ran forward with gradients enabled since the
            last call (call ``penalty()`` after the forward pass of each step).
        """
        try:
            if not self.active:
                return self._zero()
            if not self._snapshots:
                raise RuntimeError(
                    "KSS penalty() found no snapshots for this step: call it once per training step, "
                    "after the forward pass (run with gradients enabled)"
                )
            losses = [
                kss_loss(X, Y, rank=self.rank, center=self.center, gamma=self.gamma,
                         beta=self.beta, max_grad=self.max_grad,
                         seed=self.seed + 1000003 * self._step + i)
                for i, (X, Y) in sorted(self._snapshots.items())
            ]
            return self.alpha * torch.stack(losses).mean()
        finally:
            self._step += 1
            if not self._removed:
                self._plan_step()

    def _zero(self) -> torch.Tensor:
        p = next((p for b in self.blocks for p in b.parameters()), None)
        if p is None:
            return torch.zeros(())
        return torch.zeros((), dtype=p.dtype, device=p.device)

    def remove(self) -> None:
        """Detach the hooks and drop any kept snapshots; ``penalty()`` is zero from then on."""
        self._detach()
        self._removed = True

    def __enter__(self) -> "KoopmanSpectralShaping":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"KoopmanSpectralShaping(alpha={self.alpha}, every={self.every}, rank={self.rank}, "
            f"center={self.center}, max_grad={self.max_grad}, "
            f"layer_fraction={self.layer_fraction}, n_tokens={self.n_tokens}, gamma={self.gamma}, "
            f"beta={self.beta}, blocks={self.container!r} ({len(self.blocks)} blocks), step={self._step})"
        )
