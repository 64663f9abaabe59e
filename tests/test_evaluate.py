"""Metrics against independent computations; the evaluation protocol on a small synthetic corpus."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss, log_loss as sk_log_loss

from risk_model.corpus import load_corpus
from risk_model.evaluate import (auroc, bootstrap_auroc_ci, brier, ece, evaluate_corpus, grouped_splits,
                                 leave_one_out_splits, log_loss)
from synth_corpus import make_corpus, write_corpus


def brute_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def hand_ece(y, p, n_bins=10):
    """Σ_bins (n_b / n) |mean(y_b) − mean(p_b)|, bins [e_k, e_k+1) on np.linspace(0, 1, 11), last closed."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for k in range(n_bins):
        lo, hi = edges[k], edges[k + 1]
        m = (p >= lo) & ((p < hi) if k < n_bins - 1 else (p <= hi))
        if m.any():
            total += m.mean() * abs(y[m].mean() - p[m].mean())
    return total


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=40))
def test_auroc_equals_pairwise_count(pairs):
    y = np.array([a for a, _ in pairs])
    s = np.array([b for _, b in pairs], dtype=float)  # small integer range: many ties
    if len(set(y)) < 2:
        assert np.isnan(auroc(y, s))
    else:
        assert auroc(y, s) == pytest.approx(brute_auroc(y, s))


def test_ece_brier_logloss_against_independent_computation():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=3000)
    y = (rng.uniform(size=3000) < p ** 2).astype(int)
    assert ece(y, p) == pytest.approx(hand_ece(y, p), abs=1e-9)
    assert ece(y, p) > 0.1  # miscalibrated by construction: P(y=1|p) = p², not p
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p))
    assert log_loss(y, p.clip(1e-3, 1 - 1e-3)) == pytest.approx(sk_log_loss(y, p.clip(1e-3, 1 - 1e-3)))
    pc = rng.uniform(size=20000)
    yc = (rng.uniform(size=20000) < pc).astype(int)
    assert ece(yc, pc) < 0.02  # calibrated by construction


def test_bootstrap_ci():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(300), np.ones(300)].astype(int)
    s = rng.normal(size=600) + 0.8 * y
    lo, hi = bootstrap_auroc_ci(y, s, n_boot=1000, seed=0)
    a = auroc(y, s)
    # Hanley–McNeil standard error as independent yardstick of the width
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + 299 * (q1 - a * a) + 299 * (q2 - a * a)) / (300 * 300))
    assert lo < a < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert bootstrap_auroc_ci(y, y.astype(float), n_boot=200) == (1.0, 1.0)


def test_grouped_and_leave_one_out_splits():
    groups = np.repeat(np.arange(30), 3)
    for tr, te in grouped_splits(groups, n_splits=5):
        assert not set(groups[tr]) & set(groups[te])
    fam = np.array(["a", "b", "c"] * 10)
    for value, tr, te in leave_one_out_splits(fam):
        assert set(fam[te]) == {value} and value not in set(fam[tr])


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    runs, layers = make_corpus(n_configs=40, seeds=2, seed=5)
    runs.loc[runs["family"] == "moe", "diverged"] = 0  # a held-out family with one class only
    c = load_corpus(write_corpus(tmp_path_factory.mktemp("c"), runs, layers))
    out = tmp_path_factory.mktemp("reports")
    return evaluate_corpus(c, out_dir=out, n_boot=100, xgb_params={"num_boost_round": 20}), c, out


def test_evaluation_report(result):
    res, c, out = result
    names = [r["name"] for r in res["table"]]
    for needle in ("M≈1", "ρ", "κ(V)", "step 1", "step 100", "variance", "spikes", "log LR alone", "one-hot(norm)",
                   "XGBoost"):
        assert any(needle in n for n in names), needle
    md = (out / "evaluation.md").read_text()
    assert all(n in md for n in names)
    assert "100 resamples" in md and "1000 resamples" not in md  # the text follows the arguments used
    step1 = next(line for line in md.splitlines() if line.startswith("| Gradient norm, step 1 |"))
    assert step1.split("|")[2].strip() == "at init (before any update)"  # measured at the initial weights
    assert "after step 1" not in md
    for png in ("roc.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    y = c.runs["diverged"].to_numpy()
    for r in res["table"]:
        assert 0 <= r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"] <= 1
        p = res["oof"][r["name"]]
        assert not np.isnan(p).any()
        assert r["ece"] == pytest.approx(hand_ece(y, p), abs=1e-9)
    fam = {r["heldout"]: r for r in res["holdout"]["family"]}
    assert set(fam) == {"gpt", "moe"}
    assert np.isnan(fam["moe"]["auroc_xgboost"])  # one class: undefined, reported as n/a
    assert "| moe |" in md and "n/a" in md
    assert {r["heldout"] for r in res["holdout"]["norm"]} == set(c.runs["norm"])


def test_heldout_probabilities_do_not_see_their_fold(result):
    """A held-out fold's own labels must not influence its out-of-fold probabilities."""
    res, c, _ = result
    from risk_model.evaluate import candidates, cross_val_proba

    runs = c.runs.reset_index(drop=True)
    splits = grouped_splits(runs["config_id"], n_splits=5, seed=0)
    cand = candidates(xgb_params={"num_boost_round": 20})[0]  # the paper's isotonic predictor
    p = cross_val_proba(cand, runs, splits)
    tr, te = splits[0]
    flipped = runs.copy()
    flipped.loc[te, "diverged"] = 1 - flipped.loc[te, "diverged"]
    p2 = cross_val_proba(cand, flipped, [splits[0]])
    np.testing.assert_array_equal(p[te], p2[te])
