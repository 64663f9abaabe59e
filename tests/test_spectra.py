"""Kreiss constant and κ(V) against brute force and theory; the Kreiss constant is a function of the
operator (the same operator up to rounding, in any basis, gives the same value)."""
from __future__ import annotations

from pathlib import Path

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


def brute_force_kreiss(A: np.ndarray, n_theta: int = 360, n_r: int = 300, t_min: float = 1e-5,
                       n_fine: int = 201) -> float:
    """sup of (|z|−1)‖(zI−A)⁻¹‖₂ over a polar grid z = (1+t)e^{iθ}, then a finer grid around the
    best cell (plain evaluation on grids, no optimiser, nothing shared with the code under test)."""
    theta = np.linspace(0, 2 * np.pi, n_theta, endpoint=False)
    t = np.geomspace(t_min, 1e3, n_r)
    best, i, j = _grid_max(A, theta, t)
    dth = theta[1] - theta[0]
    lo, hi = t[max(j - 2, 0)], t[min(j + 2, n_r - 1)]
    fine, _, _ = _grid_max(A, np.linspace(theta[i] - 2 * dth, theta[i] + 2 * dth, n_fine), np.geomspace(lo, hi, n_fine))
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


OPERATORS = np.load(Path(__file__).parent / "data" / "dmd_operators.npz")  # whitened DMD operators (rank 32)
# of the small Llama and GPT-2 of tests/test_stream.py, on which the grid + one-start Nelder–Mead search
# gave K that moved with float noise (5.437 vs 5.428, 3.598 vs 9.182)


def _scaled(A):
    return A / max(1.0, np.max(np.abs(np.linalg.eigvals(A))))


@pytest.mark.parametrize("name", OPERATORS.files)
def test_dmd_operators_never_below_brute_force_and_within_the_power_bound(name):
    A = OPERATORS[name]
    K = kreiss_constant(A)
    B = _scaled(A)
    assert K >= brute_force_kreiss(B, n_theta=120, n_r=60, n_fine=41) * (1 - 1e-9)
    P, best = np.eye(len(B)), 1.0
    for k in range(1, 2001):  # K ≤ sup_k ‖B^k‖ (Kreiss matrix theorem, lower side)
        P = P @ B
        if k <= 50 or k % 10 == 0:
            best = max(best, np.linalg.norm(P, 2))
    assert K <= best * (1 + 1e-9)


@pytest.mark.parametrize("c,a", [(3.0, 0.5), (10.0, -0.3), (1.0, 0.9)])
def test_eigenvalue_on_the_circle_gives_its_condition_number(c, a):
    """ρ = 2: A/2 = [[1, c/2], [0, a]] has the eigenvalue 1 on the circle; near it the resolvent is
    P/(z − 1), so the sup is at least ‖P‖ = sqrt(1 + (c/2)²/(1 − a)²), the limit as z → 1 radially."""
    A = np.array([[2.0, c], [0.0, 2 * a]])
    kappa = np.sqrt(1 + (c / 2) ** 2 / (1 - a) ** 2)
    K = kreiss_constant(A)
    assert K >= kappa * (1 - 1e-12)
    assert K == pytest.approx(max(kappa, brute_force_kreiss(A / 2, t_min=1e-9)), rel=1e-3)


@pytest.mark.parametrize("name", OPERATORS.files)
def test_same_operator_in_another_basis_or_rounding_gives_the_same_kreiss(name):
    """The resolvent norm is invariant under unitary similarity, so Q A Qᵀ (another real orthonormal
    basis: other rounding, another Schur basis, other tied grid points) must give the same K; so must
    A with a last-bit perturbation."""
    A = OPERATORS[name]
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal(A.shape))
    K = kreiss_constant(A)
    np.testing.assert_allclose(kreiss_constant(Q @ A @ Q.T), K, rtol=1e-6)
    np.testing.assert_allclose(kreiss_constant(A * (1 + 1e-15 * rng.standard_normal(A.shape))), K, rtol=1e-6)
