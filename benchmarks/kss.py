"""KSS dose–response: does the paper's spectral penalty (Sec. 5.3) lower failure rates? Writes results/kss.json.

Two settings, each with six arms α ∈ ``ALPHAS`` (α = 0 is plain training; ``kss_every`` = 10, the other
``KoopmanSpectralShaping`` arguments its defaults, recorded in the output), the same seeds in every arm:

A. The paper's setting: GPT-style d = 64, L = 4, **no normalisation**, synthetic LM, AdamW, 50 warmup
   steps, 200 steps, seq 32, batch 16, at one high learning rate. The LR is picked by a pilot at α = 0
   on seeds of their own (``PILOT_SEEDS``, not used in the arms): of ``PILOT_LRS``, the one whose
   divergence rate is closest to 7/12 (the brief: "about half to two thirds"). Label: the paper's
   ``diverged`` (loss > 50 or gradient norm > 500 at some step; the trainer's label).
B. A normed class at its ``lr_fail``, on our ``failed`` label (``risk_model.labels``): the same model
   with Pre-LN, 200 steps, 4 held-out batches (the final eval loss). First a half-decade ladder at
   α = 0, seed 0 (``LADDER``); ``ladder_summary`` gives its best final eval loss B, best LR and
   ``lr_fail_min``. Then the arms at that ``lr_fail_min``, on seeds 1…24 (seed 0 failed there by
   construction, so it is left out); each run is labelled ``failed(diverged, lr, final_eval_loss,
   lr_best, B, R)`` with B and lr_best of the seed-0 ladder and R the task's marginal loss.

Per arm: runs, failures, rate with a 95% Wilson interval, and against α = 0 the two-sided Fisher exact
p-value and sample odds ratio (``scipy.stats.fisher_exact``; the arms are analysed as independent
samples), the rate difference with Newcombe's hybrid-score 95% interval (Newcombe 1998, method 10),
and, because the seeds are paired, the discordant seed counts with an exact McNemar p-value (two-sided
binomial test on the discordant pairs). No correction for the five comparisons per setting is applied
to the p-values; with Bonferroni the threshold would be 0.01.

Also the wall-time overhead of KSS per training step at α = 0.15 (trainer's loop timed directly, KSS
and plain steps interleaved in rounds so that load from other processes hits both alike).

The earlier single-arm benchmark (α = 0.15 at lr 1.5e-2 and 2e-2, and its largest-stable-LR scans) is
not rerun; its numbers are carried over under ``earlier_run``. Nothing serves KSS: no arm helped,
so ``risk predict`` and ``--what-if`` do not offer it.

Run: ``python benchmarks/kss.py`` (about 27 CPU-minutes, one process; ``--jobs N`` runs N in
parallel); ``--quick`` for a smoke run (a few short runs, two arms). ``--add-a-lr LR`` / ``--add-b-lr
LR`` (with ``--alphas``) run one more learning rate of setting A or B and add it to the stored result.
The committed result is ``python benchmarks/kss.py``, then ``--add-a-lr 1.6e-2`` (the pilot's pick,
1.7e-2, diverged in 19/24 seeds at α = 0, above the half-to-two-thirds aim; 9 CPU-minutes), then
``--add-b-lr 2e-2 --alphas 0,0.15,1.5`` (at B's lr_fail every run of every arm failed; 2e-2 lies
between lr_fail_lo and lr_fail; 8 CPU-minutes). Both were added after seeing the first run.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package when this file is run as a script
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from featurize.shaping import KoopmanSpectralShaping  # noqa: E402
from risk_model.labels import failed, ladder_summary  # noqa: E402
from risk_model.sweep import trainer  # noqa: E402
from risk_model.sweep.archs import build_network  # noqa: E402
from risk_model.sweep.spec import RunConfig  # noqa: E402
from risk_model.sweep.tasks import make_task  # noqa: E402
from risk_model.zoo import build_model  # noqa: E402

OUT = Path(__file__).parent / "results" / "kss.json"
BASE = RunConfig(norm="none", d_model=64, n_layers=4, n_heads=4, seq_len=32, batch_size=16,
                 steps=200, warmup=50, optimizer="adamw", task="synthetic_lm")
BASE_B = replace(BASE, norm="pre_ln", eval_batches=4)
ALPHAS = (0.0, 0.01, 0.05, 0.15, 0.5, 1.5)
EVERY = 10
SEEDS_A = tuple(range(24))
SEEDS_B = tuple(range(1, 25))
PILOT_LRS = (1.5e-2, 1.7e-2, 1.9e-2)
PILOT_SEEDS = tuple(range(100, 108))
PILOT_TARGET = 7 / 12
LADDER = tuple(10 ** (-3 + k / 2) for k in range(9))  # 1e-3, 3.16e-3, … 10
OVERHEAD_ALPHA = 0.15

# The earlier benchmark (commit 81fd7f8, same BASE, α = 0.15, every 10), carried over unchanged.
EARLIER = {
    "source": "benchmarks/kss.py before the dose-response rewrite (commit 81fd7f8); not rerun",
    "no_norm_high_lr": {"alpha": 0.15, "lrs": [1.5e-2, 2e-2], "seeds_per_lr": 12,
                        "no_kss": {"runs": 24, "diverged": 17}, "kss": {"runs": 24, "diverged": 16},
                        "by_lr": {"0.015": {"no_kss": [5, 12], "kss": [4, 12], "kss_control_alpha_1e-4": [3, 12]},
                                  "0.02": {"no_kss": [12, 12], "kss": [12, 12]}}},
    "max_stable_lr": {"none": {"without": 0.01414, "with": 0.01414},
                      "pre_ln": {"without": 0.4525, "with": 0.4525},
                      "rmsnorm": {"without": 0.9051, "with": 0.9051},
                      "how": "ascending sqrt(2) grid, 3 seeds per rate, stable = no seed diverged"},
    "overhead_pct": 3.7,
}


# --------------------------------------------------------------------------------- statistics
def wilson_ci(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (no continuity correction)."""
    if n <= 0:
        return (math.nan, math.nan)
    z = stats.norm.ppf(0.5 + conf / 2)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def newcombe_diff_ci(k1: int, n1: int, k2: int, n2: int, conf: float = 0.95) -> tuple[float, float, float]:
    """p1 − p2 with Newcombe's hybrid-score interval (Newcombe 1998, method 10): ``(diff, lo, hi)``."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_ci(k1, n1, conf)
    l2, u2 = wilson_ci(k2, n2, conf)
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def compare_arm(fail_ref: list[bool], fail_arm: list[bool]) -> dict:
    """One arm against the reference arm (α = 0), seeds in the same order in both."""
    n0, k0, n1, k1 = len(fail_ref), sum(fail_ref), len(fail_arm), sum(fail_arm)
    odds, p = stats.fisher_exact([[k1, n1 - k1], [k0, n0 - k0]], alternative="two-sided")
    d, lo, hi = newcombe_diff_ci(k1, n1, k0, n0)
    out = dict(fisher_p_two_sided=float(p),
               odds_ratio=float(odds) if math.isfinite(odds) else ("inf" if odds > 0 else None),
               diff_vs_alpha0=d, diff_ci95_newcombe=[lo, hi])
    if n0 == n1:
        only_ref = sum(a and not b for a, b in zip(fail_ref, fail_arm))
        only_arm = sum(b and not a for a, b in zip(fail_ref, fail_arm))
        m = only_ref + only_arm
        out.update(discordant_failed_only_at_alpha0=only_ref, discordant_failed_only_in_arm=only_arm,
                   mcnemar_exact_p=float(stats.binomtest(only_arm, m).pvalue) if m else 1.0)
    return out


def arm_table(arms: dict[float, list[bool]]) -> list[dict]:
    ref = arms[0.0]
    rows = []
    for a, f in arms.items():
        k, n = sum(f), len(f)
        lo, hi = wilson_ci(k, n)
        row = dict(alpha=a, runs=n, failed=k, rate=k / n, rate_ci95_wilson=[lo, hi])
        if a != 0.0:
            row.update(compare_arm(ref, f))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------- training
def run(cfg: RunConfig) -> dict:
    """Train one run (no init profile: it is not used here and costs more than the training)."""
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model_args())
    task = trainer.make_run_task(cfg)
    t0 = time.process_time()
    res = trainer.train(model, cfg, task)
    lab = trainer.run_labels(res, task)
    ev = trainer.v3_labels(res, cfg.steps)["final_eval_loss"] if cfg.eval_batches else math.nan
    return dict(lr=cfg.lr, seed=cfg.seed, kss_alpha=cfg.kss_alpha, diverged=bool(lab["diverged"]),
                diverge_step=int(lab["diverge_step"]), diverge_reason=lab["diverge_reason"],
                final_train_loss=round(float(lab["final_loss"]), 4),
                final_eval_loss=round(float(ev), 4) if math.isfinite(ev) else None,
                marginal_loss=float(lab["marginal_loss"]), cpu_seconds=round(time.process_time() - t0, 2))


_POOL: ProcessPoolExecutor | None = None


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_all(cfgs: list[RunConfig]) -> list[dict]:
    return list(_POOL.map(run, cfgs)) if _POOL is not None else [run(c) for c in cfgs]


def pilot_lr(lrs, seeds, log) -> tuple[float, dict]:
    rows = run_all([replace(BASE, lr=lr, seed=s) for lr in lrs for s in seeds])
    rates = {}
    for lr in lrs:
        d = [r["diverged"] for r in rows if r["lr"] == lr]
        rates[lr] = (sum(d), len(d))
        log(f"pilot no-norm lr={lr:g}: {sum(d)}/{len(d)} diverged")
    best = min(lrs, key=lambda lr: (abs(rates[lr][0] / rates[lr][1] - PILOT_TARGET), lr))
    return best, {str(lr): dict(diverged=k, runs=n) for lr, (k, n) in rates.items()}


def setting_a(lr: float, alphas, seeds, log) -> dict:
    rows = run_all([replace(BASE, lr=lr, seed=s, kss_alpha=a, kss_every=EVERY) for a in alphas for s in seeds])
    arms = {a: [r["diverged"] for r in rows if r["kss_alpha"] == a] for a in alphas}
    table = arm_table(arms)
    for t in table:
        log(f"A no-norm lr={lr:g} α={t['alpha']:g}: {t['failed']}/{t['runs']} diverged "
            f"p={t.get('fisher_p_two_sided', float('nan')):.3g}")
    return dict(lr=lr, label="diverged", seeds=list(seeds), arms=table, runs=rows)


def setting_b(ladder, alphas, seeds, log) -> dict:
    lad = run_all([replace(BASE_B, lr=lr, seed=0) for lr in ladder])
    R = lad[0]["marginal_loss"]
    fl = [r["final_eval_loss"] if r["final_eval_loss"] is not None else math.nan for r in lad]
    s = ladder_summary([r["lr"] for r in lad], fl, [r["diverged"] for r in lad], R)
    for r, f in zip(lad, s["failed"]):
        r["failed"] = bool(f)
        log(f"B ladder pre_ln lr={r['lr']:.3g}: eval {r['final_eval_loss']} diverged={r['diverged']} failed={f}")
    summ = {k: v for k, v in s.items() if k != "failed"}
    lr_fail = s["lr_fail_min"]
    log(f"B ladder: B={s['best_loss']:.4f} lr_best={s['lr_best']:.3g} lr_fail={lr_fail:.3g} R={R:.4f}")
    out = dict(label="failed", ladder=dict(seed=0, lrs=list(ladder), runs=lad, summary=summ),
               marginal_loss_R=R, best_loss_B=s["best_loss"], lr_best=s["lr_best"], lr_fail=lr_fail,
               seeds=list(seeds))
    if not math.isfinite(lr_fail):
        out["arms"] = []
        return out
    out.update(b_arms(lr_fail, alphas, seeds, s["lr_best"], s["best_loss"], R, log))
    return out


def b_arms(lr, alphas, seeds, lr_best, best_loss, R, log) -> dict:
    """Setting B's arms at ``lr``, labelled ``failed`` with the ladder's ``lr_best``, B and R."""
    rows = run_all([replace(BASE_B, lr=lr, seed=sd, kss_alpha=a, kss_every=EVERY) for a in alphas for sd in seeds])
    for r in rows:
        ev = r["final_eval_loss"] if r["final_eval_loss"] is not None else math.nan
        r["failed"] = bool(failed(r["diverged"], r["lr"], ev, lr_best, best_loss, R))
    arms = {a: [r["failed"] for r in rows if r["kss_alpha"] == a] for a in alphas}
    table = arm_table(arms)
    for t, a in zip(table, alphas):
        t["diverged"] = sum(r["diverged"] for r in rows if r["kss_alpha"] == a)
        t["mean_final_eval_loss"] = float(np.mean([r["final_eval_loss"] if r["final_eval_loss"] is not None
                                                   else math.nan for r in rows if r["kss_alpha"] == a]))
        log(f"B pre_ln lr={lr:.3g} α={a:g}: {t['failed']}/{t['runs']} failed ({t['diverged']} diverged) "
            f"p={t.get('fisher_p_two_sided', float('nan')):.3g}")
    return dict(arms=table, runs=rows)


def overhead(rounds: int, steps_per_round: int) -> dict:
    """Per-step wall time of the trainer's loop with and without KSS (α = ``OVERHEAD_ALPHA``).

    Plain and KSS steps run in alternating rounds of ``steps_per_round`` (a multiple of ``EVERY``, so
    each KSS round holds the same share of penalty steps)."""
    cfg = replace(BASE, lr=1e-3)  # stable, so both runs take every step
    state = {}
    for name in ("plain", "kss"):
        torch.manual_seed(0)
        model = build_model(cfg.model_args())
        task = make_task(cfg.task, seed=0, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
        opt = trainer.make_optimizer("adamw", model.parameters(), cfg.lr, 0.0)
        kss = KoopmanSpectralShaping(model, alpha=OVERHEAD_ALPHA, every=EVERY) if name == "kss" else None
        state[name] = (model, task, opt, kss)

    def step(name) -> float:
        model, task, opt, kss = state[name]
        t0 = time.perf_counter()
        x, y = task.batch()
        loss = task.loss(model(x), y)
        total = loss + kss.penalty() if kss is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        opt.step()
        return time.perf_counter() - t0

    for name in state:  # warm-up
        for _ in range(10):
            step(name)
    per_round = {"plain": [], "kss": []}
    for _ in range(rounds):
        for name in state:
            per_round[name].append(sum(step(name) for _ in range(steps_per_round)) / steps_per_round)
    state["kss"][3].remove()
    plain, with_kss = float(np.median(per_round["plain"])), float(np.median(per_round["kss"]))
    return dict(overhead_pct=round(100 * (with_kss / plain - 1), 1), alpha=OVERHEAD_ALPHA, every=EVERY,
                seconds_per_step=dict(plain=round(plain, 5), kss=round(with_kss, 5)),
                rounds=rounds, steps_per_round=steps_per_round)


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return ""


def cpu_seconds() -> float:
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime, 1)


def add_lr(args, log) -> None:
    """One more learning rate for setting A or B, added to an existing result (``--add-a-lr``/``--add-b-lr``)."""
    start = time.perf_counter()
    result = json.loads(args.out.read_text())
    alphas = (tuple(float(x) for x in args.alphas.split(",")) if args.alphas
              else tuple(result["settings"]["alphas"]))
    assert alphas[0] == 0.0, "the first arm must be alpha = 0 (the reference)"
    if args.add_a_lr is not None:
        lr, key = args.add_a_lr, "A_no_norm_diverged_extra_lrs"
        seeds = tuple(result["dose_response"]["A_no_norm_diverged"]["seeds"])
        out = setting_a(lr, alphas, seeds, log)
    else:
        lr, key = args.add_b_lr, "B_pre_ln_failed_extra_lrs"
        b = result["dose_response"]["B_pre_ln_failed_at_lr_fail"]
        seeds = tuple(b["seeds"])
        out = dict(lr=lr, label="failed", seeds=list(seeds), labelled_with=dict(
            lr_best=b["lr_best"], best_loss_B=b["best_loss_B"], marginal_loss_R=b["marginal_loss_R"],
            source="the seed-0 alpha=0 ladder of B_pre_ln_failed_at_lr_fail"))
        out.update(b_arms(lr, alphas, seeds, b["lr_best"], b["best_loss_B"], b["marginal_loss_R"], log))
    if _POOL is not None:
        _POOL.shutdown()
    out.update(alphas=list(alphas), git_commit=git_commit(), cpu_seconds=cpu_seconds(),
               wall_seconds=round(time.perf_counter() - start, 1))
    result["dose_response"].setdefault(key, {})[f"{lr:g}"] = out
    extra = [e for k in ("A_no_norm_diverged_extra_lrs", "B_pre_ln_failed_extra_lrs")
             for e in result["dose_response"].get(k, {}).values()]
    result["cpu_seconds_total"] = round(result["cpu_seconds"] + sum(e["cpu_seconds"] for e in extra), 1)
    args.out.write_text(json.dumps(result, indent=1))
    log(f"added lr {lr:g} to {args.out} under {key} (cpu {out['cpu_seconds']} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few short runs, two arms (smoke test)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (processes)")
    ap.add_argument("--add-a-lr", type=float, default=None, metavar="LR",
                    help="only run setting A at LR (all arms, same seeds) and add it to the existing --out file")
    ap.add_argument("--add-b-lr", type=float, default=None, metavar="LR",
                    help="only run setting B's arms at LR (labelled with the stored ladder's B, lr_best and R) "
                         "and add them to the existing --out file")
    ap.add_argument("--alphas", default=None, help="with --add-a-lr/--add-b-lr: the arms, e.g. 0,0.15,1.5 "
                    "(default: those of the stored result)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    global _POOL, BASE, BASE_B
    if args.quick:
        BASE, BASE_B = replace(BASE, steps=30, warmup=5), replace(BASE_B, steps=30, warmup=5)
    if args.jobs > 1:
        _POOL = ProcessPoolExecutor(args.jobs, initializer=_init_worker)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    if args.add_a_lr is not None or args.add_b_lr is not None:
        add_lr(args, log)
        return

    alphas = (0.0, 0.15) if args.quick else ALPHAS
    seeds_a, seeds_b = (SEEDS_A[:2], SEEDS_B[:2]) if args.quick else (SEEDS_A, SEEDS_B)
    pilot_lrs, pilot_seeds = (PILOT_LRS[:1], PILOT_SEEDS[:2]) if args.quick else (PILOT_LRS, PILOT_SEEDS)
    ladder = LADDER[::3] if args.quick else LADDER

    lr_a, pilot = pilot_lr(pilot_lrs, pilot_seeds, log)
    a = setting_a(lr_a, alphas, seeds_a, log)
    a["pilot"] = dict(lrs=list(pilot_lrs), seeds=list(pilot_seeds), target_rate=PILOT_TARGET, result=pilot)
    b = setting_b(ladder, alphas, seeds_b, log)
    if _POOL is not None:
        _POOL.shutdown()
    ov = overhead(rounds=3 if args.quick else 10, steps_per_round=40)
    log(f"overhead: {ov}")
    kss_defaults = {k: v.default for k, v in inspect.signature(KoopmanSpectralShaping).parameters.items()
                    if k in ("rank", "layer_fraction", "n_tokens", "gamma", "beta", "center", "max_grad")}
    result = {
        # --- this run
        "dose_response": {"A_no_norm_diverged": a, "B_pre_ln_failed_at_lr_fail": b},
        "overhead": ov,
        "settings": {
            "alphas": list(alphas), "kss_every": EVERY, "kss_defaults": kss_defaults,
            "base_A": asdict(BASE), "base_B": asdict(BASE_B), "quick": args.quick, "jobs": args.jobs,
            "torch_threads": 1, "torch": torch.__version__,
            "statistics": ("rate CI: Wilson 95%; vs alpha=0: scipy.stats.fisher_exact two-sided (arms as "
                           "independent samples), sample odds ratio (arm failed/ok over alpha=0 failed/ok); "
                           "difference arm - alpha0 with Newcombe hybrid-score 95% CI (1998, method 10); "
                           "paired seeds: discordant counts and exact McNemar p. No multiplicity correction."),
        },
        "earlier_run": EARLIER,
        "git_commit": git_commit(),
        "cpu_seconds": cpu_seconds(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out} (cpu {result['cpu_seconds']} s)")


if __name__ == "__main__":
    main()
