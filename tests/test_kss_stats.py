"""The statistics helpers of benchmarks/kss.py, against scipy and published values."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from scipy.stats import binomtest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "kss.py"


@pytest.fixture(scope="module")
def kss():
    spec = importlib.util.spec_from_file_location("kss_benchmark", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("k,n", [(0, 24), (1, 24), (12, 24), (17, 24), (24, 24), (3, 7)])
def test_wilson_matches_scipy(kss, k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert kss.wilson_ci(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


# Newcombe (1998), Stat. Med. 17:873, Table II, method 10 (hybrid score, no continuity correction).
@pytest.mark.parametrize("k1,n1,k2,n2,lo,hi", [
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (6, 7, 2, 7, 0.0582, 0.8062),
    (5, 56, 0, 29, -0.0381, 0.1926),
    (0, 10, 0, 20, -0.1611, 0.2775),
    (10, 10, 0, 10, 0.6075, 1.0000),
])
def test_newcombe_matches_published_values(kss, k1, n1, k2, n2, lo, hi):
    d, a, b = kss.newcombe_diff_ci(k1, n1, k2, n2)
    assert d == pytest.approx(k1 / n1 - k2 / n2)
    assert (a, b) == pytest.approx((lo, hi), abs=6e-5)


def test_compare_arm_fisher_and_mcnemar_by_hand(kss):
    # α=0: 3 of 4 failed; arm: 1 of 4. Fisher table [[1, 3], [3, 1]]: two-sided p = 34/70 (the
    # hypergeometric tables as or more extreme: 1+16+1+16 of 70), odds ratio (1·1)/(3·3).
    out = kss.compare_arm([True, True, True, False], [True, False, False, False])
    assert out["fisher_p_two_sided"] == pytest.approx(34 / 70)
    assert out["odds_ratio"] == pytest.approx(1 / 9)
    assert out["diff_vs_alpha0"] == pytest.approx(-0.5)
    # paired: seeds 2 and 3 failed only at α=0, none only in the arm: exact McNemar p = 2·(1/2)² = 0.5
    assert (out["discordant_failed_only_at_alpha0"], out["discordant_failed_only_in_arm"]) == (2, 0)
    assert out["mcnemar_exact_p"] == pytest.approx(0.5)


def test_compare_arm_mcnemar_six_discordant(kss):
    ref = [True] * 5 + [False] + [True] * 4
    arm = [False] * 5 + [True] + [True] * 4
    out = kss.compare_arm(ref, arm)
    # 5 seeds failed only at α=0, 1 only in the arm: p = 2·(1 + 6)/2⁶
    assert out["mcnemar_exact_p"] == pytest.approx(14 / 64)
