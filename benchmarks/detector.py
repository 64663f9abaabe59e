"""Failure detector on corpus-v2's stored curves, leave-one-class-out, against the simple stopping
rules; writes results/detector.json and ../reports/detector.md, and (``--fit-default``) fits the
shipped detector on every class: models/default/detector/detector.json.

Run: ``python benchmarks/detector.py [--fit-default]`` (about a CPU-minute).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package when this file is run as a script
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "detector.json"
REPORT = ROOT / "reports" / "detector.md"
CORPUS = ROOT / "datasets" / "corpus-v2" / "runs.parquet"
DEFAULT = ROOT / "models" / "default" / "detector" / "detector.json"
TARGETS = dict(recall=0.90, saved_median=0.50, false_alarm=0.02)


def _pct(v):
    return "–" if v != v else f"{100 * v:.1f}%"


def table(res: dict, cls: str | None = None) -> str:
    head = ("| rule | recall (failed) | median steps saved (stopped) | median saved (all failed) | false alarms "
            "| recall: diverged / lost progress / never learns |\n|---|---|---|---|---|---|\n")
    rows = []
    for name, m in res["methods"].items():
        p = m["pooled"] if cls is None else m["per_class"][cls]
        k = p["recall_by_kind"]
        rows.append(f"| {name} | {_pct(p['recall'])} | {_pct(p['saved_median'])} | {_pct(p['saved_median_all'])} "
                    f"| {_pct(p['false_alarm'])} ({p['n_false_alarm']}/{p['n_keep_running']}) "
                    f"| {_pct(k['diverged'])} / {_pct(k['lost progress'])} / {_pct(k['never learns'])} |")
    return head + "\n".join(rows) + "\n"


def per_class_table(res: dict, name: str) -> str:
    head = ("| held-out class | failed runs | recall | median steps saved | false alarms | p_stop (fitted without it) |\n"
            "|---|---|---|---|---|---|\n")
    rows = []
    for cls in res["classes"]:
        p = res["methods"][name]["per_class"][cls]
        rows.append(f"| {cls} | {p['n_failed']} | {_pct(p['recall'])} | {_pct(p['saved_median'])} | "
                    f"{_pct(p['false_alarm'])} ({p['n_false_alarm']}/{p['n_keep_running']}) | "
                    f"{res['thresholds'][cls]:.4f} |")
    p = res["methods"][name]["pooled"]
    rows.append(f"| **pooled** | {p['n_failed']} | {_pct(p['recall'])} | {_pct(p['saved_median'])} | "
                f"{_pct(p['false_alarm'])} ({p['n_false_alarm']}/{p['n_keep_running']}) | |")
    return head + "\n".join(rows) + "\n"


def met(p: dict) -> str:
    ok = [p["recall"] >= TARGETS["recall"], p["saved_median"] >= TARGETS["saved_median"],
          p["false_alarm"] <= TARGETS["false_alarm"]]
    words = ["recall ≥ 90%", "≥ 50% of steps saved", "false alarms ≤ 2%"]
    return "; ".join(f"{w}: {'met' if o else 'NOT met'}" for w, o in zip(words, ok))


def report(res: dict) -> str:
    lab = res["labels"]
    d = res["methods"]["detector"]["pooled"]
    return f"""# Stopping a failing run early: the failure detector on corpus-v2

Written by `python benchmarks/detector.py` (numbers: `benchmarks/results/detector.json`).

**Data.** corpus-v2's {lab['runs']} runs (300 planned steps each), 50 stored points per curve (loss and
gradient norm at evenly spaced steps of the steps run; a diverged run stops at its diverge step).
Labels from `risk_model.labels`: `failed` by `ladder_summary` per model (final train loss as the
eval loss) — {lab['failed']} failed ({lab['by_kind']['diverged']} diverged,
{lab['by_kind']['lost progress']} lost progress, {lab['by_kind']['never learns']} in models that never learn),
{lab['by_kind']['ok']} not failed; `unstable` {lab['unstable']}. The runs that must not be stopped
(*keep-running*): not failed and final loss within 5% of the model's best, {lab['keep_running']} runs.

**Protocol.** Leave-one-class-out over `family` (7 classes): the detector and its stopping threshold
`p_stop` are fitted on the other six classes; the held-out class is scored. Steps saved = (300 − stop
step) / 300. The simple rules have nothing fitted.

**Verdict (pooled, held-out): {met(d)}.** Recall {_pct(d['recall'])}, median {_pct(d['saved_median'])} of the
steps saved on the runs it stops, false alarms {_pct(d['false_alarm'])}.

## Pooled over the held-out classes

{table(res)}
## The detector per held-out class

{per_class_table(res, 'detector')}
Reasons the detector gave when it stopped (held-out): {json.dumps(res['detector_reasons'])}.

## Per class, every rule

""" + "\n".join(f"### {cls}\n\n{table(res, cls)}" for cls in res["classes"]) + f"""
## What the rules are

- `detector`: `risk_model.detector.FailureDetector` (hard rule = the paper's divergence rule, then a
  logistic P(failed) on scale-free curve features, stop at P ≥ p_stop chosen so that ≤ 1% of the
  training classes' keep-running runs are ever stopped). Parameters: {json.dumps(res['detector_params'])}.
- `nan`: stop at the first non-finite loss (fastai `TerminateOnNaNCallback`).
- `k x_min`: loss > k × the lowest loss before it.
- `lightning_dt_*`: Lightning `EarlyStopping(check_finite=True, divergence_threshold=D)` on the training
  loss at every stored point, patience off, D = factor × the run's initial loss (Lightning needs an
  absolute D).
- `fastai_div_4x_best`: fastai `LRFinder`'s stop: the smoothed loss (`AvgSmoothLoss`, β = 0.98 per step,
  debiased; β^Δ across a gap of Δ steps between stored points) > 4 × its best so far; non-finite stops.
- `divergence_rule`: loss > 50, gradient norm > 500 or non-finite (`labels.divergence_reason`).

## Caveats

- The curves hold every ~6th step of a full run, so the rules see fewer points than in a live run
  (a per-step spike between stored points is missed, and a live run would be checked more often).
- A diverged run's curve ends at its diverge step: a rule that would have fired later in a run left
  going (e.g. the NaN check after the loss passed 50) counts as a miss.
- Most failures here are in models that never learn in 300 steps: a run that has not learned by a
  given step looks like a slow run that will, which bounds early recall at a low false-alarm rate.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-default", action="store_true", help="also fit and write the shipped detector")
    a = ap.parse_args(argv)
    import pandas as pd

    from risk_model.detector import FailureDetector
    from risk_model.detector_eval import evaluate, label_runs, run_curves

    runs = pd.read_parquet(CORPUS)
    t0 = time.perf_counter()
    res = evaluate(runs)
    res["seconds"] = time.perf_counter() - t0
    OUT.write_text(json.dumps(res, indent=1, default=float) + "\n")
    REPORT.write_text(report(res))
    print(table(res))
    if a.fit_default:
        df = label_runs(runs)
        det = FailureDetector().fit(run_curves(df), df["failed"], keep_running=df["keep_running"])
        det.save(DEFAULT)
        print(f"wrote {DEFAULT} (p_stop {det.p_stop_:.4f}, {det.n_runs_} runs)")


if __name__ == "__main__":
    main()
