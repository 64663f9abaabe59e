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
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .capture import CaptureError, _first_tensor, find_blocks
from .dmd import EPS, RANK_RTOL

__all__ = ["KoopmanSpectralShaping", "band_penalty", "dmd_eigenvalues", "kss_loss"]

TEMPERATURE = 20.0  # T: sharpness of the soft band edges
TAU_UPPER = 1.05  # τ_u: |λ| above this is expansive
TAU_LOWER = 0.90  # τ_l: lower edge of the near-unit band
#: Cap on ‖∂L/∂Â‖_F relative to ‖∂L/∂λ‖₂. The two are equal for a normal Â; a near-defective Â
#: (ill-conditioned eigenvectors) would otherwise turn a modest penalty into a gradient spike.
MAX_GRAD_GAIN = 30.0
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
        Ub, s, _ = torch.linalg.svd(Q.T @ Xc.T, full_matrices=False)  # (k, k), (k,)
        evecs = Q @ Ub[:, :rank]  # (d, rank)
        evals = s[:rank] ** 2 / (n - 1)
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
        Subtract each matrix's own mean row first (DESIGN §3). ``False`` keeps the mean direction,
        so growth of the residual stream's mean shows up as an eigenvalue.
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
    Xc = X - X.mean(dim=0, keepdim=True) if center else X  # (N, d)
    Yc = Y - Y.mean(dim=0, keepdim=True) if center else Y  # (N, d)
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
    gamma: float = 0.4,
    beta: float = 1.0,
    center: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """KSS loss of one layer from its snapshot pairs (not yet multiplied by α).

    Parameters
    ----------
    X, Y : Tensor of shape (N, d)
        Token states entering and leaving the block.
    rank : int or None, default 32
        Rank r of the randomized DMD.
    gamma, beta : float
        Target soft near-unit mass γ and weight β of the mass term (see ``band_penalty``).
    center : bool, default True
        Centre the snapshots first (see ``dmd_eigenvalues``).
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

    On every ``every``-th step (counted by calls to ``penalty()``, starting with the first), the
    hooks keep ``n_tokens`` randomly chosen token states (with their autograd graph) entering and
    leaving a random ``layer_fraction`` of the blocks; ``penalty()`` turns them into
    ``alpha · mean_l kss_loss(X_l, Y_l)``. On the other steps the hooks return at once and
    ``penalty()`` is a zero tensor. Snapshots are taken only from forward passes run with
    gradients enabled, so evaluation under ``torch.no_grad()`` is left alone.

    Parameters
    ----------
    model : nn.Module
    alpha : float, default 0.15
        Weight α of the regularizer (``0`` turns it off).
    every : int, default 10
        Apply the penalty on one step in ``every``.
    rank : int, default 32
        Rank r of the randomized DMD (``min(r, d)``).
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
    center : bool, default True
        Centre the snapshots before the DMD (DESIGN §3); see ``dmd_eigenvalues``.

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
        rank: int = 32,
        layer_fraction: float = 0.5,
        n_tokens: int = 256,
        gamma: float = 0.4,
        beta: float = 1.0,
        blocks: str | None = None,
        seed: int = 0,
        center: bool = True,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
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
        self.rank = int(rank)
        self.layer_fraction = float(layer_fraction)
        self.n_tokens = int(n_tokens)
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.seed = int(seed)
        self.center = bool(center)
        self._rng = np.random.default_rng(seed)
        self._step = 0
        self._sampled: set[int] = set()
        self._snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [
            b.register_forward_hook(self._make_hook(i), with_kwargs=True)
            for i, b in enumerate(self.blocks)
        ]
        self._plan_step()

    @property
    def step(self) -> int:
        """Number of ``penalty()`` calls so far (the index of the current training step)."""
        return self._step

    @property
    def active(self) -> bool:
        """Whether the penalty applies on the current step."""
        return self.alpha > 0 and self._step % self.every == 0

    def _plan_step(self) -> None:
        self._snapshots.clear()
        self._sampled = set()
        if self.active:
            L = len(self.blocks)
            k = max(1, math.ceil(L * self.layer_fraction - 1e-9))
            self._sampled = {int(i) for i in self._rng.choice(L, size=k, replace=False)}

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
                kss_loss(X, Y, rank=self.rank, gamma=self.gamma, beta=self.beta, center=self.center,
                         seed=self.seed + 1000003 * self._step + i)
                for i, (X, Y) in sorted(self._snapshots.items())
            ]
            return self.alpha * torch.stack(losses).mean()
        finally:
            self._step += 1
            self._plan_step()

    def _zero(self) -> torch.Tensor:
        p = next((p for b in self.blocks for p in b.parameters()), None)
        if p is None:
            return torch.zeros(())
        return torch.zeros((), dtype=p.dtype, device=p.device)

    def remove(self) -> None:
        """Detach the hooks and drop any kept snapshots."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._snapshots.clear()
        self._sampled = set()

    def __enter__(self) -> "KoopmanSpectralShaping":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"KoopmanSpectralShaping(alpha={self.alpha}, every={self.every}, rank={self.rank}, "
            f"layer_fraction={self.layer_fraction}, n_tokens={self.n_tokens}, gamma={self.gamma}, "
            f"beta={self.beta}, center={self.center}, blocks={self.container!r} ({len(self.blocks)} blocks), step={self._step})"
        )
