"""Fit the two served predictors on a corpus and bundle them with their held-out metrics (``risk train``)."""
from __future__ import annotations

import datetime as _dt

import numpy as np

from .predictor import IsotonicRiskModel, library_versions
from .serve import PredictorBundle


def train_bundle(corpus, heldout: dict, *, calibration: str = "platt", n_splits: int = 5, seed: int = 0,
                 xgb_params: dict | None = None) -> PredictorBundle:
    """Fit the config-aware (XGBoost, calibrated) and config-free (isotonic M≈1) predictors on the whole corpus.

    Parameters
    ----------
    corpus : Corpus
    heldout : {"isotonic": metrics, "xgboost": metrics}, grouped-CV metrics of each (from
        ``evaluate.evaluate_corpus(...)["summary"]``), stored in each predictor's metadata

    Returns
    -------
    PredictorBundle (not yet saved)
    """
    from .evaluate import boosted

    runs = corpus.runs
    y = runs["diverged"].to_numpy()
    groups = runs["group_id"].to_numpy()
    iso = IsotonicRiskModel().fit(runs, y, groups)
    xgbp = boosted(calibration, xgb_params, n_splits=n_splits, random_state=seed).fit(runs, y, groups)
    now = _dt.datetime.now(_dt.timezone.utc)
    version = f"{now:%Y%m%d}-{corpus.hash[:8]}"
    common = dict(
        name="divergence-risk", version=version, trained_at=now.isoformat(timespec="seconds"),
        corpus_hash=corpus.hash, corpus_sources=list(corpus.sources), n_runs=int(len(runs)),
        n_diverged=int(y.sum()), n_configs=int(runs["group_id"].nunique()),
        profile_settings=corpus.profile_settings,
        config_defaults={k: float(runs[k].median()) for k in ("warmup", "batch_size", "steps", "d_model")},
        families=sorted(runs["family"].unique().tolist()), norms=sorted(runs["norm"].unique().tolist()),
        versions=library_versions(),
    )

    def clean(m: dict) -> dict:
        return {k: (float(v) if isinstance(v, (int, float, np.floating)) and np.isfinite(v) else None)
                for k, v in m.items() if k in ("auroc", "auroc_lo", "auroc_hi", "ece", "brier", "log_loss")}

    iso.metadata_ = dict(common, metrics=clean(heldout["isotonic"]))
    xgbp.metadata_ = dict(common, metrics=clean(heldout["xgboost"]))
    return PredictorBundle(config_aware=xgbp, config_free=iso, source="", version=version)
