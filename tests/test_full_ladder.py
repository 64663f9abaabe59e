"""Corpus-v3: recipe fields, the text task, horizon rows, the full-ladder walk, resume, new classes."""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from risk_model.sweep.full_ladder import full_walk, parse_full_ladder_spec
from risk_model.sweep.runner import load_any_spec, load_corpus, run_sweep
from risk_model.sweep.spec import RunConfig, SweepSpecError, make_config, run_id
from risk_model.sweep.tasks import TEXT_SHA256, make_task
from risk_model.sweep.trainer import horizon_rows, lr_at, make_run_task, run_labels, train, v3_labels
from sweep_proc import kill_after_parts, start_sweep

REPO = Path(__file__).resolve().parent.parent
RUNGS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]


def test_v2_run_ids_stay_with_the_new_recipe_fields():
    runs = pd.read_parquet(REPO / "datasets/corpus-v2/runs.parquet").head(5)
    fields = set(RunConfig.__dataclass_fields__)
    for _, r in runs.iterrows():
        cfg = RunConfig(**{k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in fields if k in r.index})
        assert run_id(cfg) == r["run_id"]
        assert run_id(replace(cfg, horizons="100")) == r["run_id"]       # never in the id
        assert run_id(replace(cfg, beta2=0.999)) != r["run_id"]          # in the id off its default


def test_cosine_schedule_by_hand():
    cfg = RunConfig(lr=1.0, warmup=10, steps=110, schedule="cosine")
    assert lr_at(cfg, 5) == pytest.approx(0.5)                            # linear warmup
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5)               # halfway: cos = 0
    assert lr_at(cfg, 110) == pytest.approx(0.1)                          # 10% at the last step
    assert lr_at(replace(cfg, schedule="constant"), 110) == 1.0


def test_horizons_need_a_constant_schedule_and_fit_the_steps():
    with pytest.raises(SweepSpecError, match="horizons"):
        make_config(steps=100, horizons="300")
    with pytest.raises(SweepSpecError, match="horizons"):
        make_config(steps=1000, horizons="300", schedule="cosine")
    assert make_config(steps=1000, horizons=[300, 100]).horizons == "300,100"


def test_text_task_is_the_pydoc_text_with_its_unigram_entropy():
    from pydoc_data.topics import topics

    raw = "\n".join(topics[k] for k in sorted(topics)).encode()
    assert hashlib.sha256(raw).hexdigest() == TEXT_SHA256
    train = raw[: int(0.9 * len(raw))]
    c = Counter(train)
    h = -sum(n / len(train) * math.log(n / len(train)) for n in c.values())
    t = make_task("text_bytes", seed=3, seq_len=16, vocab_size=256, batch_size=4)
    assert t.marginal_loss == pytest.approx(h, rel=1e-12)
    x, y = t.batch()
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    # a training window is a substring of the training split; a held-out one of the rest
    assert bytes(x[0].tolist()) in train
    hx, _ = t.eval_set(2)[1]
    assert bytes(hx[0].tolist()) in raw[int(0.9 * len(raw)):]


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    cfg = make_config(d_model=16, n_layers=2, n_heads=2, seq_len=12, vocab_size=32, batch_size=8, steps=1,
                      profile_samples=48)
    from risk_model.sweep.archs import build_network

    norms = []
    for acc in (1, 4):
        torch.manual_seed(0)
        c = replace(cfg, accum=acc)
        res = train(build_network(c.model_args()), c, make_run_task(c))
        norms.append((res.grad_norms[0], res.losses[0]))
    assert norms[0][0] == pytest.approx(norms[1][0], rel=1e-5)   # the mean of the chunk means is the mean
    assert norms[0][1] == pytest.approx(norms[1][1], rel=1e-6)


@pytest.mark.parametrize("lr", [3e-3, 30.0])
def test_horizon_row_equals_a_separate_shorter_run(lr):
    """The 20-step row read from a 60-step constant-LR run is the row of a separate 20-step run."""
    from risk_model.sweep.archs import build_network

    cfg = make_config(task="text_bytes", d_model=16, n_layers=2, n_heads=2, seq_len=16, batch_size=8,
                      steps=60, horizons="20", eval_batches=2, lr=lr, warmup=5, norm="none", init_std=0.1)
    torch.manual_seed(cfg.seed)
    long = train(build_network(cfg.model_args()), cfg, make_run_task(cfg))
    rows = horizon_rows(long, cfg, make_run_task(cfg))
    assert [c.steps for c, _ in rows] == [20, 60]
    c20, lab20 = rows[0]
    short_cfg = replace(cfg, steps=20, horizons="")
    assert c20 == short_cfg and run_id(c20) == run_id(short_cfg)
    torch.manual_seed(cfg.seed)
    short = train(build_network(short_cfg.model_args()), short_cfg, make_run_task(short_cfg))
    truth = {**run_labels(short, make_run_task(short_cfg)), **v3_labels(short, 20)}
    for k in ("final_eval_loss", "final_train_loss", "diverged", "diverge_step", "update_rms_ratio",
              "loss_curve_10", "grad_norm_curve_10", "unstable", "final_loss", "collapsed"):
        a, b = lab20[k], truth[k]
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), k
    assert lab20["horizon_of"] == 60
    # the two cases are what they are meant to be: one learns through the horizon, one diverges by it
    assert lab20["diverged"] == (lr > 1) and len(lab20["loss_curve_10"]) == (1 if lr > 1 else 2)


def _outcomes(best_lr: float, fail_lr: float):
    """A U-shaped synthetic ladder: loss falls with log lr up to best_lr, then rises; from fail_lr
    on the run loses what it learned (loss near R = 5)."""
    R = 5.0

    def loss(lr):
        if lr >= fail_lr:
            return R - 0.1
        return 1.0 + 0.8 * abs(math.log10(lr / best_lr))

    return R, loss


@pytest.mark.parametrize("start", [0, 3, 5, 8])
def test_full_walk_goes_from_too_slow_past_best_to_first_failed(start):
    R, loss = _outcomes(best_lr=3e-3, fail_lr=0.3)
    ran = []

    def outcome(lr):
        ran.append(lr)
        return loss(lr), False, False

    from risk_model.labels import ladder_summary

    full_walk(start, RUNGS, outcome, R)
    assert len(set(ran)) == len(ran)
    lrs = sorted(ran)
    # by hand: B = 1.0 at 3e-3, a run is too slow / lost above 1 + ½(5 − 1) = 3.0
    assert 3e-3 in lrs and 0.3 in lrs
    if start <= RUNGS.index(0.3):
        assert 1.0 not in lrs                                     # up to the first failed rung, no further
    assert loss(lrs[0]) > 3.0 or lrs[0] == RUNGS[0]              # down to a clearly too slow rung
    assert all(loss(x) <= 3.0 for x in lrs[1:] if x < 3e-3)       # ... and not below it
    mid = math.sqrt(0.1 * 0.3)                                    # the extra rung brackets lr_fail
    assert mid in lrs and 0.3 / mid < 1.8
    s = ladder_summary(lrs, [loss(x) for x in lrs], [False] * len(lrs), R)
    assert s["lr_best"] == 3e-3 and s["lr_fail_min"] == 0.3 and s["lr_fail_lo"] == mid


def test_full_walk_climbs_a_model_that_never_learns_until_it_diverges():
    ran = []

    def outcome(lr):
        ran.append(lr)
        return 5.0, lr >= 1.0, False

    full_walk(2, RUNGS, outcome, 5.0)
    assert max(ran) == 1.0 and min(ran) == RUNGS[0]


TINY = """
kind = "full_ladder"
[ladder]
adamw = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 1000.0]
start = 1
max_runs = 6
horizons = [10]
[[stage]]
name = "one"
n_models = {n}
seed = {seed}
[stage.model]
family = ["gpt", "hf_qwen3"]
d_model = 16
n_layers = 2
n_heads = 2
mlp_ratio = 2
seq_len = 12
vocab_size = 32
profile_samples = 48
profile_rank = 8
norm = "none"
[stage.train]
task = "synthetic_lm"
batch_size = 8
steps = {steps}
eval_batches = 2
"""


def test_full_ladder_sweep_rows_and_labels_from_real_runs(tmp_path, capsys):
    from risk_model.labels import ladder_summary

    spec = tmp_path / "s.toml"
    spec.write_text(TINY.format(n=2, seed=0, steps=30))
    run_sweep(spec, tmp_path / "o", progress=False)
    runs, layers = load_corpus(tmp_path / "o")
    assert runs["run_id"].is_unique and set(runs["steps"]) == {10, 30}
    assert set(layers["model_id"]) == set(runs["model_id"])
    for (mid, steps), g in runs.groupby(["model_id", "steps"]):
        s = ladder_summary(list(g["lr"]), list(g["final_eval_loss"]), list(g["diverged"]),
                           g["marginal_loss"].iloc[0])
        assert list(g["failed"]) == s["failed"] and g["lr_best"].iloc[0] == s["lr_best"]
        assert g.loc[g["lr"] == 1000.0, "diverged"].all() if (g["lr"] == 1000.0).any() else True
        assert g["failed"].any()       # every ladder reaches a failed rung on these tiny nets
    # held-out loss of a learning run is below ln(V) (real training, real eval)
    assert (runs["final_eval_loss"].min() < math.log(32))
    # the datasheet: the v3 section; a plot it cannot make is one line, exit 1, no file
    from risk_model.sweep import datasheet

    assert datasheet.main([str(tmp_path / "o")]) == 0
    assert f"failed: **{int(runs['failed'].sum())}**" in capsys.readouterr().out
    assert datasheet.main([str(tmp_path / "o"), "--plot", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and not (tmp_path / "p.png").exists()
    assert datasheet.main([str(tmp_path / "nothing")]) == 1


def test_sigkill_mid_full_ladder_sweep_loses_and_duplicates_nothing(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(TINY.format(n=5, seed=3, steps=40))
    out = tmp_path / "out"
    kill_after_parts(start_sweep(spec, out), out)
    before = {p.name.split(".")[0]: pd.read_parquet(p) for p in (out / "parts").glob("*.runs.parquet")}
    assert 2 <= len(before) < 5
    summary = run_sweep(spec, out, progress=False)
    runs, _ = load_corpus(out)
    assert runs["model_id"].nunique() == 5 and runs["run_id"].is_unique
    assert summary["already_done"] == len(before)
    for mid, df in before.items():
        kept = runs[runs["model_id"] == mid].set_index("run_id").sort_index()
        assert list(kept["model_seconds"]) == list(df.set_index("run_id").sort_index()["model_seconds"])
    assert run_sweep(spec, out, progress=False)["ran"] == 0


def test_v3_spec_parses_and_puts_every_class_and_the_scale_ladders_first():
    spec = load_any_spec(REPO / "datasets/corpus-v3/spec.toml")
    units = spec.units()
    from risk_model.sweep.archs import FAMILIES

    stages = [u["stage"] for u in units]
    first_density = min(i for i, s in enumerate(stages) if s.startswith("density"))
    assert {u["config"]["family"] for u in units[:24]} == set(FAMILIES) and len(FAMILIES) >= 12
    assert any(s.startswith("scale-width") for s in stages[:first_density])
    assert all(s.startswith("density") for s in stages[first_density:])
    small = [u["config"] for u in units if u["stage"] == "density-small"]
    assert small and all(c["d_model"] ** 2 * c["n_layers"] * c["batch_size"] <= 2 ** 18 for c in small)
    widths = {u["config"]["d_model"] for u in units if u["stage"].startswith("scale-width")}
    assert widths == {64, 128, 256, 512, 1024}
    assert all(u["config"]["eval_batches"] >= 1 for u in units)


def test_full_ladder_spec_errors_name_the_key():
    base = {"kind": "full_ladder", "ladder": {"adamw": RUNGS},
            "stage": [{"n_models": 1, "train": {"eval_batches": 2}}]}
    parse_full_ladder_spec(base)
    with pytest.raises(SweepSpecError, match="eval_batches"):
        parse_full_ladder_spec({**base, "stage": [{"n_models": 1}]})
    with pytest.raises(SweepSpecError, match="horizons"):
        parse_full_ladder_spec({**base, "ladder": {**base["ladder"], "horizons": ["x"]}})
    with pytest.raises(SweepSpecError, match="bogus"):
        parse_full_ladder_spec({**base, "stage": [{"n_models": 1, "bogus": 1}]})


@pytest.mark.parametrize("family", ["hf_gptj", "hf_bloom", "hf_qwen3", "hf_gemma", "hf_phi"])
def test_new_hf_families_build_train_and_profile(family):
    import featurize

    from risk_model.sweep.archs import build_network

    cfg = make_config(family=family, norm={"hf_qwen3": "rmsnorm", "hf_gemma": "rmsnorm"}.get(family, "pre_ln"),
                      d_model=32, n_layers=2, n_heads=2, seq_len=12, vocab_size=40, batch_size=8, steps=15,
                      lr=3e-3, profile_samples=48, eval_batches=1)
    torch.manual_seed(0)
    net = build_network(cfg.model_args())
    prof = featurize.profile(net, n_samples=48, seed=0, rank=8)
    assert len(prof.layers) == 2 and np.isfinite(prof.layers["m_near"]).all()
    res = train(net, cfg, make_run_task(cfg))
    assert res.diverge_step == -1 and res.losses[-5:].mean() < res.losses[0]   # it learns
