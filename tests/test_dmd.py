"""Whitened DMD against analytic operators and PyDMD."""
from __future__ import annotations

import numpy as np
import pytest

from featurize import dmd, spectral_masses
from featurize.dmd import whitening_basis


def test_recovers_eigenvalues_of_a_known_operator(rng):
    from conftest import matrix_with_eigenvalues

    lam = np.array([0.3, 0.7, 0.95, 1.0, 1.2, -0.9, 0.5, 0.1])
    A = matrix_with_eigenvalues(lam, rng, cond=10.0)
    X = rng.standard_normal((8, 500)) * np.geomspace(1, 100, 8)[:, None]  # badly scaled coordinates
    res = dmd(X, A @ X, rank=None)
    np.testing.assert_allclose(np.sort(res.eigenvalues.real), np.sort(lam), atol=1e-8)
    np.testing.assert_allclose(res.eigenvalues.imag, 0, atol=1e-8)
    assert res.eta_nl < 1e-8
    assert np.all(res.residuals < 1e-6) and res.reliable.all()


def test_unwhitened_eigenvalues_equal_pydmd(rng):
    pydmd = pytest.importorskip("pydmd")
    d, n = 20, 300
    X = rng.standard_normal((d, n))
    Y = rng.standard_normal((d, d)) @ X / np.sqrt(d) + 0.05 * rng.standard_normal((d, n))
    ours = dmd(X, Y, whiten=False, center=False).eigenvalues
    ref = pydmd.DMD(svd_rank=-1, exact=True)
    ref.fit(X, Y)
    theirs = np.asarray(ref.eigs)
    key = lambda z: np.lexsort((np.round(z.imag, 6), np.round(z.real, 6)))  # noqa: E731
    np.testing.assert_allclose(ours[key(ours)], theirs[key(theirs)], atol=1e-8)


def test_whitening_is_a_similarity_transform_for_full_rank(rng):
    d, n = 10, 400
    X = rng.standard_normal((d, n)) * np.linspace(0.1, 10, d)[:, None]
    Y = rng.standard_normal((d, d)) @ X / 3 + 0.1 * rng.standard_normal((d, n))
    w = np.sort_complex(dmd(X, Y, whiten=True).eigenvalues)
    u = np.sort_complex(dmd(X, Y, whiten=False).eigenvalues)
    np.testing.assert_allclose(np.sort(np.abs(w)), np.sort(np.abs(u)), rtol=1e-3)


@pytest.mark.parametrize("kind", ["layernorm", "embedding_sum"])
def test_rank_deficient_snapshots_give_no_spurious_large_eigenvalues(rng, kind):
    d, n = 32, 1024
    if kind == "layernorm":
        Z = rng.standard_normal((d, n))
        X = (Z - Z.mean(axis=0)) / Z.std(axis=0)  # every column sums to 0: rank d-1
    else:
        tok = rng.standard_normal((d, 8))  # 8 token embeddings + 8 positions: rank ≤ 16 < d
        pos = rng.standard_normal((d, 8))
        X = tok[:, rng.integers(0, 8, n)] + pos[:, rng.integers(0, 8, n)]
    # a mildly contractive, slightly nonlinear layer acting on the stream
    W = rng.standard_normal((d, d)) / np.sqrt(d)
    Y = X + 0.3 * np.tanh(W @ X)
    Y = Y + 1e-9 * rng.standard_normal(Y.shape)  # float noise in the null directions
    res = dmd(X, Y, rank=None)
    assert np.max(np.abs(res.eigenvalues)) < 3.0
    assert res.rank == np.linalg.matrix_rank(X - X.mean(1, keepdims=True))


def test_randomized_rank_r_matches_full_on_a_low_rank_stream(rng):
    d, n, r = 40, 800, 6
    B = rng.standard_normal((d, r))
    X = B @ rng.standard_normal((r, n))  # the stream lives in an r-dim subspace
    Ar = np.diag([0.5, 0.8, 0.95, 1.0, 1.1, 0.3])
    Y = B @ Ar @ np.linalg.pinv(B) @ X
    full = np.sort(np.abs(dmd(X, Y, rank=None).eigenvalues))
    rnd = np.sort(np.abs(dmd(X, Y, rank=r, seed=3).eigenvalues))
    np.testing.assert_allclose(rnd, np.sort(np.diag(Ar)), atol=1e-6)
    np.testing.assert_allclose(full, np.sort(np.diag(Ar)), atol=1e-6)


def test_whitened_coordinates_have_identity_covariance(rng):
    X = rng.standard_normal((6, 2000)) * np.array([1, 2, 3, 4, 5, 0.5])[:, None]
    Xc = X - X.mean(1, keepdims=True)
    Q, scale = whitening_basis(Xc)
    Xt = scale[:, None] * (Q.T @ Xc)
    np.testing.assert_allclose(Xt @ Xt.T / (X.shape[1] - 1), np.eye(6), atol=1e-3)


def test_bad_snapshots_are_refused():
    with pytest.raises(ValueError, match="at least 2 snapshots, got 1"):
        dmd(np.ones((3, 1)), np.ones((3, 1)))
    with pytest.raises(ValueError, match="same shape"):
        dmd(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        dmd(np.full((3, 4), np.nan), np.ones((3, 4)))


def test_masses_of_a_chosen_spectrum():
    lam = np.array([1.2, 1.06, 1.05, 1.0, 0.9, 0.89, 0.8, 0.79, 0.1, -1.3])
    m = spectral_masses(lam)
    # by hand: >1.05: 1.2, 1.06, -1.3 → 3; [0.9, 1.05]: 1.05, 1.0, 0.9 → 3; [0.8, 0.9): 0.89, 0.8 → 2; <0.8: 2
    assert m == dict(m_exp=0.3, m_near=0.3, m_mid=0.2, m_con=0.2)
