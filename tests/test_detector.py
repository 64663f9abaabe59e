"""The failure detector on hand-built curves with known answers, its estimator contract and JSON
file, the evaluation's curve steps against the sweep trainer's own downsampling, and the simple
rules on curves where the stop step is known."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from risk_model import labels
from risk_model.detector import REASON_CODES, FailureDetector, RunCurve, RunWatch, default_detector_path
from risk_model.detector_eval import curve_steps, rule_fastai, rule_k_min, rule_lightning, rule_nan
from risk_model.monitor import RiskMonitor, RunFailingError

T = 300


@pytest.fixture(scope="module")
def shipped():
    return FailureDetector.load_default()


def learning(step, total=T, start=5.5, end=2.0):
    """A clean learning curve: exponential approach from start to end."""
    return end + (start - end) * math.exp(-5.0 * step / total)


def lost_progress(step):
    """Learns to 2.5 by step 60, then loses all of it by step 120 and stays at the start."""
    if step <= 60:
        return 5.5 - 3.0 * step / 60
    if step <= 120:
        return 2.5 + 3.0 * (step - 60) / 60
    return 5.5


def stream(det, fn, spacing=1, total=T, grad=lambda s: 1.0):
    w = det.watch(total)
    for s in range(1, total + 1, spacing):
        v = w.update(s, fn(s), grad(s))
        if v.failing:
            return v
    return None


def test_nan_from_step_one_is_failing_at_once(shipped):
    v = shipped.watch(T).update(1, float("nan"), 1.0)
    assert v.failing and v.reason == "non-finite" and v.p_failed == 1.0 and v.step == 1
    assert v.metrics() == {"risk/failing": 1.0, "risk/reason": REASON_CODES["non-finite"], "risk/p_failed": 1.0}


@pytest.mark.parametrize("loss, grad, reason", [(60.0, 1.0, "loss blow-up"), (3.0, 600.0, "gradient explosion"),
                                                (3.0, float("inf"), "non-finite")])
def test_the_divergence_rule_stops_at_its_step(shipped, loss, grad, reason):
    w = shipped.watch(T)
    for s in range(1, 11):
        assert not w.update(s, learning(s), 1.0).failing
    v = w.update(11, loss, grad)
    assert (v.failing, v.reason, v.step) == (True, reason, 11)
    assert w.update(12, 2.0, 1.0) is v  # a failing verdict is kept


def test_a_clean_learning_curve_is_never_stopped(shipped):
    for spacing in (1, 6, 10):
        assert stream(shipped, learning, spacing) is None
    w = shipped.watch(T)
    ps = [w.update(s, learning(s), 1.0).p_failed for s in range(1, T + 1)]
    assert max(ps[150:]) < 0.5  # a run that is learning is likely to end well


def test_lost_progress_is_stopped_early_whatever_the_spacing(shipped):
    assert labels.unstable([lost_progress(s) for s in range(1, T + 1)])  # the label agrees it failed
    stops = []
    for spacing in (1, 6, 10):
        v = stream(shipped, lost_progress, spacing)
        assert v is not None and v.reason in ("lost progress", "loss blow-up")
        assert 60 < v.step <= 150  # after the loss turned, with at least half of the run saved
        stops.append(v.step)
    assert max(stops) - min(stops) <= 30  # the spacing moves the stop by about the smoothing window


def test_hard_rules_without_a_model_or_steps():
    w = RunWatch(None, None)
    assert not w.update(1, 5.0, 1.0).failing
    v = w.update(2, 5.0, float("nan"))
    assert v.failing and v.reason == "non-finite"


def test_json_round_trip_gives_the_same_answers(shipped, tmp_path):
    path = shipped.save(tmp_path / "d.json")
    doc = json.loads(path.read_text())  # plain JSON, no pickle
    assert doc["format"] == "divergence-risk-failure-detector" and 0 < doc["p_stop"] < 1
    back = FailureDetector.load(path)
    w1, w2 = shipped.watch(T), back.watch(T)
    for s in range(1, 200, 3):
        a, b = w1.update(s, lost_progress(s), 1.0), w2.update(s, lost_progress(s), 1.0)
        assert (a.failing, a.reason, a.p_failed) == (b.failing, b.reason, b.p_failed)
    assert default_detector_path().parent.name == "detector"


def _synthetic(rng, n):
    """Learning curves (not failed) and curves that learn and then lose it (failed)."""
    X, y = [], []
    for i in range(n):
        fail = i % 2 == 0
        turn = rng.uniform(40, 120)
        steps = list(range(1, T + 1, 5))
        loss = [(5.5 - 2.5 * min(s, turn) / turn + (2.5 * (s - turn) / turn if fail and s > turn else 0.0))
                * (1 + 0.01 * rng.standard_normal()) for s in steps]
        X.append(RunCurve(steps, loss, [1.0] * len(steps), T))
        y.append(fail)
    return X, np.array(y)


def test_fit_follows_the_estimator_contract_and_separates_synthetic_runs():
    rng = np.random.default_rng(0)
    X, y = _synthetic(rng, 60)
    det = FailureDetector(false_alarm=0.0)
    assert det.fit(X, y) is det
    assert len(det.coef_) == len(det.feature_names_) == len(det.mean_) and 0 < det.p_stop_ <= 1
    Xt, yt = _synthetic(np.random.default_rng(1), 40)
    stopped = np.array([det.detect(c) is not None for c in Xt])
    assert not stopped[~yt].any()  # no learning run stopped
    assert stopped[yt].mean() >= 0.9


def test_bad_use_says_what_is_wrong(shipped):
    with pytest.raises(RuntimeError, match="not fitted"):
        FailureDetector().watch(T)
    with pytest.raises(ValueError, match="total_steps"):
        shipped.watch(0)
    with pytest.raises(ValueError, match="both"):
        FailureDetector().fit(*_synthetic(np.random.default_rng(0), 4)[:1], [True] * 4)
    with pytest.raises(ValueError, match="marginal_loss"):
        FailureDetector(use_marginal=True).fit(*_synthetic(np.random.default_rng(0), 4))


def test_curve_steps_match_the_sweep_trainers_downsampling():
    from risk_model.sweep.trainer import downsample

    for n in (1, 7, 50, 51, 123, 300):
        idx = downsample(np.arange(n, dtype=float))
        assert curve_steps(n, len(idx)) == [int(i) + 1 for i in idx]


def test_simple_rules_stop_where_they_should():
    steps = [1, 2, 3, 4, 5, 6]
    c = RunCurve(steps, [5.0, 4.0, 2.0, 3.5, 4.5, float("nan")], [1.0] * 6, 6)
    assert rule_nan(c) == 6
    assert rule_k_min(1.5)(c) == 4 and rule_k_min(2.0)(c) == 5 and rule_k_min(4.0)(c) == 6
    assert rule_lightning(0.8)(c) == 1 and rule_lightning(2.0)(c) == 6  # D = 4.0 (step 1 is above), D = 10 (NaN)
    up = RunCurve(steps[:5], [5.0, 4.0, 2.0, 3.5, 5.5], [1.0] * 5, 5)
    assert rule_lightning(1.0)(up) == 5 and rule_lightning(1.2)(up) is None
    flat = RunCurve(list(range(1, 101)), [2.0] * 50 + [20.0] * 50, [1.0] * 100, 100)
    # smoothed loss (beta 0.98, debiased) passes 4 x 2.0 = 8 only some steps after the jump to 20
    stop = rule_fastai()(flat)
    expect = next(k for k in range(51, 101)
                  if (2.0 * 0.98 ** (k - 50) * (1 - 0.98 ** 50) + 20.0 * (1 - 0.98 ** (k - 50))) / (1 - 0.98 ** k) > 8.0)
    assert stop == expect > 55


def test_monitor_observe_stops_with_the_reason_and_logs_once(caplog):
    from torch import nn

    mon = RiskMonitor(nn.Linear(2, 2), steps=T, action="stop")
    assert not mon.observe(1, 5.0, 1.0).failing
    with caplog.at_level(logging.WARNING, logger="risk_model.monitor"):
        with pytest.raises(RunFailingError, match="non-finite") as info:
            mon.observe(2, float("nan"), 1.0)
        assert mon.observe(3, 5.0, 1.0).failing  # kept, no second stop
    assert info.value.verdict.step == 2 and mon.verdict.reason == "non-finite"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "stopping training" in said[0] and "non-finite" in said[0]


def test_monitor_without_steps_says_so_once_and_keeps_the_divergence_rule(caplog):
    from torch import nn

    mon = RiskMonitor(nn.Linear(2, 2), action="warn")
    with caplog.at_level(logging.WARNING, logger="risk_model.monitor"):
        for s in range(1, 5):
            v = mon.observe(s, 5.0, 1.0)
            assert not v.failing and math.isnan(v.p_failed)  # no P without the planned steps
        v = mon.observe(5, 70.0, 1.0)
    assert v.failing and v.reason == "loss blow-up" and v.p_failed == 1.0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "planned number of training steps" in said[0]
    assert "training goes on" in said[1]


def _with_prior(X, y, informative: bool, rng):
    """The same curves with a pre-flight P(failed): informative (high for the runs that fail) or noise."""
    out = []
    for c, fail in zip(X, y):
        p = (0.8 if fail else 0.2) if informative else float(rng.uniform(0.1, 0.9))
        out.append(RunCurve(c.steps, c.loss, c.grad_norm, c.total_steps, prior=p))
    return out


def test_an_informative_prior_makes_the_detector_surer_and_noise_does_not():
    rng = np.random.default_rng(0)
    X, y = _synthetic(rng, 60)
    good = FailureDetector(use_prior=True, false_alarm=0.0).fit(_with_prior(X, y, True, rng), y)
    noise = FailureDetector(use_prior=True, false_alarm=0.0).fit(_with_prior(X, y, False, rng), y)
    w = dict(zip(good.feature_names_, good.coef_))
    assert w["prior"] > 0.5 and abs(dict(zip(noise.feature_names_, noise.coef_))["prior"]) < w["prior"] / 3
    # the same early curve (step 20, before any run has turned) is read as riskier under a high prior
    early = [(s, 5.5 - 2.5 * s / 80) for s in range(1, 21)]
    hi, lo = good.watch(T, prior=0.8), good.watch(T, prior=0.2)
    for s, l in early:
        a, b = hi.update(s, l, 1.0), lo.update(s, l, 1.0)
    assert a.p_failed > b.p_failed
    assert a.reason is None or a.reason in ("lost progress", "no progress", "loss blow-up", "gradient explosion")


def test_prior_detector_needs_its_input_and_old_files_load(shipped, tmp_path):
    rng = np.random.default_rng(0)
    X, y = _synthetic(rng, 20)
    with pytest.raises(ValueError, match="prior"):
        FailureDetector(use_prior=True).fit(X, y)
    det = FailureDetector(use_prior=True).fit(_with_prior(X, y, True, rng), y)
    with pytest.raises(ValueError, match="pass prior"):
        det.watch(T)
    with pytest.raises(ValueError, match="probability"):
        det.watch(T, prior=1.5)
    doc = shipped.to_dict()
    doc["params"].pop("use_prior")  # a file written before use_prior existed
    old = FailureDetector.from_dict(doc)
    assert old.use_prior is False and old.feature_names_ == shipped.feature_names_


def test_marginal_loss_is_the_entropy_of_the_target_frequencies():
    import torch

    from risk_model.detector import marginal_loss

    assert marginal_loss(list(range(8)) * 5) == pytest.approx(math.log(8), abs=1e-12)
    t = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 3]])  # p = 3/8, 3/8, 1/8, 1/8
    expect = -(2 * 3 / 8 * math.log(3 / 8) + 2 * 1 / 8 * math.log(1 / 8))
    assert marginal_loss(t) == pytest.approx(expect, abs=1e-12)
    assert marginal_loss([7, 7, 7]) == 0.0
    with pytest.raises(ValueError, match="integer"):
        marginal_loss([0.5, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        marginal_loss([])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        marginal_loss([0, 4], vocab_size=4)


def test_failure_watch_takes_the_richest_shipped_detector_the_run_can_feed(caplog, monkeypatch, tmp_path):
    import risk_model.serve as serve
    from risk_model.monitor import FailureWatch, preflight_prior

    rng = np.random.default_rng(0)
    X, y = _synthetic(rng, 30)
    Xp = _with_prior(X, y, True, rng)
    Xm = [RunCurve(c.steps, c.loss, c.grad_norm, c.total_steps, 2.0, c.prior) for c in Xp]
    monkeypatch.setattr(serve, "default_predictor_path", lambda: tmp_path)
    FailureDetector().fit(X, y).save(default_detector_path())
    FailureDetector(use_prior=True).fit(Xp, y).save(default_detector_path(use_prior=True))
    # no prior+marginal variant shipped: a run with both gets the prior one
    for prior, R, want in ((None, None, (False, False)), (0.3, None, (True, False)), (None, 3.2, (False, False)),
                           (0.3, 3.2, (True, False))):
        fw = FailureWatch()
        fw.start(T, prior=prior, marginal_loss=R)
        assert (fw.detector.use_prior, fw.detector.use_marginal) == want
        assert math.isfinite(fw.observe(1, 5.0, 1.0).p_failed)  # the model's P, not the hard rules alone
    FailureDetector(use_prior=True, use_marginal=True).fit(Xm, y).save(default_detector_path(use_prior=True,
                                                                                             use_marginal=True))
    fw = FailureWatch()
    fw.start(T, prior=0.3, marginal_loss=3.2)
    assert fw.detector.use_prior and fw.detector.use_marginal
    # a detector given that needs the prior, on a run without one: said once, the divergence rule only
    fw = FailureWatch(FailureDetector(use_prior=True).fit(Xp, y))
    with caplog.at_level(logging.WARNING, logger="risk_model.monitor"):
        fw.start(T)
        assert math.isnan(fw.observe(1, 5.0, 1.0).p_failed)
        assert fw.observe(2, float("nan"), 1.0).failing
    assert sum("pre-flight P(failed)" in r.getMessage() for r in caplog.records) == 1
    assert preflight_prior({"predictions": [{"lr": None, "p_failed": 0.9}, {"lr": 1e-3, "p_failed": 0.25}]}) == 0.25
    assert preflight_prior({"predictions": []}) is None and preflight_prior(None) is None


def test_sample_weight_zero_is_a_run_left_out_and_corpora_can_weigh_the_same():
    import pandas as pd

    from risk_model.detector_eval import corpus_weights

    rng = np.random.default_rng(0)
    X, y = _synthetic(rng, 40)
    Xn, yn = _synthetic(np.random.default_rng(5), 10)
    yn = ~yn  # ten runs with their labels flipped: weight 0 must be as if they were not there
    w = np.r_[np.ones(len(X)), np.zeros(len(Xn))]
    a = FailureDetector().fit(X + Xn, np.r_[y, yn], sample_weight=w)
    b = FailureDetector().fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sample_weight"):
        FailureDetector().fit(X, y, sample_weight=np.zeros(len(X)))
    cw = corpus_weights(pd.DataFrame({"corpus": ["a", "a", "a", "b"]}))
    np.testing.assert_allclose(cw, [2 / 3, 2 / 3, 2 / 3, 2.0])
