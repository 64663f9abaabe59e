"""Fit and measure the sweep-aware stop rule (``risk_model.ladder_watch``) on corpus-v3's stored curves.

The single-run detector (``risk_model.detector``) cannot know the model's best loss B, so it misses
most "plateau high" failures (a run that learns, but ends far above what its best sibling reaches).
In an LR sweep the siblings are there. Each model's ladder is replayed side by side through the
library's own rule (``ladder_watch.replay``: its definition is in that module) for every point of a
grid of its parameters; a run on the paper's divergence label counts as stopped at its divergence
step (the watch, reading every step, stops it there). Runs: corpus-v3's full-length rows, labels as
stored. Keep-running runs: not failed and final eval loss ≤ 1.05 × the model's best. The grid point
is chosen leave-one-class-out (most recall with false alarms ≤ 2% on the other classes, then most
steps saved; the fewest false alarms where no grid point keeps 2%) and scored on the held-out class.
``--fit-default`` writes the point chosen the same way on every class, with the held-out precision
(the verdict's P(failed) once failing), to ``models/default/detector/ladder.json``.

    python -u benchmarks/ladder_rule.py [--fit-default]   # ~3-5 min; writes benchmarks/results/ladder_rule.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package (imported on the way to the default rule's path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from risk_model.ladder_watch import LadderRule, default_rule_path, replay_runs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "ladder_rule.json"
SMOOTH = 3
GRID = dict(theta=(0.5, 0.6, 0.7, 0.8), fmin=(0.1, 0.2), persist=(0.05, 0.1), min_gap=(0.0, 0.1, 0.2))
FA_BUDGET = 0.02


def stops(f: pd.DataFrame, theta: float, fmin: float, persist: float, min_gap: float = 0.0) -> np.ndarray:
    """Fraction of the planned steps saved per run (NaN: not stopped), in the row order of ``f``:
    each model's ladder replayed side by side through ``risk_model.ladder_watch``."""
    rule = LadderRule(theta=theta, fmin=fmin, persist=persist, min_gap=min_gap, smooth_points=SMOOTH)
    stop = replay_runs(f, rule)
    saved = 1 - np.minimum(stop, f.steps) / f.steps  # NaN where never stopped
    return saved.to_numpy()


def metrics(f, saved) -> dict:
    hit = ~np.isnan(saved)
    F, K = f.failed.to_numpy(bool), f.keep.to_numpy(bool)
    nl = f.never_learns.to_numpy(bool)
    return dict(n_failed=int(F.sum()), n_keep=int(K.sum()), recall=float(hit[F].mean()),
                recall_learning_models=float(hit[F & ~nl].mean()) if (F & ~nl).any() else None,
                saved_median=float(np.median(saved[F & hit])) if (F & hit).any() else None,
                false_alarm=float(hit[K].mean()) if K.any() else None, n_false_alarm=int(hit[K].sum()),
                n_stopped=int(hit.sum()), precision=float(F[hit].mean()) if hit.any() else None)


def choose(m: dict):
    """The grid point with most recall within the false-alarm budget (then most steps saved); where
    none keeps it, the fewest false alarms."""
    ok = [c for c in m if m[c]["false_alarm"] <= FA_BUDGET]
    if ok:
        return max(ok, key=lambda c: (m[c]["recall"], m[c]["saved_median"] or 0.0))
    return min(m, key=lambda c: (m[c]["false_alarm"], -m[c]["recall"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-default", action="store_true",
                    help="also write the rule chosen on every class, with its held-out precision, to "
                         "models/default/detector/ladder.json")
    args = ap.parse_args(argv)
    r = pd.read_parquet(REPO / "datasets/corpus-v3/runs.parquet")
    f = r[r.steps == r.horizon_of].reset_index(drop=True)
    f["keep"] = ~f.failed & (f.final_eval_loss <= 1.05 * f.best_loss)
    combos = list(itertools.product(*GRID.values()))
    S = {}
    for k, c in enumerate(combos, 1):
        S[c] = stops(f, *c)
        print(f"\rreplayed {k}/{len(combos)} grid points", end="", flush=True)
    print()
    grid = [dict(zip(GRID, c), **metrics(f, S[c])) for c in combos]
    loco, held = {}, np.full(len(f), np.nan)
    for cls in sorted(f.family.unique()):
        tr, te = (f.family != cls).to_numpy(), (f.family == cls).to_numpy()
        best = choose({c: metrics(f[tr], S[c][tr]) for c in combos})
        held[te] = S[best][te]
        loco[cls] = dict(zip(GRID, best), **metrics(f[te], S[best][te]))
    pooled = metrics(f, held)
    # the synthetic tasks memorise (train loss far below eval loss), the real-data ones do not
    per_task = {t: metrics(f[m], held[m]) for t in sorted(f.task.unique()) for m in [(f.task == t).to_numpy()]}
    chosen = choose({c: metrics(f, S[c]) for c in combos})
    out = dict(runs=int(len(f)), models=int(f.model_id.nunique()), smooth_points=SMOOTH, fa_budget=FA_BUDGET,
               heldout_pooled=pooled, heldout_per_class=loco, heldout_per_task=per_task,
               chosen_on_all=dict(zip(GRID, chosen), **metrics(f, S[chosen])), grid_in_sample=grid)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    p = out["heldout_pooled"]
    print(f"leave-one-class-out, pooled: recall {p['recall']:.3f} (models that learn: {p['recall_learning_models']:.3f}), "
          f"steps saved median {p['saved_median']:.2f}, false alarms {p['false_alarm']:.3f} "
          f"({p['n_false_alarm']}/{p['n_keep']}), precision {p['precision']:.3f}")
    for cls, m in loco.items():
        print(f"  {cls:10s} θ {m['theta']} fmin {m['fmin']} persist {m['persist']} min_gap {m['min_gap']}: recall {m['recall']:.2f} "
              f"FA {m['false_alarm'] if m['false_alarm'] is not None else float('nan'):.3f} ({m['n_false_alarm']}/{m['n_keep']})")
    for t, m in per_task.items():
        rl = m["recall_learning_models"]
        print(f"  task {t:12s}: recall {m['recall']:.3f} (models that learn: {rl if rl is not None else float('nan'):.3f}), "
              f"FA {m['false_alarm'] if m['false_alarm'] is not None else float('nan'):.3f} ({m['n_false_alarm']}/{m['n_keep']})")
    print("chosen on every class: " + ", ".join(f"{k} {v}" for k, v in zip(GRID, chosen)))
    print(f"wrote {OUT.relative_to(REPO)}")
    if args.fit_default:
        rule = LadderRule(**dict(zip(GRID, chosen)), smooth_points=SMOOTH, precision=round(p["precision"], 4))
        print(f"wrote {rule.save(default_rule_path()).relative_to(REPO)}")


if __name__ == "__main__":
    main()
