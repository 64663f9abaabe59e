"""risk_model.heldout: the leave-one-class-out report's text follows the arguments actually used."""
from __future__ import annotations

from risk_model.heldout import report_markdown


def _result(n_boot: int, ece_bins: int) -> dict:
    pooled = {"all": dict(auroc=0.9, auroc_ci=(0.85, 0.95), ece=0.05, brier=0.1)}
    per_class = [dict(predictor="all", heldout=c, runs=10, diverged=4, auroc=0.9, ece=0.05, brier=0.1)
                 for c in ("gpt", "moe")]
    safe = {"all": dict(right=0.6, unsafe=0.1, median_abs_log10_err=0.3,
                        per_class={c: dict(right=0.6, unsafe=0.1, median_abs_log10_err=0.3) for c in ("gpt", "moe")})}
    return dict(n_networks=12, n_runs=20, classes=["gpt", "moe"], threshold=0.2, pooled=pooled,
                per_class=per_class, max_safe_lr=safe, n_boot=n_boot, ece_bins=ece_bins)


def test_report_states_the_resamples_and_bins_used():
    md = report_markdown(_result(n_boot=37, ece_bins=15), {"a − b": dict(delta=0.01, ci=(-0.02, 0.04))})
    assert "percentile bootstrap over networks, 37 resamples" in md
    assert "ECE: 15 equal-width bins" in md
    assert "1000" not in md and "10 equal-width" not in md
