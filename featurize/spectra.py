"""Spectral summaries of one operator: masses (DESIGN §4), ρ, κ(V) and the Kreiss constant (§5)."""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.optimize

EXPANSIVE = 1.05  # |λ| > 1.05
NEAR_LOW = 0.90  # 0.90 ≤ |λ| ≤ 1.05 is near-unit
CONTRACTIVE = 0.80  # |λ| < 0.80


def spectral_masses(eigenvalues: np.ndarray) -> dict[str, float]:
    """Fractions of eigenvalues in each band of |λ|.

    Parameters
    ----------
    eigenvalues : array-like of shape (m,)

    Returns
    -------
    dict with keys ``m_exp`` (|λ| > 1.05), ``m_near`` (0.90 ≤ |λ| ≤ 1.05), ``m_mid``
    (0.80 ≤ |λ| < 0.90) and ``m_con`` (|λ| < 0.80); they sum to 1. All NaN for no eigenvalues.

    Examples
    --------
    >>> spectral_masses([0.5, 0.95, 1.2, 0.85])
    {'m_exp': 0.25, 'm_near': 0.25, 'm_mid': 0.25, 'm_con': 0.25}
    """
    mod = np.abs(np.asarray(eigenvalues))
    if mod.size == 0:
        return dict(m_exp=np.nan, m_near=np.nan, m_mid=np.nan, m_con=np.nan)
    m_exp = float(np.mean(mod > EXPANSIVE))
    m_near = float(np.mean((mod >= NEAR_LOW) & (mod <= EXPANSIVE)))
    m_con = float(np.mean(mod < CONTRACTIVE))
    m_mid = float(np.mean((mod >= CONTRACTIVE) & (mod < NEAR_LOW)))
    return dict(m_exp=m_exp, m_near=m_near, m_mid=m_mid, m_con=m_con)


def spectral_radius(eigenvalues: np.ndarray) -> float:
    """ρ = max |λ_j|."""
    return float(np.max(np.abs(eigenvalues)))


def eigenvector_condition(V: np.ndarray) -> float:
    """κ(V) = ‖V‖₂ ‖V⁻¹‖₂ (ratio of extreme singular values); ``inf`` for a singular V."""
    s = np.linalg.svd(V, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def _sigma_min_batch(T: np.ndarray, z: np.ndarray) -> np.ndarray:
    """σ_min(zI − T) for every z, T upper triangular (Schur form). Shape of z is kept."""
    m = T.shape[0]
    zf = z.ravel()
    out = np.empty(zf.shape, dtype=float)
    eye = np.eye(m)
    if m <= 160:  # batched SVD is fastest for small operators
        for start in range(0, zf.size, 512):
            zz = zf[start : start + 512]
            M = zz[:, None, None] * eye - T[None]  # (b, m, m)
            out[start : start + 512] = np.linalg.svd(M, compute_uv=False)[:, -1]
        return out.reshape(z.shape)
    # larger operators: inverse iteration with triangular solves, ‖(zI−T)⁻¹‖₂ = 1/σ_min
    rng = np.random.default_rng(0)
    v0 = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    for i, zi in enumerate(zf):
        R = zi * eye - T
        v = v0 / np.linalg.norm(v0)
        est = 0.0
        for _ in range(30):
            w = scipy.linalg.solve_triangular(R, v)
            w = scipy.linalg.solve_triangular(R, w, trans="C")
            new = np.linalg.norm(w)
            v = w / new
            if abs(new - est) <= 1e-10 * new:
                est = new
                break
            est = new
        out[i] = 1.0 / np.sqrt(est)
    return out.reshape(z.shape)


def kreiss_constant(A: np.ndarray, *, n_theta: int = 181, n_r: int = 36) -> float:
    """Kreiss constant of ``A / s`` with ``s = max(1, ρ(A))`` (DESIGN §5, ours).

    K(B) = sup_{|z|>1} (|z| − 1) ‖(zI − B)⁻¹‖₂ measures transient growth:
    K ≤ sup_k ‖B^k‖ ≤ e·d·K. Dividing by ``s`` removes the asymptotic growth rate, so the value
    is finite for operators with ρ > 1. Computed on the Schur form: a polar grid over
    z = (1 + t)e^{iθ} followed by local refinement of the best points.

    Parameters
    ----------
    A : ndarray of shape (m, m)

    Returns
    -------
    float, at least 1 for any non-zero operator with ρ(A/s) = 1 and 0 for the zero matrix.
    """
    A = np.asarray(A)
    m = A.shape[0]
    if m == 0:
        return float("nan")
    T, _ = scipy.linalg.schur(A.astype(complex), output="complex")
    rho = float(np.max(np.abs(np.diag(T))))
    T = T / max(1.0, rho)
    real = np.isrealobj(A)
    theta_hi = np.pi if real else 2 * np.pi
    if m > 160:  # each point costs triangular solves: a coarser grid, same refinement
        n_theta, n_r = max(25, n_theta // 4), max(12, n_r // 2)
    theta = np.linspace(0.0, theta_hi, n_theta)
    # add the eigenvalue angles: the sup often sits right outside an eigenvalue near the circle
    lam = np.diag(T)
    theta = np.unique(np.concatenate([theta, np.mod(np.angle(lam), 2 * np.pi)]))
    if real:
        theta = theta[theta <= np.pi + 1e-12]
    logt = np.linspace(np.log(1e-6), np.log(1e3), n_r)
    TT, LL = np.meshgrid(theta, logt, indexing="ij")
    t = np.exp(LL)
    z = (1 + t) * np.exp(1j * TT)
    vals = t / np.maximum(_sigma_min_batch(T, z), 1e-300)

    def negf(p: np.ndarray) -> float:
        tt = np.exp(p[1])
        zz = (1 + tt) * np.exp(1j * p[0])
        return -tt / max(float(_sigma_min_batch(T, np.array([zz]))[0]), 1e-300)

    best = float(vals.max())
    order = np.argsort(vals.ravel())[::-1][:3]
    for idx in order:
        i, j = np.unravel_index(idx, vals.shape)
        res = scipy.optimize.minimize(
            negf, np.array([TT[i, j], LL[i, j]]), method="Nelder-Mead",
            options=dict(xatol=1e-7, fatol=1e-10 * max(best, 1.0), maxiter=400),
        )
        best = max(best, -float(res.fun))
    return best
