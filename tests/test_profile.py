"""featurize.profile on networks whose spectra are known, and on real architectures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import LinearBlock, matrix_with_eigenvalues
from featurize import PROFILE_COLUMNS, CaptureError, SpectralProfile, find_blocks, profile, spectral_masses


def test_linear_residual_network_recovers_chosen_masses_and_rho(linear_net):
    net, spectra = linear_net
    prof = profile(net, n_samples=512, rank=None, input_shape=(8, 12), seed=0)
    assert list(prof.layers.columns) == PROFILE_COLUMNS
    assert len(prof.layers) == 3
    for row, lam in zip(prof.layers.to_dict("records"), spectra):
        expect = spectral_masses(lam)  # the bands applied to the chosen eigenvalues
        for key, val in expect.items():
            assert row[key] == pytest.approx(val, abs=1e-12), key
        assert row["rho"] == pytest.approx(np.max(np.abs(lam)), rel=1e-5)
        assert row["reliable_fraction"] == 1.0
        assert not row["degenerate"]
    assert prof.aggregates["m_near_mean"] == pytest.approx(np.mean([spectral_masses(s)["m_near"] for s in spectra]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), cond=st.floats(1.0, 30.0))
def test_masses_and_rho_invariant_under_invertible_map_of_the_stream(seed, cond):
    """Mapping the residual stream through an invertible M (h ↦ M h) leaves the spectrum unchanged."""
    rng = np.random.default_rng(seed)
    d = 10
    lam = rng.choice([0.3, 0.6, 0.85, 0.95, 1.0, 1.2], size=d)
    A = matrix_with_eigenvalues(lam, rng)
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    M = U @ np.diag(np.geomspace(1, cond, d)) @ V
    X = rng.standard_normal((d, 600))
    Y = A @ X + 0.02 * np.tanh(X)  # slightly nonlinear
    from featurize.profile import layer_stats

    a = layer_stats(X, Y, rank=None)
    b = layer_stats(M @ X, M @ Y, rank=None)
    for key in ("m_exp_all", "m_near_all", "m_mid_all", "m_con_all"):
        assert a[key] == b[key], key
    assert b["rho"] == pytest.approx(a["rho"], rel=1e-6)


class ReZeroBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.alpha = nn.Parameter(torch.zeros(()))  # ReZero: residual branch off at init

    def forward(self, h):
        return h + self.alpha * self.mlp(h)


class TinyLM(nn.Module):
    def __init__(self, d=16, L=3, vocab=50, rezero=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        block = (lambda: ReZeroBlock(d)) if rezero else (lambda: LinearBlock(0.9 * np.eye(d)))
        self.layers = nn.ModuleList([block() for _ in range(L)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.wte(idx)  # (B, T, d)
        for blk in self.layers:
            h = blk(h)
        return self.head(h)


def test_rezero_blocks_are_flagged_degenerate():
    prof = profile(TinyLM(rezero=True), n_samples=256)
    assert prof.layers["degenerate"].all()
    assert prof.degenerate_layers == [0, 1, 2]
    # every eigenvalue of the identity map sits at 1: exactly why they must be flagged
    assert prof.layers["m_near"].eq(1.0).all()


def test_profile_leaves_the_callers_torch_rng_as_it_found_it():
    net = TinyLM()  # built before the state is taken
    torch.manual_seed(7)
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(state)
    profile(net, n_samples=128)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected)


def test_blocks_found_in_hf_gpt2_and_llama_random_init():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=97, n_positions=64))
    name, blocks = find_blocks(gpt2)
    assert name == "transformer.h" and len(blocks) == 3
    prof = profile(gpt2, n_samples=256)
    assert len(prof.layers) == 3 and np.isfinite(prof.layers["rho"]).all()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64))
    name, blocks = find_blocks(llama)
    assert name == "model.layers" and len(blocks) == 2
    prof = profile(llama, n_samples=256)
    assert len(prof.layers) == 2 and np.isfinite(prof.layers["m_near"]).all()


def test_blocks_of_a_nanogpt_style_model_and_override():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleList([nn.Linear(8, 8) for _ in range(6)])  # longer list, deeper

        def forward(self, h):
            return h + sum(a(h) for a in self.attn) / 6

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(10, 8), h=nn.ModuleList([Block() for _ in range(2)])))

        def forward(self, idx):
            h = self.transformer.wte(idx)
            for b in self.transformer.h:
                h = b(h)
            return h

    name, blocks = find_blocks(GPT())
    assert name == "transformer.h" and len(blocks) == 2
    name, blocks = find_blocks(GPT(), "transformer.h.0.attn")
    assert len(blocks) == 6
    with pytest.raises(CaptureError, match="no submodule named"):
        find_blocks(GPT(), "transformer.nope")


def test_no_blocks_is_a_clear_error():
    with pytest.raises(CaptureError, match="--blocks"):
        find_blocks(nn.Linear(3, 3))


def test_same_seed_same_profile_and_json_round_trip(tmp_path):
    net = TinyLM()
    a = profile(net, n_samples=128, seed=3)
    b = profile(net, n_samples=128, seed=3)
    assert a.layers.equals(b.layers)
    c = profile(net, n_samples=128, seed=4)
    assert not np.allclose(c.layers["eta_nl"], a.layers["eta_nl"], rtol=0, atol=0) or not c.layers["update_ratio"].equals(a.layers["update_ratio"])
    back = SpectralProfile.from_json(a.to_json(tmp_path / "p.json"))
    assert list(back.layers.columns) == PROFILE_COLUMNS
    np.testing.assert_allclose(back.layers["m_near"], a.layers["m_near"])
    assert back.aggregates == pytest.approx(a.aggregates)
    d = json.loads((tmp_path / "p.json").read_text())
    assert set(d["layers"][0]) >= {"layer", "name", "m_exp", "m_near", "m_mid", "m_con", "rho", "kappa_v",
                                   "kreiss", "eta_nl", "reliable_fraction", "degenerate"}
    assert "m_near_mean" in d["aggregates"]
    png = a.plot(tmp_path / "eig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_activations_are_reported():
    net = TinyLM()
    with torch.no_grad():
        net.layers[1].lin.weight.fill_(float("inf"))
    with pytest.raises(CaptureError, match="non-finite activations"):
        profile(net, n_samples=64)


def test_hook_memory_is_n_states_per_layer():
    net = TinyLM(d=16, L=2)
    from featurize import collect_snapshots, make_probe

    probe = make_probe(net, 4096, seed=0)
    snaps = collect_snapshots(net, probe, n_samples=300, seed=0)
    assert all(x.shape == (16, 300) for x in snaps.X)
    # the kept states are the chosen token positions: layer 0's input is the embedding of those tokens
    emb = net.wte(probe).detach().reshape(-1, 16).double().numpy()
    rows = {tuple(np.round(r, 10)) for r in emb}
    assert all(tuple(np.round(c, 10)) in rows for c in snaps.X[0].T[:20])


def test_forward_stops_after_the_last_block():
    """Nothing after the blocks (an LM head's large logits) is computed while profiling."""
    class CountingHead(nn.Linear):
        calls = 0

        def forward(self, h):
            CountingHead.calls += 1
            return super().forward(h)

    net = TinyLM()
    net.head = CountingHead(16, 50)
    prof = profile(net, n_samples=128)
    assert len(prof.layers) == 3
    assert CountingHead.calls == 0
    net(torch.zeros(1, 4, dtype=torch.long))  # the hooks are gone afterwards
    assert CountingHead.calls == 1
