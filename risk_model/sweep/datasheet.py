"""Summary tables of a sweep corpus, as Markdown, for the datasheet (``datasets/README.md``).

    python -m risk_model.sweep.datasheet sweeps/corpus-v1
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


if __name__ == "__main__":
    from .runner import load_corpus

    runs, layers = load_corpus(Path(sys.argv[1]))
    sys.stdout.write(summary_markdown(runs, layers))
