"""Whitened dynamic mode decomposition of one layer's snapshot pairs (DESIGN §3).

Snapshots are columns: ``X, Y`` of shape ``(d, N)``, column ``i`` of both taken from the same
token state (``Y`` is the block's output for the input ``X``).

The whitening is ZCA restricted to the numerical range of ``X``: rank-deficient snapshots
(embedding sums, LayerNorm outputs that lose the all-ones direction) would otherwise divide by
near-zero variances and produce spurious eigenvalues with ``|λ| ≫ 1``. Restricting to an
orthonormal basis of the range is an orthogonal change of coordinates, so eigenvalues, ‖V‖,
‖V⁻¹‖ and the Kreiss constant are those of the ZCA-whitened operator on that range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-5  # ridge added to the covariance, relative to its mean variance tr(Σ)/d
RANK_RTOL = 1e-7  # covariance eigenvalues below RANK_RTOL * max are the numerical null space
RESIDUAL_TAU = 0.1  # ResDMD: a mode with residual above this is unreliable


@dataclass
class DMDResult:
    """The DMD operator of one layer and what is derived from its eigen-decomposition.

    Attributes
    ----------
    A : ndarray of shape (m, m)
        The (whitened) DMD operator in an orthonormal basis of the retained subspace.
    eigenvalues : ndarray of shape (m,)
    V : ndarray of shape (m, m)
        Right eigenvectors, columns of unit 2-norm.
    residuals : ndarray of shape (m,)
        ResDMD residual of each mode (Colbrook & Townsend).
    eta_nl : float
        Nonlinearity ratio ‖Ỹ − ÂX̃‖_F / ‖Ỹ − X̃‖_F.
    rank : int
        Dimension m of the retained subspace.
    """

    A: np.ndarray
    eigenvalues: np.ndarray
    V: np.ndarray
    residuals: np.ndarray
    eta_nl: float
    rank: int

    @property
    def reliable(self) -> np.ndarray:
        """Boolean mask of modes whose ResDMD residual is at most ``RESIDUAL_TAU``."""
        return self.residuals <= RESIDUAL_TAU


def _check_snapshots(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"snapshots must be 2-D (d, N), got X{X.shape} and Y{Y.shape}")
    if X.shape != Y.shape:
        raise ValueError(f"X and Y must have the same shape, got X{X.shape} and Y{Y.shape}")
    if X.shape[1] < 2:
        raise ValueError(f"need at least 2 snapshots, got {X.shape[1]}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("snapshots contain NaN or infinite values")
    return X, Y


def whitening_basis(
    Xc: np.ndarray, rank: int | None = None, *, seed: int = 0, eps: float = EPS
) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis of the numerical range of centred snapshots and its whitening scales.

    Parameters
    ----------
    Xc : ndarray of shape (d, N)
        Centred snapshots.
    rank : int or None
        ``None`` keeps the whole numerical range (full DMD); an int keeps the top ``rank``
        principal directions found by a randomized range finder (Halko et al.; Erichson et al.'s
        randomized DMD).

    Returns
    -------
    Q : ndarray of shape (d, m)
        Orthonormal basis.
    scale : ndarray of shape (m,)
        ``1 / sqrt(var_i + ε)``; ``diag(scale) @ Q.T @ Xc`` has (nearly) identity covariance.
    """
    d, n = Xc.shape
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive int or None, got {rank}")
    if rank is None or rank >= min(d, n - 1):
        cov = Xc @ Xc.T / (n - 1)  # (d, d)
        evals, evecs = np.linalg.eigh(cov)
        evals, evecs = evals[::-1], evecs[:, ::-1]
    else:
        rng = np.random.default_rng(seed)
        k = min(rank + 10, d)
        Q = np.linalg.qr(Xc @ rng.standard_normal((n, k)))[0]  # (d, k)
        for _ in range(2):  # power iterations sharpen the captured subspace
            Q = np.linalg.qr(Xc @ (Xc.T @ Q))[0]
        B = Q.T @ Xc  # (k, N)
        Ub, s, _ = np.linalg.svd(B, full_matrices=False)
        evecs = Q @ Ub[:, :rank]  # (d, rank)
        evals = s[:rank] ** 2 / (n - 1)
        cov_trace = float(np.einsum("ij,ij->", Xc, Xc)) / (n - 1)
        keep = evals > RANK_RTOL * max(evals[0], 1e-300)
        ridge = eps * cov_trace / d
        return evecs[:, keep], 1.0 / np.sqrt(evals[keep] + ridge)
    top = max(evals[0], 1e-300)
    keep = evals > RANK_RTOL * top
    ridge = eps * float(np.clip(evals, 0, None).sum()) / d
    return evecs[:, keep], 1.0 / np.sqrt(evals[keep] + ridge)


def dmd(
    X: np.ndarray,
    Y: np.ndarray,
    *,
    rank: int | None = None,
    whiten: bool = True,
    center: bool = True,
    seed: int = 0,
) -> DMDResult:
    """Whitened DMD of one layer.

    Parameters
    ----------
    X, Y : array-like of shape (d, N)
        Snapshot pairs (columns are token states).
    rank : int or None, default None
        ``None``: full DMD on the numerical range of X. An int ``r``: rank-r randomized DMD.
    whiten : bool, default True
        ``False`` gives plain (exact) DMD, ``Â = Y X⁺``, for comparison with other libraries.
    center : bool, default True
        Subtract each matrix's own mean column first.

    Returns
    -------
    DMDResult

    Examples
    --------
    >>> A = np.diag([0.5, 0.95, 1.2])
    >>> X = np.random.default_rng(0).standard_normal((3, 100))
    >>> np.sort(np.abs(dmd(X, A @ X).eigenvalues)).round(6)
    array([0.5 , 0.95, 1.2 ])
    """
    X, Y = _check_snapshots(X, Y)
    d, n = X.shape
    if center:
        Xc = X - X.mean(axis=1, keepdims=True)
        Yc = Y - Y.mean(axis=1, keepdims=True)
    else:
        Xc, Yc = X, Y
    if whiten:
        Q, scale = whitening_basis(Xc, rank, seed=seed)
        Xt = scale[:, None] * (Q.T @ Xc)  # (m, N)
        Yt = scale[:, None] * (Q.T @ Yc)  # (m, N)
        G = Xt @ Xt.T  # (m, m)
        A = np.linalg.solve(G, Xt @ Yt.T).T  # Ỹ X̃ᵀ (X̃ X̃ᵀ)⁻¹
    else:
        U, s, Vh = np.linalg.svd(Xc, full_matrices=False)
        keep = s > RANK_RTOL * s[0] if s[0] > 0 else np.zeros_like(s, dtype=bool)
        if rank is not None:
            keep[rank:] = False
        U, s, Vh = U[:, keep], s[keep], Vh[keep]
        A = (U.T @ Yc @ Vh.T) / s[None, :]  # (m, m), Uᵀ Y X⁺ U
        Xt, Yt = U.T @ Xc, U.T @ Yc
        G = np.diag(s**2)  # Xt Xtᵀ = Uᵀ Xc Xcᵀ U
    m = A.shape[0]
    if m == 0:
        raise ValueError("snapshots have zero variance: nothing to decompose")
    lam, V = np.linalg.eig(A)
    V = V / np.linalg.norm(V, axis=0, keepdims=True)
    E = Yt - A @ Xt  # (m, N) linear-fit error
    residuals = resdmd_residuals(G, E @ E.T, lam, V)
    eta = float(np.linalg.norm(E) / (np.linalg.norm(Yt - Xt) + 1e-12))
    return DMDResult(A=A, eigenvalues=lam, V=V, residuals=residuals, eta_nl=eta, rank=m)


def resdmd_residuals(G: np.ndarray, EEt: np.ndarray, lam: np.ndarray, V: np.ndarray) -> np.ndarray:
    """ResDMD residual of each mode: ‖u_j*(Ỹ − λ_j X̃)‖₂ / (‖u_j* X̃‖₂ + 1e-12).

    ``u_j`` are left eigenvectors (rows of ``V⁻¹``); the residual is the relative linear-fit error
    along the mode, 0 for an exactly linear layer. Since u_j* Â = λ_j u_j*, the numerator equals
    ‖u_j* E‖ with E = Ỹ − ÂX̃, so only the Gram matrices are needed:

    Parameters
    ----------
    G : ndarray of shape (m, m)
        X̃ X̃ᵀ.
    EEt : ndarray of shape (m, m)
        E Eᵀ of the fit error E = Ỹ − ÂX̃.
    lam : ndarray of shape (m,)
    V : ndarray of shape (m, m)
        Right eigenvectors.
    """
    try:
        U = np.linalg.inv(V)  # (m, m), row j is u_j*
    except np.linalg.LinAlgError:
        U = np.linalg.pinv(V)
    num = np.sqrt(np.maximum(((U @ EEt) * U.conj()).sum(axis=1).real, 0.0))
    den = np.sqrt(np.maximum(((U @ G) * U.conj()).sum(axis=1).real, 0.0)) + 1e-12
    return num / den
