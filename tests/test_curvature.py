"""featurize.curvature and the curvature group, against analytic quadratics and brute-force Hessians."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from featurize import curvature as C


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw − bᵀw, in float64: H = A, ∇L = Aw − b."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.A, self.b = A, b
        self.w = nn.Parameter(w0.clone())

    def loss(self) -> torch.Tensor:
        return 0.5 * self.w @ self.A @ self.w - self.b @ self.w


def _quadratic(n=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    return Quadratic(A, torch.randn(n, generator=g, dtype=torch.float64),
                     torch.randn(n, generator=g, dtype=torch.float64))


def test_hessian_top_eig_is_the_quadratic_s_largest_eigenvalue():
    q = _quadratic()
    want = np.linalg.eigvalsh(q.A.numpy())[-1]
    assert C.hessian_top_eig(q, q.loss, iters=25) == pytest.approx(want, rel=1e-10)
    # few iterations still approach it from below (Ritz values never exceed λ_max)
    assert C.hessian_top_eig(q, q.loss, iters=8) <= want * (1 + 1e-12)


def test_preconditioned_top_eig_matches_dense_generalised_eigenvalue():
    q = _quadratic(seed=1)
    g = C.flat_grad(q, q.loss)
    P = C.adam_preconditioner([g, 0.5 * g], eps=1e-3)
    # by hand: √(mean g²) + ε
    assert torch.allclose(P, torch.sqrt((g ** 2 + 0.25 * g ** 2) / 2) + 1e-3)
    S = torch.diag(P.rsqrt())
    want = np.linalg.eigvalsh((S @ q.A @ S).numpy())[-1]
    # the same as the largest eigenvalue of P⁻¹A (similar matrices)
    assert want == pytest.approx(np.max(np.linalg.eigvals(np.diag(1 / P.numpy()) @ q.A.numpy()).real), rel=1e-9)
    assert C.preconditioned_top_eig(q, q.loss, P, iters=25) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_line_search_overshoot_is_the_analytic_root(kind):
    q = _quadratic(seed=2)
    g = C.flat_grad(q, q.loss)
    u = g / (g.abs() + 1e-8) if kind == "adam" else g
    w0 = q.w.detach().clone()
    res = C.line_search(q, q.loss, u)
    # L(w − ηu) − L(w) = −η gᵀu + ½ η² uᵀAu: back above L(w) beyond η* = 2 gᵀu / uᵀAu, lowest at η*/2
    root = float(2 * (g @ u) / (u @ q.A @ u))
    assert res.overshoot == pytest.approx(root, rel=0.006)           # 8 bisections of a half decade
    assert res.overshoot >= root                                       # the bracket's upper end
    assert abs(math.log10(res.argmin) - math.log10(root / 2)) <= 0.25 + 1e-9
    assert res.loss0 == pytest.approx(float(q.loss().detach()))
    assert torch.equal(q.w.detach(), w0)                               # weights restored exactly


def _tiny_gpt():
    from risk_model.zoo import build_model

    torch.manual_seed(3)
    return build_model(dict(d_model=4, n_layers=1, n_heads=1, vocab_size=7, block_size=6, norm="pre_ln")).double()


def test_lanczos_on_a_real_network_matches_the_brute_force_hessian():
    model = _tiny_gpt().eval()
    x = torch.randint(0, 7, (3, 7), generator=torch.Generator().manual_seed(0))

    def loss():
        out = model(x[:, :-1])
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))

    ps = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in ps)
    assert n < 400
    # brute force: every column of H from autograd's Hessian of the flattened loss
    flat0 = torch.cat([p.detach().reshape(-1) for p in ps])

    def f(flat):
        chunks = torch.split(flat, [p.numel() for p in ps])
        params = {name: c.reshape(p.shape) for (name, p), c in
                  zip([(nm, p) for nm, p in model.named_parameters() if p.requires_grad], chunks)}
        out = torch.func.functional_call(model, params, (x[:, :-1],))
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(f, flat0, vectorize=True).numpy()
    ev = np.linalg.eigvalsh(0.5 * (H + H.T))
    got = C.hessian_top_eig(model, loss, iters=80, seed=1)
    assert got == pytest.approx(ev[-1], rel=1e-6)


def test_curvature_features_leave_the_model_and_rng_alone():
    from risk_model.init_features import curvature_feature_names, curvature_features

    model = _tiny_gpt().float().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    torch.manual_seed(123)
    want_next = torch.rand(3)
    torch.manual_seed(123)
    f = curvature_features(model, optimizer="adamw", batch=4, seq_len=6, iters=10)
    assert torch.equal(torch.rand(3), want_next)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())
    assert set(curvature_feature_names()) <= set(f)
    assert all(math.isfinite(f[k]) for k in ("ln_lr_eos", "ln_lr_line_min", "line_gain", "curvature_top_eig"))
    # the Adam edge of stability is 38/λ_max(P⁻¹H) by construction of the feature
    assert f["ln_lr_eos"] == pytest.approx(math.log(38.0 / f["curvature_top_eig"]), rel=1e-12)


def test_hf_sdpa_attention_gets_a_hessian_through_the_math_kernel():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = dict(n_embd=8, n_layer=1, n_head=2, vocab_size=16, n_positions=8)
    m_sdpa = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, attn_implementation="sdpa")).eval()
    m_eager = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, attn_implementation="eager")).eval()
    m_eager.load_state_dict(m_sdpa.state_dict())
    x = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    vals = [C.hessian_top_eig(m, lambda m=m: m(x, labels=x).loss, iters=10, seed=0) for m in (m_sdpa, m_eager)]
    assert math.isfinite(vals[0]) and vals[0] > 0
    assert vals[0] == pytest.approx(vals[1], rel=1e-4)
