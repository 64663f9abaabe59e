"""Leave-one-architecture-class-out evaluation of predictor v2 on a ladder corpus (corpus-v2).

For every architecture class (``family``) in turn, every predictor is fitted on the other classes'
networks and scores the held-out class's runs. Reported per class and pooled over the held-out
folds: AUROC [95% bootstrap CI over networks], ECE (``evaluate.ECE_BINS`` equal-width bins), Brier on runs; for
``max_safe_lr`` (at ``threshold``) the fraction of held-out networks whose prediction lies in
[lr_stable_max / 2, lr_diverge_min) ("right"), the fraction at or above lr_diverge_min ("unsafe")
and the median |log10 error| of the predicted median critical LR against the bracket's geometric
mean. Networks dead at init are left out (``risk predict`` answers them deterministically).

Predictors: the critical-LR threshold model on feature-group sets (an ablation on the same folds),
and baselines: log LR alone, log LR + optimizer (logistic), the paper's isotonic map on M≈1, and
v1's monotone XGBoost on profile aggregates + config.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .evaluate import ECE_BINS, _fmt, auroc, brier, ece
from .outputs import atomic_path
from .threshold import FEATURE_GROUPS, OPTIMIZERS, CriticalLRModel, config_features, spectral_features

ABLATION = {
    "config": ("config",),
    "config+forward": ("config", "forward"),
    "config+forward+gradient": ("config", "forward", "gradient"),
    "all (config+forward+gradient+spectral)": ("config", "forward", "gradient", "spectral"),
    "spectral": ("spectral",),
}
FULL = "all (config+forward+gradient+spectral)"
NO_SPECTRAL = "config+forward+gradient"


def network_table(models: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """One row per network: ids, boundary, and every feature group (``threshold.FEATURE_GROUPS``)."""
    spec = {mid: spectral_features(g.sort_values("layer")) for mid, g in layers.groupby("model_id")}
    rows = []
    for _, m in models.iterrows():
        init = {k: m[k] for k in m.index if k.startswith("log10_")}
        row = dict(model_id=m["model_id"], family=m["family"], norm=m["norm"], optimizer=m["optimizer"],
                   lr_stable_max=m["lr_stable_max"], lr_diverge_min=m["lr_diverge_min"],
                   bracketed=bool(m["bracketed"]), dead_at_init=bool(m["dead_at_init"]))
        row.update(config_features(optimizer=m["optimizer"], warmup=m["warmup"], steps=m["steps"],
                                   grad_clip=m["grad_clip"], weight_decay=m["weight_decay"],
                                   batch_size=m["batch_size"], d_model=m["d_model"],
                                   n_layers=m["n_layers"], init=init))
        for c in FEATURE_GROUPS["forward"] + FEATURE_GROUPS["gradient"]:
            row[c] = float(m[c]) if c in m.index else math.nan
        row.update(spec.get(m["model_id"], {c: math.nan for c in FEATURE_GROUPS["spectral"]}))
        rows.append(row)
    return pd.DataFrame(rows)


def censored_bounds(nets: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of lr* per network: (lr_stable_max or 0, lr_diverge_min or inf)."""
    lo = nets["lr_stable_max"].fillna(0.0).to_numpy(float)
    hi = nets["lr_diverge_min"].fillna(np.inf).to_numpy(float)
    return lo, hi


def _boot_ci(y, p, cluster, n_boot=1000, seed=0) -> tuple[float, float]:
    """95% percentile CI of AUROC, resampling networks (clusters) with replacement."""
    rng = np.random.default_rng(seed)
    ids = np.unique(cluster)
    pos = {c: np.flatnonzero(cluster == c) for c in ids}
    vals = []
    for _ in range(n_boot):
        take = np.concatenate([pos[c] for c in rng.choice(ids, len(ids))])
        a = auroc(y[take], p[take])
        if math.isfinite(a):
            vals.append(a)
    return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if vals else (math.nan, math.nan)


def _fit_threshold(nets_tr, runs_tr, groups, **kw) -> CriticalLRModel:
    idx = {m: i for i, m in enumerate(nets_tr["model_id"])}
    lo, hi = censored_bounds(nets_tr)
    return CriticalLRModel(groups=groups, **kw).fit(
        nets_tr, lo, hi, runs_model_index=runs_tr["model_id"].map(idx).to_numpy(),
        runs_lr=runs_tr["lr"].to_numpy(), runs_diverged=runs_tr["diverged"].to_numpy(int))


def _baseline_scores(name, runs_tr, runs_te) -> np.ndarray:
    """Per-run P(divergence) of a baseline fitted on ``runs_tr``."""
    y = runs_tr["diverged"].to_numpy(int)
    if name.startswith("log LR"):
        from sklearn.linear_model import LogisticRegression

        def X(r):
            cols = [np.log10(r["lr"].to_numpy(float))]
            if "optimizer" in name:
                cols += [(r["optimizer"] == o).to_numpy(float) for o in OPTIMIZERS]
            return np.column_stack(cols)
        return LogisticRegression(C=1e4, max_iter=1000).fit(X(runs_tr), y).predict_proba(X(runs_te))[:, 1]
    if name.startswith("paper"):
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(increasing=True, out_of_bounds="clip")
        iso.fit(runs_tr["m_near_mean"].to_numpy(float), y)
        return iso.predict(runs_te["m_near_mean"].to_numpy(float))
    if name.startswith("v1"):
        import xgboost as xgb

        from featurize.schema import aggregate_names

        # the profile aggregates only: suffix matching would also take lr_stable_max/lr_diverge_min,
        # the per-model boundary, i.e. the label
        cols = [c for c in aggregate_names() if c in runs_tr.columns]

        def X(r):
            base = r[cols].to_numpy(float)
            cfg = np.column_stack([np.log10(r["lr"].to_numpy(float)), r["warmup"].to_numpy(float),
                                   np.log2(r["batch_size"].to_numpy(float)), r["steps"].to_numpy(float),
                                   r["d_model"].to_numpy(float)]
                                  + [(r["optimizer"] == o).to_numpy(float) for o in OPTIMIZERS])
            M = np.column_stack([cfg, base])
            return np.where(np.isfinite(M), np.clip(M, -1e30, 1e30), np.nan)
        mono = "(" + ",".join(["1"] + ["0"] * (X(runs_tr.head(1)).shape[1] - 1)) + ")"
        clf = xgb.XGBClassifier(n_estimators=300, max_depth=3, learning_rate=0.05, subsample=0.8,
                                monotone_constraints=mono, n_jobs=1, random_state=0)
        return clf.fit(X(runs_tr), y).predict_proba(X(runs_te))[:, 1]
    raise ValueError(name)


BASELINES = ("log LR alone", "log LR + optimizer", "paper: isotonic on M≈1", "v1: monotone XGBoost")


def evaluate_heldout(nets: pd.DataFrame, runs: pd.DataFrame, *, threshold: float = 0.2,
                     ablation: dict | None = None, baselines=BASELINES, n_boot: int = 1000,
                     progress=None, **model_kw) -> dict:
    """Leave-one-class-out evaluation (module docstring).

    Parameters
    ----------
    nets : ``network_table`` rows (one per network)
    runs : the corpus runs (``model_id``, ``lr``, ``diverged``, ``optimizer``, and for the
        baselines the profile aggregates and config columns)
    threshold : P threshold of ``max_safe_lr``

    Returns
    -------
    dict with ``per_class`` (list of rows: predictor, heldout, metrics), ``pooled`` (per predictor),
    ``oof`` (per-run out-of-class P per predictor, for paired comparisons) and ``protocol``
    """
    ablation = ABLATION if ablation is None else ablation
    nets = nets[~nets["dead_at_init"]].reset_index(drop=True)
    runs = runs[runs["model_id"].isin(set(nets["model_id"]))].reset_index(drop=True)
    y = runs["diverged"].to_numpy(int)
    classes = sorted(nets["family"].unique())
    names = list(ablation) + list(baselines)
    oof = {n: np.full(len(runs), np.nan) for n in names}
    safe = {n: pd.Series(np.nan, index=nets["model_id"]) for n in ablation}
    med = {n: pd.Series(np.nan, index=nets["model_id"]) for n in ablation}
    for k, fam in enumerate(classes):
        tr_n, te_n = nets[nets["family"] != fam], nets[nets["family"] == fam]
        tr_r = runs["model_id"].isin(set(tr_n["model_id"])).to_numpy()
        te_r = ~tr_r
        for name, groups in ablation.items():
            m = _fit_threshold(tr_n.reset_index(drop=True), runs[tr_r], groups, **model_kw)
            z = pd.Series(m.log_critical_lr(te_n), index=te_n["model_id"])
            oof[name][te_r] = 1 / (1 + np.exp(-(np.log(runs.loc[te_r, "lr"].to_numpy(float))
                                                 - z.loc[runs.loc[te_r, "model_id"]].to_numpy()) / m.scale_))
            s = m.max_safe_lr(te_n, threshold)
            safe[name].loc[te_n["model_id"]] = s["max_safe_lr"]
            med[name].loc[te_n["model_id"]] = np.exp(z.to_numpy())
        for name in baselines:
            oof[name][te_r] = _baseline_scores(name, runs[tr_r], runs[te_r])
        if progress:
            progress(k + 1, len(classes))
    cluster = runs["model_id"].to_numpy()
    fam_r = runs["family"].to_numpy()
    rows, pooled = [], {}
    for name in names:
        p = oof[name]
        ci = _boot_ci(y, p, cluster, n_boot=n_boot)
        pooled[name] = dict(auroc=auroc(y, p), auroc_ci=ci, ece=ece(y, p), brier=brier(y, p))
        for fam in classes:
            m = fam_r == fam
            rows.append(dict(predictor=name, heldout=fam, runs=int(m.sum()), diverged=int(y[m].sum()),
                             auroc=auroc(y[m], p[m]), ece=ece(y[m], p[m]), brier=brier(y[m], p[m])))
    lr_ok = {}
    for name in ablation:
        s = safe[name].to_numpy()
        lo = nets["lr_stable_max"].to_numpy(float)
        hi = nets["lr_diverge_min"].to_numpy(float)
        right = (s >= np.nan_to_num(lo, nan=0.0) / 2) & (s < np.nan_to_num(hi, nan=np.inf))
        unsafe = s >= np.nan_to_num(hi, nan=np.inf)
        mid = np.where(np.isfinite(lo) & np.isfinite(hi) & (lo > 0), np.sqrt(lo * hi), np.nan)
        err = np.abs(np.log10(med[name].to_numpy()) - np.log10(mid))
        per = {}
        for fam in classes:
            m = (nets["family"] == fam).to_numpy()
            per[fam] = dict(right=float(right[m].mean()), unsafe=float(unsafe[m].mean()),
                            median_abs_log10_err=float(np.nanmedian(err[m])) if np.isfinite(err[m]).any() else math.nan)
        lr_ok[name] = dict(right=float(right.mean()), unsafe=float(unsafe.mean()),
                           median_abs_log10_err=float(np.nanmedian(err)), per_class=per)
    return dict(per_class=rows, pooled=pooled, max_safe_lr=lr_ok, oof=oof, y=y, cluster=cluster,
                classes=classes, n_networks=int(len(nets)), n_runs=int(len(runs)), threshold=threshold,
                n_boot=n_boot, ece_bins=ECE_BINS,
                protocol="leave-one-architecture-class-out; every predictor fitted on the other classes")


def paired_delta(y, p_a, p_b, cluster, n_boot=1000, seed=0) -> dict:
    """AUROC(a) − AUROC(b) on the same runs with a 95% paired bootstrap CI over networks."""
    rng = np.random.default_rng(seed)
    ids = np.unique(cluster)
    pos = {c: np.flatnonzero(cluster == c) for c in ids}
    d0 = auroc(y, p_a) - auroc(y, p_b)
    vals = []
    for _ in range(n_boot):
        take = np.concatenate([pos[c] for c in rng.choice(ids, len(ids))])
        d = auroc(y[take], p_a[take]) - auroc(y[take], p_b[take])
        if math.isfinite(d):
            vals.append(d)
    return dict(delta=float(d0), ci=(float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))))


def report_markdown(res: dict, paired: dict) -> str:
    """The leave-one-class-out section of ``reports/evaluation.md``."""
    L = ["## Predictor v2: leave-one-architecture-class-out (corpus-v2)", "",
         f"{res['n_networks']} networks (not dead at init), {res['n_runs']} runs, {len(res['classes'])} "
         f"classes: {', '.join(res['classes'])}. Every predictor is fitted on the other classes' networks "
         "and scores the held-out class (for the critical-LR model, its out-of-fold calibration too). "
         f"AUROC 95% CI: percentile bootstrap over networks, {res['n_boot']} resamples. "
         f"ECE: {res['ece_bins']} equal-width bins. "
         f"`max_safe_lr` at P = {res['threshold']:g}: *right* when in [lr_stable_max / 2, lr_diverge_min), "
         "*unsafe* when at or above lr_diverge_min; |log10 error| of the predicted median critical LR "
         "against the bracket's geometric mean.", "",
         "| predictor | AUROC [95% CI] | ECE | Brier |", "|---|---|---|---|"]
    for name, m in res["pooled"].items():
        lo, hi = m["auroc_ci"]
        L.append(f"| {name} | {_fmt(m['auroc'])} [{_fmt(lo)}, {_fmt(hi)}] | {_fmt(m['ece'])} | {_fmt(m['brier'])} |")
    L += ["", "**AUROC per held-out class**", "",
          "| predictor | " + " | ".join(res["classes"]) + " |", "|---|" + "---|" * len(res["classes"])]
    per = pd.DataFrame(res["per_class"])
    for name in res["pooled"]:
        row = per[per["predictor"] == name].set_index("heldout")
        L.append(f"| {name} | " + " | ".join(_fmt(row.loc[c, "auroc"], '.2f') for c in res["classes"]) + " |")
    L += ["", "**ECE per held-out class**", "",
          "| predictor | " + " | ".join(res["classes"]) + " |", "|---|" + "---|" * len(res["classes"])]
    for name in res["pooled"]:
        row = per[per["predictor"] == name].set_index("heldout")
        L.append(f"| {name} | " + " | ".join(_fmt(row.loc[c, "ece"], '.2f') for c in res["classes"]) + " |")
    L += ["", f"**max_safe_lr (P < {res['threshold']:g}) on held-out networks**", "",
          "| feature groups | right | unsafe | median abs log10 error | right per class |", "|---|---|---|---|---|"]
    for name, m in res["max_safe_lr"].items():
        pc = ", ".join(f"{c} {_fmt(v['right'], '.2f')}" for c, v in m["per_class"].items())
        L.append(f"| {name} | {_fmt(m['right'], '.2f')} | {_fmt(m['unsafe'], '.2f')} | {_fmt(m['median_abs_log10_err'], '.2f')} | {pc} |")
    L += ["", "**What each group adds** (paired bootstrap over networks, same held-out predictions)", "",
          "| comparison | ΔAUROC [95% CI] |", "|---|---|"]
    for name, d in paired.items():
        L.append(f"| {name} | {d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    return "\n".join(L) + "\n"


def load_networks(corpus_dir):
    """``(networks, corpus)`` of a ladder corpus: ``network_table`` of every model whose rebuild
    reproduced its stored initial loss (``models.parquet``, made or extended here), and the
    ``corpus.Corpus`` (runs, hash, profile settings)."""
    from pathlib import Path

    from .corpus import load_corpus
    from .sweep.model_table import build_model_table

    corpus_dir = Path(corpus_dir)
    models = build_model_table(corpus_dir, progress=False)
    if "rebuild_ok" in models:
        models = models[models["rebuild_ok"].astype(bool)]
    nets = network_table(models, pd.read_parquet(corpus_dir / "layers.parquet"))
    return nets, load_corpus([corpus_dir])


def evaluate_ladder(corpus_dir, out_dir, *, threshold: float = 0.2, n_boot: int = 1000, seed: int = 0,
                    n_estimators: int = 400, progress=None) -> dict:
    """Run the leave-one-class-out evaluation on a ladder corpus and write ``heldout.md``,
    ``heldout.json`` and ``heldout_reliability.png`` into ``out_dir`` (atomically)."""
    import json
    from pathlib import Path

    from .evaluate import plot_reliability

    out_dir = Path(out_dir)
    nets, corpus = load_networks(corpus_dir)
    res = evaluate_heldout(nets, corpus.runs, threshold=threshold, n_boot=n_boot, progress=progress,
                           n_estimators=n_estimators, random_state=seed)
    y, cl = res["y"], res["cluster"]
    paired = {
        "all − (config+forward+gradient): the spectral group": paired_delta(y, res["oof"][FULL], res["oof"][NO_SPECTRAL], cl, n_boot),
        "(config+forward+gradient) − config": paired_delta(y, res["oof"][NO_SPECTRAL], res["oof"]["config"], cl, n_boot),
        "all − log LR + optimizer": paired_delta(y, res["oof"][FULL], res["oof"]["log LR + optimizer"], cl, n_boot),
        "all − v1 monotone XGBoost": paired_delta(y, res["oof"][FULL], res["oof"]["v1: monotone XGBoost"], cl, n_boot),
        "spectral alone − log LR alone": paired_delta(y, res["oof"]["spectral"], res["oof"]["log LR alone"], cl, n_boot),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    md = report_markdown(res, paired)
    summary = {k: res[k] for k in ("pooled", "max_safe_lr", "per_class", "classes", "n_networks", "n_runs",
                                   "threshold", "n_boot", "ece_bins", "protocol")}
    summary["paired"] = paired
    with atomic_path(out_dir / "heldout.md") as tmp:
        tmp.write_text(md)
    with atomic_path(out_dir / "heldout.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=float))
    with atomic_path(out_dir / "heldout_reliability.png") as tmp:
        plot_reliability(res, tmp, names=[FULL, "v1: monotone XGBoost"],
                         title="Reliability, leave-one-architecture-class-out probabilities")
    res.update(paired=paired, markdown=md)
    return res
