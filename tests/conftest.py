"""Shared fixtures: small analytic networks whose spectra are known exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

HERE = __import__("pathlib").Path(__file__).parent


class LinearBlock(nn.Module):
    """A residual block that is exactly linear: h ↦ A h (no bias)."""

    def __init__(self, A: np.ndarray):
        super().__init__()
        d = A.shape[0]
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.as_tensor(A, dtype=torch.float32))

    def forward(self, h):  # (B, T, d) -> (B, T, d)
        return self.lin(h)


def matrix_with_eigenvalues(moduli: np.ndarray, rng: np.random.Generator, cond: float = 3.0) -> np.ndarray:
    """Real d×d matrix P diag(λ) P⁻¹ with the given (real, signed) eigenvalues and a mild non-normal P."""
    d = len(moduli)
    Q1, _ = np.linalg.qr(rng.standard_normal((d, d)))
    Q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.geomspace(1.0, cond, d)
    P = Q1 @ np.diag(s) @ Q2
    return P @ np.diag(moduli) @ np.linalg.inv(P)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def linear_net(rng):
    """Three linear residual blocks, d=12, with chosen eigenvalues (known masses and ρ)."""
    spectra = [
        np.array([0.5] * 6 + [0.95] * 3 + [1.2] * 3),
        np.array([0.85] * 4 + [0.99] * 4 + [0.3] * 4),
        np.array([1.3, -1.1, 0.92, -0.93, 0.2, 0.6, 0.81, 0.89, 1.0, 0.7, 0.1, 0.4]),
    ]
    mats = [matrix_with_eigenvalues(s, rng) for s in spectra]
    net = nn.Sequential(*[LinearBlock(A) for A in mats])
    return net, spectra
