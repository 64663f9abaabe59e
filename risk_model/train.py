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


def train_critical_lr(corpus_dir, *, heldout: dict | None = None, evaluate: bool = True, seed: int = 0,
                      n_estimators: int = 400, progress: bool = False):
    """Fit predictor v2 (``threshold.CriticalLRModel``, every feature group) on a ladder corpus.

    Needs the corpus's ``models.parquet`` (init-time features per network; made, or extended, here
    with ``sweep.model_table.build_model_table``) and ``layers.parquet``. Networks dead at init are
    left out (``risk predict`` answers them deterministically). ``heldout`` (from
    ``heldout.evaluate_heldout``) is stored as the model's metrics.

    Returns
    -------
    CriticalLRModel with ``metadata_``
    """
    from .heldout import ABLATION, FULL, censored_bounds, evaluate_heldout, load_networks
    from .threshold import FEATURE_GROUPS, OPTIMIZERS, CriticalLRModel

    nets, c = load_networks(corpus_dir)
    nets = nets[~nets["dead_at_init"]].reset_index(drop=True)
    runs = c.runs[c.runs["model_id"].isin(set(nets["model_id"]))]
    if heldout is None and evaluate:
        heldout = evaluate_heldout(nets, runs, ablation={FULL: ABLATION[FULL]}, baselines=(), n_boot=200,
                                   n_estimators=n_estimators, random_state=seed)
    idx = {m: i for i, m in enumerate(nets["model_id"])}
    lo, hi = censored_bounds(nets)
    model = CriticalLRModel(n_estimators=n_estimators, random_state=seed).fit(
        nets, lo, hi, runs_model_index=runs["model_id"].map(idx).to_numpy(), runs_lr=runs["lr"].to_numpy(),
        runs_diverged=runs["diverged"].to_numpy(int))
    names = [n for g in model.groups for n in FEATURE_GROUPS[g]]
    rng = {n: [float(nets[n].min()), float(nets[n].max())] for n in names
           if n in nets and nets[n].notna().any() and not n.startswith("opt_")}
    now = _dt.datetime.now(_dt.timezone.utc)
    m = (heldout or {}).get("pooled", {}).get(FULL, {})
    safe = (heldout or {}).get("max_safe_lr", {}).get(FULL, {})
    model.metadata_ = dict(
        name="divergence-risk", kind="critical_lr", version=f"{now:%Y%m%d}-v2-{c.hash[:8]}",
        trained_at=now.isoformat(timespec="seconds"), corpus_hash=c.hash, corpus_sources=[str(corpus_dir)],
        n_networks=int(len(nets)), n_runs=int(len(runs)), n_diverged=int(runs["diverged"].sum()),
        optimizers=list(OPTIMIZERS), families=sorted(nets["family"].unique().tolist()),
        profile_settings=c.profile_settings, feature_range=rng,
        config_defaults={"warmup": float(runs["warmup"].median()), "batch_size": float(runs["batch_size"].median()),
                         "steps": float(runs["steps"].median()), "d_model": float(runs["d_model"].median()),
                         "grad_clip": 0.0, "weight_decay": 0.0},
        metrics={"auroc": m.get("auroc"), "auroc_ci": m.get("auroc_ci"), "ece": m.get("ece"),
                 "brier": m.get("brier"), "max_safe_lr_right": safe.get("right"),
                 "max_safe_lr_unsafe": safe.get("unsafe"),
                 "protocol": "leave-one-architecture-class-out"} if heldout else {},
        shift=model.shift_, scale=model.scale_, versions=library_versions(),
    )
    return model
