"""Evaluation (DESIGN §8): grouped CV, leave-one-family/norm-out, AUROC + bootstrap CI, ECE, Brier,
log-loss, the paper's Table 2 baselines, ROC curve and reliability diagram.

Held-out protocol
-----------------
- Grouped K-fold on ``group_id``: a model's learning-rate ladder (ladder corpora, ``model_id``) or
  a config's seeds (``config_id``) never straddle folds. Every learned predictor
  (the isotonic maps, the logistic baselines, XGBoost with its own inner calibration folds) is fitted
  on K−1 folds and scores the held-out fold; the metrics are computed on the pooled out-of-fold
  probabilities.
- Leave-one-family-out and leave-one-norm-out: the same with one family (norm) held out at a time;
  AUROC is reported per held-out group (undefined when the group holds one class only).
- One-dimensional scores (M≈1, ρ, κ(V), the gradient baselines, log LR) are also ranked as they
  are (higher = riskier, no fitting), which is how the paper's Table 2 reports AUROC; their ECE,
  Brier and log-loss come from the grouped-CV isotonic map.

Examples
--------
>>> res = evaluate_corpus(load_corpus("datasets/corpus-v1"), out_dir="reports")   # doctest: +SKIP
>>> res["summary"]["xgboost"]["auroc"]                                          # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .predictor import P_CLIP, BoostedRiskModel, CalibratedRiskModel, IsotonicCalibrator, IsotonicRiskModel


# ==================================================================== metrics
def auroc(y, s) -> float:
    """Area under the ROC curve = P(s_pos > s_neg) + ½ P(tie) (Mann–Whitney U / (n_pos n_neg)).

    NaN when ``y`` holds one class only.
    """
    from scipy.stats import rankdata

    y = np.asarray(y).astype(int)
    s = np.asarray(s, dtype=float)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_auroc_ci(y, s, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC over ``n_boot`` resamples of the rows (resamples
    with one class only are redrawn)."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(int)
    s = np.asarray(s, dtype=float)
    n = len(y)
    if len(np.unique(y)) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    while len(vals) < n_boot:
        idx = rng.integers(0, n, size=(n_boot - len(vals), n))
        yy = y[idx]
        n1 = yy.sum(axis=1)
        ok = (n1 > 0) & (n1 < n)
        if not ok.any():
            continue
        idx, yy, n1 = idx[ok], yy[ok], n1[ok]
        r = rankdata(s[idx], axis=1)
        u = (r * yy).sum(axis=1) - n1 * (n1 + 1) / 2
        vals.extend((u / (n1 * (n - n1))).tolist())
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def bootstrap_auroc_diff_ci(y, s_a, s_b, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUROC(s_a) − AUROC(s_b) and its paired percentile bootstrap 95% CI."""
    y = np.asarray(y).astype(int)
    s_a, s_b = np.asarray(s_a, float), np.asarray(s_b, float)
    rng = np.random.default_rng(seed)
    diffs = []
    n = len(y)
    while len(diffs) < n_boot:
        idx = rng.integers(0, n, n)
        if 0 < y[idx].sum() < n:
            diffs.append(auroc(y[idx], s_a[idx]) - auroc(y[idx], s_b[idx]))
    return auroc(y, s_a) - auroc(y, s_b), float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


#: Bins of the expected calibration error (equal width), in the metrics and the reliability plot.
ECE_BINS = 10


def ece(y, p, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of P(diverged) (netcal): Σ_b (n_b/n)·|observed rate_b − mean p_b| over
    ``n_bins`` equal-width bins [e_k, e_k+1) with edges ``np.linspace(0, 1, n_bins + 1)``."""
    from netcal.metrics import ECE

    return float(ECE(bins=n_bins).measure(np.asarray(p, dtype=float), np.asarray(y).astype(int)))


def brier(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(np.mean((p - y) ** 2))


def log_loss(y, p) -> float:
    y = np.asarray(y, float)
    p = np.clip(np.asarray(p, float), P_CLIP, 1 - P_CLIP)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def score_metrics(y, p, score=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC (of ``score`` when given, else of ``p``) with its bootstrap CI, and ECE/Brier/log-loss of p."""
    s = p if score is None else score
    lo, hi = bootstrap_auroc_ci(y, s, n_boot=n_boot, seed=seed)
    return dict(auroc=auroc(y, s), auroc_lo=lo, auroc_hi=hi, ece=ece(y, p), brier=brier(y, p),
                log_loss=log_loss(y, p), n=int(len(y)), n_pos=int(np.sum(y)))


# ==================================================================== splits
def grouped_splits(groups, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """GroupKFold (shuffled) over ``groups``: no group straddles folds."""
    from sklearn.model_selection import GroupKFold

    g = np.asarray(groups)
    k = min(n_splits, len(np.unique(g)))
    return list(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(g)), groups=g))


def leave_one_out_splits(values) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(held-out value, train idx, test idx) for every distinct value."""
    v = np.asarray(values).astype(str)
    return [(u, np.flatnonzero(v != u), np.flatnonzero(v == u)) for u in sorted(np.unique(v))]


# ==================================================================== predictors under CV
@dataclass
class Candidate:
    """A predictor evaluated under CV: ``fit_predict(train_rows, test_rows) -> P(diverged)``, plus an
    optional raw score (higher = riskier) ranked without fitting."""

    name: str
    key: str  # short ASCII name (MLflow metric prefix)
    fit_predict: Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]
    raw: Callable[[pd.DataFrame], np.ndarray] | None = None
    group: str = "baseline"


def _raw_column(col: str):
    def f(df: pd.DataFrame) -> np.ndarray:
        v = pd.to_numeric(df[col], errors="coerce").astype(float).to_numpy()
        # a run that blew up before the baseline was measured has no value: rank it riskiest
        return np.where(np.isfinite(v), v, np.inf)
    return f


def _neg(raw):
    return lambda df: -raw(df)


def _log_lr(df: pd.DataFrame) -> np.ndarray:
    return np.log10(df["lr"].astype(float).to_numpy())


def _iso_candidate(name: str, key: str, raw, group="baseline") -> Candidate:
    def fit_predict(tr: pd.DataFrame, te: pd.DataFrame) -> np.ndarray:
        s_tr = np.nan_to_num(raw(tr), posinf=1e300)
        s_te = np.nan_to_num(raw(te), posinf=1e300)
        ytr = tr["diverged"].to_numpy()
        if len(np.unique(ytr)) < 2:
            return np.full(len(te), ytr.mean())
        return np.clip(IsotonicCalibrator().fit(s_tr, ytr).predict(s_te), P_CLIP, 1 - P_CLIP)
    return Candidate(name, key, fit_predict, raw, group)


def _logistic_candidate(name: str, key: str, cols: Callable[[pd.DataFrame], pd.DataFrame]) -> Candidate:
    def fit_predict(tr: pd.DataFrame, te: pd.DataFrame) -> np.ndarray:
        from sklearn.linear_model import LogisticRegression

        Xtr, Xte = cols(tr), cols(te)
        Xte = Xte.reindex(columns=Xtr.columns, fill_value=0.0)
        ytr = tr["diverged"].to_numpy()
        if len(np.unique(ytr)) < 2:
            return np.full(len(te), ytr.mean())
        m = LogisticRegression(C=1.0, max_iter=2000).fit(Xtr.to_numpy(float), ytr)
        return np.clip(m.predict_proba(Xte.to_numpy(float))[:, 1], P_CLIP, 1 - P_CLIP)
    return Candidate(name, key, fit_predict, None, "baseline")


def _lr_norm(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.get_dummies(df["norm"].astype(str), prefix="norm", dtype=float)
    out.insert(0, "log10_lr", np.log10(df["lr"].astype(float)))
    return out.set_axis(df.index)


def _predictor_candidate(name: str, key: str, group: str, make: Callable[[], object],
                         raw: Callable[[pd.DataFrame], np.ndarray] | None = None) -> Candidate:
    """A served predictor under CV: ``make()`` gives a new unfitted estimator per fold."""
    def fit_predict(tr: pd.DataFrame, te: pd.DataFrame) -> np.ndarray:
        ytr = tr["diverged"].to_numpy()
        if len(np.unique(ytr)) < 2:
            return np.full(len(te), ytr.mean())
        est = make().fit(tr, ytr, groups=tr["group_id"].to_numpy())
        return est.predict_proba(te)[:, 1]
    return Candidate(name, key, fit_predict, raw, group)


def boosted(calibration: str = "platt", xgb_params: dict | None = None, n_splits: int = 5,
            random_state: int = 0) -> CalibratedRiskModel:
    """The config-aware predictor: XGBoost on profile + config, calibrated on out-of-fold predictions."""
    return CalibratedRiskModel(BoostedRiskModel(xgb_params=xgb_params, random_state=random_state),
                               method=calibration, n_splits=n_splits, random_state=random_state)


def candidates(calibration: str = "platt", xgb_params: dict | None = None) -> list[Candidate]:
    """The predictors and the paper's Table 2 baselines, in table order (the served two first, the
    ``log LR + one-hot(norm)`` baseline last)."""
    other = "isotonic" if calibration == "platt" else "platt"
    return [
        _predictor_candidate("M≈1 (layer mean), isotonic — paper", "isotonic", "predictor", IsotonicRiskModel,
                             raw=_raw_column("m_near_mean")),
        _predictor_candidate("XGBoost profile + config, calibrated — ours", "xgboost", "predictor",
                             lambda: boosted(calibration, xgb_params)),
        _predictor_candidate(f"XGBoost profile + config, {other} calibration instead", f"xgboost_{other}",
                             "predictor", lambda: boosted(other, xgb_params)),
        _iso_candidate("M≈1 (layer mean) reversed: lower = riskier (direction read off the data)",
                       "m_near_reversed", _neg(_raw_column("m_near_mean")), "spectral"),
        _iso_candidate("Spectral radius ρ (max over layers)", "rho_max", _raw_column("rho_max"), "spectral"),
        _iso_candidate("Eigenvector condition κ(V) (max over layers)", "kappa_v_max", _raw_column("kappa_v_max"),
                       "spectral"),
        _iso_candidate("Gradient norm, step 1", "grad_norm_step1", _raw_column("grad_norm_step1"), "gradient"),
        _iso_candidate("Gradient norm, step 100", "grad_norm_step100", _raw_column("grad_norm_step100"), "gradient"),
        _iso_candidate("Gradient-norm variance, steps 1–100", "grad_norm_var_1_100",
                       _raw_column("grad_norm_var_1_100"), "gradient"),
        _iso_candidate("Loss spikes, steps 1–500", "loss_spikes_1_500", _raw_column("loss_spikes_1_500"), "gradient"),
        _iso_candidate("log LR alone", "log_lr", _log_lr, "config"),
        _logistic_candidate("log LR + one-hot(norm), logistic", "log_lr_norm", _lr_norm),
    ]


def cross_val_proba(cand: Candidate, runs: pd.DataFrame, splits) -> np.ndarray:
    """Out-of-fold P(diverged) of ``cand`` over ``splits`` (train idx, test idx)."""
    p = np.full(len(runs), np.nan)
    for tr, te in splits:
        p[te] = cand.fit_predict(runs.iloc[tr], runs.iloc[te])
    return p


# ==================================================================== the whole evaluation
def evaluate_corpus(corpus, *, out_dir: str | Path | None = "reports", n_splits: int = 5, n_boot: int = 1000,
                    seed: int = 0, calibration: str = "platt", xgb_params: dict | None = None,
                    holdouts: tuple[str, ...] = ("family", "norm"), baselines: bool = True,
                    progress=None) -> dict:
    """Run every candidate under grouped CV and the leave-one-group-out protocols.

    Parameters
    ----------
    corpus : Corpus (or anything with ``.runs`` and ``.hash``)
    out_dir : directory for evaluation.md, roc.png, reliability.png (None: write nothing)
    baselines : bool, default True
        False: only the two predictors and ``log LR + one-hot(norm)`` (what ``risk train`` needs)

    Returns
    -------
    dict with ``table`` (rows per candidate), ``summary`` (the two predictors' grouped-CV metrics),
    ``holdout`` ({"family": rows, "norm": rows}), ``comparison`` (ΔAUROC XGBoost vs log LR + norm),
    ``oof`` (probabilities per candidate) and ``files`` written.
    """
    runs = corpus.runs.reset_index(drop=True)
    y = runs["diverged"].to_numpy().astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("the corpus holds one class only: cannot evaluate a divergence predictor")
    splits = grouped_splits(runs["group_id"], n_splits=n_splits, seed=seed)
    cands = candidates(calibration, xgb_params)
    if not baselines:
        cands = cands[:2] + cands[-1:]
    table, oof = [], {}
    for i, c in enumerate(cands):
        if progress:
            progress("grouped CV", i, len(cands))
        p = cross_val_proba(c, runs, splits)
        oof[c.name] = p
        raw = c.raw(runs) if c.raw is not None else None
        m = score_metrics(y, p, score=None if raw is None else np.nan_to_num(raw, posinf=1e300),
                          n_boot=n_boot, seed=seed)
        m.update(name=c.name, key=c.key, group=c.group, auroc_of="score as is" if raw is not None else "held-out P")
        if raw is not None:
            m["auroc_heldout_p"] = auroc(y, p)
        table.append(m)
    holdout: dict[str, list[dict]] = {}
    for col in holdouts:
        if col not in runs or runs[col].nunique() < 2:
            continue
        rows = []
        for value, tr, te in leave_one_out_splits(runs[col]):
            row = dict(heldout=value, n=int(len(te)), n_pos=int(y[te].sum()))
            for c in cands[:2] + [cands[-1]]:
                p = c.fit_predict(runs.iloc[tr], runs.iloc[te])
                row[f"auroc_{c.key}"] = auroc(y[te], p)
                row[f"ece_{c.key}"] = ece(y[te], p)
            if cands[0].raw is not None:
                row["auroc_m_near_raw"] = auroc(y[te], cands[0].raw(runs.iloc[te]))
            rows.append(row)
        holdout[col] = rows
    summary = {"isotonic": table[0], "xgboost": table[1]}
    comp = bootstrap_auroc_diff_ci(y, oof[cands[1].name], oof[cands[-1].name], n_boot=n_boot, seed=seed)
    res = dict(table=table, summary=summary, holdout=holdout,
               comparison=dict(delta_auroc=comp[0], lo=comp[1], hi=comp[2], a=cands[1].name, b=cands[-1].name),
               oof=oof, y=y, n_runs=len(runs), n_configs=int(runs["group_id"].nunique()),
               corpus_hash=corpus.hash, n_splits=len(splits), n_boot=n_boot, ece_bins=ECE_BINS, files=[])
    if out_dir is not None:
        res["files"] = write_report(res, runs, Path(out_dir))
    return res


# ==================================================================== report
#: When each predictor's input is available (the paper's Table 2 "timing" column).
WHEN = {"isotonic": "at init", "xgboost": "at init (+ config)", "m_near_reversed": "at init",
        "rho_max": "at init", "kappa_v_max": "at init",
        "xgboost_isotonic": "at init (+ config)", "xgboost_platt": "at init (+ config)",
        "grad_norm_step1": "at init (before any update)", "grad_norm_step100": "at step 100",
        "grad_norm_var_1_100": "through step 100", "loss_spikes_1_500": "through step 500 (run length)",
        "log_lr": "config only", "log_lr_norm": "config only"}


def _fmt(v, f=".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)


def _figure(**kw):
    """A matplotlib Figure on its own Agg canvas: no pyplot, no change to the global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def plot_roc(res: dict, path: Path, names: list[str] | None = None) -> Path:
    from sklearn.metrics import roc_curve

    y = res["y"]
    fig = _figure(figsize=(5.5, 5))
    ax = fig.subplots()
    rows = {r["name"]: r for r in res["table"]}
    for name in names or list(rows)[:2] + [list(rows)[-1]]:
        p = res["oof"][name]
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(y, p):.3f})", lw=1.2)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, grouped-CV held-out probabilities", fontsize=10)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_reliability(res: dict, path: Path, names: list[str] | None = None, n_bins: int = ECE_BINS,
                     title: str = "grouped-CV held-out probabilities") -> Path:
    y = res["y"]
    names = names or [r["name"] for r in res["table"][:2]]
    fig = _figure(figsize=(5.5, 6.5))
    axes = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    edges = np.linspace(0, 1, n_bins + 1)
    for name in names:
        p = res["oof"][name]
        b = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
        xs, ys = [], []
        for k in range(n_bins):
            m = b == k
            if m.any():
                xs.append(p[m].mean())
                ys.append(y[m].mean())
        axes[0].plot(xs, ys, "o-", ms=4, label=f"{name} (ECE {ece(y, p):.3f})")
        axes[1].hist(p, bins=edges, histtype="step", label=name)
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[0].set_ylabel("observed divergence rate")
    axes[0].set_title(f"Reliability ({n_bins} bins), {title}", fontsize=10)
    axes[0].legend(fontsize=6, loc="upper left")
    axes[1].set_xlabel("predicted P(divergence)")
    axes[1].set_ylabel("runs")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(res: dict, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """evaluation.md + roc.png + reliability.png in ``out_dir``."""
    from .outputs import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    roc, rel = out_dir / "roc.png", out_dir / "reliability.png"
    with atomic_path(roc) as tmp:  # each file whole or not at all
        plot_roc(res, tmp)
    with atomic_path(rel) as tmp:
        plot_reliability(res, tmp)
    y = res["y"]
    L = ["# Divergence-risk predictor: evaluation", ""]
    L.append(f"Corpus: {res['n_runs']} runs, {res['n_configs']} groups, {int(y.sum())} diverged "
             f"({100 * y.mean():.1f}%); corpus hash `{res['corpus_hash'][:16]}`.")
    L.append(f"Protocol: {res['n_splits']}-fold GroupKFold on `group_id` (the model of a learning-rate "
             "ladder, or a config's seeds, never straddles folds); every fitted map is fitted on the training folds only. AUROC 95% CI: percentile "
             f"bootstrap, {res['n_boot']} resamples of the runs. ECE: {res['ece_bins']} equal-width bins (netcal).")
    L += ["", "## Predictors and the paper's Table 2 baselines (grouped CV)", "",
          "| predictor | available | AUROC | 95% CI | AUROC from | ECE | Brier | log-loss |",
          "|---|---|---|---|---|---|---|---|"]
    for r in res["table"]:
        L.append(f"| {r['name']} | {WHEN.get(r['key'], '')} | {_fmt(r['auroc'])} | "
                 f"[{_fmt(r['auroc_lo'])}, {_fmt(r['auroc_hi'])}] | "
                 f"{r['auroc_of']} | {_fmt(r['ece'])} | {_fmt(r['brier'])} | {_fmt(r['log_loss'])} |")
    L += ["", "One-dimensional scores are ranked as they are (higher = riskier), as in the paper's Table 2; "
          "their ECE/Brier/log-loss are those of a grouped-CV isotonic map on the score. A run that "
          "diverged before a gradient baseline was measured ranks as the riskiest on that baseline. "
          "Paper (its corpus): M≈1 0.995 [0.986, –], ρ 0.845, grad norm step 1 0.621, loss spikes 0.758, ECE 0.283.",
          ""]
    if "diverge_step" in runs:
        ds = pd.to_numeric(runs.loc[runs["diverged"] == 1, "diverge_step"], errors="coerce")
        if len(ds):
            early = float((ds < 100).mean())
            L += [f"Caveat: {100 * early:.0f}% of the diverged runs diverged before step 100 (median step "
                  f"{ds.median():.0f}), so the step-100 and steps-1–100 gradient baselines have, for those runs, "
                  "already seen the divergence; the step-1 baseline and the spectral scores have not.", ""]
    c = res["comparison"]
    L.append(f"ΔAUROC ({c['a']} − {c['b']}): {c['delta_auroc']:+.4f}, paired bootstrap 95% CI "
             f"[{c['lo']:+.4f}, {c['hi']:+.4f}].")
    for col, rows in res["holdout"].items():
        L += ["", f"## Leave-one-{col}-out", "",
              f"| held-out {col} | runs | diverged | AUROC XGBoost | ECE XGBoost | AUROC M≈1 isotonic | "
              "AUROC log LR + norm |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            L.append(f"| {r['heldout']} | {r['n']} | {r['n_pos']} | {_fmt(r['auroc_xgboost'])} | "
                     f"{_fmt(r['ece_xgboost'])} | {_fmt(r['auroc_isotonic'])} | {_fmt(r['auroc_log_lr_norm'])} |")
        if any(np.isnan(r["auroc_xgboost"]) for r in rows):
            L += ["", "n/a: the held-out group has one class only, so AUROC is undefined there."]
    L += ["", "## Divergence rate by norm and learning rate (fraction of runs; n/a: no runs)", ""]
    lr = runs["lr"].astype(float)
    if lr.nunique() > 10:  # continuous rates: half-decade bins
        lr = 10 ** (np.round(np.log10(lr) * 2) / 2)
    piv = runs.assign(lr=lr).pivot_table(index="norm", columns="lr", values="diverged", aggfunc="mean")
    piv.columns = [f"{v:.0e}" for v in piv.columns]
    L.append("| norm | " + " | ".join(piv.columns) + " |")
    L.append("|---" * (len(piv.columns) + 1) + "|")
    for norm, row in piv.iterrows():
        L.append(f"| {norm} | " + " | ".join(_fmt(v, ".2f") for v in row.to_numpy()) + " |")
    L += ["", "![ROC](roc.png)", "", "![Reliability](reliability.png)", ""]
    md = out_dir / "evaluation.md"
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(L))
    return [md, roc, rel]


def flat_metrics(res: dict) -> dict[str, float]:
    """MLflow-ready metric dict (names without spaces)."""
    out = {}
    for r in res["table"]:
        tag = r["key"]
        for k in ("auroc", "auroc_lo", "auroc_hi", "ece", "brier", "log_loss"):
            v = r[k]
            if v is not None and np.isfinite(v):
                out[f"{tag}.{k}"] = float(v)
    for col, rows in res["holdout"].items():
        for r in rows:
            for k in ("auroc_xgboost", "auroc_isotonic"):
                if np.isfinite(r[k]):
                    out[f"lo{col[0]}o.{r['heldout']}.{k}"] = float(r[k])
    c = res["comparison"]
    out["delta_auroc_xgb_vs_lr_norm"] = float(c["delta_auroc"])
    return out
