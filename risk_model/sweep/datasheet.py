"""Summary tables of a sweep corpus, as Markdown, for the datasheet (``datasets/README.md``).

    python -m risk_model.sweep.datasheet sweeps/corpus-v1
    python -m risk_model.sweep.datasheet datasets/corpus-v2      # ladder corpus: per-model tables too
    python -m risk_model.sweep.datasheet datasets/corpus-v3 --plot datasets/corpus-v3/lr_fail_scale.png

A full-ladder corpus (corpus-v3: a ``failed`` column) gets the v3 section too: label counts, the
per-class spread of lr_best and lr_fail_min, the distribution of the best loss relative to the
marginal loss, and (``--plot``) lr_fail_min against width and horizon on the scale ladders.
Bad input (no corpus, foreign or corrupt files): one line on stderr, exit 1, nothing written.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def _table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def by(runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """Runs, diverged, diverged %, collapsed per value of ``key``."""
    g = runs.groupby(key, sort=True)
    out = pd.DataFrame({
        "runs": g.size(),
        "diverged": g["diverged"].sum().astype(int),
        "collapsed": g["collapsed"].sum().astype(int),
    })
    out["diverged %"] = (100 * out["diverged"] / out["runs"]).round(1)
    return out.reset_index()[[key, "runs", "diverged", "diverged %", "collapsed"]]


def summary_markdown(runs: pd.DataFrame, layers: pd.DataFrame | None = None) -> str:
    """Counts and divergence rates by family, norm, family × norm, lr, init scale, optimizer,
    depth, width, warmup, task; divergence reasons; timing."""
    parts = [
        f"- runs: **{len(runs)}** ({runs['config_id'].nunique()} configs), layer rows: "
        f"{0 if layers is None else len(layers)}",
        f"- diverged: **{int(runs['diverged'].sum())}** ({100 * runs['diverged'].mean():.1f}%), "
        f"collapsed: {int(runs['collapsed'].sum())} ({100 * runs['collapsed'].mean():.1f}%), "
        f"neither: {int((~runs['diverged'] & ~runs['collapsed']).sum())}",
        f"- runs whose init profile failed (NaN aggregates, no layer rows): "
        f"{int((runs['profile_error'] != '').sum())}",
        f"- run time: mean {runs['seconds'].mean():.1f} s, median {runs['seconds'].median():.1f} s, "
        f"total {runs['seconds'].sum() / 3600:.1f} CPU-hours of worker time; "
        f"init profile mean {runs['profile_seconds'].mean():.1f} s",
    ]
    out = ["\n".join(parts)]
    reasons = runs.loc[runs["diverged"], "diverge_reason"].value_counts()
    out.append("Divergence reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    fn = runs.assign(**{"family/norm": runs["family"] + "/" + runs["norm"]})
    for key in ("family", "norm", "family/norm", "lr", "init_scale", "optimizer", "n_layers",
                "d_model", "residual_scale", "warmup", "task"):
        out.append(f"**By {key}**\n\n" + _table(by(fn, key)))
    return "\n\n".join(out) + "\n"


def ladder_stats(runs: pd.DataFrame) -> dict:
    """The shape of a ladder corpus: counts, the dead-at-init and after-step-10 fractions of the
    diverged runs, the bracketed fraction of models, and the families with both outcomes."""
    models = runs.groupby("model_id").first()
    div = runs[runs["diverged"].astype(bool)]
    fam = runs.groupby("family")["diverged"].agg(["size", "sum"])
    return dict(
        models=int(len(models)), runs=int(len(runs)),
        diverged=int(len(div)), diverged_fraction=float(runs["diverged"].mean()),
        dead_at_init_of_diverged=float(div["dead_at_init"].mean()) if len(div) else float("nan"),
        after_step_10_of_diverged=float((div["diverge_step"] > 10).mean()) if len(div) else float("nan"),
        bracketed_models=float(models["bracketed"].mean()),
        bracketed_models_not_dead=float(models.loc[~models["dead_at_init"].astype(bool), "bracketed"].mean()),
        dead_models=int(models["dead_at_init"].astype(bool).sum()),
        runs_per_model=float(len(runs) / max(1, len(models))),
        families=int(fam.shape[0]),
        families_with_both_outcomes=int(((fam["sum"] > 0) & (fam["sum"] < fam["size"])).sum()),
        worker_hours=float(runs["seconds"].sum() / 3600),
    )


def _bins(x: pd.Series, edges: list[float], fmt: str = "{:g}") -> pd.Series:
    labels = [f"[{fmt.format(a)}, {fmt.format(b)})" for a, b in zip(edges, edges[1:])]
    return pd.cut(x, edges, labels=labels, right=False).astype(str)


def ladder_markdown(runs: pd.DataFrame, layers: pd.DataFrame | None = None) -> str:
    """Datasheet section of a ladder corpus: headline numbers, then per-model and per-run tables."""
    st = ladder_stats(runs)
    head = [
        f"- models: **{st['models']}**, runs: **{st['runs']}** ({st['runs_per_model']:.1f} per model), "
        f"layer rows: {0 if layers is None else len(layers)}",
        f"- diverged runs: **{st['diverged']}** ({100 * st['diverged_fraction']:.1f}%); of them dead at "
        f"init: **{100 * st['dead_at_init_of_diverged']:.1f}%**, diverged after step 10: "
        f"**{100 * st['after_step_10_of_diverged']:.1f}%**",
        f"- models whose boundary is bracketed: **{100 * st['bracketed_models']:.1f}%** "
        f"({100 * st['bracketed_models_not_dead']:.1f}% of the {st['models'] - st['dead_models']} "
        f"not dead at init; {st['dead_models']} dead at init)",
        f"- families: {st['families']}, with both outcomes: {st['families_with_both_outcomes']}",
        f"- collapsed (stable but no better than the marginal): {int(runs['collapsed'].sum())} runs",
        f"- worker time: {st['worker_hours']:.2f} CPU-hours; mean run {runs['seconds'].mean():.1f} s, "
        f"init profile mean {runs.groupby('model_id')['profile_seconds'].first().mean():.2f} s per model",
    ]
    out = ["\n".join(head)]
    reasons = runs.loc[runs["diverged"].astype(bool), "diverge_reason"].value_counts()
    out.append("Divergence reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    models = runs.groupby("model_id").first()
    g = models.groupby("family")
    per_fam = pd.DataFrame({
        "models": g.size(),
        "runs": runs.groupby("family").size(),
        "diverged runs": runs.groupby("family")["diverged"].sum().astype(int),
        "bracketed %": (100 * g["bracketed"].mean()).round(1),
        "median lr_diverge_min (adamw)": models[models["optimizer"] == "adamw"].groupby("family")[
            "lr_diverge_min"].median(),
    }).reset_index()
    out.append("**Per family (models)**\n\n" + _table(per_fam))
    fn = runs.assign(**{"family/norm": runs["family"] + "/" + runs["norm"]})
    fn["init_std"] = _bins(runs["init_std"], [0.002, 0.006, 0.02, 0.06, 0.31], "{:g}")
    fn["lr (optimizer)"] = runs["optimizer"] + " " + runs["lr"].map("{:g}".format)
    for key in ("family/norm", "optimizer", "lr (optimizer)", "init_std", "n_layers", "d_model",
                "warmup", "grad_clip", "weight_decay", "batch_size", "task"):
        out.append(f"**By {key}** (runs)\n\n" + _table(by(fn, key)))
    return "\n\n".join(out) + "\n"


def _per_model(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, horizon) of a full-ladder corpus: its per-model labels."""
    cols = ["model_id", "steps", "family", "d_model", "n_layers", "stage", "optimizer", "marginal_loss",
            "best_loss", "lr_best", "lr_fail_min", "lr_fail_lo", "lr_diverge_min", "never_learns"]
    return runs.groupby(["model_id", "steps"], sort=True).first().reset_index()[
        [c for c in cols if c in runs.columns or c in ("model_id", "steps")]]


def full_ladder_markdown(runs: pd.DataFrame) -> str:
    """The corpus-v3 section: label counts, lr spread per class, best vs marginal loss."""
    import numpy as np

    m = _per_model(runs)
    longest = m[m["steps"] == m.groupby("model_id")["steps"].transform("max")]
    lines = [
        f"- rows: **{len(runs)}** (of them read at a horizon of a longer run: "
        f"{int((runs['steps'] < runs['horizon_of']).sum())}), models: **{runs['model_id'].nunique()}**",
        f"- failed: **{int(runs['failed'].sum())}**, unstable: **{int(runs['unstable'].sum())}**, "
        f"diverged: **{int(runs['diverged'].sum())}**, models that never learn: "
        f"{int(longest['never_learns'].astype(bool).sum())}",
        f"- lr_fail_min found (a failed rung above lr_best) on {100 * longest['lr_fail_min'].notna().mean():.1f}% "
        f"of the models; lr_diverge_min on {100 * longest['lr_diverge_min'].notna().mean():.1f}%",
    ]
    out = ["\n".join(lines)]
    counts = runs.groupby("steps").agg(rows=("run_id", "size"), failed=("failed", "sum"),
                                       unstable=("unstable", "sum"), diverged=("diverged", "sum")).reset_index()
    out.append("**Labels per horizon (steps)**\n\n" + _table(counts))

    def q(x: pd.Series) -> str:
        x = x.dropna()
        if not len(x):
            return "–"
        return " / ".join(f"{v:.3g}" for v in np.quantile(x, [0.1, 0.5, 0.9]))

    fam = longest.groupby(["family", "optimizer"]).agg(
        models=("model_id", "size"), lr_best_q10_50_90=("lr_best", q),
        lr_fail_min_q10_50_90=("lr_fail_min", q),
        fail_over_best_median=("lr_fail_min", lambda x: float(f"{np.nanmedian((x / longest.loc[x.index, 'lr_best']).to_numpy()):.3g}")
                               if x.notna().any() else float("nan")),
    ).reset_index()
    out.append("**Per class: spread of lr_best and lr_fail_min (longest horizon, 10% / 50% / 90%)**\n\n"
               + _table(fam))
    rel = (longest["best_loss"] / longest["marginal_loss"]).replace([np.inf, -np.inf], np.nan)
    dist = pd.DataFrame({"B / R": _bins(rel, [0, 0.25, 0.5, 0.75, 0.9, 0.98, 1.0, 10.0], "{:g}")})
    dist = dist.groupby("B / R").size().rename("models").reset_index()
    out.append("**Best final eval loss B relative to the marginal loss R (models, longest horizon)**\n\n"
               + _table(dist))
    return "\n\n".join(out) + "\n"


def plot_scale(runs: pd.DataFrame, path: Path) -> Path:
    """lr_fail_min against width (scale-width stages) per horizon, written atomically to ``path``."""
    import os

    from matplotlib.figure import Figure   # no pyplot: no global figure state, no backend switch

    m = _per_model(runs)
    m = m[m["stage"].astype(str).str.startswith("scale-width")]
    if not len(m):
        raise ValueError("no scale-width models in this corpus: nothing to plot")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for (fam, steps), g in m.groupby(["family", "steps"]):
        g = g.sort_values("d_model")
        ax.plot(g["d_model"], g["lr_fail_min"], marker="o", label=f"{fam}, {steps} steps")
    ax.set(xscale="log", yscale="log", xlabel="width d_model", ylabel="lr_fail_min",
           title="first failed LR on the scale ladders")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: the datasheet Markdown of a corpus folder on stdout (module doc)."""
    import argparse

    from risk_model.errors import CorpusError

    from .runner import load_corpus

    ap = argparse.ArgumentParser(description="datasheet tables of a sweep corpus")
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of lr_fail_min vs width (full-ladder corpora)")
    args = ap.parse_args(argv)
    try:
        runs, layers = load_corpus(args.corpus)
        if "failed" in runs:
            text = ladder_v3_markdown(runs, layers)
        else:
            text = ladder_markdown(runs, layers) if "model_id" in runs else summary_markdown(runs, layers)
        if args.plot is not None:
            plot_scale(runs, args.plot)
    except (CorpusError, OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def ladder_v3_markdown(runs: pd.DataFrame, layers: pd.DataFrame | None = None) -> str:
    """A full-ladder corpus: the v3 section, then the per-run tables of a ladder corpus."""
    runs = runs.assign(bracketed=runs["lr_fail_min"].notna() & runs["lr_fail_lo"].notna())
    return full_ladder_markdown(runs) + "\n" + ladder_markdown(runs, layers)


if __name__ == "__main__":
    sys.exit(main())
