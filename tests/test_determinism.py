"""Every profile column is a function of the network, not of how the probe ran: the same layers
profiled with 1 or 2 threads (torch's and BLAS's) and with the probe split into other micro-batches
give the same numbers to 1e-6 (the Kreiss constant once moved from 3.6 to 9.2 with float noise), and
so do the seeds profiled together on 1 or 2 worker threads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featurize.profile import layer_stats
from featurize.capture import collect_snapshots, make_probe

transformers = pytest.importorskip("transformers")

N = 256
NUMERIC = ["m_exp", "m_near", "m_mid", "m_con", "rho", "kappa_v", "kreiss", "eta_nl", "reliable_fraction",
           "m_exp_all", "m_near_all", "m_mid_all", "m_con_all", "update_ratio"]


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=128)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _gpt2():
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=200, n_positions=64)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _rows(model, seed, batch_size, threads):
    """The per-layer rows with ``threads`` torch and BLAS threads (the whitening, DMD and Schur steps
    run in numpy's BLAS: its thread count changes the operator in the last bits, ~1e-13)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            probe = make_probe(model, N, seed=seed)
            snaps = collect_snapshots(model, probe, n_samples=N, seed=seed, batch_size=batch_size)
            return [layer_stats(X, Y, rank=32, seed=seed) for X, Y in zip(snaps.X, snaps.Y)]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("build", [_llama, _gpt2])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_threads_and_micro_batches_leave_every_column_unchanged(build, seed):
    model = build()
    ref = _rows(model, seed, batch_size=16, threads=1)
    for batch_size, threads in [(16, 2), (5, 1), (3, 2)]:
        got = _rows(model, seed, batch_size=batch_size, threads=threads)
        for a, b in zip(ref, got):
            for c in NUMERIC:
                np.testing.assert_allclose(b[c], a[c], rtol=1e-6, atol=1e-9,
                                           err_msg=f"{c}, batch {batch_size}, {threads} threads")


def test_profile_seeds_on_one_or_two_workers_agree():
    from featurize import profile_seeds

    model = _llama()
    one = profile_seeds(model, seeds=[0, 1], n_samples=N, rank=32, workers=1)
    two = profile_seeds(model, seeds=[0, 1], n_samples=N, rank=32, workers=2)
    for a, b in zip(one, two):
        for ra, rb in zip(a.rows, b.rows):
            for c in NUMERIC:
                np.testing.assert_allclose(rb[c], ra[c], rtol=1e-6, atol=1e-9, err_msg=c)
