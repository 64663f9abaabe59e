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
                         "seq_len": float(nets["seq_len"].median()), "grad_clip": 0.0, "weight_decay": 0.0},
        metrics={"auroc": m.get("auroc"), "auroc_ci": m.get("auroc_ci"), "ece": m.get("ece"),
                 "brier": m.get("brier"), "max_safe_lr_right": safe.get("right"),
                 "max_safe_lr_unsafe": safe.get("unsafe"),
                 "protocol": "leave-one-architecture-class-out"} if heldout else {},
        shift=model.shift_, scale=model.scale_, versions=library_versions(),
    )
    return model


def _heldout_paper_score(nets, runs) -> dict:
    """Leave-one-class-out AUROC of the paper's isotonic map on M≈1 (P(diverged)), as shown beside
    the v3 answer."""
    from sklearn.isotonic import IsotonicRegression

    from .evaluate import auroc, ece

    y = runs["diverged"].to_numpy(int)
    p = np.full(len(runs), np.nan)
    for fam in sorted(nets["family"].unique()):
        te = (runs["family"] == fam).to_numpy()
        iso = IsotonicRegression(increasing=True, out_of_bounds="clip")
        iso.fit(runs.loc[~te, "m_near_mean"].to_numpy(float), y[~te])
        p[te] = iso.predict(runs.loc[te, "m_near_mean"].to_numpy(float))
    ok = np.isfinite(p)
    return {"auroc": auroc(y[ok], p[ok]), "ece": ece(y[ok], p[ok]), "protocol": "leave-one-architecture-class-out"}


def train_lr_predictor(evaluation: dict, *, seed: int = 0, n_estimators: int = 100):
    """Fit the shipped v3 predictor (``lrmodel.LRPredictor``) on every network of the corpus that
    ``heldout_v3.evaluate_v3`` evaluated, with the groups it chose; its held-out metrics go into
    the metadata. Returns ``(LRPredictor, IsotonicRiskModel)`` (the paper's score, for reference)."""
    from .heldout_v3 import _fit
    from .lrmodel import FEATURE_GROUPS, OPTIMIZERS, SCALE_AXES

    nets, runs, c = evaluation["nets"], evaluation["runs"], evaluation["corpus"]
    groups = tuple(evaluation["groups"])
    model = _fit(nets, runs, groups, dict(n_estimators=n_estimators, random_state=seed))
    names = [n for g in groups for n in FEATURE_GROUPS[g]]
    rng = {n: [float(nets[n].min()), float(nets[n].max())] for n in names
           if n in nets and nets[n].notna().any() and not n.startswith(("opt_", "schedule_"))}
    scale_range = {key: [float(nets[key].min()), float(nets[key].max())] for _, key in SCALE_AXES
                   if key in nets and nets[key].notna().any()}
    constant = {}
    if nets["steps"].nunique() == 1:
        constant["steps"] = f"{nets['steps'].iloc[0]:g}"
    sch = [s for s in ("constant", "cosine", "linear") if nets[f"schedule_{s}"].max() > 0]
    if len(sch) == 1:
        constant["schedule"] = sch[0]
    for col, key, what in (("log10_one_minus_beta2", "beta2", lambda v: 1 - 10 ** v), ("log10_eps", "eps", lambda v: 10 ** v)):
        per = {o: sorted(set(np.round(what(nets.loc[nets["optimizer"] == o, col].dropna()), 12)))
               for o in OPTIMIZERS if (nets["optimizer"] == o).any()}
        if all(len(v) <= 1 for v in per.values()):
            constant[key] = ", ".join(f"{o} {v[0]:g}" for o, v in per.items() if v) or "not used"
    now = _dt.datetime.now(_dt.timezone.utc)
    pooled = evaluation["pooled"]
    f, d = pooled.get("failed", {}), pooled.get("diverged", {})
    model.metadata_ = dict(
        name="divergence-risk", kind="lr_v3", version=f"{now:%Y%m%d}-v3-{c.hash[:8]}",
        trained_at=now.isoformat(timespec="seconds"), corpus_hash=c.hash, corpus_sources=list(c.sources),
        n_networks=int(len(nets)), n_runs=int(len(runs)), n_failed=int(runs["failed"].sum()),
        n_diverged=int(runs["diverged"].sum()), n_never_learns=int(nets["never_learns"].sum()),
        optimizers=list(OPTIMIZERS), families=sorted(nets["family"].unique().tolist()), groups=list(groups),
        profile_settings=c.profile_settings, feature_range=rng, scale_range=scale_range, constant_recipe=constant,
        novel_class_widen=float(evaluation["novel_class_widen"]),
        config_defaults={"warmup": float(runs["warmup"].median()), "batch_size": float(runs["batch_size"].median()),
                         "steps": float(runs["steps"].median()), "d_model": float(runs["d_model"].median()),
                         "seq_len": float(nets["seq_len"].median()), "grad_clip": 0.0, "weight_decay": 0.0},
        metrics={"auroc": f.get("auroc"), "auroc_ci": f.get("auroc_ci"), "ece": f.get("ece"), "brier": f.get("brier"),
                 "auroc_diverged": d.get("auroc"), "ece_diverged": d.get("ece"),
                 "max_safe_lr_right": pooled["max_safe_right"], "max_safe_lr_unsafe": pooled["max_safe_unsafe"],
                 "recommended_within_3x": pooled["recommended_within_3x"],
                 "per_class_auroc": {k: v.get("failed", {}).get("auroc") for k, v in evaluation["per_class"].items()},
                 "protocol": "leave-one-architecture-class-out, label failed"},
        versions=library_versions(),
    )
    free = IsotonicRiskModel().fit(runs, runs["diverged"].to_numpy(), runs["model_id"].to_numpy())
    free.metadata_ = dict(model.metadata_, kind="config_free", metrics=_heldout_paper_score(nets, runs))
    return model, free
