"""featurize.capture: block discovery (hand-written parameter-only blocks, the shape check) and the
one-pass capture of several probe seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from featurize import CaptureError, find_blocks, profile, profile_seeds
from featurize.capture import collect_snapshots_seeds, discover_blocks, make_probe
from featurize.profile import layer_stats


class RawBlock(nn.Module):
    """A hand-written residual block: raw nn.Parameters and a buffer, no child modules."""

    def __init__(self, d: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(d, 2 * d) / d**0.5)
        self.w_out = nn.Parameter(torch.randn(2 * d, d) / (2 * d) ** 0.5)
        self.register_buffer("gain", torch.tensor(0.5))

    def forward(self, h):  # (B, T, d) -> (B, T, d)
        return h + self.gain * torch.tanh(h @ self.w_in) @ self.w_out


class Widen(nn.Module):
    """Raw parameters too, but maps the stream from d to 2d: not a residual block."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, 2 * d) / d**0.5)

    def forward(self, h):  # (B, T, d) -> (B, T, 2d)
        return h @ self.w


class RawLM(nn.Module):
    """Embedding, a list of parameter-only blocks, and (optionally) a longer list of readouts at
    the same depth that change the width."""

    def __init__(self, d=16, L=3, vocab=50, readouts=0):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.readouts = nn.ModuleList([Widen(d) for _ in range(readouts)])  # listed before the blocks
        self.blocks = nn.ModuleList([RawBlock(d) for _ in range(L)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.wte(idx)  # (B, T, d)
        for blk in self.blocks:
            h = blk(h)
        out = self.head(h)  # (B, T, vocab)
        for r in self.readouts:
            out = out + r(h).sum() * 0.0
        return out


def test_parameter_only_blocks_are_found_and_profiled():
    torch.manual_seed(0)
    net = RawLM()
    name, blocks = find_blocks(net)
    assert name == "blocks" and blocks == list(net.blocks)
    prof = profile(net, n_samples=256, rank=None)
    assert prof.meta["blocks"] == "blocks" and len(prof.rows) == 3
    assert np.isfinite(prof.layers["rho"]).all()


def test_torch_layers_without_children_are_not_blocks():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(CaptureError, match="no residual blocks"):
        find_blocks(net)


def test_shape_check_prefers_blocks_that_keep_the_stream_shape():
    torch.manual_seed(0)
    net = RawLM(readouts=4)  # the longer list, same depth, listed first: it wins without the check
    assert find_blocks(net)[0] == "readouts"
    probe = make_probe(net, 1, seed=0)
    assert find_blocks(net, probe=probe)[0] == "blocks"
    assert discover_blocks(net)[0] == "blocks"
    prof = profile(net, n_samples=256, rank=None)
    assert prof.meta["blocks"] == "blocks" and len(prof.rows) == 3


def test_no_shape_preserving_candidate_is_a_clear_error():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(20, 8)
            self.a = nn.ModuleList([Widen(8) for _ in range(2)])
            self.b = nn.ModuleList([Widen(16) for _ in range(2)])

        def forward(self, idx):
            h = self.wte(idx)
            return self.b[0](self.a[0](h)), self.b[1](self.a[1](h))

    net = Wide()
    with pytest.raises(CaptureError, match="same shape"):
        find_blocks(net, probe=make_probe(net, 1))


def test_composite_blocks_win_over_a_list_of_norms_of_the_same_length():
    class MyNorm(nn.Module):  # hand-written, parameter only, shape-preserving
        def __init__(self, d):
            super().__init__()
            self.g = nn.Parameter(torch.ones(d))

        def forward(self, h):
            return self.g * h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc = nn.Linear(d, d)

        def forward(self, h):
            return h + self.fc(h)

    class Net(nn.Module):
        def __init__(self, d=8, L=3):
            super().__init__()
            self.wte = nn.Embedding(20, d)
            self.norms = nn.ModuleList([MyNorm(d) for _ in range(L)])
            self.blocks = nn.ModuleList([Block(d) for _ in range(L)])

        def forward(self, idx):
            h = self.wte(idx)
            for n, b in zip(self.norms, self.blocks):
                h = b(n(h))
            return h

    net = Net()
    assert find_blocks(net)[0] == "blocks"
    assert find_blocks(net, probe=make_probe(net, 1))[0] == "blocks"


def _hooked_states(net, probe, seed, n_samples):
    """Per block (X, Y) of shape (d, N), from a plain forward pass of ``probe`` alone with hooks that
    keep every state, then the token states ``collect_snapshots`` draws for ``seed``."""
    _, blocks = find_blocks(net)
    seen = {}

    def keep(i):
        def hook(module, args, output):
            seen.setdefault(i, (args[0], output))
        return hook

    hooks = [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            net.eval()
            net(probe)
    finally:
        for h in hooks:
            h.remove()
    chosen = np.sort(np.random.default_rng(seed).choice(probe.shape[0] * probe.shape[1], size=n_samples, replace=False))
    out = []
    for i in range(len(blocks)):
        x, y = seen[i]
        out.append((x.reshape(-1, x.shape[-1])[chosen].T.double().numpy(),
                    y.reshape(-1, y.shape[-1])[chosen].T.double().numpy()))
    return out


def test_one_pass_for_several_seeds_keeps_each_seeds_own_snapshots():
    torch.manual_seed(1)
    net = RawLM(d=12, L=2)
    seeds, n = [3, 4, 5], 100
    probes = [make_probe(net, n, seed=s, seq_len=16) for s in seeds]
    snaps = collect_snapshots_seeds(net, probes, seeds, n_samples=n, batch_size=4)  # micro-batches span seeds
    for s, probe, got in zip(seeds, probes, snaps):
        for (X, Y), gx, gy in zip(_hooked_states(net, probe, s, n), got.X, got.Y):
            np.testing.assert_array_equal(gx, X)
            np.testing.assert_array_equal(gy, Y)


def test_profile_seeds_gives_each_seeds_profile():
    torch.manual_seed(2)
    net = RawLM(d=12, L=2)
    seeds, n = [0, 1], 128
    profs = profile_seeds(net, seeds=seeds, n_samples=n, rank=8, workers=2)
    for s, prof in zip(seeds, profs):
        assert prof.meta["seed"] == s
        probe = make_probe(net, n, seed=s)
        for row, (X, Y) in zip(prof.rows, _hooked_states(net, probe, s, n)):
            want = layer_stats(X, Y, rank=8, seed=s)
            for key in ("m_near", "rho", "kappa_v", "kreiss", "eta_nl", "update_ratio"):
                assert row[key] == want[key], key


def test_one_pass_and_the_shape_check_leave_the_callers_torch_rng_as_they_found_it():
    nets = [RawLM(d=8, L=2), RawLM(d=8, L=2, readouts=2)]  # built before the state is taken
    torch.manual_seed(7)
    state = torch.get_rng_state()
    profile_seeds(nets[0], seeds=[0, 1], n_samples=64, rank=4)
    profile(nets[1], n_samples=64, rank=4)  # with the shape check's forward pass
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ residual_stages
class _Mixer(torch.nn.Module):
    def __init__(self, d, hidden=None):
        super().__init__()
        self.a = torch.nn.Linear(d, hidden or d)
        self.b = torch.nn.Linear(hidden or d, d)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class _Block(torch.nn.Module):
    """x + f(ln1 x) + g(ln2 ·): serial when ``parallel`` is False, both on x when True."""

    def __init__(self, d, parallel, flat_mlp=False):
        super().__init__()
        self.parallel, self.flat = parallel, flat_mlp
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = _Mixer(d)
        if flat_mlp:  # OPT's layout: the MLP's two matrices are direct children of the block
            self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        else:
            self.mlp = _Mixer(d, 4 * d)

    def _mlp(self, h):
        return self.fc2(torch.relu(self.fc1(h))) if self.flat else self.mlp(h)

    def forward(self, x):
        a = self.attn(self.ln1(x))
        if self.parallel:
            return x + a + self._mlp(self.ln2(x))
        x = x + a
        return x + self._mlp(self.ln2(x))


@pytest.mark.parametrize("parallel,flat,expected", [(False, False, 2.0), (True, False, 1.0),
                                                     (False, True, 2.0), (True, True, 1.0)])
def test_residual_stages_of_built_blocks(parallel, flat, expected):
    from featurize.capture import residual_stages

    torch.manual_seed(0)
    block = _Block(16, parallel, flat).eval()
    x = torch.randn(2, 5, 16)
    assert residual_stages(block, (x,), {}) == expected
    assert all(h is None or not h for h in (block._forward_hooks, block._forward_pre_hooks))


@pytest.mark.parametrize("parallel", [True, False])
def test_residual_stages_follow_the_hf_config_flag(parallel):
    """GPT-NeoX's ``use_parallel_residual`` decides the layout: the measurement must follow it."""
    transformers = pytest.importorskip("transformers")
    from risk_model.init_features import init_features

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, use_parallel_residual=parallel)
    model = transformers.GPTNeoXForCausalLM(cfg)
    assert init_features(model, seed=0)["residual_stages"] == (1.0 if parallel else 2.0)
