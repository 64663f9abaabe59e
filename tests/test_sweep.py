"""Sweep harness: zoo, tasks, trainer labels and spec validation (tiny models, fast)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

from risk_model.sweep.spec import SweepSpecError, config_id, make_config, parse_spec, run_id
from risk_model.sweep.tasks import make_task
from risk_model.sweep.trainer import count_spikes, train_run
from risk_model.zoo import (FAMILIES, NORMS, RMSNorm, build_model, load_checkpoint,
                                  save_checkpoint)

TINY = dict(d_model=16, n_layers=2, n_heads=2, block_size=8, vocab_size=32, mlp_ratio=2,
            n_experts=3, top_k=2, kan_grid=3)


# ------------------------------------------------------------------------------------------ zoo


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm", NORMS)
def test_zoo_shapes_and_blocks(family, norm):
    torch.manual_seed(0)
    model = build_model(dict(TINY, family=family, norm=norm))
    idx = torch.randint(0, 32, (3, 8))
    assert model(idx).shape == (3, 8, 32)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    assert model.config.block_size == 8
    x = torch.randn(3, 8, 16)
    for block in model.blocks:
        assert block(x).shape == (3, 8, 16)
    import featurize

    name, blocks = featurize.find_blocks(model)
    assert name == "blocks" and len(blocks) == 2


def _norm_modules(model):
    return [type(m) for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))]


def test_norm_switch_places_the_right_layers():
    count = {n: _norm_modules(build_model(dict(TINY, norm=n))) for n in NORMS}
    assert count["none"] == []
    assert set(count["rmsnorm"]) == {RMSNorm}
    # pre_ln: 2 per block + final; subln adds one inside each of the 2 sublayers per block
    assert len(count["pre_ln"]) == 2 * 2 + 1
    assert len(count["subln"]) == 2 * 2 + 2 * 2 + 1
    assert len(count["post_ln"]) == 2 * 2  # no final norm: the last block ends with one


@pytest.mark.parametrize("norm", ["post_ln", "deepnorm"])
def test_post_norm_blocks_output_is_normalised(norm):
    torch.manual_seed(0)
    model = build_model(dict(TINY, norm=norm))
    y = model.blocks[0](torch.randn(4, 8, 16) * 5)
    assert torch.allclose(y.mean(-1), torch.zeros(4, 8), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(4, 8), atol=1e-3)


def test_deepnorm_residual_weight_matches_depth():
    # DeepNet: x_{l+1} = LN(α x + f(x)), α = (2N)^(1/4); check by switching the branch off
    torch.manual_seed(0)
    model = build_model(dict(TINY, norm="deepnorm", n_layers=8))
    block = model.blocks[0]
    x = torch.randn(2, 8, 16)
    block.attn.forward = lambda h: torch.zeros_like(h)
    block.ffn.forward = lambda h: torch.zeros_like(h)
    alpha = 16 ** 0.25
    ln = nn.functional.layer_norm
    expect = ln(alpha * ln(alpha * x, (16,)), (16,))
    assert torch.allclose(block(x), expect, atol=1e-5)


def test_moe_top1_equals_the_chosen_expert():
    torch.manual_seed(0)
    model = build_model(dict(TINY, family="moe", top_k=1, n_experts=3))
    moe = model.blocks[0].ffn
    x = torch.randn(2, 8, 16)
    choice = (x @ moe.router.weight.T).argmax(-1)  # (2, 8)
    expect = torch.stack([torch.stack([moe.experts[int(choice[b, t])](x[b, t])
                                       for t in range(8)]) for b in range(2)])
    assert torch.allclose(moe(x), expect, atol=1e-5)


def test_init_scale_multiplies_the_init_std():
    a = build_model(dict(TINY, d_model=64, n_heads=2, init_scale=1.0))
    b = build_model(dict(TINY, d_model=64, n_heads=2, init_scale=4.0))
    ratio = b.blocks[0].attn.c_attn.weight.detach().std() / a.blocks[0].attn.c_attn.weight.detach().std()
    assert 3.6 < float(ratio) < 4.4
    assert abs(float(a.wte.weight.detach().std()) - 0.02) < 0.003


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_weights_only(tmp_path, family):
    torch.manual_seed(1)
    model = build_model(dict(TINY, family=family, norm="rmsnorm"))
    path = save_checkpoint(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)  # plain dict, safe loader
    assert set(raw) == {"model_args", "state_dict"}
    assert raw["model_args"]["family"] == family and raw["model_args"]["norm"] == "rmsnorm"
    loaded = load_checkpoint(path)
    idx = torch.randint(0, 32, (2, 8))
    assert torch.equal(model(idx), loaded(idx))


def test_build_model_rejects_unknown_args():
    with pytest.raises(ValueError, match="wdith"):
        build_model({"wdith": 3})
    with pytest.raises(ValueError, match="norm"):
        build_model({"norm": "batchnorm"})


# ---------------------------------------------------------------------------------------- tasks


def test_associative_recall_target_is_the_paired_value():
    task = make_task("assoc_recall", seed=3, seq_len=16, vocab_size=64, n_train=200)
    x, y = task.inputs.numpy(), task.targets.numpy()
    assert x.shape == (200, 16) and y.shape == (200,)
    for row, target in zip(x, y):
        keys, values = row[0:8:2], row[1:8:2]
        assert len(set(keys)) == 4
        assert row[-1] in keys
        assert target == values[list(keys).index(row[-1])]
    assert task.marginal_loss == pytest.approx(math.log(32))


def test_synthetic_lm_tokens_and_determinism():
    a = make_task("synthetic_lm", seed=5, seq_len=24, vocab_size=64, n_train=50)
    b = make_task("synthetic_lm", seed=5, seq_len=24, vocab_size=64, n_train=50)
    c = make_task("synthetic_lm", seed=6, seq_len=24, vocab_size=64, n_train=50)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)
    assert int(a.inputs.min()) >= 4 and int(a.inputs.max()) < 64
    assert torch.equal(a.inputs[:, 1:], a.targets[:, :-1])  # targets are the inputs shifted
    # sequential segments (runs of +1) must occur: count consecutive increments
    inc = (a.inputs[:, 1:] - a.inputs[:, :-1] == 1).float().mean()
    assert inc > 0.15


# -------------------------------------------------------------------------------------- trainer

RUN = dict(d_model=16, n_layers=2, n_heads=2, mlp_ratio=2, seq_len=12, vocab_size=32,
           batch_size=8, steps=20, profile_samples=48, profile_rank=8)


def _replay(cfg):
    """Independent re-implementation of the training loop: per-step task loss and grad norm."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_args())
    task = make_task(cfg.task, seed=cfg.seed, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size,
                     batch_size=cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses, norms = [], []
    for step in range(1, cfg.steps + 1):
        x, y = task.batch()
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        losses.append(float(loss.detach()))
        norms.append(float(g.norm()))
        if not (math.isfinite(losses[-1]) and math.isfinite(norms[-1])) \
                or losses[-1] > 50 or norms[-1] > 500:
            break
        opt.step()
    return losses, norms


def test_divergence_label_fires_at_huge_lr():
    cfg = make_config(**RUN, norm="none", init_scale=4.0, lr=3.0)
    row, layers = train_run(cfg)
    assert row["diverged"] and row["diverge_step"] >= 1
    losses, norms = _replay(cfg)
    s = row["diverge_step"]
    assert len(losses) == s  # the replay crosses a threshold at the same step, not before
    lv, gn = losses[s - 1], norms[s - 1]
    assert (not math.isfinite(lv)) or (not math.isfinite(gn)) or lv > 50 or gn > 500
    assert all(l <= 50 and g <= 500 for l, g in zip(losses[:s - 1], norms[:s - 1]))
    expect = "nonfinite" if not (math.isfinite(lv) and math.isfinite(gn)) else \
        ("loss" if lv > 50 else "grad_norm")
    assert row["diverge_reason"] == expect
    assert row["grad_norm_step1"] == pytest.approx(norms[0], rel=1e-4)
    assert not row["collapsed"]
    assert list(layers["layer"]) == [0, 1]  # the init profile was taken


def test_no_divergence_at_tiny_lr_and_collapse_label():
    cfg = make_config(**RUN, norm="pre_ln", lr=1e-6)
    row, _ = train_run(cfg)
    losses, norms = _replay(cfg)
    assert not row["diverged"] and row["diverge_step"] == -1 and row["diverge_reason"] == ""
    assert max(losses) < 50 and max(norms) < 500 and len(losses) == 20
    # 1e-6 for 20 steps leaves the model at chance: loss ≈ ln V, well above 0.95 ln(V - 4)
    assert np.mean(losses[-10:]) > 0.95 * math.log(28)
    assert row["collapsed"]
    assert row["final_loss"] == pytest.approx(np.mean(losses[-10:]), rel=1e-4)
    assert row["grad_norm_step1"] == pytest.approx(norms[0], rel=1e-4)
    assert row["grad_norm_var_1_100"] == pytest.approx(np.var(norms), rel=1e-3)
    assert math.isnan(row["grad_norm_step100"])  # the run had only 20 steps
    assert len(row["loss_curve"]) == 20


def test_kss_penalty_changes_the_gradient_not_the_recorded_loss():
    pytest.importorskip("featurize.shaping")
    plain, _ = train_run(make_config(**dict(RUN, steps=3), norm="none", lr=1e-3))
    shaped, _ = train_run(make_config(**dict(RUN, steps=3), norm="none", lr=1e-3,
                                      kss_alpha=5.0, kss_every=1))
    # step 1: same model, same batch, so the task loss agrees; the penalty adds gradient
    assert shaped["loss_curve"][0] == pytest.approx(plain["loss_curve"][0], rel=1e-6)
    assert shaped["grad_norm_step1"] != pytest.approx(plain["grad_norm_step1"], rel=1e-4)
    assert shaped["kss_alpha"] == 5.0 and shaped["run_id"] != plain["run_id"]


def test_count_spikes_hand_made():
    base = [2.0] * 10
    assert count_spikes(np.array(base)) == 0
    assert count_spikes(np.array(base + [3.1] + base)) == 1     # 3.1 > 1.5 × 2
    assert count_spikes(np.array(base + [2.9] + base)) == 0     # 2.9 < 3.0
    assert count_spikes(np.array([2.0, 9.0, 9.0] + base)) == 0  # fewer than 5 previous losses
    assert count_spikes(np.array(base + [np.nan])) == 1
    assert count_spikes(np.array(base * 60 + [5.0]), upto=500) == 0  # step 601 is past 500


# ----------------------------------------------------------------------------------------- spec


def test_run_id_is_sha1_of_canonical_json():
    cfg = make_config(lr=1e-3, seed=4)
    # the init fields added with corpus-v2 are left out while at their defaults (v1 ids unchanged)
    # so are corpus-v3's recipe fields, and horizons always
    v3 = ("beta2", "eps", "momentum", "schedule", "accum", "eval_batches", "horizons")
    d = {k: v for k, v in asdict(cfg).items() if k not in ("init_std", "embed_std", "out_std") + v3}
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert run_id(cfg) == hashlib.sha1(text.encode()).hexdigest()[:16]
    wide = make_config(lr=1e-3, seed=4, init_std=0.1)
    d = {k: v for k, v in asdict(wide).items() if k not in ("embed_std", "out_std") + v3}
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert run_id(wide) == hashlib.sha1(text.encode()).hexdigest()[:16]
    assert run_id(make_config(lr=1e-3, seed=4)) == run_id(cfg)
    assert run_id(make_config(lr=1e-3, seed=5)) != run_id(cfg)
    assert config_id(make_config(lr=1e-3, seed=5)) == config_id(cfg)
    assert run_id(make_config(lr=1)) == run_id(make_config(lr=1.0))  # types are canonical


@pytest.mark.parametrize("grid, key", [
    ({"norm": ["pre_ln", "batchnorm"]}, "norm"),
    ({"lr": [1e-3, 0.0]}, "lr"),
    ({"lr": [-1e-3]}, "lr"),
    ({"learning_rate": [1e-3]}, "learning_rate"),
    ({"family": ["gpt", "mamba2"]}, "family"),
    ({"d_model": [48], "n_heads": [5]}, "n_heads"),
    ({"steps": [10.5]}, "steps"),
])
def test_invalid_spec_names_the_key(grid, key):
    with pytest.raises(SweepSpecError) as err:
        parse_spec({"n_runs": 4, "grid": grid})
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_spec_top_level_errors():
    with pytest.raises(SweepSpecError, match="samplr"):
        parse_spec({"n_runs": 4, "samplr": "lhs", "grid": {"lr": [1e-3]}})
    with pytest.raises(SweepSpecError, match="sampler"):
        parse_spec({"n_runs": 4, "sampler": "sobol", "grid": {"lr": [1e-3]}})
    with pytest.raises(SweepSpecError, match="n_runs"):
        parse_spec({"grid": {"lr": [1e-3]}})


def test_lhs_covers_every_value_evenly_and_is_reproducible():
    data = {"n_runs": 12, "sampler": "lhs", "seed": 3,
            "grid": {"lr": [1e-4, 1e-3, 1e-2], "norm": ["pre_ln", "none"], "steps": 5}}
    cfgs = parse_spec(data).configs()
    assert len(cfgs) == 12 and len({run_id(c) for c in cfgs}) == 12
    lrs = [c.lr for c in cfgs]
    assert sorted(lrs.count(v) for v in (1e-4, 1e-3, 1e-2)) == [4, 4, 4]
    assert sorted([c.norm for c in cfgs].count(v) for v in ("pre_ln", "none")) == [6, 6]
    assert all(c.steps == 5 for c in cfgs)
    assert [run_id(c) for c in parse_spec(data).configs()] == [run_id(c) for c in cfgs]
    grid = parse_spec({"sampler": "grid", "grid": {"lr": [1e-4, 1e-3], "norm": ["none", "subln"]}})
    assert {(c.lr, c.norm) for c in grid.configs()} == {
        (1e-4, "none"), (1e-4, "subln"), (1e-3, "none"), (1e-3, "subln")}


def test_seeds_per_config_groups_by_config_id():
    cfgs = parse_spec({"n_runs": 6, "seeds_per_config": 3, "grid": {"lr": [1e-4, 1e-3]}}).configs()
    by_cfg = {}
    for c in cfgs:
        by_cfg.setdefault(config_id(c), set()).add(c.seed)
    assert len(cfgs) == 6 and len(by_cfg) == 2 and all(len(s) == 3 for s in by_cfg.values())
