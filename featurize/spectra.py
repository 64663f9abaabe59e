"""Spectral summaries of one operator: masses (DESIGN §4), ρ, κ(V) and the Kreiss constant (§5)."""
from __future__ import annotations

import numpy as np

from .schema import CONTRACTIVE, EXPANSIVE, NEAR_LOW  # the mass bands, named once


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


def _sigma_min_exact(T: np.ndarray, z: complex) -> float:
    """σ_min(zI − T) by a dense SVD (small operators) or converged inverse iteration (large)."""
    m = T.shape[0]
    if m <= 160:
        return float(np.linalg.svd(z * np.eye(m) - T, compute_uv=False)[-1])
    return float(_sigma_min_batch(T, np.array([z]), iters=200, tol=1e-12)[0])


def _sigma_min_batch(T: np.ndarray, z: np.ndarray, *, iters: int = 25, tol: float = 1e-5) -> np.ndarray:
    """σ_min(zI − T) for every z, T upper triangular (Schur form); the shape of z is kept.

    Inverse iteration on (zI−T)ᴴ(zI−T) with triangular solves, batched over z in torch:
    ‖(zI−T)⁻¹‖₂ = 1/σ_min. The estimate approaches σ_min from above.
    """
    import torch

    m = T.shape[0]
    zf = torch.from_numpy(np.ascontiguousarray(z.ravel()).astype(np.complex128))
    Tt = torch.from_numpy(np.ascontiguousarray(T).astype(np.complex128))
    eye = torch.eye(m, dtype=torch.complex128)
    out = np.empty(zf.shape[0], dtype=float)
    chunk = max(1, min(1024, (2**22) // (m * m)))  # ≤ 64 MB of complex matrices per chunk
    gen = torch.Generator().manual_seed(0)
    for start in range(0, zf.shape[0], chunk):
        zz = zf[start : start + chunk]
        R = zz[:, None, None] * eye - Tt  # (b, m, m) upper triangular
        Rh = R.conj().transpose(1, 2)  # (b, m, m) lower triangular
        v = torch.randn(len(zz), m, 1, dtype=torch.complex128, generator=gen)  # (b, m, 1)
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
        est = torch.zeros(len(zz), dtype=torch.float64)
        for _ in range(iters):
            w = torch.linalg.solve_triangular(R, v, upper=True)
            w = torch.linalg.solve_triangular(Rh, w, upper=False)
            new = torch.linalg.vector_norm(w, dim=1)[:, 0]  # (b,) → ‖(RᴴR)⁻¹ v‖
            v = w / new[:, None, None]
            done = torch.all(torch.abs(new - est) <= tol * new)
            est = new
            if done:
                break
        out[start : start + len(zz)] = (1.0 / torch.sqrt(est)).numpy()
    return out.reshape(z.shape)


def kreiss_constant(A: np.ndarray, *, n_theta: int = 61, n_r: int = 21) -> float:
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
    import scipy.linalg

    T, _ = scipy.linalg.schur(A.astype(complex), output="complex")
    rho = float(np.max(np.abs(np.diag(T))))
    T = T / max(1.0, rho)
    real = np.isrealobj(A)
    theta_hi = np.pi if real else 2 * np.pi
    if m > 160:  # each point costs O(m²) per solve: a coarser grid, same refinement
        n_theta, n_r = max(25, n_theta // 2), max(12, n_r // 2)
    theta = np.linspace(0.0, theta_hi, n_theta)
    # add the angles of the largest eigenvalues: the sup often sits right outside one near the circle
    lam = np.diag(T)
    top = lam[np.argsort(-np.abs(lam))[:16]]
    theta = np.unique(np.concatenate([theta, np.mod(np.angle(top), 2 * np.pi)]))
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
        return -tt / max(_sigma_min_exact(T, zz), 1e-300)

    best = float(vals.max())
    order = np.argsort(vals.ravel())[::-1][:2]
    for idx in order:
        i, j = np.unravel_index(idx, vals.shape)
        fun = nelder_mead(negf, np.array([TT[i, j], LL[i, j]]), xatol=1e-4, fatol=1e-6 * max(best, 1.0),
                          maxiter=250)
        best = max(best, -float(fun))
    return best


def nelder_mead(f, x0: np.ndarray, *, xatol: float, fatol: float, maxiter: int) -> float:
    """Smallest value of ``f`` found by Nelder–Mead from ``x0``: the iteration of
    ``scipy.optimize.minimize(f, x0, method="Nelder-Mead", options=dict(xatol=.., fatol=.., maxiter=..))``
    step for step (its simplex, coefficients and stopping rule; no bounds), without importing
    scipy.optimize (≈0.2 s) on ``risk predict``'s path. ``tests/test_spectra.py`` checks the two agree."""
    rho, chi, psi, sigma = 1.0, 2.0, 0.5, 0.5
    x0 = np.asarray(x0, dtype=float).ravel()
    n = len(x0)
    sim = np.empty((n + 1, n))
    sim[0] = x0
    for k in range(n):
        y = x0.copy()
        y[k] = (1 + 0.05) * y[k] if y[k] != 0 else 0.00025
        sim[k + 1] = y
    fsim = np.array([f(x) for x in sim], dtype=float)
    ind = np.argsort(fsim)
    sim, fsim = np.take(sim, ind, 0), np.take(fsim, ind, 0)
    iterations = 1
    while iterations < maxiter:
        if np.max(np.abs(sim[1:] - sim[0])) <= xatol and np.max(np.abs(fsim[0] - fsim[1:])) <= fatol:
            break
        xbar = np.add.reduce(sim[:-1], 0) / n
        xr = (1 + rho) * xbar - rho * sim[-1]
        fxr = f(xr)
        if fxr < fsim[0]:
            xe = (1 + rho * chi) * xbar - rho * chi * sim[-1]
            fxe = f(xe)
            sim[-1], fsim[-1] = (xe, fxe) if fxe < fxr else (xr, fxr)
        elif fxr < fsim[-2]:
            sim[-1], fsim[-1] = xr, fxr
        else:
            shrink = False
            if fxr < fsim[-1]:  # outside contraction
                xc = (1 + psi * rho) * xbar - psi * rho * sim[-1]
                fxc = f(xc)
                if fxc <= fxr:
                    sim[-1], fsim[-1] = xc, fxc
                else:
                    shrink = True
            else:  # inside contraction
                xcc = (1 - psi) * xbar + psi * sim[-1]
                fxcc = f(xcc)
                if fxcc < fsim[-1]:
                    sim[-1], fsim[-1] = xcc, fxcc
                else:
                    shrink = True
            if shrink:
                for j in range(1, n + 1):
                    sim[j] = sim[0] + sigma * (sim[j] - sim[0])
                    fsim[j] = f(sim[j])
        iterations += 1
        ind = np.argsort(fsim)
        sim, fsim = np.take(sim, ind, 0), np.take(fsim, ind, 0)
    return float(np.min(fsim))
