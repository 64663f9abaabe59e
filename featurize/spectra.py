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


#: the search domain of the Kreiss sup: z = (1 + t)·e^{iθ} with T_MIN ≤ t ≤ T_MAX (ours). The limit
#: t → ∞ is 1 for every operator and is taken exactly; below T_MIN the sup is the limit value at an
#: eigenvalue on the unit circle, which T_MIN approaches to about T_MIN relative.
T_MIN, T_MAX = 1e-6, 1e3
#: an eigenvalue on the unit circle contributes its t → 0 limit only when isolated by more than this
MIN_GAP = 1e-4
#: refinement starts: the best local maxima of the grid, each refined to convergence
N_STARTS = 5
#: the dense-SVD path up to this operator size; above it converged inverse iteration
DENSE_MAX = 160


def _sigma_min_batch(T: np.ndarray, z: np.ndarray, *, iters: int = 25, tol: float = 1e-5) -> np.ndarray:
    """σ_min(zI − T) for every z, T upper triangular (Schur form); the shape of z is kept.

    m ≤ ``DENSE_MAX``: a dense SVD of every shifted matrix (exact to rounding, each matrix on its own, so a
    value does not depend on which other points share the batch). Larger m: inverse iteration on
    (zI−T)ᴴ(zI−T) with triangular solves, batched over z in torch, converged to ``tol`` (an estimate
    from above: used for the grid only; the refinement is exact).
    """
    m = T.shape[0]
    zf = np.ascontiguousarray(z.ravel()).astype(np.complex128)
    if m <= DENSE_MAX:
        out = np.empty(zf.shape[0], dtype=float)
        eye = np.eye(m)
        chunk = max(1, (2**22) // (m * m))  # ≤ 64 MB of complex matrices per chunk
        for start in range(0, zf.shape[0], chunk):
            zz = zf[start : start + chunk]
            R = zz[:, None, None] * eye - T  # (b, m, m) upper triangular
            out[start : start + len(zz)] = np.linalg.svd(R, compute_uv=False)[:, -1]
        return out.reshape(z.shape)
    import torch

    Tt = torch.from_numpy(np.ascontiguousarray(T).astype(np.complex128))
    ztt = torch.from_numpy(zf)
    eye = torch.eye(m, dtype=torch.complex128)
    out = np.empty(zf.shape[0], dtype=float)
    chunk = max(1, min(1024, (2**22) // (m * m)))
    gen = torch.Generator().manual_seed(0)
    for start in range(0, ztt.shape[0], chunk):
        zz = ztt[start : start + chunk]
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


def _sigma_min_pair(T: np.ndarray, z: complex) -> tuple[float, complex]:
    """(σ_min(zI − T), uᴴv) for the smallest singular triple (σ, u, v) of zI − T: dσ = Re(uᴴv · dz)."""
    m = T.shape[0]
    R = z * np.eye(m) - T  # (m, m) upper triangular
    if m <= DENSE_MAX:
        U, s, Vh = np.linalg.svd(R)
        return float(s[-1]), complex(np.vdot(U[:, -1], Vh[-1].conj()))
    import scipy.linalg

    v = np.ones(m, dtype=complex) / np.sqrt(m)
    est = 0.0
    for _ in range(500):  # inverse iteration on RᴴR, to convergence
        w = scipy.linalg.solve_triangular(R, v, lower=False)
        w = scipy.linalg.solve_triangular(R, w, lower=False, trans="C")
        new = float(np.linalg.norm(w))
        v = w / new
        if abs(new - est) <= 1e-14 * new:
            break
        est = new
    Rv = R @ v
    sigma = float(np.linalg.norm(Rv))
    return sigma, complex(np.vdot(Rv / sigma, v))


def _log_f(T: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray]:
    """log((|z|−1)‖(zI−T)⁻¹‖₂) at z = (1 + e^u)e^{iθ}, x = (θ, u), and its gradient in (θ, u)."""
    theta, u = float(x[0]), float(x[1])
    t = np.exp(u)
    e = np.exp(1j * theta)
    z = (1 + t) * e
    sigma, w = _sigma_min_pair(T, z)
    sigma = max(sigma, 1e-300)
    dtheta = (w * 1j * z).real / sigma  # ∂ log σ / ∂θ
    du = (w * t * e).real / sigma       # ∂ log σ / ∂u
    return u - np.log(sigma), np.array([-dtheta, 1.0 - du])


def _ascend(T: np.ndarray, x0: np.ndarray, scale: np.ndarray, bounds: tuple[float, float],
            maxiter: int = 100) -> float:
    """Largest log f found by projected BFGS ascent from ``x0`` = (θ, u), u kept in ``bounds``.

    Works in coordinates scaled by ``scale`` (the grid spacing), so the first step is about one grid
    cell; an Armijo backtracking line search; u at a bound with the gradient pointing out is held
    there. Stops when a step moves less than 1e-12 grid cells or gains less than 1e-15 in log f.
    log f is a maximum of smooth functions (one per singular value), so its maxima are smooth points.
    """
    lo, hi = bounds
    x = np.array([x0[0], min(max(x0[1], lo), hi)], dtype=float)
    f, g = _log_f(T, x)
    H = np.eye(2)
    for _ in range(maxiter):
        gs = g * scale  # gradient in scaled coordinates
        free = np.array([True, not ((x[1] <= lo and gs[1] < 0) or (x[1] >= hi and gs[1] > 0))])
        Hf = H * np.outer(free, free)
        p = Hf @ gs
        if gs @ p <= 0 or not np.all(np.isfinite(p)):
            H = np.eye(2)
            p = gs * free
        norm = np.linalg.norm(p)
        if norm == 0:
            break
        if norm > 1.0:  # never more than one grid cell per step
            p = p / norm
        step = 1.0
        for _ in range(40):  # Armijo backtracking
            xn = x + step * p * scale
            xn[1] = min(max(xn[1], lo), hi)
            fn, gn = _log_f(T, xn)
            if fn >= f + 1e-4 * step * (gs @ p):
                break
            step *= 0.5
        else:
            break
        s = (xn - x) / scale
        y = (g - gn) * scale  # gradient change of −log f, scaled
        gain = fn - f
        x, f, g = xn, fn, gn
        if np.max(np.abs(s)) < 1e-12 or gain < 1e-15:
            break
        sy = s @ y
        if sy > 1e-16:
            rho = 1.0 / sy
            V = np.eye(2) - rho * np.outer(s, y)
            H = V @ H @ V.T + rho * np.outer(s, s)
    return f


def _local_maxima(vals: np.ndarray, periodic: bool) -> np.ndarray:
    """Flat indices of the grid's local maxima (≥ every 8-neighbour), best first, ties by index.
    θ is the first axis: periodic for complex operators, mirrored at its ends for real ones."""
    pad = np.pad(vals, ((1, 1), (1, 1)), mode="wrap" if periodic else "reflect")
    pad[:, 0] = pad[:, -1] = -np.inf  # no neighbour beyond the ends of the t axis
    if periodic:
        pad[0], pad[-1] = vals[-1], vals[0]
    is_max = np.ones(vals.shape, dtype=bool)
    n0, n1 = vals.shape
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                is_max &= vals >= pad[1 + di : 1 + di + n0, 1 + dj : 1 + dj + n1]
    idx = np.flatnonzero(is_max)
    return idx[np.lexsort((idx, -vals.ravel()[idx]))]


def _unit_circle_limit(B: np.ndarray) -> float:
    """The limit of (|z|−1)‖(zI−B)⁻¹‖₂ as z → λ radially, largest over the eigenvalues λ of B within
    ``T_MIN`` of the unit circle and farther than ``MIN_GAP`` from every other eigenvalue (1 when there
    is none): ‖P_λ‖ = 1 / |yᴴx| for the unit left and right eigenvectors y, x (the eigenvalue's condition
    number). Near such λ the resolvent is P_λ/(z − λ) + O(1), so the sup is this limit, approached only
    as t → 0; the search at t ≥ T_MIN finds it only to about T_MIN/gap relative, with a value that moves
    with rounding. A cluster of eigenvalues closer than MIN_GAP (an operator ≈ I: a layer whose update
    is below float precision) is left to the search: below t ≈ its spread the limit is decided by the
    rounding noise inside the cluster, not by the layer."""
    import scipy.linalg

    w, vl, vr = scipy.linalg.eig(B, left=True, right=True)
    gap = np.array([np.min(np.abs(np.delete(w, j) - w[j]), initial=np.inf) for j in range(len(w))])
    on = (np.abs(w) >= 1 - T_MIN) & (gap > MIN_GAP)
    if not on.any():
        return 1.0
    overlap = np.abs(np.sum(vl[:, on].conj() * vr[:, on], axis=0))  # |yᴴx|, unit vectors
    with np.errstate(divide="ignore"):
        return float(np.max(1.0 / overlap))


def kreiss_constant(A: np.ndarray, *, n_theta: int = 61, n_r: int = 21) -> float:
    """Kreiss constant of ``A / s`` with ``s = max(1, ρ(A))`` (DESIGN §5, ours).

    K(B) = sup_{|z|>1} (|z| − 1) ‖(zI − B)⁻¹‖₂ measures transient growth:
    K ≤ sup_k ‖B^k‖ ≤ e·d·K. Dividing by ``s`` removes the asymptotic growth rate, so the value
    is finite for operators with ρ > 1.

    A function of the operator, not of the search: on the Schur form T of A/s, a polar grid over
    z = (1 + t)e^{iθ} (θ ∈ [0, π] for real operators, whose resolvent norm is symmetric under
    conjugation, [0, 2π) otherwise; the angles of the 16 largest eigenvalues added, duplicates merged;
    log t uniform on [log T_MIN, log T_MAX]), evaluated exactly (dense SVD per point up to m = 160);
    then projected BFGS ascent of log f, with the exact gradient from the smallest singular triple,
    from each of the ``N_STARTS`` best local maxima of the grid; the best value is kept, never less
    than 1 (the t → ∞ limit of every operator), nor than the t → 0 limit at an eigenvalue on the unit
    circle (:func:`_unit_circle_limit`; after the division by s the largest eigenvalue of an operator
    with ρ > 1 lies there). The same operator up to float rounding gives the
    same K to far better than 1e-6 (``tests/test_spectra.py``).

    Parameters
    ----------
    A : ndarray of shape (m, m)
    n_theta, n_r : int
        Grid points in θ and in t.

    Returns
    -------
    float, at least 1; NaN for an empty operator.

    Examples
    --------
    >>> round(kreiss_constant(np.array([[0.5, 1.0], [0.0, 0.5]])), 4)
    1.3111
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
    if m > DENSE_MAX:  # each point costs O(m²) per solve: a coarser grid, same refinement
        n_theta, n_r = max(25, n_theta // 2), max(12, n_r // 2)
    lam = np.diag(T)
    top = lam[np.lexsort((np.angle(lam), -np.abs(lam)))[:16]]
    if real:  # conjugate symmetry: θ and −θ give the same value
        theta = np.concatenate([np.linspace(0.0, np.pi, n_theta), np.abs(np.angle(top))])
    else:
        theta = np.concatenate([np.linspace(0.0, 2 * np.pi, n_theta, endpoint=False),
                                np.mod(np.angle(top), 2 * np.pi)])
    theta = np.sort(theta)
    theta = theta[np.concatenate([[True], np.diff(theta) > 1e-9])]  # duplicate angles merged
    logt = np.linspace(np.log(T_MIN), np.log(T_MAX), n_r)
    TT, LL = np.meshgrid(theta, logt, indexing="ij")
    z = (1 + np.exp(LL)) * np.exp(1j * TT)
    vals = np.exp(LL) / np.maximum(_sigma_min_batch(T, z), 1e-300)

    scale = np.array([(np.pi if real else 2 * np.pi) / (n_theta - 1), logt[1] - logt[0]])
    best = max(1.0, float(vals.max()) if m <= DENSE_MAX else 1.0)
    if np.max(np.abs(lam)) >= 1 - T_MIN:
        best = max(best, _unit_circle_limit(A / max(1.0, rho)))
    for idx in _local_maxima(vals, periodic=not real)[:N_STARTS]:
        i, j = np.unravel_index(idx, vals.shape)
        logf = _ascend(T, np.array([TT[i, j], LL[i, j]]), scale, (logt[0], logt[-1]))
        best = max(best, float(np.exp(logf)))
    return best
