"""Predictor v3 (risk_model.lrmodel): the labels it learns come from labels.ladder_summary, the
linear scale part recovers a known law and keeps moving outside the training range where trees are
flat, the interval widens off the corpus, numpy serving equals xgboost, JSON round-trips."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from risk_model.lrmodel import FEATURE_GROUPS, LogLRModel, LRPredictor, ladder_targets, recipe_features

RUNGS = 10.0 ** np.arange(-5, 1.01, 0.5)


def test_ladder_targets_follow_the_label_rule_on_a_hand_built_ladder():
    # model a: best final loss 2.0 at 1e-2; R = 5 so the failure limit is 2 + ½·3 = 3.5
    runs = pd.DataFrame(dict(
        model_id=["a"] * 4 + ["b"] * 2,
        lr=[1e-3, 1e-2, 1e-1, 1.0, 1e-3, 1e-2],
        final_loss=[3.0, 2.0, 4.9, np.nan, 4.95, 4.96],
        diverged=[False, False, False, True, False, False],
        marginal_loss=[5.0] * 6))
    t, failed = ladder_targets(runs)
    assert failed.tolist() == [False, False, True, True, True, True]    # b never learns: fails everywhere
    a, b = t.loc["a"], t.loc["b"]
    assert (a.fail_lo, a.fail_hi) == (1e-2, 1e-1)
    assert a.best_lo == pytest.approx(math.sqrt(1e-3 * 1e-2)) and a.best_hi == pytest.approx(math.sqrt(1e-2 * 1e-1))
    assert (a.div_lo, a.div_hi) == (1e-1, 1.0)
    assert b.never_learns and (b.fail_lo, b.fail_hi) == (0.0, 1e-3) and math.isnan(b.best_lo)
    assert b.div_hi == math.inf and b.div_lo == 1e-2                    # never diverged: right-censored


def _bracket(crit: float) -> dict:
    """The interval a half-decade ladder (``RUNGS``) measures for a true first failing LR ``crit``:
    (last rung below it, first rung at or above it), 0 / inf where censored."""
    below, above = RUNGS[RUNGS < crit], RUNGS[RUNGS >= crit]
    return dict(fail_lo=below.max() if below.size else 0.0, fail_hi=above.min() if above.size else np.inf)


def _synthetic(n=400, seed=0, widths=(32, 48, 64, 96, 128)):
    """Networks whose lr_fail follows ln lr = −0.7 ln d − 0.5 ln L + 1.5·u − 3 + logistic(0.3), u a
    dimensionless init feature; measured on half-decade ladders (interval-censored)."""
    rng = np.random.default_rng(seed)
    d = rng.choice(widths, n).astype(float)
    L = rng.choice([2, 4, 8], n).astype(float)
    u = rng.uniform(-1, 1, n)
    truth = -0.7 * np.log(d) - 0.5 * np.log(L) + 1.5 * u - 3.0
    crit = np.exp(truth + rng.logistic(0, 0.3, n))
    rows = []
    for i in range(n):
        f = recipe_features(optimizer="adamw", warmup=0, steps=300, grad_clip=0, weight_decay=0, batch_size=16,
                            d_model=d[i], n_layers=L[i])
        f["log10_rms_w_sqrt_d_hidden"] = u[i]
        f.update(_bracket(crit[i]))
        rows.append(f)
    return pd.DataFrame(rows), truth


def _net(d, L=4, u=0.0, steps=300):
    f = recipe_features(optimizer="adamw", warmup=0, steps=steps, grad_clip=0, weight_decay=0, batch_size=16,
                        d_model=d, n_layers=L)
    f["log10_rms_w_sqrt_d_hidden"] = u
    return {k: np.array([v]) for k, v in f.items()}


@pytest.fixture(scope="module")
def fitted():
    X, _ = _synthetic()
    kw = dict(groups=("config",), n_estimators=60, n_splits=3)
    v3 = LogLRModel(**kw).fit(X, X["fail_lo"], X["fail_hi"], groups=np.arange(len(X)) % 5)
    v2 = LogLRModel(scale_part=False, **kw).fit(X, X["fail_lo"], X["fail_hi"], groups=np.arange(len(X)) % 5)
    return X, v3, v2


def test_linear_part_recovers_the_law_and_extrapolates_where_trees_are_flat(fitted):
    X, v3, v2 = fitted
    coef = dict(zip(v3.linear_columns_, v3.coef_))
    assert coef["ln_d_model"] == pytest.approx(-0.7, abs=0.15)
    assert coef["ln_n_layers"] == pytest.approx(-0.5, abs=0.15)
    assert abs(coef["ln_steps"]) < 1e-9                                  # no variation: the prior's 0
    for d in (512, 1024):                                                # 4× and 8× wider than the corpus
        truth = -0.7 * math.log(d) - 0.5 * math.log(4) - 3.0
        e3 = abs(v3.predict_log_lr(_net(d))["mu"][0] - truth)
        e2 = abs(v2.predict_log_lr(_net(d))["mu"][0] - truth)
        assert e3 < 0.35 and e2 > e3 + 0.5, (d, e3, e2)
    # the trees-only form is flat beyond the widest training network, the v3 form is not
    m2 = [v2.predict_log_lr(_net(d))["mu"][0] for d in (128, 512, 1024)]
    m3 = [v3.predict_log_lr(_net(d))["mu"][0] for d in (128, 512, 1024)]
    assert m2[1] == pytest.approx(m2[2], abs=1e-6)
    assert m3[0] > m3[1] > m3[2]


def test_interval_widens_off_the_corpus_by_the_prior_on_an_axis_that_never_varied(fitted):
    X, v3, _ = fitted
    s_in = v3.predict_log_lr(_net(64))["scale"][0]
    s_wide = v3.predict_log_lr(_net(1024))["scale"][0]
    assert s_in == pytest.approx(v3.scale_, rel=0.05) and s_wide > 1.15 * s_in
    # steps were always 300: the slope's posterior is its prior (sd 0.5), uncorrelated with the rest,
    # so going from steps 3000 to 30000 adds exactly 3/π² · 0.5² · ((ln 100)² − (ln 10)²) to s_eff²
    a = v3.predict_log_lr(_net(1024, steps=3000))["scale"][0]
    b = v3.predict_log_lr(_net(1024, steps=30000))["scale"][0]
    want = 3 / math.pi ** 2 * 0.25 * (math.log(100) ** 2 - math.log(10) ** 2)
    assert b ** 2 - a ** 2 == pytest.approx(want, rel=1e-4)


def test_calibrated_scale_matches_the_generating_noise(fitted):
    """The truth's noise is logistic(0.3); the rungs are half a decade apart (1.15 in ln), so the
    fitted scale lies between the noise and the noise + the rung's own width."""
    _, v3, _ = fitted
    assert 0.2 < v3.scale_ < 0.8


def test_numpy_trees_equal_xgboost_with_the_same_base_margin(fitted):
    import xgboost as xgb

    X, v3, _ = fitted
    U = v3._columns(X, v3.tree_features_)
    Z = v3._design(X)
    booster = xgb.Booster(model_file=bytearray(v3.booster_json_.encode()))
    want = booster.predict(xgb.DMatrix(U, feature_names=v3.tree_features_, base_margin=Z @ v3.coef_),
                           output_margin=True)
    got = Z @ v3.coef_ + v3._tree_part(v3.trees_, U)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_json_round_trip_predicts_the_same(fitted):
    import json

    X, v3, _ = fitted
    back = LogLRModel.from_dict(json.loads(json.dumps(v3.to_dict())))
    a, b = v3.predict_log_lr(X), back.predict_log_lr(X)
    np.testing.assert_array_equal(a["mu"], b["mu"])
    np.testing.assert_array_equal(a["scale"], b["scale"])


def test_estimator_conventions():
    m = LogLRModel(groups=("config",), n_estimators=5)
    assert not [k for k in vars(m) if k.endswith("_")]                  # __init__ only stores arguments
    X, _ = _synthetic(n=60)
    assert m.fit(X, X["fail_lo"], X["fail_hi"]) is m
    assert {"coef_", "cov_", "shift_", "scale_", "trees_"} <= set(vars(m))


def test_predictor_curves_are_monotone_and_failed_covers_diverged():
    X, _ = _synthetic(n=200, seed=1)
    X = X.assign(div_lo=X["fail_lo"] * 10, div_hi=np.where(np.isfinite(X["fail_hi"]), X["fail_hi"] * 10, np.inf),
                 best_lo=X["fail_lo"] / 10, best_hi=X["fail_hi"] / 10)
    runs = [(i, lr, lr >= X.loc[i, "fail_hi"], lr >= X.loc[i, "div_hi"]) for i in range(len(X)) for lr in RUNGS[4:]]
    ri, lr, f, d = map(np.array, zip(*runs))
    m = LRPredictor(groups=("config",), n_estimators=20, n_splits=3).fit(X, ri, lr, f, d, groups=np.arange(len(X)) % 4)
    grid = np.logspace(-6, 1, 50)
    p = m.predict(X.iloc[:20], lrs=grid)
    assert (np.diff(p["p_failed"], axis=1) >= -1e-12).all() and (np.diff(p["p_diverged"], axis=1) >= -1e-12).all()
    assert (p["p_failed"] >= p["p_diverged"] - 1e-12).all()
    # max_safe_lr is where P(failed) crosses the threshold on a brute-force grid
    fine = np.logspace(-8, 2, 4001)
    pf = m.predict(X.iloc[:5], lrs=fine, threshold=0.2)
    for k in range(5):
        crossing = fine[np.argmax(pf["p_failed"][k] >= 0.2)]
        assert pf["max_safe_lr"][k] == pytest.approx(crossing, rel=0.01)
    assert (p["recommended_lr"] <= p["max_safe_lr"] * (1 + 1e-12)).all()


def test_tree_groups_are_dimensionless():
    """No width, depth, steps, batch or parameter count among the tree features."""
    names = {c for g in FEATURE_GROUPS.values() for c in g}
    assert not names & {"log2_d_model", "n_layers", "steps", "log2_batch_size", "log10_n_params", "d_model"}


def test_fit_does_not_depend_on_the_thread_count():
    from threadpoolctl import threadpool_limits

    X, _ = _synthetic(n=120, seed=3)
    preds = []
    for n in (1, 2):
        with threadpool_limits(limits=n):
            m = LogLRModel(groups=("config",), n_estimators=20, n_splits=3).fit(X, X["fail_lo"], X["fail_hi"],
                                                                              groups=np.arange(len(X)) % 3)
        preds.append(m.predict_log_lr(X))
    np.testing.assert_array_equal(preds[0]["mu"], preds[1]["mu"])
    np.testing.assert_array_equal(preds[0]["scale"], preds[1]["scale"])


def test_task_term_learns_a_synthetic_task_shift_and_serves_real_data():
    """Half the networks trained on a synthetic task whose lr_fail sits e^1.2 higher: the task term
    finds the shift, and a network without a task (what `risk predict` sees) gets the real-data level."""
    from risk_model.lrmodel import SYNTHETIC_TASKS, TASK_COLUMN

    X, truth = _synthetic(n=400, seed=5)
    rng = np.random.default_rng(5)
    synth = rng.random(len(X)) < 0.5
    crit = np.sqrt(np.where(X["fail_lo"] > 0, X["fail_lo"], RUNGS[0] / 3) * np.where(np.isfinite(X["fail_hi"]),
                                                                                        X["fail_hi"], RUNGS[-1] * 3))
    crit = np.where(synth, crit * math.exp(1.2), crit)
    lo = np.array([RUNGS[RUNGS < c].max() if (RUNGS < c).any() else 0.0 for c in crit])
    hi = np.array([RUNGS[RUNGS >= c].min() if (RUNGS >= c).any() else np.inf for c in crit])
    X = X.assign(**{TASK_COLUMN: synth.astype(float)})
    m = LogLRModel(groups=(), n_estimators=0, n_splits=3).fit(X, lo, hi, groups=np.arange(len(X)) % 5)
    coef = dict(zip(m.linear_columns_, m.coef_))
    assert coef[TASK_COLUMN] == pytest.approx(1.2, abs=0.2)
    real = m.predict_log_lr(_net(64))["mu"][0]
    assert m.predict_log_lr({**_net(64), TASK_COLUMN: np.array([1.0])})["mu"][0] - real == pytest.approx(coef[TASK_COLUMN])
    f = recipe_features(optimizer="adamw", warmup=0, steps=300, grad_clip=0, weight_decay=0, batch_size=16,
                        d_model=64, n_layers=4)
    assert f[TASK_COLUMN] == 0.0 and all(recipe_features(
        optimizer="adamw", warmup=0, steps=300, grad_clip=0, weight_decay=0, batch_size=16, d_model=64, n_layers=4,
        task=t)[TASK_COLUMN] == 1.0 for t in SYNTHETIC_TASKS)


def test_every_corpus_task_is_synthetic_or_real_data():
    from risk_model.lrmodel import SYNTHETIC_TASKS
    from risk_model.sweep.tasks import TASKS

    assert set(SYNTHETIC_TASKS) <= set(TASKS)
    assert set(TASKS) - set(SYNTHETIC_TASKS) == {"text_bytes", "digits"}   # generated vs. read from a file


def test_a_model_saved_without_the_task_term_loads_and_predicts_as_saved(fitted):
    _, v3, _ = fitted
    d = v3.to_dict()
    cols = v3.linear_columns_
    keep = [i for i, c in enumerate(cols) if c != "task_synthetic"]
    d["params"].pop("task_term"), d["params"].pop("task_prior_sd")
    d["coef"] = [d["coef"][i] for i in keep]
    d["cov"] = [[d["cov"][i][j] for j in keep] for i in keep]
    d["design_center"] = [d["design_center"][i] for i in keep]
    old = LogLRModel.from_dict(d)
    assert "task_synthetic" not in old.linear_columns_
    np.testing.assert_allclose(old.predict_log_lr(_net(96))["mu"], v3.predict_log_lr(_net(96))["mu"], rtol=1e-12)


def _fit_with_and_without_ladders(rows, crit, n_ladder):
    """Fit a linear-only LogLRModel on networks ``rows`` with lr_fail ``crit`` bracketed by RUNGS,
    with the first ``n_ladder`` rows as ``slope_rows`` and without; returns both and their coefs."""
    X = pd.DataFrame(rows)
    crit = np.array(crit)
    lo = np.array([RUNGS[RUNGS < c].max() for c in crit])
    hi = np.array([RUNGS[RUNGS >= c].min() for c in crit])
    sr = np.arange(len(X)) < n_ladder
    kw = dict(groups=(), n_estimators=0, n_splits=3)
    both = LogLRModel(**kw).fit(X, lo, hi, groups=np.arange(len(X)) % 4, slope_rows=sr)
    pooled = LogLRModel(**kw).fit(X, lo, hi, groups=np.arange(len(X)) % 4)
    return both, pooled, dict(zip(both.linear_columns_, both.coef_)), dict(zip(pooled.linear_columns_, pooled.coef_))


def test_scale_slopes_come_from_the_ladders_that_vary_them():
    """A large corpus whose lr_fail ignores width (as corpus-v2's relabelled boundary nearly does)
    and a small ladder corpus where ln lr_fail = −1·ln d: the pooled fit is pulled towards 0; with
    ``slope_rows`` the width slope is the ladders' and depth (which only the large corpus varies)
    is fitted on every row."""
    rng = np.random.default_rng(7)
    rows, crit = [], []
    for i in range(600):
        ladder = i < 120
        d = float(rng.choice([64, 128, 256, 512, 1024] if ladder else [32, 64, 128, 256]))
        L = 2.0 if ladder else float(rng.choice([2, 4, 8]))
        ln = (-1.0 * math.log(d / 128) if ladder else 0.0) - 0.5 * math.log(L) - 4.0 + rng.logistic(0, 0.2)
        rows.append(recipe_features(optimizer="adamw", warmup=0, steps=300, grad_clip=0, weight_decay=0,
                                    batch_size=16, d_model=d, n_layers=L))
        crit.append(math.exp(ln))
    both, pooled, c2, c1 = _fit_with_and_without_ladders(rows, crit, 120)
    assert both.ladder_axes_ == ["ln_d_model"]
    assert c2["ln_d_model"] == pytest.approx(-1.0, abs=0.2)               # the prior (sd 0.5) shrinks a little
    assert c1["ln_d_model"] > -0.6                                        # pulled towards the large corpus's 0
    assert c2["ln_n_layers"] == pytest.approx(-0.5, abs=0.3)                # the large corpus alone varies it
    # the covariance keeps the ladders' uncertainty for the width slope: a few networks, a wider sd
    j = both.linear_columns_.index("ln_d_model")
    assert both.cov_[j, j] > pooled.cov_[j, j]
    assert LogLRModel.from_dict(both.to_dict()).ladder_axes_ == ["ln_d_model"]


def test_a_horizon_read_at_two_values_sets_the_horizon_exponent():
    """Ladder networks read at two horizons (300 and 3000 steps, as a 3000-step corpus-v3 model and
    its 300-step horizon) with ln lr_fail = −0.5·ln steps, beside a large corpus at 300 steps only
    whose level differs: the horizon slope is the ladders' −0.5. Pooled it is not identified by a
    within-architecture contrast and comes out elsewhere."""
    rng = np.random.default_rng(11)
    rows, crit = [], []
    for i in range(500):
        ladder = i < 100
        steps = float(rng.choice([300, 3000])) if ladder else 300.0
        d = float(rng.choice([32, 64, 128]))
        ln = -0.5 * math.log(steps / 300) - 4.0 + (0.0 if ladder else -1.5) + rng.logistic(0, 0.2)
        rows.append(recipe_features(optimizer="adamw", warmup=0, steps=steps, grad_clip=0, weight_decay=0,
                                    batch_size=16, d_model=d, n_layers=2))
        crit.append(math.exp(ln))
    m, _, c, cp = _fit_with_and_without_ladders(rows, crit, 100)
    assert "ln_steps" in m.ladder_axes_
    assert c["ln_steps"] == pytest.approx(-0.5, abs=0.15)
    assert cp["ln_steps"] > -0.3                      # the large corpus's lower level at 300 steps pulls it up


def test_the_sequence_axis_is_learned_where_it_varies_and_extrapolates():
    """lr_fail ∝ seq_len^0.4 (beside the width law): the ln_seq_len slope comes out near 0.4 and a
    4× longer sequence than the corpus's longest moves the prediction by about 0.4·ln 4."""
    rng = np.random.default_rng(3)
    n = 300
    d = rng.choice([32, 64, 128], n).astype(float)
    seq = rng.choice([32, 64, 128, 256], n).astype(float)
    crit = np.exp(-0.7 * np.log(d) + 0.4 * np.log(seq) - 4.0 + rng.logistic(0, 0.3, n))
    rows = []
    for i in range(n):
        f = recipe_features(optimizer="adamw", warmup=0, steps=300, grad_clip=0, weight_decay=0, batch_size=16,
                            d_model=d[i], n_layers=4, seq_len=seq[i])
        f.update(_bracket(crit[i]))
        rows.append(f)
    X = pd.DataFrame(rows)
    m = LogLRModel(groups=(), n_estimators=0, n_splits=2).fit(X, X["fail_lo"], X["fail_hi"], groups=np.arange(n) % 4)
    coef = dict(zip(m.linear_columns_, m.coef_))
    assert coef["ln_seq_len"] == pytest.approx(0.4, abs=0.1)

    def at(s):
        f = recipe_features(optimizer="adamw", warmup=0, steps=300, grad_clip=0, weight_decay=0, batch_size=16,
                            d_model=64, n_layers=4, seq_len=s)
        return m.predict_log_lr({k: np.array([v]) for k, v in f.items()})["mu"][0]

    assert at(1024) - at(256) == pytest.approx(0.4 * math.log(4), abs=0.15)


def test_a_model_saved_before_the_sequence_axis_loads_and_predicts_as_saved(fitted):
    _, v3, _ = fitted
    d = v3.to_dict()
    keep = [i for i, c in enumerate(v3.linear_columns_) if c != "ln_seq_len"]
    d["params"].pop("scale_axes")
    d["coef"] = [d["coef"][i] for i in keep]
    d["cov"] = [[d["cov"][i][j] for j in keep] for i in keep]
    d["design_center"] = [d["design_center"][i] for i in keep]
    d["feature_names"] = [c for c in d["feature_names"] if c != "ln_seq_len"]
    old = LogLRModel.from_dict(d)
    assert "ln_seq_len" not in old.linear_columns_ and len(old.linear_columns_) == len(old.coef_)
    net = _net(96)
    net["ln_seq_len"] = np.array([math.log(512.0)])   # a request that states it: ignored by the old model
    np.testing.assert_allclose(old.predict_log_lr(net)["mu"], v3.predict_log_lr(_net(96))["mu"], rtol=1e-12)


def test_the_structure_term_recovers_a_known_stage_effect_and_old_models_load_without_it():
    """lr_fail 3× higher for single-stage blocks (ln lr += ln 3 when stages = 1): the
    ``ln_residual_stages`` slope comes out near −ln 3 / ln 2; a model saved before the term loads
    and ignores the column."""
    from risk_model.lrmodel import STRUCTURE_COLUMN

    rng = np.random.default_rng(3)
    n = 400
    d = rng.choice([32, 64, 128], n).astype(float)
    stages = rng.choice([1.0, 2.0], n)
    crit = np.exp(-0.7 * np.log(d) + np.log(3.0) * (stages == 1) - 3.0 + rng.logistic(0, 0.3, n))
    rows = []
    for i in range(n):
        f = recipe_features(optimizer="adamw", warmup=0, steps=300, grad_clip=0, weight_decay=0, batch_size=16,
                            d_model=d[i], n_layers=4)
        f[STRUCTURE_COLUMN] = math.log(stages[i])
        f.update(_bracket(crit[i]))
        rows.append(f)
    X = pd.DataFrame(rows)
    m = LogLRModel(groups=(), n_splits=3).fit(X, X["fail_lo"], X["fail_hi"], groups=np.arange(n) % 5)
    coef = dict(zip(m.linear_columns_, m.coef_))
    assert coef[STRUCTURE_COLUMN] == pytest.approx(-math.log(3.0) / math.log(2.0), abs=0.3)
    d_ = m.to_dict()
    j = m.linear_columns_.index(STRUCTURE_COLUMN)
    keep = [i for i in range(len(m.linear_columns_)) if i != j]
    d_["params"].pop("structure_term"), d_["params"].pop("structure_prior_sd")
    d_["coef"] = [d_["coef"][i] for i in keep]
    d_["cov"] = [[d_["cov"][a][b] for b in keep] for a in keep]
    d_["design_center"] = [d_["design_center"][i] for i in keep]
    d_["feature_names"] = [c for c in d_["feature_names"] if c != STRUCTURE_COLUMN]
    old = LogLRModel.from_dict(d_)
    assert STRUCTURE_COLUMN not in old.linear_columns_ and len(old.linear_columns_) == len(old.coef_)
    one, two = _net(64), _net(64)
    one[STRUCTURE_COLUMN], two[STRUCTURE_COLUMN] = np.array([0.0]), np.array([math.log(2.0)])
    assert old.predict_log_lr(one)["mu"][0] == pytest.approx(old.predict_log_lr(two)["mu"][0], abs=1e-12)
    assert m.predict_log_lr(one)["mu"][0] - m.predict_log_lr(two)["mu"][0] == pytest.approx(math.log(3.0), abs=0.25)


def test_an_extra_linear_column_recovers_its_known_slope_and_round_trips():
    """ln lr_fail = −0.7 ln d + 0.6·x − 3 (+ logistic noise), x a candidate feature in ln LR units:
    with ``extra_columns=("x",)`` the slope on x comes out near 0.6 and moves the answer by 0.6 per
    unit; without it the model cannot see x; the JSON round trip keeps the column, and a network
    without x sits at the corpus centre."""
    rng = np.random.default_rng(5)
    n = 400
    d = rng.choice([32, 64, 128], n).astype(float)
    x = rng.normal(0.0, 1.0, n)
    crit = np.exp(-0.7 * np.log(d) + 0.6 * x - 3.0 + rng.logistic(0, 0.3, n))
    rows = []
    for i in range(n):
        f = recipe_features(optimizer="adamw", warmup=0, steps=300, grad_clip=0, weight_decay=0, batch_size=16,
                            d_model=d[i], n_layers=4)
        f["x"] = x[i]
        f.update(_bracket(crit[i]))
        rows.append(f)
    X = pd.DataFrame(rows)
    g = np.arange(n) % 5
    m = LogLRModel(groups=(), extra_columns=("x",), n_splits=3).fit(X, X["fail_lo"], X["fail_hi"], groups=g)
    base = LogLRModel(groups=(), n_splits=3).fit(X, X["fail_lo"], X["fail_hi"], groups=g)
    assert "x" in m.linear_columns_ and "x" not in base.linear_columns_
    assert dict(zip(m.linear_columns_, m.coef_))["x"] == pytest.approx(0.6, abs=0.1)
    assert m.scale_ < base.scale_                         # x explains part of what base calls noise
    lo, hi = _net(64), _net(64)
    lo["x"], hi["x"] = np.array([-1.0]), np.array([1.0])
    assert m.predict_log_lr(hi)["mu"][0] - m.predict_log_lr(lo)["mu"][0] == pytest.approx(1.2, abs=0.2)
    back = LogLRModel.from_dict(m.to_dict())
    assert back.extra_columns == ("x",)
    assert back.predict_log_lr(hi)["mu"][0] == pytest.approx(m.predict_log_lr(hi)["mu"][0], abs=1e-12)
    centre = _net(64)
    centre["x"] = np.array([float(X["x"].mean())])
    assert m.predict_log_lr(_net(64))["mu"][0] == pytest.approx(m.predict_log_lr(centre)["mu"][0], abs=1e-9)
