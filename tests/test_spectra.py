"""Kreiss constant and κ(V) against brute force and theory."""
from __future__ import annotations

import numpy as np
import pytest

from featurize import eigenvector_condition, kreiss_constant


def _grid_max(A: np.ndarray, theta: np.ndarray, t: np.ndarray) -> tuple[float, int, int]:
    d = A.shape[0]
    z = (1 + t[None, :]) * np.exp(1j * theta[:, None])
    M = z[..., None, None] * np.eye(d) - A  # (n_theta, n_r, d, d)
    vals = t[None, :] / np.linalg.svd(M, compute_uv=False)[..., -1]
    i, j = np.unravel_index(np.argmax(vals), vals.shape)
    return float(vals[i, j]), int(i), int(j)


def brute_force_kreiss(A: np.ndarray, n_theta: int = 360, n_r: int = 300) -> float:
    """sup of (|z|−1)‖(zI−A)⁻¹‖₂ over a polar grid z = (1+t)e^{iθ}, then a finer grid around the
    best cell (plain evaluation on grids, no optimiser, nothing shared with the code under test)."""
    theta = np.linspace(0, 2 * np.pi, n_theta, endpoint=False)
    t = np.geomspace(1e-5, 1e3, n_r)
    best, i, j = _grid_max(A, theta, t)
    dth = theta[1] - theta[0]
    lo, hi = t[max(j - 2, 0)], t[min(j + 2, n_r - 1)]
    fine, _, _ = _grid_max(A, np.linspace(theta[i] - 2 * dth, theta[i] + 2 * dth, 201), np.geomspace(lo, hi, 201))
    return max(best, fine)


def test_normal_contraction_has_kreiss_one(rng):
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    A = Q @ np.diag([0.9, 0.5, -0.3, 0.2, 0.7, 0.0]) @ Q.T  # symmetric, ρ < 1
    assert kreiss_constant(A) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("lam,eps", [(0.5, 1.0), (0.8, 0.6), (0.0, 1.0)])
def test_jordan_block_matches_brute_force_grid(lam, eps):
    d = 4
    A = lam * np.eye(d) + eps * np.eye(d, k=1)
    K = kreiss_constant(A)
    ref = brute_force_kreiss(A)
    assert K == pytest.approx(ref, rel=1e-3)
    powers = [np.linalg.norm(np.linalg.matrix_power(A, k), 2) for k in range(0, 400)]
    assert K <= max(powers) * (1 + 1e-9)
    assert max(powers) <= np.e * d * K


def test_non_normal_random_matrix_matches_brute_force(rng):
    d = 5
    A = np.triu(rng.standard_normal((d, d)))
    A[np.diag_indices(d)] = rng.uniform(-0.9, 0.9, d)
    K = kreiss_constant(A)
    assert K == pytest.approx(brute_force_kreiss(A), rel=1e-3)
    powers = [np.linalg.norm(np.linalg.matrix_power(A, k), 2) for k in range(0, 600)]
    assert K <= max(powers) * (1 + 1e-9) <= np.e * d * K * (1 + 1e-9)


def test_expansive_operator_is_rescaled_to_a_finite_value():
    A = np.diag([2.0, 0.5])  # ρ = 2: K(A) = ∞, K(A/2) = 1 (normal)
    assert kreiss_constant(A) == pytest.approx(1.0, rel=1e-3)


def test_eigenvector_condition():
    assert eigenvector_condition(np.eye(4)) == pytest.approx(1.0)
    V = np.array([[1.0, 1.0], [0.0, 1e-3]])
    V = V / np.linalg.norm(V, axis=0)
    s = np.linalg.svd(V, compute_uv=False)
    assert eigenvector_condition(V) == pytest.approx(s[0] / s[1])
    assert eigenvector_condition(V) > 1e3


@pytest.mark.parametrize("seed", range(6))
def test_nelder_mead_is_scipys(seed):
    """The Kreiss refinement's Nelder–Mead follows scipy.optimize.minimize(method="Nelder-Mead") exactly."""
    import scipy.optimize

    from featurize.spectra import nelder_mead

    rng = np.random.default_rng(seed)
    c, w = rng.normal(size=2), rng.uniform(0.5, 3, size=2)

    def f(p):  # a bumpy bowl, several local minima
        return float(np.sum(w * (p - c) ** 2) + 0.3 * np.sin(5 * p[0]) * np.cos(3 * p[1]))

    x0 = rng.normal(size=2) * 2
    x0[seed % 2] = 0.0 if seed >= 4 else x0[seed % 2]  # the zero-coordinate simplex rule too
    opts = dict(xatol=1e-4, fatol=1e-6, maxiter=250 if seed else 5)
    want = scipy.optimize.minimize(f, x0, method="Nelder-Mead", options=opts).fun
    assert nelder_mead(f, x0, **opts) == want
