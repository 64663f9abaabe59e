"""`risk predict` with predictor v2 (the critical-LR model): max_safe_lr with its interval, the
P(divergence) curve, the dead-at-init answer, and the JSON contract."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from risk_model.cli import app
from risk_model.serve import LOSS_LIMIT, dead_at_init, load_bundle
from risk_model.threshold import FEATURE_GROUPS, CriticalLRModel

REPO = Path(__file__).resolve().parent.parent
RUNGS = np.array([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0])


@pytest.fixture(scope="module")
def bundle_v2(tmp_path_factory):
    """The shipped bundle plus a small critical-LR model on config features (synthetic networks
    whose critical LR falls with the measured weight scale)."""
    rng = np.random.default_rng(0)
    n = 200
    X = pd.DataFrame({c: rng.normal(size=n) for c in FEATURE_GROUPS["config"]})
    X["opt_adamw"] = 1.0
    X["log10_rms_w_hidden"] = rng.uniform(-3, 0, n)
    z = -2.0 * X["log10_rms_w_hidden"].to_numpy() - 6 + rng.logistic(0, 0.3, n)
    crit = np.exp(z)
    lo = np.array([RUNGS[RUNGS < c].max() if (RUNGS < c).any() else 0.0 for c in crit])
    hi = np.array([RUNGS[RUNGS >= c].min() if (RUNGS >= c).any() else np.inf for c in crit])
    runs = pd.DataFrame([(i, lr, lr >= c) for i, c in enumerate(crit) for lr in RUNGS], columns=["i", "lr", "d"])
    m = CriticalLRModel(groups=("config",), n_estimators=100).fit(
        X, lo, hi, runs_model_index=runs["i"], runs_lr=runs["lr"], runs_diverged=runs["d"])
    m.metadata_ = {"version": "test-v2", "optimizers": ["adamw", "lion", "sgd"],
                   "metrics": {"auroc": 0.9, "ece": 0.03, "max_safe_lr_right": 0.8},
                   "profile_settings": {"n_samples": 256, "rank": 16, "seed": 0, "kreiss_grid": "21x8"},
                   "config_defaults": {"warmup": 0, "batch_size": 16, "steps": 300, "d_model": 64}}
    b = load_bundle(REPO / "models" / "default")
    b.critical_lr = m
    out = tmp_path_factory.mktemp("b") / "bundle"
    b.save(out)
    return out


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


def test_bundle_round_trip_keeps_the_critical_lr_model(bundle_v2):
    b = load_bundle(bundle_v2)
    assert b.critical_lr is not None and b.critical_lr.metadata_["version"] == "test-v2"
    assert b.config_aware is not None and b.config_free is not None


def test_predict_with_lr_gives_monotone_curve_and_consistent_max_safe_lr(bundle_v2):
    res = run("predict", "example", "--predictor", bundle_v2, "--lr", "1e-4", "--lr", "3.0", "--json",
              "--probe-seeds", "1")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("predictions", "max_safe_lr", "profile", "predictor", "warnings", "max_safe_lr_interval",
                "dead_at_init", "p_curve"):
        assert key in out
    assert out["dead_at_init"] is None and out["predictor"]["method"] == "critical_lr"
    ps = [c["p"] for c in out["p_curve"]]
    assert all(b >= a for a, b in zip(ps, ps[1:])) and ps[-1] > ps[0]          # monotone in the LR
    lo, hi = out["max_safe_lr_interval"]
    assert lo < out["max_safe_lr"] < hi
    # P at max_safe_lr is the threshold: interpolate the curve there (independent of the formula)
    lrs = np.array([c["lr"] for c in out["p_curve"]])
    p_at = np.interp(np.log(out["max_safe_lr"]), np.log(lrs), ps)
    assert p_at == pytest.approx(0.2, abs=0.05)
    p = {d["lr"]: d["p_divergence"] for d in out["predictions"]}
    assert p[1e-4] <= p[3.0]


def test_predict_without_lr_answers_max_safe_lr_and_shows_the_paper_score_as_reference(bundle_v2, tmp_path):
    res = run("predict", "example", "--predictor", bundle_v2, "--probe-seeds", "1", "--plot", tmp_path / "e.png")
    assert res.exit_code == 0, res.output
    assert "largest safe learning rate" in res.stdout and "80% interval" in res.stdout
    assert "paper's config-free score" in res.stdout
    assert (tmp_path / "e.png").stat().st_size > 0 and (tmp_path / "e-risk.png").stat().st_size > 0
    out = json.loads(run("predict", "example", "--predictor", bundle_v2, "--probe-seeds", "1", "--json").stdout)
    assert out["predictions"] == [] and out["max_safe_lr"] > 0
    assert out["paper_score"]["heldout_auroc"] is not None


def test_a_network_dead_at_init_gets_p_one_and_the_reason(bundle_v2, tmp_path):
    from risk_model.zoo import build_model, save_checkpoint

    torch.manual_seed(0)
    net = build_model(dict(family="gpt", norm="none", d_model=32, n_layers=2, n_heads=2, block_size=32,
                           init_std=3.0))
    ck = save_checkpoint(net, tmp_path / "dead.pt")
    res = run("predict", ck, "--predictor", bundle_v2, "--lr", "1e-5", "--json", "--probe-seeds", "1")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["dead_at_init"] is not None and out["max_safe_lr"] is None
    assert [p["p_divergence"] for p in out["predictions"]] == [1.0]
    # independent check: the real loss of the network on random tokens is over the limit
    ids = torch.randint(0, 256, (8, 33))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(net(ids[:, :-1]).reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert float(loss) > LOSS_LIMIT or not math.isfinite(float(loss))


def test_dead_at_init_rule():
    assert dead_at_init({"init_loss": 5.5, "grad_norm": 3.0}) is None
    assert "loss" in dead_at_init({"init_loss": 60.0, "grad_norm": 3.0})["reason"]
    assert "gradient" in dead_at_init({"init_loss": 5.0, "grad_norm": 600.0})["reason"]
    assert "non-finite" in dead_at_init({"init_loss": float("inf"), "grad_norm": 1.0})["reason"]
    assert dead_at_init({"init_loss": float("nan"), "grad_norm": float("nan")}) is None   # nothing measured
