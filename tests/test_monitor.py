"""RiskMonitor: check() is what `risk predict` says, step() records one row per `every` steps with
the profile's own numbers, leaves the training state alone, and never raises for a failed check."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from featurize import CaptureError, make_probe, profile
from risk_model.cli import app
from risk_model.monitor import HISTORY_COLUMNS, RiskMonitor, optimizer_name
from risk_model.zoo import build_model, save_checkpoint


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(dict(norm="pre_ln", d_model=32, n_layers=2, n_heads=2, block_size=32))


class Flat(nn.Module):
    """No residual-block container to discover."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 16)

    def forward(self, x):
        return self.out(self.emb(x))


def test_check_is_what_risk_predict_says(tmp_path):
    model = tiny_model()
    path = save_checkpoint(model, tmp_path / "tiny.pt")
    res = CliRunner().invoke(app, ["predict", str(path), "--lr", "3e-3", "--warmup", "10", "--threshold", "0.5",
                                   "--optimizer", "sgd", "--json"])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.stdout)

    mon = RiskMonitor(model, lr=3e-3, optimizer=torch.optim.SGD(model.parameters(), lr=3e-3), warmup=10)
    got = mon.check()
    for key in ("predictions", "max_safe_lr", "warnings", "recommendation", "predictor"):
        assert got[key] == cli[key], key
    assert mon.assessment_ is got and mon.assumptions_ == []
    assert [p["lr"] for p in got["predictions"]] == [3e-3]


def test_check_without_lr_answers_the_largest_safe_lr_and_says_so():
    mon = RiskMonitor(tiny_model())
    res = mon.check()
    # the shipped predictor has a critical-LR model: no LR asked, the answer is max_safe_lr
    assert res["predictions"] == [] and res["max_safe_lr"] > 0
    lo, hi = res["max_safe_lr_interval"]
    assert lo < res["max_safe_lr"] < hi
    assert any("no learning rate given" in a for a in mon.assumptions_)
    assert "largest safe learning rate" in mon.explain()


def test_step_records_one_row_per_every_steps_with_the_profiles_numbers():
    model = tiny_model()
    mon = RiskMonitor(model, lr=1e-3, every=3, n_samples=128, seed=5)
    rows = [mon.step(s) for s in range(1, 8)]
    assert [r is not None for r in rows] == [False, False, True, False, False, True, False]
    hist = mon.history
    assert list(hist.columns) == HISTORY_COLUMNS
    assert hist["step"].tolist() == [3, 6]
    assert hist["lr"].tolist() == [1e-3, 1e-3]
    assert (hist["error"] == "").all() and hist["p_divergence"].between(0, 1).all()
    # a diverged run has failed: P(failed) ≥ P(diverged) at every monitored step
    assert (hist["p_failed"] >= hist["p_divergence"]).all() and hist["p_failed"].le(1).all()
    # independent recomputation with the featurizer: same probe, same settings
    probe = make_probe(model, 128, seed=5)
    aggs = profile(model, probe, n_samples=128, seed=5, rank=32).aggregates
    for col in ("m_near_mean", "rho_max", "kreiss_max", "update_ratio_mean"):
        assert hist[col].iloc[0] == pytest.approx(aggs[col], rel=1e-6), col
    assert hist["n_layers"].tolist() == [2, 2]
    assert mon.metrics(rows[2]) == {f"risk/{c}": pytest.approx(rows[2][c]) for c in
                                    ("p_failed", "p_divergence", "max_safe_lr", "m_near_mean", "rho_max", "kreiss_max",
                                     "update_ratio_mean")}


def test_step_follows_the_weights():
    model = tiny_model()
    mon = RiskMonitor(model, lr=1e-3, every=1, n_samples=128)
    mon.step(1)
    with torch.no_grad():
        for blk in model.blocks:
            for p in blk.parameters():
                p.mul_(3.0)
    mon.step(2)
    ur = mon.history["update_ratio_mean"]
    assert ur.iloc[1] > 2 * ur.iloc[0]


def test_step_leaves_rng_mode_and_gradients_alone():
    model = tiny_model().train()
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    mon = RiskMonitor(model, lr=1e-3, every=1, n_samples=64)
    mon.step(1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_step_reads_the_current_lr_from_the_optimizer():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = RiskMonitor(model, lr=1e-2, optimizer=opt, every=1, n_samples=64)
    opt.param_groups[0]["lr"] = 5e-4
    assert mon.step(1)["lr"] == 5e-4
    assert mon.step(2, lr=0.0)["lr"] == 0.0
    hist = mon.history
    assert math.isnan(hist["p_divergence"].iloc[1])  # a zero LR (start of warmup): nothing to predict
    assert not math.isnan(hist["m_near_mean"].iloc[1])


def test_failed_checks_are_recorded_and_logged_once_never_raised(caplog):
    mon = RiskMonitor(Flat(), lr=1e-3, every=1, n_samples=32)
    with pytest.raises(CaptureError):
        mon.check()  # the plain API says so
    with caplog.at_level(logging.WARNING, logger="risk_model.monitor"):
        rows = [mon.step(s) for s in (1, 2, 3)]
    assert all(r["error"].startswith("CaptureError") for r in rows)
    assert len([r for r in caplog.records if r.name == "risk_model.monitor"]) == 1
    assert mon.history["step"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("kw, match", [(dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
                                       (dict(threshold=1.0), "threshold"), (dict(every=0), "every"),
                                       (dict(every=2.5), "every"), (dict(n_samples=1), "n_samples")])
def test_bad_arguments_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        RiskMonitor(Flat(), **kw)


@pytest.mark.parametrize("given, name", [("adamw", "adamw"), ("AdamW", "adamw"), ("adamw_torch_fused", "adamw"),
                                         ("adam", "adamw"), ("sgd", "sgd"), ("lion_32bit", "lion"),
                                         ("paged_lion_8bit", "lion"), ("adafactor", None), (None, None)])
def test_optimizer_names(given, name):
    assert optimizer_name(given) == name


def test_unknown_optimizer_is_assumed_adamw_and_said():
    mon = RiskMonitor(Flat(), lr=1e-3, optimizer="adafactor")
    assert mon.assumptions_ == ["optimizer 'adafactor' not known to the predictor; assumed adamw"]
    assert optimizer_name(torch.optim.Adam(Flat().parameters())) == "adamw"
