"""Tests of featurize.shaping (KSS, DESIGN §9) against independent NumPy computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import featurize
from featurize.dmd import dmd
from featurize.shaping import (
    MAX_SNAPSHOT_GRAD,
    KoopmanSpectralShaping,
    band_penalty,
    dmd_eigenvalues,
    kss_loss,
)

T, TAU_U, TAU_L = 20.0, 1.05, 0.90


def numpy_band_penalty(lam: np.ndarray, gamma: float = 0.4, beta: float = 1.0) -> float:
    """DESIGN §9 written out again in NumPy, independently of the torch code."""
    a = np.abs(np.asarray(lam, dtype=complex))
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    softplus = lambda z: np.log1p(np.exp(z))  # noqa: E731
    unstable = np.sum(sig(T * (a - TAU_U)) * softplus(a - TAU_U) ** 2)
    m_soft = np.mean(sig(T * (a - TAU_L)) * sig(T * (TAU_U - a)))
    return float(unstable + beta * (m_soft - gamma) ** 2)


def on_circle(radii, seed=0) -> torch.Tensor:
    phases = np.random.default_rng(seed).uniform(0, np.pi, len(radii))
    return torch.tensor(np.asarray(radii) * np.exp(1j * phases), dtype=torch.complex128)


# ---------------------------------------------------------------------------- band_penalty


def test_band_penalty_on_target_spectrum_matches_hand_value():
    # 40% at |λ| = 0.97 (inside the band, away from both edges), 60% at 0.5, γ = 0.4
    lam = on_circle([0.97] * 4 + [0.5] * 6)
    got = float(band_penalty(lam, gamma=0.4))
    # by hand: σ(20·(−0.08))·softplus(−0.08)² = 0.167982·0.427647 = 0.0718368 per eigenvalue at
    # 0.97 and 1.670e−5·0.20747 = 3.465e−6 at 0.5; soft band membership σ(1.4)·σ(1.6) = 0.667432
    # at 0.97 and σ(−8)·σ(11) = 3.353e−4 at 0.5. Note m_soft = 0.267, not the hard fraction 0.4.
    unstable = 4 * 0.0718368 + 6 * 3.465e-6
    m_soft = (4 * 0.667432 + 6 * 3.353e-4) / 10
    assert got == pytest.approx(unstable + (m_soft - 0.4) ** 2, abs=1e-5)
    assert got == pytest.approx(numpy_band_penalty(lam.numpy(), gamma=0.4), abs=1e-12)


def test_mass_term_vanishes_when_soft_mass_is_on_target():
    lam = on_circle([0.97] * 4 + [0.5] * 6)
    a = np.abs(lam.numpy())
    m_soft = float(np.mean(1 / (1 + np.exp(-T * (a - TAU_L))) / (1 + np.exp(-T * (TAU_U - a)))))
    unstable_only = numpy_band_penalty(lam.numpy(), gamma=m_soft)
    assert float(band_penalty(lam, gamma=m_soft)) == pytest.approx(unstable_only, abs=1e-12)
    assert float(band_penalty(lam, gamma=m_soft, beta=0.0)) == pytest.approx(unstable_only, abs=1e-12)


def test_band_penalty_is_zero_for_a_contractive_spectrum_with_zero_target():
    lam = on_circle([0.2] * 32)
    assert abs(float(band_penalty(lam, gamma=0.0))) < 1e-6


def test_band_penalty_matches_numpy_on_random_spectra():
    rng = np.random.default_rng(1)
    for _ in range(20):
        lam = rng.uniform(0, 1.6, 32) * np.exp(1j * rng.uniform(-np.pi, np.pi, 32))
        gamma, beta = rng.uniform(0.3, 0.5), rng.uniform(0.5, 2.0)
        got = float(band_penalty(torch.tensor(lam), gamma=gamma, beta=beta))
        assert got >= 0
        assert got == pytest.approx(numpy_band_penalty(lam, gamma, beta), rel=1e-10, abs=1e-12)


def test_band_penalty_gradient_pushes_expansive_modes_inward():
    lam = on_circle([1.3, 1.1, 0.97, 0.5]).requires_grad_(True)
    band_penalty(lam).backward()
    g = lam.grad
    assert torch.isfinite(g.real).all() and torch.isfinite(g.imag).all()
    # descent direction −g: its radial component is negative for the expansive eigenvalues
    radial = (-(g.conj() * lam.detach() / lam.detach().abs()).real)
    assert radial[0] < 0 and radial[1] < 0


def test_band_penalty_rejects_empty_input():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        band_penalty(torch.zeros(0))


# ---------------------------------------------------------------------- differentiable DMD


def test_dmd_eigenvalues_match_numpy_featurizer():
    rng = np.random.default_rng(0)
    d, n = 6, 400
    A = rng.standard_normal((d, d)) / np.sqrt(d) + 0.8 * np.eye(d)
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))  # correlated token states
    Y = X @ A.T + 0.01 * rng.standard_normal((n, d))
    ours = dmd_eigenvalues(torch.tensor(X), torch.tensor(Y), rank=None).numpy()
    ref = dmd(X.T, Y.T, rank=None).eigenvalues
    np.testing.assert_allclose(np.sort_complex(ours), np.sort_complex(ref), atol=1e-8)


def test_randomized_rank_matches_numpy_featurizer_on_low_rank_data():
    rng = np.random.default_rng(2)
    d, n, r = 40, 300, 5
    basis = np.linalg.qr(rng.standard_normal((d, r)))[0]  # (d, r)
    Z = rng.standard_normal((n, r)) * np.array([5, 4, 3, 2, 1.5])
    M = rng.standard_normal((r, r)) / np.sqrt(r)
    X = Z @ basis.T + 1e-3 * rng.standard_normal((n, d))
    Y = (Z @ M.T) @ basis.T + 1e-3 * rng.standard_normal((n, d))
    ours = dmd_eigenvalues(torch.tensor(X), torch.tensor(Y), rank=r).numpy()
    ref = dmd(X.T, Y.T, rank=r).eigenvalues
    assert ours.shape == (r,)
    np.testing.assert_allclose(np.sort(np.abs(ours)), np.sort(np.abs(ref)), atol=1e-3)
    np.testing.assert_allclose(np.sort(np.abs(ours)), np.sort(np.abs(np.linalg.eigvals(M))), atol=1e-2)


def test_kss_loss_gradient_is_finite_even_for_repeated_eigenvalues():
    torch.manual_seed(0)
    X = torch.randn(256, 16, requires_grad=True)
    for Y in (X * 1.0, X @ (1.3 * torch.eye(16)), X + 1e-7 * X.roll(1, dims=1)):
        X.grad = None
        loss = kss_loss(X, Y)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        assert torch.isfinite(X.grad).all()


def test_uncentred_dmd_matches_plain_least_squares_and_sees_mean_growth():
    # Y = 0.5 (X − μ) + 2 μ: every centred eigenvalue is 0.5, but the mean grows ×2 per block
    rng = np.random.default_rng(3)
    d, n = 6, 500
    mu = 3.0 * rng.standard_normal(d)
    X = mu + rng.standard_normal((n, d))
    Y = 0.5 * (X - X.mean(0)) + 2.0 * X.mean(0)
    centred = dmd_eigenvalues(torch.tensor(X), torch.tensor(Y), rank=None).numpy()
    ours = dmd_eigenvalues(torch.tensor(X), torch.tensor(Y), rank=None, center=False).numpy()
    ref = np.linalg.eigvals(np.linalg.lstsq(X, Y, rcond=None)[0].T)  # Y ≈ X Âᵀ, no intercept
    np.testing.assert_allclose(np.abs(centred), 0.5, atol=1e-8)
    np.testing.assert_allclose(np.sort_complex(ours), np.sort_complex(ref), atol=1e-8)
    assert np.abs(ours).max() > 1.5


def snapshot_grad_norm(X, Y, **kwargs):
    X = X.clone().requires_grad_(True)
    Y = Y.clone().requires_grad_(True)
    kss_loss(X, Y, **kwargs).backward()
    return torch.cat([X.grad.flatten(), Y.grad.flatten()])


def test_penalty_gradient_on_snapshots_is_bounded_as_documented():
    # Ill-conditioned X (variances 1e4 … 1e-4) and an expansive map: the whitening makes the
    # unbounded gradient large; the bound is ‖∂ℓ/∂(X, Y)‖_F ≤ G / ‖(X, Y)‖_F, direction kept.
    torch.manual_seed(0)
    d, n = 12, 256
    X = torch.randn(n, d, dtype=torch.float64) * torch.logspace(2, -2, d, dtype=torch.float64)
    Y = X @ (1.6 * torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]).T
    size = float(torch.sqrt((X ** 2).sum() + (Y ** 2).sum()))
    free = snapshot_grad_norm(X, Y, max_grad=None)
    for G in (MAX_SNAPSHOT_GRAD, 0.01):
        bounded = snapshot_grad_norm(X, Y, max_grad=G)
        assert float(free.norm()) > 10 * G / size  # the bound is active here
        assert float(bounded.norm()) == pytest.approx(G / size, rel=1e-9)
        cosine = float(bounded @ free / (bounded.norm() * free.norm()))
        assert cosine == pytest.approx(1.0, abs=1e-9)
    # a gradient already within the bound is left alone
    loose = 2 * float(free.norm()) * size
    torch.testing.assert_close(snapshot_grad_norm(X, Y, max_grad=loose), free, rtol=0, atol=0)


def layernorm_block_gradients(max_grad):
    torch.manual_seed(1)
    d, n = 32, 256
    X = (torch.randn(n, d) * torch.logspace(2, -1, d)).requires_grad_(True)  # large, anisotropic
    lin = nn.Linear(d, d)
    Y = X + lin(nn.functional.layer_norm(X, (d,)))  # pre-LN style: an O(1) branch on an O(100) stream
    loss = kss_loss(X, Y, rank=None, max_grad=max_grad)
    loss.backward()
    size = float(torch.sqrt((X.detach() ** 2).sum() + (Y.detach() ** 2).sum()))
    return float(loss.detach()), float(X.grad.norm()) * size


def test_bound_keeps_the_gradient_of_layernorm_like_blocks_in_check():
    # Whitening makes the stream's low-variance directions look expansive (ℓ > 1) and, unbounded,
    # multiplies the gradient by 1/σ_min. Bounded, the gradient reaching X is the capped ∂ℓ/∂X plus
    # ∂ℓ/∂Y passed back through the block: the identity path (≤ G) and the LayerNorm path, which
    # is small for a large stream, so ‖∂ℓ/∂X‖·‖(X, Y)‖ stays within 1.5 G.
    loss_free, free = layernorm_block_gradients(None)
    loss, bounded = layernorm_block_gradients(MAX_SNAPSHOT_GRAD)
    assert loss == loss_free > 1  # the bound leaves the loss value alone
    assert free > 1000 * MAX_SNAPSHOT_GRAD
    assert bounded <= 1.5 * MAX_SNAPSHOT_GRAD


def test_kss_loss_of_non_finite_snapshots_is_zero():
    X = torch.randn(64, 4)
    Y = X.clone()
    Y[0, 0] = float("nan")
    assert float(kss_loss(X, Y)) == 0.0


# ------------------------------------------------------------------------------- the hooks


class Linear(nn.Module):
    """h ↦ A h = h + (A − I) h, a linear residual block with a chosen spectrum."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.branch = nn.Linear(A.shape[0], A.shape[0], bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(A - torch.eye(A.shape[0]))

    def forward(self, h):
        return h + self.branch(h)


class ToyResNet(nn.Module):
    def __init__(self, As):
        super().__init__()
        self.blocks = nn.ModuleList(Linear(A) for A in As)

    def forward(self, h):
        for b in self.blocks:
            h = b(h)
        return h


def expansive_net(d=8, n_layers=3, radius=1.3, seed=0) -> ToyResNet:
    g = torch.Generator().manual_seed(seed)
    As = [radius * torch.linalg.qr(torch.randn(d, d, generator=g))[0] for _ in range(n_layers)]
    return ToyResNet(As)  # every eigenvalue of every block has |λ| = radius


def test_penalty_alone_moves_eigenvalues_into_the_band():
    torch.manual_seed(0)
    d = 8
    net = expansive_net(d)
    before = featurize.profile(net, rank=None, input_shape=(16, d), n_samples=512)
    assert before.aggregates["rho_mean"] == pytest.approx(1.3, abs=1e-6)
    kss = KoopmanSpectralShaping(net, alpha=1.0, every=1, layer_fraction=1.0, n_tokens=256)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        net(torch.randn(32, 16, d))
        loss = kss.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    kss.remove()
    after = featurize.profile(net, rank=None, input_shape=(16, d), n_samples=512)
    assert after.aggregates["rho_max"] < 1.10
    assert after.aggregates["m_exp_mean"] < 0.2 < before.aggregates["m_exp_mean"]


class TinyLM(nn.Module):
    """A small decoder-like model whose blocks live in ``model.blocks`` (nn.ModuleList)."""

    def __init__(self, vocab=32, d=16, n_layers=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(n_layers)
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.wte(idx)  # (B, T, d)
        for b in self.blocks:
            x = x + b(x)  # residual outside the block: the block is not residual on its own
        return self.head(x)


class ResidualMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.proj(torch.nn.functional.gelu(self.fc(x)))


class TinyResidualLM(TinyLM):
    def __init__(self, vocab=32, d=16, n_layers=4):
        super().__init__(vocab, d, n_layers)
        self.blocks = nn.ModuleList(ResidualMLP(d) for _ in range(n_layers))

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_training_loop_applies_penalty_every_k_steps_on_half_the_layers():
    torch.manual_seed(0)
    model = TinyResidualLM()
    kss = KoopmanSpectralShaping(model, alpha=0.15, every=3, n_tokens=64, seed=1)
    assert kss.container == "blocks" and len(kss.blocks) == 4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    for step in range(7):
        idx = torch.randint(0, 32, (4, 12))
        hooked = sum(len(b._forward_hooks) for b in model.blocks)
        logits = model(idx)
        captured = sorted(kss._snapshots)
        assert hooked == (2 if step % 3 == 0 else 0)  # no hooks at all on the other steps
        task = nn.functional.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())
        pen = kss.penalty()
        loss = task + pen
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        seen.append((pen.item(), captured))
        assert pen.shape == () and pen.dtype == torch.float32
    for step, (pen, captured) in enumerate(seen):
        if step % 3 == 0:
            assert pen > 0 and len(captured) == 2
        else:
            assert pen == 0.0 and captured == []
    assert kss.step == 7
    with torch.no_grad():  # evaluation passes are not captured
        model(torch.randint(0, 32, (2, 12)))
    assert kss._snapshots == {}
    kss.remove()
    assert all(len(b._forward_hooks) == 0 for b in model.blocks)
    model(torch.randint(0, 32, (2, 12)))
    assert float(kss.penalty()) == 0.0  # removed: off for good


def test_penalty_before_any_forward_pass_says_so():
    kss = KoopmanSpectralShaping(TinyResidualLM(), every=5)
    with pytest.raises(RuntimeError, match="after the forward pass"):
        kss.penalty()
    assert float(kss.penalty()) == 0.0  # step 1 is not an active step
    kss.remove()


def test_alpha_zero_is_off():
    model = TinyResidualLM()
    kss = KoopmanSpectralShaping(model, alpha=0.0)
    model(torch.randint(0, 32, (2, 8)))
    assert kss._snapshots == {} and float(kss.penalty()) == 0.0


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=-0.1), "alpha must be a finite number >= 0, got -0.1"),
        (dict(every=0), "every must be an int >= 1, got 0"),
        (dict(every=2.5), "every must be an int >= 1, got 2.5"),
        (dict(rank=0), "rank must be an int >= 1 or None"),
        (dict(max_grad=0.0), "max_grad must be a number > 0 or None"),
        (dict(layer_fraction=0.0), "layer_fraction must be in"),
        (dict(n_tokens=1), "n_tokens must be an int >= 2"),
        (dict(gamma=1.5), "gamma must be in"),
    ],
)
def test_construction_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        KoopmanSpectralShaping(TinyResidualLM(), **kwargs)


def test_model_without_blocks_raises_capture_error():
    with pytest.raises(featurize.CaptureError, match="no residual blocks"):
        KoopmanSpectralShaping(nn.Linear(4, 4))


def test_non_residual_blocks_are_reported_when_hooked():
    model = TinyLM()  # blocks map d → d, so they hook fine; a wrong container is caught at forward
    kss = KoopmanSpectralShaping(model, every=1)
    model(torch.randint(0, 32, (2, 8)))
    assert kss.penalty().item() > 0
    bad = nn.Sequential(nn.Sequential(nn.Linear(4, 8)), nn.Sequential(nn.Linear(8, 8)))
    kss = KoopmanSpectralShaping(bad, every=1, layer_fraction=1.0)
    with pytest.raises(featurize.CaptureError, match="same shape"):
        bad(torch.randn(3, 4))
