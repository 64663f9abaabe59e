"""Study (not shipped): a sweep-aware stop rule for the runs of one LR ladder, on corpus-v3's stored curves.

The single-run detector (``risk_model.detector``) cannot know the model's best loss B, so it misses
most "plateau high" failures (a run that learns, but ends far above what its best sibling reaches).
In an LR sweep the siblings are there. This rule stops a run at point t when

- its LR is above the LR of the sibling with the lowest smoothed loss at t (B_t), and
- its smoothed loss (trailing mean of ``SMOOTH`` stored points, every 10 steps) is above
  B_t + θ (R − B_t), R the task's marginal loss (``labels.failed``'s clause with θ for ½),
- for ``persist`` × planned points in a row (at least 3), not before ``fmin`` × planned steps;

and at the first non-finite loss; a run on the paper's divergence label counts as stopped (the hard
rule). Runs: corpus-v3's full-length rows, labels as stored. Keep-running runs: not failed and
final eval loss ≤ 1.05 × the model's best. The grid point is chosen leave-one-class-out (most recall
with false alarms ≤ 2% on the other classes, then most steps saved; the fewest false alarms where
no grid point keeps 2%) and scored on the held-out class.

    python -u benchmarks/ladder_rule.py   # about a minute; writes benchmarks/results/ladder_rule.json
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "ladder_rule.json"
SMOOTH = 3
GRID = dict(theta=(0.5, 0.6, 0.7, 0.8), fmin=(0.05, 0.1, 0.2), persist=(0.02, 0.05, 0.1))
FA_BUDGET = 0.02


def smooth(c, k=SMOOTH):
    c = np.asarray(c, float)  # (n_points,)
    out = np.convolve(c, np.ones(k) / k)[: len(c)]
    for i in range(min(k - 1, len(c))):
        out[i] = c[: i + 1].mean()
    return out


def stops(f: pd.DataFrame, theta: float, fmin: float, persist: float) -> np.ndarray:
    """Fraction of the planned steps saved per run (NaN: not stopped), in the row order of ``f``."""
    saved = pd.Series(np.nan, index=f.index)
    for _, g in f.groupby("model_id"):
        cs = [smooth(c) for c in g.loss_curve_10]
        M = np.full((len(cs), max(map(len, cs))), np.nan)  # (n_runs, n_points)
        for i, c in enumerate(cs):
            M[i, : len(c)] = c
        Mf = np.where(np.isfinite(M), M, np.inf)
        B, lr_b = Mf.min(0), g.lr.to_numpy()[Mf.argmin(0)]  # (n_points,)
        R = float(g.marginal_loss.iloc[0])
        for i, row in enumerate(g.itertuples()):
            planned = int(np.ceil(row.steps / 10))
            need = max(3, int(round(persist * planned)))
            c = M[i, : len(cs[i])]
            cond = (row.lr > lr_b[: len(c)]) & (c > B[: len(c)] + theta * (R - B[: len(c)]))
            cond[: int(np.ceil(fmin * planned))] = False
            stop, run = None, 0
            for t in range(len(c)):
                if not np.isfinite(c[t]):
                    stop = t
                    break
                run = run + 1 if cond[t] else 0
                if run >= need:
                    stop = t
                    break
            if stop is None and row.diverged:
                stop = len(c)
            if stop is not None:
                saved[row.Index] = 1 - stop / planned
    return saved.to_numpy()


def metrics(f, saved) -> dict:
    hit = ~np.isnan(saved)
    F, K = f.failed.to_numpy(bool), f.keep.to_numpy(bool)
    nl = f.never_learns.to_numpy(bool)
    return dict(n_failed=int(F.sum()), n_keep=int(K.sum()), recall=float(hit[F].mean()),
                recall_learning_models=float(hit[F & ~nl].mean()) if (F & ~nl).any() else None,
                saved_median=float(np.median(saved[F & hit])) if (F & hit).any() else None,
                false_alarm=float(hit[K].mean()) if K.any() else None, n_false_alarm=int(hit[K].sum()))


def main():
    r = pd.read_parquet(REPO / "datasets/corpus-v3/runs.parquet")
    f = r[r.steps == r.horizon_of].reset_index(drop=True)
    f["keep"] = ~f.failed & (f.final_eval_loss <= 1.05 * f.best_loss)
    combos = list(itertools.product(*GRID.values()))
    S = {c: stops(f, *c) for c in combos}
    grid = [dict(zip(GRID, c), **metrics(f, S[c])) for c in combos]
    loco, held = {}, np.full(len(f), np.nan)
    for cls in sorted(f.family.unique()):
        tr, te = (f.family != cls).to_numpy(), (f.family == cls).to_numpy()
        m_tr = {c: metrics(f[tr], S[c][tr]) for c in combos}
        ok = [c for c in combos if m_tr[c]["false_alarm"] <= FA_BUDGET]
        # most recall within the budget; where no grid point keeps it, the fewest false alarms
        best = (max(ok, key=lambda c: (m_tr[c]["recall"], m_tr[c]["saved_median"])) if ok
                else min(combos, key=lambda c: (m_tr[c]["false_alarm"], -m_tr[c]["recall"])))
        held[te] = S[best][te]
        loco[cls] = dict(zip(GRID, best), **metrics(f[te], S[best][te]))
    out = dict(runs=int(len(f)), models=int(f.model_id.nunique()), smooth_points=SMOOTH, fa_budget=FA_BUDGET,
               heldout_pooled=metrics(f, held), heldout_per_class=loco, grid_in_sample=grid)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    p = out["heldout_pooled"]
    print(f"leave-one-class-out, pooled: recall {p['recall']:.3f} (models that learn: {p['recall_learning_models']:.3f}), "
          f"steps saved median {p['saved_median']:.2f}, false alarms {p['false_alarm']:.3f} "
          f"({p['n_false_alarm']}/{p['n_keep']})")
    for cls, m in loco.items():
        print(f"  {cls:10s} θ {m['theta']} fmin {m['fmin']} persist {m['persist']}: recall {m['recall']:.2f} "
              f"FA {m['false_alarm'] if m['false_alarm'] is not None else float('nan'):.3f} ({m['n_false_alarm']}/{m['n_keep']})")
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
