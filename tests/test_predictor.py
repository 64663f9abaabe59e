"""Estimators: isotonic map vs scikit-learn's, monotonicity, save/load round trip without pickle,
schema checks, scikit-learn conventions; serving's max_safe_lr and the KSS wording."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression

from risk_model.corpus import load_corpus
from risk_model.evaluate import auroc
from risk_model.predictor import (P_CLIP, BoostedRiskModel, CalibratedRiskModel, IsotonicRiskModel, PredictorError,
                                  load_predictor, save_predictor)
from risk_model.predictor import LR_GRID, max_safe_lr
from risk_model.serve import PredictorBundle, load_bundle
from synth_corpus import make_corpus, true_logit, write_corpus

FAST = {"num_boost_round": 40}


def xgb(calibration="platt", **kw):
    return CalibratedRiskModel(BoostedRiskModel(xgb_params=FAST), method=calibration, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    runs, layers = make_corpus(n_configs=80, seeds=2, seed=1)
    return load_corpus(write_corpus(tmp_path_factory.mktemp("c"), runs, layers))


@pytest.fixture(scope="module")
def split(corpus):
    runs = corpus.runs
    test_cfg = set(runs["config_id"].unique()[::4])
    te = runs["config_id"].isin(test_cfg)
    return runs[~te].reset_index(drop=True), runs[te].reset_index(drop=True)


def test_isotonic_equals_sklearn_and_is_monotone(split):
    train, test = split
    pred = IsotonicRiskModel().fit(train, train["diverged"], groups=train["config_id"])
    ref = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(train["m_near_mean"], train["diverged"])
    want = np.clip(ref.predict(test["m_near_mean"]), P_CLIP, 1 - P_CLIP)
    np.testing.assert_allclose(pred.predict_proba(test)[:, 1], want, atol=1e-12)
    grid = pd.DataFrame({"m_near_mean": np.linspace(-1, 2, 301)})
    p = pred.predict_proba(grid)[:, 1]
    assert np.all(np.diff(p) >= 0)
    lo, hi = train["m_near_mean"].min(), train["m_near_mean"].max()
    assert np.all(p[grid["m_near_mean"] < lo] == p[0]) and np.all(p[grid["m_near_mean"] > hi] == p[-1])
    np.testing.assert_allclose(pred.predict_proba(test).sum(axis=1), 1.0)


def test_xgboost_roundtrip_identical_and_no_pickle(split, tmp_path):
    train, test = split
    pred = xgb().fit(train, train["diverged"], groups=train["config_id"])
    save_predictor(pred, tmp_path / "p", metadata={"corpus_hash": "abc"})
    for f in (tmp_path / "p").iterdir():
        json.loads(f.read_text())  # every artifact is plain JSON
    back = load_predictor(tmp_path / "p")
    np.testing.assert_array_equal(back.predict_proba(test), pred.predict_proba(test))
    assert back.metadata_["corpus_hash"] == "abc" and back.feature_names_in_ == pred.feature_names_in_


def test_platt_roundtrip_and_probabilities_in_range(split, tmp_path):
    train, test = split
    pred = xgb(calibration="platt").fit(
        train, train["diverged"], groups=train["config_id"])
    p = pred.predict_proba(test)[:, 1]
    assert np.all((p >= P_CLIP) & (p <= 1 - P_CLIP))
    save_predictor(pred, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "calibrator.json").read_text())["kind"] == "platt"
    np.testing.assert_array_equal(load_predictor(tmp_path / "p").predict_proba(test), pred.predict_proba(test))


def test_xgboost_learns_the_generating_law_on_heldout_configs(split):
    train, test = split
    pred = xgb().fit(train, train["diverged"], groups=train["config_id"])
    p = pred.predict_proba(test)[:, 1]
    truth = true_logit(test["m_near_mean"], test["lr"])
    # ranks like the true law does; better than the config-free isotonic map
    assert np.corrcoef(pd.Series(p).rank(), pd.Series(truth).rank())[0, 1] > 0.6
    iso = IsotonicRiskModel().fit(train, train["diverged"]).predict_proba(test)[:, 1]
    assert auroc(test["diverged"], p) > auroc(test["diverged"], iso)


def test_monotone_in_lr_and_max_safe_lr(split):
    train, test = split
    pred = xgb().fit(train, train["diverged"], groups=train["config_id"])
    row = test.iloc[[0]]
    table = pd.concat([row] * len(LR_GRID), ignore_index=True).assign(lr=LR_GRID)
    p = pred.predict_proba(table)[:, 1]
    assert np.all(np.diff(p) >= -1e-12)
    safe = max_safe_lr(pred, row, 0.2)
    if safe is None:
        assert p[0] >= 0.2
    else:
        i = int(np.flatnonzero(LR_GRID == safe)[0])
        assert p[i] < 0.2 and (i == len(LR_GRID) - 1 or p[i + 1] >= 0.2)


def test_sklearn_conventions():
    for est in (xgb(n_splits=3), IsotonicRiskModel(score="rho_max"), BoostedRiskModel(random_state=3)):
        assert vars(est) == est.get_params(deep=False)  # __init__ stores its kwargs and nothing else
        c = clone(est)
        assert c.get_params(deep=False).keys() == est.get_params(deep=False).keys() and c is not est
        with pytest.raises(NotFittedError):
            est.predict_proba(pd.DataFrame({"m_near_mean": [0.1]}))
    assert xgb().get_params()["estimator__xgb_params"] == FAST
    with pytest.raises(ValueError, match="one class"):
        IsotonicRiskModel().fit(pd.DataFrame({"m_near_mean": [0.1, 0.2, 0.3]}), [0, 0, 0])
    with pytest.raises(ValueError, match="calibration method"):
        CalibratedRiskModel(IsotonicRiskModel(), method="beta").fit(pd.DataFrame({"m_near_mean": [0.1, 0.2]}), [0, 1])


def test_calibrated_estimator_is_the_composition(split):
    """CalibratedRiskModel = its estimator refitted on every row, then the calibrator."""
    train, test = split
    pred = xgb().fit(train, train["diverged"], groups=train["config_id"])
    inner = BoostedRiskModel(xgb_params=FAST).fit(train, train["diverged"])
    raw = inner.predict_proba(test)[:, 1]
    np.testing.assert_allclose(pred.estimator_.predict_proba(test)[:, 1], raw, atol=1e-12)
    a, b = pred.calibrator_.a_, pred.calibrator_.b_
    z = np.log(np.clip(raw, 1e-6, 1 - 1e-6) / (1 - np.clip(raw, 1e-6, 1 - 1e-6)))
    want = np.clip(1 / (1 + np.exp(-(a * z + b))), P_CLIP, 1 - P_CLIP)
    np.testing.assert_allclose(pred.predict_proba(test)[:, 1], want, atol=1e-12)


def test_other_feature_schema_is_refused(split, tmp_path):
    train, _ = split
    pred = xgb().fit(train, train["diverged"], groups=train["config_id"])
    save_predictor(pred, tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "metadata.json").read_text())
    meta["feature_names"] = meta["feature_names"][:-1] + ["grad_clip"]
    (tmp_path / "p" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PredictorError, match="another feature schema"):
        load_predictor(tmp_path / "p")
    with pytest.raises(PredictorError, match="not a predictor directory"):
        load_predictor(tmp_path)


def test_bundle_roundtrip(split, tmp_path):
    train, test = split
    y, g = train["diverged"], train["config_id"]
    b = PredictorBundle(xgb().fit(train, y, g),
                        IsotonicRiskModel().fit(train, y, g), source="", version="v1")
    b.save(tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    assert back.version == "v1"
    np.testing.assert_array_equal(back.config_aware.predict_proba(test), b.config_aware.predict_proba(test))
    np.testing.assert_array_equal(back.config_free.predict_proba(test), b.config_free.predict_proba(test))


