"""Summary tables of a sweep corpus, as Markdown, for the datasheet (``datasets/README.md``).

    python -m risk_model.sweep.datasheet sweeps/corpus-v1
    python -m risk_model.sweep.datasheet datasets/corpus-v2      # ladder corpus: per-model tables too
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


if __name__ == "__main__":
    from .runner import load_corpus

    runs, layers = load_corpus(Path(sys.argv[1]))
    sys.stdout.write(ladder_markdown(runs, layers) if "model_id" in runs else summary_markdown(runs, layers))
