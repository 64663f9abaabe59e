"""The numpy evaluator of XGBoost's JSON model agrees with xgboost's own predict (the independent truth)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from risk_model.booster import TreeEnsemble
from risk_model.errors import PredictorError

xgb = pytest.importorskip("xgboost")
ROOT = Path(__file__).resolve().parent.parent


def _data(n=400, d=7, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.choice([1e-3, 1.0, 1e3], size=d)
    X[rng.random(X.shape) < 0.1] = np.nan  # missing values take each split's default direction
    y = (np.nan_to_num(X[:, 0]) + 0.5 * np.nan_to_num(X[:, 1]) / 1e3 + rng.normal(size=n) > 0).astype(int)
    return X, y


@pytest.mark.parametrize("params", [
    dict(max_depth=4, eta=0.05, subsample=0.8, colsample_bytree=0.8, num_boost_round=300),
    dict(max_depth=7, eta=0.3, num_boost_round=50, base_score=0.3),
    dict(max_depth=2, eta=0.1, num_boost_round=1, monotone_constraints="(1,0,0,0,0,0,0)"),
])
def test_agrees_with_xgboost(params):
    params = dict(params)
    rounds = params.pop("num_boost_round")
    X, y = _data()
    booster = xgb.train(dict(objective="binary:logistic", nthread=1, seed=0, **params),
                        xgb.DMatrix(X, label=y), num_boost_round=rounds)
    trees = TreeEnsemble.from_json(booster.save_raw("json"))
    Xt, _ = _data(n=1000, seed=1)
    Xt[0] = np.nan  # a row with every value missing
    want = booster.predict(xgb.DMatrix(Xt))
    np.testing.assert_allclose(trees.predict(Xt), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(trees.predict_margin(Xt), booster.predict(xgb.DMatrix(Xt), output_margin=True),
                               rtol=0, atol=1e-5)


def test_shipped_trees_agree_with_xgboost():
    """Every tree part of the shipped v3 predictor, evaluated in numpy, equals xgboost's margin; a
    predictor whose ablation kept no tree group ships no trees."""
    from risk_model.lrmodel import LRPredictor

    lrp = LRPredictor.load(ROOT / "models" / "default" / "lr_predictor")
    parts = [lrp.fail_, lrp.best_, lrp.diverge_]
    if not lrp.metadata_.get("groups"):
        assert all(m.booster_json_ is None and m.trees_ is None for m in parts)
    for m in parts:
        if m.booster_json_ is None:
            continue
        booster = xgb.Booster(model_file=bytearray(m.booster_json_.encode()))
        trees = m.trees_
        assert trees.n_trees == booster.num_boosted_rounds()
        rng = np.random.default_rng(2)
        X = rng.normal(size=(500, trees.n_features)) * 3.0
        X[rng.random(X.shape) < 0.05] = np.nan
        want = booster.predict(xgb.DMatrix(X, feature_names=booster.feature_names), output_margin=True)
        np.testing.assert_allclose(trees.predict_margin(X), want, rtol=0, atol=1e-5)


def test_refuses_what_it_cannot_evaluate(tmp_path):
    X, y = _data(n=100)
    booster = xgb.train(dict(objective="reg:squarederror", nthread=1), xgb.DMatrix(X, label=y), num_boost_round=2)
    with pytest.raises(PredictorError, match="objective"):
        TreeEnsemble.from_json(booster.save_raw("json"))
    with pytest.raises(PredictorError, match="not valid JSON"):
        TreeEnsemble.from_json("{nope")
    with pytest.raises(PredictorError, match="not an XGBoost JSON model"):
        TreeEnsemble.from_json("{}")
    ok = xgb.train(dict(objective="binary:logistic", nthread=1), xgb.DMatrix(X, label=y), num_boost_round=2)
    with pytest.raises(PredictorError, match="expects 7 features"):
        TreeEnsemble.from_json(ok.save_raw("json")).predict(X[:, :3])
