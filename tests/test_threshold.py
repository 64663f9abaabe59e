"""Predictor v2 pieces: init-time scale features, the critical-LR threshold model, held-out metrics."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from risk_model.evaluate import ece
from risk_model.init_features import init_features, param_group
from risk_model.threshold import CriticalLRModel


class Scale(nn.Module):
    """x + a·W x with W = I: the update is exactly a·x."""

    def __init__(self, d, a):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(d) * a)

    def forward(self, x):
        return x + self.lin(x)


class ToyLM(nn.Module):
    def __init__(self, V=11, d=6, a=(0.5, 0.25, 2.0)):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(Scale(d, x) for x in a)
        self.head = nn.Linear(d, V, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_forward_features_match_the_analytic_network():
    torch.manual_seed(0)
    net = ToyLM()
    state = torch.get_rng_state()
    f = init_features(net, blocks=list(net.blocks), batch=4, seq_len=5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)                 # caller's RNG untouched
    assert f["update_ratio_early"] == pytest.approx(0.5) and f["update_ratio_mid"] == pytest.approx(0.25)
    assert f["update_ratio_late"] == pytest.approx(2.0) and f["update_ratio_max"] == pytest.approx(2.0)
    assert f["log10_stream_growth"] == pytest.approx(math.log10(1.5 * 1.25 * 3.0))
    # a zero head: every logit is 0, the loss is ln V exactly, the logit std is 0 (log: NaN)
    assert f["init_loss_excess"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(f["log10_logit_std"])
    # gradient: only the head gets one (zero head blocks the rest); checked by hand
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(3))
    net.zero_grad()
    logits = net(ids[:, :-1])
    nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1)).backward()
    g = net.head.weight.grad.norm().item()
    assert f["log10_grad_norm"] == pytest.approx(math.log10(g), rel=1e-6)
    assert f["log10_grad_hidden"] == pytest.approx(math.log10(g), rel=1e-6)
    w = net.emb.weight.detach()
    assert f["log10_rms_w_embed"] == pytest.approx(math.log10(w.double().pow(2).mean().sqrt().item()), abs=1e-9)


def test_gradients_and_mode_are_restored():
    net = ToyLM()
    net.train()
    net.head.weight.grad = torch.ones_like(net.head.weight)
    init_features(net, blocks=list(net.blocks), batch=2, seq_len=4)
    assert net.training and torch.equal(net.head.weight.grad, torch.ones_like(net.head.weight))
    assert net.emb.weight.grad is None


def test_network_without_embedding_gets_nan_not_a_crash():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    f = init_features(net, blocks=[])
    assert math.isnan(f["update_ratio_mean"]) and math.isnan(f["log10_grad_norm"])
    assert math.isfinite(f["log10_rms_w_hidden"])


def test_param_groups_by_role():
    assert param_group("transformer.h.0.attn.c_proj.weight", torch.zeros(2, 2), set()) == "out"
    assert param_group("model.layers.1.mlp.down_proj.weight", torch.zeros(2, 2), set()) == "out"
    assert param_group("model.layers.1.mlp.up_proj.weight", torch.zeros(2, 2), set()) == "hidden"
    assert param_group("ln_f.weight", torch.zeros(2), set()) == "gain"


# ----------------------------------------------------------------------------------- threshold

RUNGS = np.array([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0])


def synthetic(n, seed):
    """Networks with a known critical LR: ln lr* = 1.5·x1 − 4 + logistic noise (scale 0.3); x2 is
    noise. Each network runs the whole ladder; the label is lr > lr*."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"opt_adamw": 1.0, "log2_d_model": rng.uniform(-2, 2, n),
                      "n_layers": rng.uniform(-2, 2, n)})
    z = 1.5 * X["log2_d_model"].to_numpy() - 4 + rng.logistic(0, 0.3, n)
    crit = np.exp(z)
    lo = np.array([RUNGS[RUNGS < c].max() if (RUNGS < c).any() else 0.0 for c in crit])
    hi = np.array([RUNGS[RUNGS >= c].min() if (RUNGS >= c).any() else np.inf for c in crit])
    runs = pd.DataFrame([(i, lr, lr >= c) for i, c in enumerate(crit) for lr in RUNGS],
                        columns=["net", "lr", "diverged"])
    return X, lo, hi, runs, z


def fit(X, lo, hi, runs):
    return CriticalLRModel(groups=("config",), n_estimators=200).fit(
        X, lo, hi, runs_model_index=runs["net"], runs_lr=runs["lr"], runs_diverged=runs["diverged"])


def test_threshold_model_recovers_a_known_boundary_and_is_calibrated():
    X, lo, hi, runs, _ = synthetic(300, 0)
    m = fit(X, lo, hi, runs)
    Xt, _, _, rt, zt = synthetic(300, 1)
    z = m.log_critical_lr(Xt)
    assert np.corrcoef(z, zt)[0, 1] > 0.9
    assert np.median(np.abs(z - zt)) < 0.5                        # ln units: within a factor 1.65
    p = m.proba_at(Xt, RUNGS)[rt["net"].to_numpy(), np.searchsorted(RUNGS, rt["lr"].to_numpy())]
    assert ece(rt["diverged"].to_numpy(float), p) < 0.05
    # monotone in the LR by construction, and rising past the ladder's top
    P = m.proba_at(Xt.head(5), np.logspace(-6, 3, 50))
    assert (np.diff(P, axis=1) >= 0).all() and (P[:, -1] > 0.99).all()
    s = m.max_safe_lr(Xt, threshold=0.2)
    assert np.allclose(m.proba_at(Xt, 1.0)[:, 0] * 0 + 0.2,
                       [m.proba_at(Xt.iloc[[i]], s["max_safe_lr"][i])[0, 0] for i in range(len(Xt))])
    assert (s["low"] < s["max_safe_lr"]).all() and (s["max_safe_lr"] < s["high"]).all()


def test_threshold_model_json_round_trip_predicts_the_same():
    X, lo, hi, runs, _ = synthetic(80, 2)
    m = fit(X, lo, hi, runs)
    back = CriticalLRModel.from_dict(json.loads(json.dumps(m.to_dict())))
    np.testing.assert_allclose(back.log_critical_lr(X), m.log_critical_lr(X), rtol=1e-6)
    with pytest.raises(ValueError, match="critical-LR"):
        CriticalLRModel.from_dict({"kind": "isotonic"})


def test_ece_by_hand():
    y = np.array([0, 1, 1, 0])
    p = np.array([0.05, 0.95, 0.55, 0.45])
    # bins: [0,.1): y 0 p .05 → .05; [.9,1]: 1 vs .95 → .05; [.5,.6): 1 vs .55 → .45; [.4,.5): 0 vs .45
    assert ece(y, p) == pytest.approx((0.05 + 0.05 + 0.45 + 0.45) / 4)


def test_saved_model_is_served_in_numpy_and_agrees_with_xgboost(tmp_path):
    import sys

    X, lo, hi, runs, _ = synthetic(120, 4)
    X.loc[::7, "n_layers"] = np.nan                                   # missing values take defaults
    m = fit(X, lo, hi, runs)
    m.metadata_ = {"name": "t"}
    m.save(tmp_path / "c")
    back = CriticalLRModel.load(tmp_path / "c")
    ref = m.log_critical_lr(X)                                        # xgboost's own predictor
    np.testing.assert_allclose(back.log_critical_lr(X), ref, rtol=1e-6, atol=1e-6)
    assert back.metadata_ == {"name": "t"}
    (tmp_path / "c" / "critical_lr.json").write_text("{not json")
    from risk_model.errors import PredictorError

    with pytest.raises(PredictorError, match="critical_lr.json"):
        CriticalLRModel.load(tmp_path / "c")
