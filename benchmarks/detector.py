"""Failure detector on stored training curves, leave-one-class-out, against the simple stopping
rules; writes results/detector.json and ../reports/detector.md, and (``--fit-default``) fits the
shipped detector on every class: models/default/detector/detector.json.

Run: ``python benchmarks/detector.py [--fit-default]`` (corpus-v2, about a CPU-minute).

Other corpora: ``--corpus PATH`` (repeatable; several are pooled, each class held out of all of
them); ``--shipped`` scores the shipped detector on them instead of fitting (nothing fitted);
``--out`` names the JSON (the report is left alone). ``--v3`` is the corpus-v3 study: the shipped
detector (fitted on corpus-v2) on corpus-v3, leave-one-class-out on corpus-v3 alone and on
corpus-v2 + corpus-v3 pooled, in results/detector_v3.json and the report's "On corpus-v3" section
(about two CPU-minutes). ``--prior`` is the study of the two optional inputs, the pre-flight
P(failed) (held out) and the marginal loss R, in results/detector_prior.json and the report's last
section (about 25 minutes on the loaded machine); with ``--fit-default`` it writes the variants that
ship beside the shipped detector (and removes those that do not).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# benchmarks/featurize.py would shadow the featurize package when this file is run as a script
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's risk_model, not an installed one
OUT = ROOT / "benchmarks" / "results" / "detector.json"
REPORT = ROOT / "reports" / "detector.md"
OUT_V3 = ROOT / "benchmarks" / "results" / "detector_v3.json"
CORPUS = ROOT / "datasets" / "corpus-v2" / "runs.parquet"
CORPUS_V3 = ROOT / "datasets" / "corpus-v3" / "runs.parquet"
DEFAULT = ROOT / "models" / "default" / "detector" / "detector.json"
TARGETS = dict(recall=0.90, saved_median=0.50, false_alarm=0.02)


def _pct(v):
    return "–" if v != v else f"{100 * v:.1f}%"


def table(res: dict, cls: str | None = None, corpus: str | None = None) -> str:
    head = ("| rule | recall (failed) | median steps saved (stopped) | median saved (all failed) | false alarms "
            "| recall: diverged / lost progress / never learns |\n|---|---|---|---|---|---|\n")
    rows = []
    for name, m in res["methods"].items():
        if corpus is not None:
            m = m["per_corpus"][corpus]
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


def _cell(p: dict) -> str:
    return (f"{_pct(p['recall'])} · {_pct(p['saved_median'])} · "
            f"{_pct(p['false_alarm'])} ({p['n_false_alarm']}/{p['n_keep_running']})")


def class_matrix(res: dict, corpus: str | None = None) -> str:
    """Every rule (rows) on every class (columns): recall · median saved (stopped) · false alarms."""
    classes = res["classes"]
    ms = res["methods"]
    get = (lambda m: m) if corpus is None else (lambda m: m["per_corpus"][corpus])
    p0 = get(ms["detector"])["per_class"]
    head = ("| rule | " + " | ".join(f"{c} ({p0[c]['n_failed']} f / {p0[c]['n_keep_running']} k)" for c in classes)
            + " | pooled |\n|---|" + "---|" * (len(classes) + 1) + "\n")
    rows = [f"| {name} | " + " | ".join(_cell(get(m)["per_class"][c]) for c in classes)
            + f" | {_cell(get(m)['pooled'])} |" for name, m in ms.items()]
    return head + "\n".join(rows) + "\n"


def compare_table(v2: dict, v3: dict) -> str:
    """The detector fitted three ways, scored on each corpus."""
    pool = v3["pooled_loco"]
    rows = [("corpus-v2", "corpus-v2 only, leave-one-class-out (today's)", v2["methods"]["detector"]["pooled"]),
            ("corpus-v2", "corpus-v2 + corpus-v3 pooled, leave-one-class-out",
             pool["methods"]["detector"]["per_corpus"]["corpus-v2"]["pooled"]),
            ("corpus-v3", "shipped (all of corpus-v2; nothing of corpus-v3)", v3["shipped"]["methods"]["detector"]["pooled"]),
            ("corpus-v3", "corpus-v3 only, leave-one-class-out", v3["v3_loco"]["methods"]["detector"]["pooled"]),
            ("corpus-v3", "corpus-v2 + corpus-v3 pooled, leave-one-class-out",
             pool["methods"]["detector"]["per_corpus"]["corpus-v3"]["pooled"])]
    if "pooled_loco_marginal" in v3:
        pm = v3["pooled_loco_marginal"]["methods"]["detector"]["per_corpus"]
        rows += [("corpus-v2", "*use_marginal*: corpus-v2 + corpus-v3 pooled, leave-one-class-out",
                  pm["corpus-v2"]["pooled"]),
                 ("corpus-v3", "*use_marginal*: corpus-v3 only, leave-one-class-out",
                  v3["v3_loco_marginal"]["methods"]["detector"]["pooled"]),
                 ("corpus-v3", "*use_marginal*: corpus-v2 + corpus-v3 pooled, leave-one-class-out",
                  pm["corpus-v3"]["pooled"])]
    head = ("| scored on | detector fitted on | recall (failed) | median steps saved (stopped) | median saved (all failed) "
            "| false alarms |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(f"| {c} | {w} | {_pct(p['recall'])} ({p['n_failed']} failed) | {_pct(p['saved_median'])} "
                             f"| {_pct(p['saved_median_all'])} | {_pct(p['false_alarm'])} "
                             f"({p['n_false_alarm']}/{p['n_keep_running']}) |" for c, w, p in rows) + "\n"


def _span(res: dict, key: str) -> str:
    v = [p[key] for p in res["methods"]["detector"]["per_class"].values()]
    return f"{min(v)}–{max(v)}"


def report_v3(v2: dict, v3: dict) -> str:
    sh = v3["shipped"]
    lab = sh["labels"]
    k = lab["by_kind"]
    chk = sh.get("label_check") or {}
    d = sh["methods"]["detector"]["pooled"]
    dp = sh["detector_params"]
    loco = v3["v3_loco"]
    pool = v3["pooled_loco"]
    return f"""
## On corpus-v3

Written by `python benchmarks/detector.py --v3` (numbers: `benchmarks/results/detector_v3.json`).

**Data.** corpus-v3 as it stands ({v3['corpus_rows']} rows; a sweep is still adding to it): {lab['runs']}
training runs of {lab['models']} models in {len(sh['classes'])} classes (`family`), {v3['planned_steps']} planned steps,
constant LR after a 30–50-step warmup, tasks {v3['tasks']}. Each run is stored once per horizon it
was read at (300, 1000 and its full length); only the full-length row (`steps == horizon_of`) is
used, so no curve counts twice. The curve: the points every 10 steps (`loss_curve_10`) merged with the
50 evenly spaced ones (`loss_curve`, ending at the last step run).
Labels: `failed` by `ladder_summary` per model on the held-out **final eval loss** (`final_eval_loss`;
corpus-v2 had only the train loss) — {lab['failed']} failed ({k['diverged']} diverged, {k['lost progress']} lost
progress, {k['never learns']} in models that never learn), {k['ok']} not failed; recomputed here and equal
to the corpus's stored `failed` on {chk.get('runs', 0) - chk.get('disagree', 0)}/{chk.get('runs', 0)} runs.
Keep-running (not failed, eval loss within 5% of the model's best): {lab['keep_running']} runs.
`unstable` {lab['unstable']}. Steps saved = (planned steps − stop step) / planned steps.

**Small n.** {lab['models']} models, {lab['failed']} failed runs, {lab['keep_running']} keep-running runs in all,
{_span(sh, 'n_failed')} failed and {_span(sh, 'n_keep_running')} keep-running per class: one run moves a class's recall by 25–50 points and the pooled
false-alarm rate by {100 / max(lab['keep_running'], 1):.1f} points. Read the per-class numbers as counts, not rates;
the pooled numbers are the ones to read, and even they are wide.

### The shipped detector on corpus-v3 (a new corpus: nothing fitted)

The shipped detector (`models/default/detector/detector.json`, fitted on all of corpus-v2's 300-step
runs: p_stop {dp['p_stop']:.4f}, lost_stop {dp['lost_stop']:.3f}) read every corpus-v3 curve; its features
are fractions of the planned steps and ratios of the run's own loss, so it takes the 1000-step horizon
as it is. Pooled: recall {_pct(d['recall'])}, median {_pct(d['saved_median'])} of the steps saved on the runs it
stops, false alarms {_pct(d['false_alarm'])} ({d['n_false_alarm']}/{d['n_keep_running']}). {met(d)}.

{table(sh)}
Per class (cells: recall · median steps saved on the runs stopped · false alarms (n/keep-running);
column heads: failed / keep-running runs):

{class_matrix(sh)}
Reasons the shipped detector gave when it stopped: {json.dumps(sh['detector_reasons'])}.

### Fitted leave-one-class-out on corpus-v3 alone

{table(loco)}
{per_class_table(loco, 'detector')}
### Fitted leave-one-class-out on corpus-v2 + corpus-v3 pooled

Each family is held out of both corpora at once; the detector and p_stop are fitted on the other six
families' runs of both ({pool['labels']['runs']} runs: {pool['labels_per_corpus']['corpus-v2']['runs']} of corpus-v2,
{pool['labels_per_corpus']['corpus-v3']['runs']} of corpus-v3; the false-alarm budget of p_stop is counted over
both corpora's keep-running runs, {pool['labels']['keep_running']}, of which corpus-v3's are
{pool['labels_per_corpus']['corpus-v3']['keep_running']}). The held-out scores, per corpus:

{compare_table(v2, v3)}
corpus-v3 per class, pooled fit (held out), every rule:

{class_matrix(pool, 'corpus-v3')}
p_stop per held-out class (pooled fit): {json.dumps({c: round(t, 4) for c, t in pool['thresholds'].items()})}.

### What the numbers say

{_reading(v3)}

**Shipped detector:** {v3['decision']}
"""


def _reading(v3: dict) -> str:
    import statistics

    sh = v3["shipped"]["methods"]
    k = v3["shipped"]["labels"]["by_kind"]
    rules = [n for n in sh if n != "detector"]
    best_rule = max(rules, key=lambda n: (sh[n]["pooled"]["recall"], -sh[n]["pooled"]["false_alarm"]))
    lost = v3["lost_progress_runs"]
    by_task = {}
    for r in lost:
        by_task.setdefault(r["task"], []).append(r)
    parts = []
    for t, rs in sorted(by_task.items()):
        fr = [r["lost_of_progress"] for r in rs]
        below = sum(r["min"] < r["marginal"] for r in rs)
        parts.append(f"{len(rs)} on `{t}` (train loss from about {statistics.median(r['init'] for r in rs):.2f} to a "
                     f"minimum below the marginal loss R in {below}; the end of the curve {100 * min(fr):.0f}–"
                     f"{100 * max(fr):.0f}% of that progress above its minimum, median {100 * statistics.median(fr):.0f}%)")
    vm = v3["v3_loco_marginal"]["methods"]["detector"]["pooled"]
    _mv2 = v3["marginal_v3_fit_on_v2"]["methods"]["detector"]["pooled"]
    pm = v3["pooled_loco_marginal"]["methods"]["detector"]["per_corpus"]
    pool = v3["pooled_loco"]["labels_per_corpus"]
    return f"""- Every simple rule stops only runs that blow up: the best, `{best_rule}`, has recall
  {_pct(sh[best_rule]['pooled']['recall'])}, and corpus-v3 has {k['diverged']} diverged runs of {v3['shipped']['labels']['failed']}
  failed. Keep-running runs stopped (of {v3['shipped']['labels']['keep_running']}): at most
  {max(m['pooled']['n_false_alarm'] for m in sh.values())} by any rule or the shipped detector.
- The failures corpus-v3 adds are "lost progress" at LRs above the model's best ({k['lost progress']} runs): {'; '.join(parts)}.
  The label measures progress from R (fail above B + ½(R − B) on the eval loss); the detector's `lost` and
  `progress` features measure it from the run's initial loss. On `text_bytes` the initial loss (ln 256 ≈ 5.5) is far
  above R (≈ 3.3), so a run that plateaus between B and R has lost little of its progress by that measure and
  looks like a healthy run. On `synthetic_lm` the runs do lose progress on the curve, but the shipped
  lost-progress stop sits at {v3['shipped']['detector_params']['lost_stop']:.3f} of it (set so that corpus-v2's keep-running runs
  are not stopped). The shipped detector stops {_pct(sh['detector']['pooled']['recall_by_kind']['lost progress'])} of the
  lost-progress runs.
- Fitted on corpus-v3's own other classes the detector stops more ({_pct(v3['v3_loco']['methods']['detector']['pooled']['recall'])}),
  and with the marginal-loss features (`use_marginal=True`, the gap of the loss to R) {_pct(vm['recall'])}
  at {_pct(vm['false_alarm'])} false alarms ({vm['n_false_alarm']}/{vm['n_keep_running']}); with {v3['shipped']['labels']['failed']}
  failed and {v3['shipped']['labels']['keep_running']} keep-running runs that is suggestive, not established. It does not
  carry over to another task family: fitted on every corpus-v3 run and read on corpus-v2's curves (synthetic tasks,
  where R is about the initial loss) it stops {_mv2['n_false_alarm']}/{_mv2['n_keep_running']} keep-running runs
  ({_pct(_mv2['false_alarm'])}) at {_pct(_mv2['recall'])} recall, so it is not shipped.
- Pooling does not carry it over: corpus-v2 has {pool['corpus-v2']['runs']} runs to corpus-v3's {pool['corpus-v3']['runs']},
  every run weighs the same in the fit and in p_stop's false-alarm budget, so the pooled fit is in effect the corpus-v2
  fit (on corpus-v3 it scores as the shipped one does: {_pct(v3['pooled_loco']['methods']['detector']['per_corpus']['corpus-v3']['pooled']['recall'])}
  recall; with `use_marginal` {_pct(pm['corpus-v3']['pooled']['recall'])}, and on corpus-v2 `use_marginal` has more false
  alarms, {pm['corpus-v2']['pooled']['n_false_alarm']}/{pm['corpus-v2']['pooled']['n_keep_running']}).
- Saved steps are lower than on corpus-v2 (shipped detector: median {_pct(sh['detector']['pooled']['saved_median'])} of the planned steps on
  corpus-v3 against {_pct(v3['v2_saved_median'])} of 300 on corpus-v2, held out): corpus-v2's stops were
  mostly blow-ups in the first steps; corpus-v3's diverged runs blow up later (steps run:
  {', '.join(str(x) for x in v3['diverge_steps'])}), and a lost-progress run can only be told late."""


def report(res: dict, v3: dict | None = None) -> str:
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
""" + ("" if v3 is None else report_v3(res, v3))


def _load(paths):
    """Each corpus's labelled runs (``label_runs``), named by its folder, and the rows read."""
    import pandas as pd

    from risk_model.detector_eval import label_runs, prepare

    frames, rows = [], {}
    for p in paths:
        p = Path(p)
        runs = pd.read_parquet(p)
        name = p.parent.name if p.name == "runs.parquet" else p.stem
        rows[name] = int(len(runs))
        frames.append(label_runs(prepare(runs, name)))
    return frames, rows


def _pool(frames):
    import pandas as pd

    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True, sort=False)


def _beats(a: dict, b: dict) -> bool:
    """``a`` clearly better than ``b``: recall and false alarms no worse, and recall up by 2 points
    or more (and by at least one run) or at least one false alarm fewer; median steps saved (stopped)
    not more than 5 points lower."""
    eps = 1e-12
    no_worse = a["recall"] >= b["recall"] - eps and a["false_alarm"] <= b["false_alarm"] + eps
    more_recall = a["recall"] - b["recall"] >= max(0.02, 1 / max(a["n_failed"], 1)) - eps
    fewer_fa = a["n_false_alarm"] < b["n_false_alarm"]
    saved_ok = not (a["saved_median"] < b["saved_median"] - 0.05)
    return no_worse and (more_recall or fewer_fa) and saved_ok


def study_v3(v2_path=CORPUS, v3_path=CORPUS_V3) -> dict:
    """The corpus-v3 study (module doc)."""
    from risk_model.detector import FailureDetector
    from risk_model.detector_eval import evaluate, evaluate_fixed

    (v2,), _ = _load([v2_path])
    (v3,), rows = _load([v3_path])
    t0 = time.perf_counter()
    shipped = evaluate_fixed(FailureDetector.load(DEFAULT), v3)
    v3_loco = evaluate(v3)
    pooled = evaluate(_pool([v2, v3]))
    marg = dict(use_marginal=True)
    v3_loco_m = evaluate(v3, detector_params=marg)
    pooled_m = evaluate(_pool([v2, v3]), detector_params=marg)
    # the marginal-aware detector fitted on every corpus-v3 run, read on corpus-v2 (another task family)
    from risk_model.detector_eval import label_runs, run_curves

    d3 = label_runs(v3)
    marg_v3 = FailureDetector(use_marginal=True).fit(run_curves(d3), d3["failed"].to_numpy(),
                                                     keep_running=d3["keep_running"].to_numpy())
    marg_v3_on_v2 = evaluate_fixed(marg_v3, v2)
    prev = json.loads(OUT.read_text()) if OUT.exists() else evaluate(v2)
    lp = v3[v3["kind"] == "lost progress"]
    lost = []
    for r in lp.itertuples():
        lo = min(r.curve_loss)
        lost.append(dict(task=r.task, family=r.family, init=r.curve_loss[0], min=lo, last=r.curve_loss[-1],
                         lost_of_progress=(r.curve_loss[-1] - lo) / max(r.curve_loss[0] - lo, 1e-12),
                         eval=r.label_loss, best=r.best_loss, marginal=r.marginal_loss))
    d = pooled["methods"]["detector"]["per_corpus"]
    better_v2 = _beats(d["corpus-v2"]["pooled"], prev["methods"]["detector"]["pooled"])
    better_v3 = _beats(d["corpus-v3"]["pooled"], shipped["methods"]["detector"]["pooled"])
    if better_v2 and better_v3:
        decision = ("the pooled corpus-v2 + corpus-v3 fit is better on both corpora (held out); "
                    "refit with `--fit-default --corpus` on both.")
    else:
        decision = ("kept as it is (fitted on corpus-v2 alone): the pooled corpus-v2 + corpus-v3 "
                    "leave-one-class-out fit is not clearly better on both corpora "
                    f"(on corpus-v2: {'better' if better_v2 else 'not better'} than corpus-v2 alone; on corpus-v3: "
                    f"{'better' if better_v3 else 'not better'} than the shipped detector; 'clearly better' = "
                    "recall and false alarms no worse, and recall up 2 points or more or one false alarm "
                    "fewer, with median steps saved not 5 points lower).")
    steps = v3.groupby("steps").size()
    return dict(corpus_rows=rows[v3["corpus"].iloc[0]],
                planned_steps=", ".join(f"{n} runs of {int(k)}" for k, n in steps.items()),
                tasks=", ".join(f"`{t}`" for t in sorted(v3["task"].unique())), shipped=shipped, v3_loco=v3_loco, pooled_loco=pooled,
                v3_loco_marginal=v3_loco_m, pooled_loco_marginal=pooled_m, marginal_v3_fit_on_v2=marg_v3_on_v2,
                lost_progress_runs=lost,
                diverge_steps=sorted(int(x) for x in v3.loc[v3["diverged"], "steps_run"]),
                v2_saved_median=prev["methods"]["detector"]["pooled"]["saved_median"],
                better=dict(v2=better_v2, v3=better_v3), decision=decision,
                seconds=time.perf_counter() - t0)


VARIANTS = {"base": {}, "prior": dict(use_prior=True), "marginal": dict(use_marginal=True),
            "prior+marginal": dict(use_prior=True, use_marginal=True)}
OUT_PRIOR = ROOT / "benchmarks" / "results" / "detector_prior.json"
PRIOR_SECTION = "\n## With the pre-flight P(failed) and the marginal loss"


def study_prior(v2_path=CORPUS, v3_path=CORPUS_V3):
    """The detector with the pre-flight P(failed) (``use_prior``, held out: ``preflight_priors``)
    and/or the marginal loss R (``use_marginal``), leave-one-class-out on corpus-v2 + corpus-v3
    pooled and on corpus-v3 alone; and which variants ship (``_beats`` the base on corpus-v3, held
    out, without more false alarms on corpus-v2). Returns (results, the scored runs with their priors)."""
    from risk_model.detector_eval import evaluate, preflight_priors

    t0 = time.perf_counter()
    frames, rows = _load([v2_path, v3_path])
    df = _pool(frames)
    df["prior"] = preflight_priors(df, [v2_path.parent, v3_path.parent])
    missing = int(np.isnan(df["prior"]).sum())
    df = df[np.isfinite(df["prior"])].reset_index(drop=True)
    v3 = df[df["corpus"] == "corpus-v3"].reset_index(drop=True)
    from sklearn.metrics import roc_auc_score

    prior_auroc = {c: float(roc_auc_score(g["failed"], g["prior"])) for c, g in df.groupby("corpus")}
    out = dict(rows=rows, runs_without_prior=missing, prior_auroc_on_failed=prior_auroc, pooled={}, v3_alone={})
    for name, params in VARIANTS.items():
        out["pooled"][name] = evaluate(df, detector_params=params, rules={})
        out["v3_alone"][name] = evaluate(v3, detector_params=params, rules={})
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    # fitted on every corpus-v3 run, read on corpus-v2's curves (another task family): does it carry over?
    from risk_model.detector import FailureDetector
    from risk_model.detector_eval import evaluate_fixed, run_curves

    v2 = df[df["corpus"] == "corpus-v2"].reset_index(drop=True)
    out["v3_fit_on_v2"] = {}
    for name, params in VARIANTS.items():
        det = FailureDetector(**params).fit(run_curves(v3), v3["failed"].to_numpy(),
                                            keep_running=v3["keep_running"].to_numpy())
        out["v3_fit_on_v2"][name] = evaluate_fixed(det, v2, rules={})["methods"]["detector"]["pooled"]
    base = out["pooled"]["base"]["methods"]["detector"]["per_corpus"]
    ships = {}
    for name in VARIANTS:
        if name == "base":
            continue
        pc = out["pooled"][name]["methods"]["detector"]["per_corpus"]
        ships[name] = bool(_beats(pc["corpus-v3"]["pooled"], base["corpus-v3"]["pooled"])
                           and pc["corpus-v2"]["pooled"]["false_alarm"] <= base["corpus-v2"]["pooled"]["false_alarm"] + 1e-12)
    out["ships"] = ships
    out["seconds"] = time.perf_counter() - t0
    return out, df


def report_prior(res: dict) -> str:
    head = ("| detector | fitted on | scored on | recall (failed) | median steps saved (stopped) | false alarms "
            "| recall: diverged / lost progress / never learns |\n|---|---|---|---|---|---|---|\n")
    rows = []
    for name in VARIANTS:
        for c in ("corpus-v2", "corpus-v3"):
            rows.append((name, "corpus-v2 + corpus-v3", c, res["pooled"][name]["methods"]["detector"]["per_corpus"][c]["pooled"]))
        rows.append((name, "corpus-v3 alone", "corpus-v3", res["v3_alone"][name]["methods"]["detector"]["pooled"]))
    for name in VARIANTS:
        rows.append((name, "corpus-v3 alone (all of it)", "corpus-v2", res["v3_fit_on_v2"][name]))
    body = "\n".join(f"| {n} | {f} | {c} | {_pct(p['recall'])} ({p['n_failed']}) | {_pct(p['saved_median'])} | "
                     f"{_pct(p['false_alarm'])} ({p['n_false_alarm']}/{p['n_keep_running']}) | "
                     f"{_pct(p['recall_by_kind']['diverged'])} / {_pct(p['recall_by_kind']['lost progress'])} / "
                     f"{_pct(p['recall_by_kind']['never learns'])} |" for n, f, c, p in rows)
    au = res["prior_auroc_on_failed"]
    shipped = [n for n, ok in res["ships"].items() if ok]
    return f"""{PRIOR_SECTION}

Written by `python benchmarks/detector.py --prior` (numbers: `benchmarks/results/detector_prior.json`;
{res['seconds'] / 60:.0f} minutes on the loaded machine). *prior*: the pre-flight P(failed) at the run's LR
(`use_prior`), held out as the detector is — predictor v3 (linear part, as shipped) fitted on the
other classes of both corpora (`detector_eval.preflight_priors`); its AUROC on `failed`, by itself:
corpus-v2 {au['corpus-v2']:.3f}, corpus-v3 {au['corpus-v3']:.3f}. *marginal*: the task's marginal loss R
(`use_marginal`). Leave-one-class-out; {res['runs_without_prior']} runs without a pre-flight prediction (dead at
init) are left out.

{head}{body}

A variant ships (`models/default/detector/detector_<variant>.json`) only if, fitted on both corpora and
held out, it is clearly better than the base on corpus-v3 (`_beats`) with no more false alarms on
corpus-v2: {', '.join(f'`{n}`' for n in shipped) if shipped else 'none does'}.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", action="append", type=Path,
                    help=f"a corpus's runs.parquet (repeatable, pooled; default {CORPUS.relative_to(ROOT)})")
    ap.add_argument("--shipped", action="store_true", help="score the shipped detector, fit nothing")
    ap.add_argument("--v3", action="store_true", help="the corpus-v3 study: results/detector_v3.json and the report")
    ap.add_argument("--out", type=Path, help="the results JSON (with --corpus or --shipped; the report is left alone)")
    ap.add_argument("--prior", action="store_true", help="the pre-flight-prior / marginal-loss study: "
                    "results/detector_prior.json, its section of the report, and (with --fit-default) the variants that ship")
    ap.add_argument("--fit-default", action="store_true", help="also fit and write the shipped detector "
                    "(on the corpora given, pooled)")
    a = ap.parse_args(argv)

    from risk_model.detector import FailureDetector
    from risk_model.detector_eval import evaluate, evaluate_fixed, run_curves

    if a.prior:
        resp, scored = study_prior()
        OUT_PRIOR.write_text(json.dumps(resp, indent=1, default=float) + "\n")
        text = REPORT.read_text()
        REPORT.write_text(text.split(PRIOR_SECTION)[0].rstrip() + "\n" + report_prior(resp))
        print(report_prior(resp))
        if a.fit_default:
            fit_variants(resp["ships"], scored)
        return
    if a.v3:
        res3 = study_v3()
        OUT_V3.write_text(json.dumps(res3, indent=1, default=float) + "\n")
        REPORT.write_text(report(json.loads(OUT.read_text()), res3))
        print("shipped detector on corpus-v3:\n" + table(res3["shipped"]))
        print(class_matrix(res3["shipped"]))
        print("leave-one-class-out on corpus-v3:\n" + table(res3["v3_loco"]))
        print(compare_table(json.loads(OUT.read_text()), res3))
        print(res3["decision"])
        return
    corpora = a.corpus or [CORPUS]
    default = [Path(p).resolve() for p in corpora] == [CORPUS.resolve()] and not a.shipped
    frames, _ = _load(corpora)
    df = _pool(frames)
    t0 = time.perf_counter()
    res = evaluate_fixed(FailureDetector.load(DEFAULT), df) if a.shipped else evaluate(df)
    res["seconds"] = time.perf_counter() - t0
    out = a.out or (OUT if default else OUT.with_name(
        "detector_" + ("shipped_" if a.shipped else "") + "_".join(sorted(df["corpus"].unique())) + ".json"))
    out.write_text(json.dumps(res, indent=1, default=float) + "\n")
    if default and a.out is None:
        REPORT.write_text(report(res, json.loads(OUT_V3.read_text()) if OUT_V3.exists() else None))
    print(table(res))
    for c in res.get("corpora", []) if len(res.get("corpora", [])) > 1 else []:
        print(f"{c}:\n" + table(res, corpus=c))
    print(f"wrote {out}")
    if a.fit_default:
        det = FailureDetector().fit(run_curves(df), df["failed"], keep_running=df["keep_running"])
        det.save(DEFAULT)
        print(f"wrote {DEFAULT} (p_stop {det.p_stop_:.4f}, {det.n_runs_} runs)")


def fit_variants(ships: dict, df) -> None:
    """Fit each variant that ships on every run of ``df`` (corpus-v2 + corpus-v3 with their held-out
    priors, as ``study_prior`` scored them) and write it beside the base detector; remove the file
    of a variant that does not ship."""
    from risk_model.detector import FailureDetector, default_detector_path
    from risk_model.detector_eval import run_curves

    for name, ok in ships.items():
        params = VARIANTS[name]
        path = default_detector_path(**params)
        if not ok:
            path.unlink(missing_ok=True)
            continue
        det = FailureDetector(**params).fit(run_curves(df), df["failed"], keep_running=df["keep_running"])
        det.save(path)
        print(f"wrote {path} (p_stop {det.p_stop_:.4f}, lost_stop {det.lost_stop_:.3f}, {det.n_runs_} runs)")


if __name__ == "__main__":
    main()
