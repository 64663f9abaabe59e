"""Evaluation of predictor v3 (``lrmodel.LRPredictor``) on a ladder corpus, labelled with ``failed``.

- **Leave-one-class-out** (class = ``family``): the predictor is fitted on the other classes
  (calibration folds hold out whole classes too) and scores the held-out class. Per class and
  pooled: AUROC of P(failed | lr) on runs [95% percentile bootstrap CI over networks], ECE
  (``evaluate.ECE_BINS`` bins), Brier; the same for P(diverged | lr) on the paper's label;
  ``max_safe_lr`` *right* when in [last not-failed LR / 2, first failed LR) and *unsafe* when at or
  above the first failed LR (a model that never learns fails at every rung: right only below its
  lowest rung); ``recommended_lr`` within 3× of the measured lr_best (networks that learn).
- **Ablation** of the tree feature groups on the same folds: greedy forward selection from
  ``config``; a group is added only when its paired-bootstrap ΔAUROC (on ``failed``) has a 95% CI
  above 0. Every tried step is reported.
- **Leave-largest-out**: fit on the narrower (shallower) networks, score the rest, for the v3 form
  (linear scale part + trees) and the v2 form (trees only, scale columns as tree features).

Several corpora are pooled (``load_v3``): a full-ladder corpus's shorter horizons are ladders of
their own (``horizon_ladders``), and its networks set the scale exponents (``slope_rows``).
Networks dead at init are left out (``risk predict`` answers them deterministically).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .evaluate import ECE_BINS, _fmt, auroc, brier, ece
from .heldout import _boot_ci, paired_delta
from .lrmodel import (FEATURE_GROUPS, HORIZON_SEP, LogLRModel, LRPredictor, ladder_targets, network_table,
                      parent_model_id)
from .outputs import atomic_path

WITHIN = 3.0  # recommended_lr counts as right within this factor of lr_best


def horizon_ladders(runs, models):
    """A full-ladder corpus's rows read at shorter horizons, as ladders of their own.

    With a constant schedule, the row of a 3000-step run read at step 300 *is* the outcome of the
    300-step run of the same recipe (same seed, same batches, warmup in absolute steps). Each such
    (model, horizon) ladder gets the model id ``<model_id>@<steps>`` and a copy of the model's row
    with that ``steps``; the full-length rows keep their model id. Rows of corpora without
    ``horizon_of`` (corpus-v2) pass through.

    Returns (runs, models) with one ladder per model id.
    """
    if "horizon_of" not in runs:
        return runs, models
    short = runs["horizon_of"].notna() & (runs["steps"] < runs["horizon_of"])
    if "schedule" in runs:  # only a constant schedule makes the truncated run a run of its own
        decaying = short & runs["schedule"].fillna("constant").ne("constant")
        runs, short = runs[~decaying], short[~decaying]
    runs = runs.copy()
    base = runs["model_id"].astype(str)
    runs.loc[short, "model_id"] = base[short] + HORIZON_SEP + runs.loc[short, "steps"].astype(int).astype(str)
    new = runs.loc[short, ["model_id", "steps"]].drop_duplicates("model_id")
    if new.empty:
        return runs.reset_index(drop=True), models
    parent = new["model_id"].map(parent_model_id)
    rows = models.set_index("model_id").reindex(parent.to_numpy())
    ok = rows["family"].notna().to_numpy()                  # a parent missing from the models table
    rows = rows[ok].reset_index(drop=True)
    rows["model_id"] = new["model_id"].to_numpy()[ok]
    rows["steps"] = new["steps"].to_numpy()[ok]
    models = pd.concat([models, rows[models.columns]], ignore_index=True)
    return runs.reset_index(drop=True), models


def load_v3(corpus_dirs, *, horizons: bool = True):
    """(nets, runs, corpus) of one or more ladder corpora: ``lrmodel.network_table`` of the networks
    whose rebuild reproduced their initial loss and that are not dead at init, and their runs with
    the ``failed`` label (``labels`` via ``lrmodel.ladder_targets``).

    A full-ladder corpus (corpus-v3) gives one ladder per model at its full length and, with
    ``horizons``, one per shorter horizon it was read at (``horizon_ladders``; ids
    ``<model_id>@<steps>``); without, the shorter-horizon rows are dropped (they would mix two
    horizons in one ladder). ``nets`` carries ``source`` (the corpus directory) and ``parent_id``
    (the model id without its horizon)."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from .corpus import load_corpus
    from .sweep.model_table import build_model_table

    dirs = [Path(corpus_dirs)] if isinstance(corpus_dirs, (str, Path)) else [Path(d) for d in corpus_dirs]
    c = load_corpus(dirs)
    tables, layers = [], []
    for d in dirs:
        m = build_model_table(d, progress=False)
        if "rebuild_ok" in m:
            m = m[m["rebuild_ok"].astype(bool)]
        full_ladder = "horizon_of" in pq.read_schema(d / "runs.parquet").names
        tables.append(m.assign(source=str(d), full_ladder=full_ladder))
        layers.append(pd.read_parquet(d / "layers.parquet"))
    models = pd.concat(tables, ignore_index=True).drop_duplicates("model_id")
    runs = c.runs
    if "horizon_of" in runs:
        full = runs["horizon_of"].isna() | (runs["steps"] == runs["horizon_of"])
        runs, models = horizon_ladders(runs, models) if horizons else (runs[full].reset_index(drop=True), models)
    nets = network_table(models, pd.concat(layers, ignore_index=True), runs)
    by_id = models.set_index("model_id")
    nets["source"] = by_id.loc[nets["model_id"], "source"].to_numpy()
    nets["full_ladder"] = by_id.loc[nets["model_id"], "full_ladder"].to_numpy(bool)
    nets["parent_id"] = nets["model_id"].map(parent_model_id)
    nets = nets[~nets["dead_at_init"] & nets["model_id"].isin(set(runs["model_id"]))].reset_index(drop=True)
    runs = runs[runs["model_id"].isin(set(nets["model_id"]))].reset_index(drop=True)
    _, failed = ladder_targets(runs)
    runs = runs.assign(failed=failed.to_numpy(bool))
    return nets, runs, c


def _index(nets, runs):
    idx = {m: i for i, m in enumerate(nets["model_id"])}
    return runs["model_id"].map(idx).to_numpy(int)


def slope_rows(nets):
    """The networks that set the scale exponents: those of the full-ladder corpora (their scale
    ladders vary width and horizon within one architecture, on real text), when any are in
    ``nets``; None (every network) otherwise."""
    if "full_ladder" not in nets or not nets["full_ladder"].any() or nets["full_ladder"].all():
        return None
    return nets["full_ladder"].to_numpy(bool)


def _fit(nets, runs, groups, model_kw, targets="all"):
    """A fitted LRPredictor (targets "all") or only its fail model (targets "fail")."""
    ri = _index(nets, runs)
    fam = nets["family"].to_numpy()
    sr = slope_rows(nets) if model_kw.get("scale_part", True) else None
    if targets == "fail":
        return LogLRModel(groups=groups, **model_kw).fit(
            nets, nets["fail_lo"], nets["fail_hi"], runs_model_index=ri, runs_lr=runs["lr"].to_numpy(float),
            runs_y=runs["failed"].to_numpy(int), groups=fam, slope_rows=sr)
    return LRPredictor(groups=groups, **model_kw).fit(nets, ri, runs["lr"].to_numpy(float), runs["failed"].to_numpy(int),
                                                      runs["diverged"].to_numpy(int), groups=fam, slope_rows=sr)


def _sig(z):
    return 1 / (1 + np.exp(-np.clip(z, -500, 500)))


def heldout_predictions(nets, runs, groups, *, split, targets="all", threshold=0.2, progress=None, **model_kw):
    """Out-of-split predictions. ``split``: iterable of (name, train mask over nets).

    Returns dict with per-run ``p_failed``/``p_diverged`` and per-network ``max_safe_lr``,
    ``recommended_lr``, ``mu_fail``, ``mu_diverge`` (NaN where not scored)."""
    n, nr = len(nets), len(runs)
    out = {k: np.full(nr, np.nan) for k in ("p_failed", "p_diverged")}
    out.update({k: np.full(n, np.nan) for k in ("max_safe_lr", "recommended_lr", "lr_best_pred", "mu_fail",
                                                 "mu_diverge", "scale_fail")})
    splits = list(split)
    for k, (name, tr) in enumerate(splits):
        te = ~tr
        tr_n = nets[tr].reset_index(drop=True)
        tr_r = runs[runs["model_id"].isin(set(tr_n["model_id"]))].reset_index(drop=True)
        m = _fit(tr_n, tr_r, groups, model_kw, targets)
        te_n = nets[te]
        r_te = runs["model_id"].isin(set(te_n["model_id"])).to_numpy()
        pos = {mid: i for i, mid in enumerate(te_n["model_id"])}
        ri = runs.loc[r_te, "model_id"].map(pos).to_numpy(int)
        lr = np.log(runs.loc[r_te, "lr"].to_numpy(float))
        if targets == "fail":
            r = m.predict_log_lr(te_n)
            out["p_failed"][r_te] = _sig((lr - r["mu"][ri]) / r["scale"][ri])
            out["mu_fail"][te], out["scale_fail"][te] = r["mu"], r["scale"]
            out["max_safe_lr"][te] = np.exp(r["mu"] + r["scale"] * math.log(threshold / (1 - threshold)))
        else:
            p = m.predict(te_n, threshold=threshold)
            f = _sig((lr - p["mu_fail"][ri]) / p["scale_fail"][ri])
            d = _sig((lr - p["mu_diverge"][ri]) / p["scale_diverge"][ri])
            out["p_failed"][r_te], out["p_diverged"][r_te] = np.maximum(f, d), d
            for key, src in (("max_safe_lr", "max_safe_lr"), ("recommended_lr", "recommended_lr"),
                             ("lr_best_pred", "lr_best"), ("mu_fail", "mu_fail"), ("mu_diverge", "mu_diverge"),
                             ("scale_fail", "scale_fail")):
                out[key][te] = p[src]
        if progress:
            progress(k + 1, len(splits))
    return out


def loco_splits(nets):
    return [(fam, (nets["family"] != fam).to_numpy()) for fam in sorted(nets["family"].unique())]


def lr_scores(nets, pred) -> dict:
    """Per-network right/unsafe of max_safe_lr and within-3× of recommended_lr (module doc)."""
    s = pred["max_safe_lr"]
    lo, hi = nets["fail_lo"].to_numpy(float), nets["fail_hi"].to_numpy(float)
    scored = np.isfinite(s)
    right = (s >= lo / 2) & (s < hi)
    unsafe = s >= hi
    best = nets["lr_best"].to_numpy(float)
    learns = ~nets["never_learns"].to_numpy(bool) & np.isfinite(best)
    rec = pred["recommended_lr"]
    with np.errstate(divide="ignore", invalid="ignore"):
        within = np.abs(np.log(rec / best)) <= math.log(WITHIN)
    interior = learns & np.isfinite(nets["best_lo"].to_numpy(float)) & (nets["best_lo"].to_numpy(float) > 0) \
        & np.isfinite(nets["best_hi"].to_numpy(float))
    return dict(right=right & scored, unsafe=unsafe & scored, scored=scored, within=within & learns & np.isfinite(rec),
                learns=learns & np.isfinite(rec), interior=interior & np.isfinite(rec))


def log10_errors(nets, pred, target="fail") -> np.ndarray:
    """log10(predicted median / bracket geometric mean) for networks bracketed on both sides."""
    lo, hi = (nets[f"{target}_lo"].to_numpy(float), nets[f"{target}_hi"].to_numpy(float)) if target == "fail" else \
        (nets["div_lo"].to_numpy(float), nets["div_hi"].to_numpy(float))
    mu = pred["mu_fail"] if target == "fail" else pred["mu_diverge"]
    ok = (lo > 0) & np.isfinite(hi) & np.isfinite(mu)
    err = np.full(len(lo), np.nan)
    err[ok] = (mu[ok] - 0.5 * (np.log(lo[ok]) + np.log(hi[ok]))) / math.log(10)
    return err


def metrics(nets, runs, pred, mask_nets=None, n_boot=1000, seed=0) -> dict:
    """AUROC [CI], ECE, Brier of P(failed) and P(diverged) on the runs of ``mask_nets``; max_safe_lr
    and recommended_lr scores."""
    m_n = np.ones(len(nets), bool) if mask_nets is None else np.asarray(mask_nets, bool)
    keep = runs["model_id"].isin(set(nets.loc[m_n, "model_id"])).to_numpy() & np.isfinite(pred["p_failed"])
    cl = runs.loc[keep, "model_id"].to_numpy()
    out = dict(networks=int(m_n.sum()), runs=int(keep.sum()))
    for lab, key in (("failed", "p_failed"), ("diverged", "p_diverged")):
        y = runs.loc[keep, lab].to_numpy(int)
        p = pred[key][keep]
        if not np.isfinite(p).all() or len(p) == 0:
            continue
        out[lab] = dict(auroc=auroc(y, p), auroc_ci=_boot_ci(y, p, cl, n_boot=n_boot, seed=seed), ece=ece(y, p),
                        brier=brier(y, p), rate=float(y.mean()))
    sc = lr_scores(nets, pred)
    nn = max(int((sc["scored"] & m_n).sum()), 1)
    nl = int((sc["learns"] & m_n).sum())
    out.update(max_safe_right=float((sc["right"] & m_n).sum() / nn), max_safe_unsafe=float((sc["unsafe"] & m_n).sum() / nn),
               recommended_within_3x=float((sc["within"] & m_n).sum() / nl) if nl else math.nan,
               n_learn=nl)
    ni = int((sc["interior"] & m_n).sum())
    out.update(recommended_within_3x_interior=float((sc["within"] & sc["interior"] & m_n).sum() / ni) if ni else math.nan,
               n_interior=ni)
    err = log10_errors(nets, pred, "fail")[m_n]
    out["lr_fail_median_abs_log10_err"] = float(np.nanmedian(np.abs(err))) if np.isfinite(err).any() else math.nan
    err = log10_errors(nets, pred, "diverge")[m_n]
    out["lr_diverge_median_abs_log10_err"] = float(np.nanmedian(np.abs(err))) if np.isfinite(err).any() else math.nan
    out["lr_diverge_mean_log10_err"] = float(np.nanmean(err)) if np.isfinite(err).any() else math.nan
    return out


def class_scale_factors(nets, runs, pred) -> dict[str, float]:
    """Per held-out class, the factor c on the fail model's scale that maximises the likelihood of
    the class's ``failed`` labels (c > 1: the class needed wider intervals than calibrated)."""
    from scipy.optimize import minimize_scalar

    pos = {m: i for i, m in enumerate(nets["model_id"])}
    ri = runs["model_id"].map(pos).to_numpy(int)
    z = (np.log(runs["lr"].to_numpy(float)) - pred["mu_fail"][ri]) / pred["scale_fail"][ri]
    y = runs["failed"].to_numpy(float)
    fam = nets["family"].to_numpy()[ri]
    out = {}
    for c in sorted(set(fam)):
        m = fam == c

        def nll(logc):
            p = np.clip(_sig(z[m] / math.exp(logc)), 1e-9, 1 - 1e-9)
            return -np.sum(y[m] * np.log(p) + (1 - y[m]) * np.log(1 - p))
        out[c] = float(math.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))
    return out


# ==================================================================== ablation
def measured_groups(nets) -> tuple[str, ...]:
    """The tree feature groups with at least one finite value in ``nets`` (the curvature group is
    measured only where ``model_table --curvature`` was run)."""
    return tuple(g for g, cols in FEATURE_GROUPS.items()
                 if any(c in nets and np.isfinite(np.asarray(nets[c], float)).any() for c in cols))


def ablation(nets, runs, *, candidates=None, n_boot=1000, seed=0, progress=None, **model_kw) -> dict:
    """Greedy forward selection of tree feature groups, starting from the linear part alone, on
    the leave-one-class-out AUROC of the fail model on ``failed``: each round adds the group with
    the largest gain, only if its paired ΔAUROC CI lies above 0. ``candidates`` None: every
    ``measured_groups``."""
    if candidates is None:
        candidates = measured_groups(nets)
    y = runs["failed"].to_numpy(int)
    cl = runs["model_id"].to_numpy()
    cache = {}

    def oof(groups):
        key = tuple(groups)
        if key not in cache:
            cache[key] = heldout_predictions(nets, runs, key, split=loco_splits(nets), targets="fail", **model_kw)["p_failed"]
            if progress:
                progress(len(cache), None)
        return cache[key]

    steps, chosen = [], []
    left = list(candidates)
    while left:
        tries = {g: paired_delta(y, oof(tuple(chosen + [g])), oof(tuple(chosen)), cl, n_boot, seed) for g in left}
        best = max(tries, key=lambda g: tries[g]["delta"])
        for g, d in tries.items():
            steps.append(dict(base="+".join(chosen) or "linear part only", added=g, delta=d["delta"], ci=d["ci"],
                              kept=g == best and d["ci"][0] > 0))
        if tries[best]["ci"][0] <= 0:
            break
        chosen.append(best)
        left.remove(best)
    pooled = {"+".join(k) or "linear part only": dict(auroc=auroc(y, p), auroc_ci=_boot_ci(y, p, cl, n_boot, seed),
                                                      ece=ece(y, p)) for k, p in cache.items()}
    return dict(steps=steps, chosen=tuple(chosen), pooled=pooled)


# ==================================================================== leave-largest-out
#: leave-largest-out splits: (name, fit-on rule, scored rule) over the networks' columns
LARGEST_SPLITS = (
    ("width and horizon", "d_model ≤ 256 and steps ≤ 1000", "d_model > 256 or steps > 1000",
     lambda n: (n["d_model"] <= 256) & (n["steps"] <= 1000)),
    ("width", "d_model ≤ 128", "d_model > 128", lambda n: n["d_model"] <= 128),
    ("depth", "n_layers ≤ 8", "n_layers > 8", lambda n: n["n_layers"] <= 8),
)


#: the two fit sets of a leave-largest-out split (``largest_split``)
LARGEST_PROTOCOLS = (
    ("strict", "scored models' shorter horizons left out"),
    ("as defined", "every ladder inside the rule, a scored model's shorter horizons included"),
)


def largest_split(nets, rule) -> tuple[np.ndarray, np.ndarray]:
    """(fit, small): ``small`` the networks ``rule`` keeps; ``fit`` those of them whose model has no
    ladder outside ``rule`` (a scored network's shorter horizons are not fitted on: the *strict*
    protocol; the *as defined* one fits on all of ``small``)."""
    parent = nets["parent_id"] if "parent_id" in nets else nets["model_id"]
    small = np.asarray(rule(nets), bool)
    return small & ~parent.isin(set(parent[~small])).to_numpy(), small


def largest_fit_sets(nets, rule) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({protocol: fit mask}, small) of one split (``LARGEST_PROTOCOLS``): *strict* is
    ``largest_split``'s fit, *as defined* all of ``small``; a protocol whose mask is empty, covers
    every network or equals the strict one is left out."""
    strict, small = largest_split(nets, rule)
    sets = {}
    for (protocol, _), tr in zip(LARGEST_PROTOCOLS, (strict, small)):
        if tr.all() or not tr.any() or (protocol != "strict" and (tr == strict).all()):
            continue
        sets[protocol] = tr
    return sets, small


def leave_largest_out(nets, runs, groups, *, n_boot=1000, seed=0, **model_kw) -> list[dict]:
    """Fit on the narrower / shorter / shallower networks (``LARGEST_SPLITS``) and score the rest,
    v3 form (linear scale part + trees) against the v2 form (trees only), under two protocols
    (``LARGEST_PROTOCOLS``). *Strict*: a ladder read at a shorter horizon (``horizon_ladders``) of a
    scored network is left out of the fit too, so no run of a scored network is seen. *As defined*
    (the split's rule alone, e.g. "width ≤ 256 and steps ≤ 1000"): the first 300 / 1000 steps of a
    scored 3000-step model are fitted on as the ladders they are; its 3000-step outcome is not."""
    rows = []
    for axis, fit_on, scored, rule in LARGEST_SPLITS:
        sets, small = largest_fit_sets(nets, rule)
        for protocol, tr in sets.items():
            for form, scale_part in (("v3: linear scale part + trees", True), ("v2 form: trees only", False)):
                pred = heldout_predictions(nets, runs, groups, split=[(axis, tr)], scale_part=scale_part, **model_kw)
                m = metrics(nets, runs, pred, mask_nets=~small, n_boot=n_boot, seed=seed)
                rows.append(dict(axis=axis, fit_on=fit_on, scored=scored, form=form, protocol=protocol, **m))
    return rows


# ==================================================================== plots and report
def plot_lr_fail(nets, pred, path, title="") -> None:
    """Predicted median lr_fail against the measured bracket, coloured by width; and the error
    against width and against the horizon (steps)."""
    from .evaluate import _figure

    lo, hi = nets["fail_lo"].to_numpy(float), nets["fail_hi"].to_numpy(float)
    mu = np.exp(pred["mu_fail"])
    ok = (lo > 0) & np.isfinite(hi)
    mid = np.sqrt(np.where(ok, lo * hi, np.nan))
    if not ok.any():
        fig = _figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no network bracketed on both sides", ha="center")
        fig.savefig(path, dpi=110)
        return
    fig = _figure(figsize=(12, 3.8))
    a, b, c = fig.subplots(1, 3)
    w = nets["d_model"].to_numpy(float)
    sc = a.scatter(mid[ok], mu[ok], c=np.log2(w[ok]), s=10, cmap="viridis")
    a.errorbar(mid[ok], mu[ok], xerr=[mid[ok] - lo[ok], hi[ok] - mid[ok]], fmt="none", lw=0.3, color="grey", alpha=0.5)
    lims = [np.nanmin(lo[ok]) / 3, np.nanmax(hi[ok]) * 3]
    a.plot(lims, lims, "k:", lw=0.8)
    a.set_xscale("log"), a.set_yscale("log")
    a.set_xlabel("measured lr_fail (bracket, geometric mean)"), a.set_ylabel("predicted median lr_fail (held out)")
    fig.colorbar(sc, ax=a, label="log2 width")
    err = np.log10(mu / mid)
    b.scatter(w[ok], err[ok], s=8, alpha=0.6)
    b.axhline(0, color="k", lw=0.8)
    b.set_xscale("log", base=2), b.set_xlabel("width d_model"), b.set_ylabel("log10 predicted / measured")
    steps = nets["steps"].to_numpy(float)
    one = len(np.unique(steps)) == 1
    c.scatter(steps[ok] + (np.random.default_rng(0).normal(0, 0.02 * steps[0], ok.sum()) if one else 0), err[ok],
              s=8, alpha=0.6)
    c.axhline(0, color="k", lw=0.8)
    if not one:
        c.set_xscale("log")
    else:
        c.set_xticks([steps[0]], [f"{steps[0]:g}"])
    c.set_xlabel("horizon (steps)" + (" — one value in this corpus" if len(np.unique(steps)) == 1 else ""))
    c.set_ylabel("log10 predicted / measured")
    fig.suptitle(title or "lr_fail held out by class (networks bracketed on both sides)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ci(m):
    lo, hi = m["auroc_ci"]
    return f"{_fmt(m['auroc'])} [{_fmt(lo)}, {_fmt(hi)}]"


def report_markdown(res: dict) -> str:
    L = ["## Predictor v3: leave-one-architecture-class-out on `failed` (corpus relabelled with labels.failed)", "",
         f"{res['n_networks']} networks (not dead at init; {res.get('n_horizon_ladders', 0)} of them a full-ladder "
         "model read at a shorter horizon, id `<model>@<steps>`, kept in its model's fold), "
         f"{res['n_runs']} runs; `failed` rate "
         f"{res['failed_rate']:.2f}, networks that never learn (labels.never_learns) {res['never_learns']}. "
         f"Tree feature groups shipped: {', '.join(res['groups']) or 'none (the linear part alone: optimizer, ln width, ln depth, ln steps, ln batch, ln sequence length)'}. AUROC 95% CI: percentile bootstrap over networks, "
         f"{res['n_boot']} resamples; ECE {ECE_BINS} bins. `max_safe_lr` at P(failed) = {res['threshold']:g}: *right* "
         "in [last not-failed LR / 2, first failed LR), *unsafe* at or above the first failed LR; "
         f"`recommended_lr` right within {WITHIN:g}× of lr_best (networks that learn).", "",
         "| held-out class | networks | runs | P(failed) AUROC [95% CI] | ECE | P(diverged) AUROC [95% CI] | ECE | "
         "max_safe_lr right | unsafe | recommended within 3× (n learn) | … of interior lr_best (n) |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = list(res["per_class"].items()) + [("**pooled**", res["pooled"])] \
        + [(f"*{src}* (all classes)", m) for src, m in res.get("per_source", {}).items()]
    for name, m in rows:
        f, d = m.get("failed"), m.get("diverged")
        L.append(f"| {name} | {m['networks']} | {m['runs']} | {_ci(f) if f else 'n/a'} | {_fmt(f['ece']) if f else 'n/a'} | "
                 f"{_ci(d) if d else 'n/a'} | {_fmt(d['ece']) if d else 'n/a'} | {_fmt(m['max_safe_right'], '.2f')} | "
                 f"{_fmt(m['max_safe_unsafe'], '.2f')} | {_fmt(m['recommended_within_3x'], '.2f')} ({m['n_learn']}) | "
                 f"{_fmt(m['recommended_within_3x_interior'], '.2f')} ({m['n_interior']}) |")
    p = res["pooled"]
    L += ["", "Scale factor each held-out class needed on the fail model's calibrated scale (maximum likelihood; "
          "> 1: wider than calibrated): " + ", ".join(f"{c} {v:.2f}" for c, v in res["class_scale_factor"].items())
          + f". A network outside every class seen gets its intervals widened by the largest, {res['novel_class_widen']:.2f}.",
          "", f"Median |log10 error| of the held-out median lr_fail (networks bracketed on both sides): "
          f"{_fmt(p['lr_fail_median_abs_log10_err'], '.2f')}; of lr_diverge: {_fmt(p['lr_diverge_median_abs_log10_err'], '.2f')}.",
          "", "Targets (reported, not asserted): AUROC ≥ 0.95 per class, ECE ≤ 0.05, max_safe_lr right ≥ 80% and "
          "unsafe ≤ 5%, recommended within 3× ≥ 80%.", "",
          "### Ablation (greedy forward selection of tree feature groups, fail model, ΔAUROC on `failed`)", "",
          "| base | + group | ΔAUROC [95% paired CI] | kept |", "|---|---|---|---|"]
    for s in res["ablation"]["steps"]:
        L.append(f"| {s['base']} | {s['added']} | {s['delta']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}] | "
                 f"{'yes' if s['kept'] else 'no'} |")
    L += ["", "| tree groups (fail model alone) | AUROC on failed [95% CI] | ECE |", "|---|---|---|"]
    for k, m in res["ablation"]["pooled"].items():
        L.append(f"| {k} | {_ci(m)} | {_fmt(m['ece'])} |")
    L += ["", "### Leave-largest-out (fit on the narrower / shallower networks, score the rest)", "",
          "Fit sets: " + "; ".join(f"*{k}*: {v}" for k, v in LARGEST_PROTOCOLS) + " (the first 300 / 1000 "
          "steps of a scored 3000-step model, the same network and data order; never its 3000-step outcome). "
          "A split whose scored networks have no shorter horizons has one fit set.", "",
          "| scored | fit set | form | networks | P(failed) AUROC | P(diverged) AUROC | max_safe_lr right | unsafe | "
          "median abs log10 err lr_fail | lr_diverge: median abs / mean log10 err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["largest"]:
        f, d = r.get("failed"), r.get("diverged")
        L.append(f"| {r['scored']} | {r.get('protocol', 'strict')} | {r['form']} | {r['networks']} | {_fmt(f['auroc']) if f else 'n/a'} | "
                 f"{_fmt(d['auroc']) if d else 'n/a'} | {_fmt(r['max_safe_right'], '.2f')} | {_fmt(r['max_safe_unsafe'], '.2f')} | "
                 f"{_fmt(r['lr_fail_median_abs_log10_err'], '.2f')} | {_fmt(r['lr_diverge_median_abs_log10_err'], '.2f')} / "
                 f"{r['lr_diverge_mean_log10_err']:+.2f} |")
    return "\n".join(L) + "\n"


def evaluate_v3(corpus_dirs, out_dir, *, threshold=0.2, n_boot=1000, seed=0, n_estimators=100, groups=None,
                do_ablation=True, progress=None) -> dict:
    """Everything above on one or more ladder corpora (pooled, ``load_v3``); writes ``heldout_v3.md``, ``heldout_v3.json``,
    ``heldout_v3_lr_fail.png`` and ``heldout_v3_reliability.png`` into ``out_dir`` (atomically).
    ``groups`` None: chosen by the ablation (``config`` when the ablation is skipped)."""
    import json
    from pathlib import Path

    from .evaluate import plot_reliability

    say = progress or (lambda *a: None)
    nets, runs, corpus = load_v3(corpus_dirs)
    kw = dict(n_estimators=n_estimators, random_state=seed)
    abl = ablation(nets, runs, n_boot=n_boot, seed=seed, progress=lambda k, _: say(f"ablation fit {k}"), **kw) \
        if do_ablation else dict(steps=[], chosen=("config",), pooled={})
    groups = tuple(abl["chosen"]) if groups is None else tuple(groups)
    say("leave-one-class-out, shipped groups")
    pred = heldout_predictions(nets, runs, groups, split=loco_splits(nets), threshold=threshold, **kw)
    per_class = {fam: metrics(nets, runs, pred, (nets["family"] == fam).to_numpy(), n_boot, seed)
                 for fam in sorted(nets["family"].unique())}
    pooled = metrics(nets, runs, pred, None, n_boot, seed)
    per_source = {src: metrics(nets, runs, pred, (nets["source"] == src).to_numpy(), n_boot, seed)
                  for src in sorted(nets["source"].unique())} if nets["source"].nunique() > 1 else {}
    say("leave-largest-out")
    largest = leave_largest_out(nets, runs, groups, n_boot=n_boot, seed=seed, threshold=threshold, **kw)
    factors = class_scale_factors(nets, runs, pred)
    res = dict(class_scale_factor=factors, novel_class_widen=max(1.0, max(factors.values())),
               n_networks=int(len(nets)), n_horizon_ladders=int(nets["model_id"].astype(str).str.contains(HORIZON_SEP).sum()),
               n_runs=int(len(runs)), failed_rate=float(runs["failed"].mean()),
               never_learns=int(nets["never_learns"].sum()), groups=list(groups), threshold=threshold,
               n_boot=n_boot, ece_bins=ECE_BINS, per_class=per_class, pooled=pooled, per_source=per_source, ablation=abl, largest=largest,
               protocol="leave-one-architecture-class-out; calibration folds hold out whole classes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = report_markdown(res)
    with atomic_path(out_dir / "heldout_v3.md") as tmp:
        tmp.write_text(md)
    with atomic_path(out_dir / "heldout_v3.json") as tmp:
        tmp.write_text(json.dumps(res, indent=2, default=lambda o: o.tolist()
                                  if hasattr(o, "tolist") else float(o) if isinstance(o, (np.floating,)) else str(o)))
    with atomic_path(out_dir / "heldout_v3_lr_fail.png") as tmp:
        plot_lr_fail(nets, pred, tmp)
    rel = dict(y=runs["failed"].to_numpy(int), oof={"P(failed), v3 held out by class": pred["p_failed"]})
    with atomic_path(out_dir / "heldout_v3_reliability.png") as tmp:
        plot_reliability(rel, tmp, names=list(rel["oof"]), title="P(failed), leave-one-class-out")
    res.update(markdown=md, nets=nets, runs=runs, corpus=corpus, files=[out_dir / f for f in ("heldout_v3.md", "heldout_v3.json", "heldout_v3_lr_fail.png",
                                                          "heldout_v3_reliability.png")])
    return res
