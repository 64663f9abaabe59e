"""A candidate feature (issue 20): a short-run probe ladder at init, and whether it explains what the
predictor misses.

For each network: K = 30 steps of the network's own optimizer (its β2 and ε, no weight decay, a
5-step linear warmup, then constant) from its initial weights, on a learnable probe: batches of 8
sequences of 32 tokens drawn from a fixed random Markov chain over min(vocab, 256) tokens in which
every token has two successors (entropy ln 2, initial loss ≈ ln vocab). One run per rung of a
half-decade grid 3.16e-4 … 3.16, going up until a rung ends above half of the best rung's progress.
Per network: ``ln_probe_lr_fail`` (ln of the LR above the best rung where the mean loss of the last 5
steps crosses L0 − ½(L0 − best), interpolated in ln LR), ``ln_probe_lr_best`` and ``probe_gain``.

The report compares it with the shipped protocol's leave-one-class-out residual of lr_fail
(``heldout_v3.heldout_predictions``, linear part with the structure term, as shipped):
Spearman of the probe with the residual and with ln lr_fail, pooled and per class.

Run (resumable; the probes are cached in ``benchmarks/results/probe_ladder_cache.parquet``):
``python benchmarks/probe_ladder.py --corpus datasets/corpus-v3 [--limit N]`` then
``python benchmarks/probe_ladder.py --corpus datasets/corpus-v2 --corpus datasets/corpus-v3 --report``.
Writes ``benchmarks/results/probe_ladder.json``. About 8–25 CPU-s per d = 64 network. ``--all``
probes the networks that never learn too; ``--ablation`` runs the paired leave-one-class-out
comparison with the probe as a linear column (``probe_ablation.json``); ``--cost`` times probe steps
on GPT-2 124M (``probe_ladder_cost.json``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's risk_model, not an installed one

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "probe_ladder.json"
CACHE = ROOT / "benchmarks" / "results" / "probe_ladder_cache.parquet"
GRID = [10 ** (k / 2) for k in range(-7, 2)]   # 3.16e-4 … 3.16, half-decades
K, WARM, B, T = 30, 5, 8, 32


def markov_batches(vocab: int, ctx: int | None, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches (inputs, next-token targets), each (B, T'), T' = min(ctx, T), from the probe chain."""
    V = min(vocab, 256)
    T_ = min(ctx, T) if ctx else T
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, V, (V, 2), generator=g)                    # (V, 2) successors
    out = []
    for _ in range(n):
        cur = torch.randint(0, V, (B,), generator=g)                   # (B,)
        seq = [cur]
        for _t in range(T_):
            cur = succ[cur, torch.randint(0, 2, (B,), generator=g)]
            seq.append(cur)
        ids = torch.stack(seq, 1)                                      # (B, T'+1)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def probe_step(m: nn.Module, opt, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on the probe batch (x, y), each (B, T'); the loss before it (inf if
    non-finite, and then no step)."""
    from risk_model.init_features import probe_loss

    out = m(x)
    loss = probe_loss(out if isinstance(out, torch.Tensor) else out.logits, y)
    if not torch.isfinite(loss):
        return math.inf
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def run_probe(model: nn.Module, optimizer: str = "adamw", beta2: float = 0.95, eps: float = 1e-8):
    """(initial loss, final loss per rung of GRID; inf where not run or non-finite), or None."""
    from featurize.capture import context_length
    from risk_model.sweep.trainer import make_optimizer

    emb = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not emb:
        return None
    batches = markov_batches(emb[0].num_embeddings, context_length(model), K)
    finals: list[float] = []
    l0 = math.nan
    with torch.random.fork_rng(devices=[]):
        for lr in GRID:
            m = copy.deepcopy(model)
            m.train()
            opt = make_optimizer(optimizer, m.parameters(), lr, 0.0, beta2=beta2, eps=eps)
            losses = []
            for k, (x, y) in enumerate(batches):
                for gp in opt.param_groups:
                    gp["lr"] = lr * min(1.0, (k + 1) / WARM)
                losses.append(probe_step(m, opt, x, y))
                if not math.isfinite(losses[-1]):
                    break
            if lr == GRID[0]:
                l0 = losses[0]
            finals.append(float(np.mean(losses[-5:])) if len(losses) == K else math.inf)
            if len(finals) >= 2 and finals[-1] > l0 - 0.5 * (l0 - min(finals)) and min(finals) < finals[0] - 0.05:
                break
    return l0, np.array(finals + [math.inf] * (len(GRID) - len(finals)))


def summarise(l0: float, finals: np.ndarray) -> dict:
    lg = np.log(GRID)
    fin = np.where(np.isfinite(finals), finals, 1e9)
    ib = int(np.argmin(fin))
    best = fin[ib]
    half = l0 - 0.5 * (l0 - best)
    fail = math.nan
    for j in range(ib + 1, len(GRID)):
        if fin[j] > half:
            a, b = fin[j - 1], min(fin[j], 2 * l0)
            f = (half - a) / (b - a) if b > a else 1.0
            fail = lg[j - 1] + f * (lg[j] - lg[j - 1])
            break
    return dict(probe_l0=l0, probe_best=best, ln_probe_lr_best=lg[ib], ln_probe_lr_fail=fail,
                probe_gain=(l0 - best) / l0)


def compute(corpora: list[str], limit: int | None, learners_only: bool = True) -> None:
    from risk_model import heldout_v3 as H
    from risk_model.serve import single_threaded
    from risk_model.sweep.model_table import rebuild
    from risk_model.sweep.runner import write_parquet_atomic

    nets, _, _ = H.load_v3(corpora)
    if learners_only:
        nets = nets[~nets["never_learns"].astype(bool)]
    nets = nets.assign(pid=nets["parent_id"].fillna(nets["model_id"])).drop_duplicates("pid")
    cache = pd.read_parquet(CACHE) if CACHE.exists() else pd.DataFrame(columns=["pid"])
    done = set(cache["pid"])
    tables = {s: pd.read_parquet(Path(s) / "models.parquet").set_index("model_id") for s in nets["source"].unique()}
    order = np.random.default_rng(0).permutation(len(nets))
    rows = cache.to_dict("records")
    with single_threaded():
        for c, i in enumerate(order[:limit] if limit else order):
            r = nets.iloc[i]
            if r.pid in done:
                continue
            row = tables[r.source].loc[r.pid].copy()
            row["model_id"] = r.pid
            t0 = time.perf_counter()
            model, cfg = rebuild(row)
            p = run_probe(model, cfg.optimizer, cfg.beta2, cfg.eps)
            rec = dict(pid=r.pid, family=r.family, **(summarise(*p) if p else {}),
                       seconds=time.perf_counter() - t0)
            rows.append(rec)
            write_parquet_atomic(pd.DataFrame(rows), CACHE, "probe_ladder")
            print(f"[probe] {c + 1}/{len(order)} {r.family} {rec.get('ln_probe_lr_fail')}", file=sys.stderr, flush=True)


def report(corpora: list[str]) -> dict:
    from scipy.stats import spearmanr

    from risk_model import heldout_v3 as H

    nets, runs, _ = H.load_v3(corpora)
    pred = H.heldout_predictions(nets, runs, (), split=H.loco_splits(nets), n_estimators=100, random_state=0)
    nets = nets.assign(err=H.log10_errors(nets, pred), pid=nets["parent_id"].fillna(nets["model_id"]))
    cache = pd.read_parquet(CACHE).set_index("pid")
    for k in ("ln_probe_lr_fail", "ln_probe_lr_best", "probe_gain", "seconds"):
        nets[k] = nets["pid"].map(cache[k]).astype(float)
    d = nets[np.isfinite(nets["err"]) & np.isfinite(nets["ln_probe_lr_fail"]) & ~nets["never_learns"].astype(bool)]
    ln_fail = 0.5 * (np.log(d["fail_lo"]) + np.log(d["fail_hi"]))

    def rho(a, b):
        return float(spearmanr(a, b).correlation)

    per = {f: dict(networks=int(len(g)), rho_residual=rho(g["ln_probe_lr_fail"], g["err"]),
                   median_residual_log10=float(g["err"].median()),
                   median_ln_probe_lr_fail=float(g["ln_probe_lr_fail"].median()))
           for f, g in d.groupby("family")}
    fam = d.groupby("family").agg(err=("err", "median"), probe=("ln_probe_lr_fail", "median"))
    out = dict(benchmark="probe_ladder", corpora=corpora, networks=int(len(d)),
               probe=dict(steps=K, warmup=WARM, batch=B, seq_len=T, grid=GRID, chain="two successors per token"),
               residual="log10(predicted median lr_fail / bracket geometric mean), leave-one-class-out, shipped linear part",
               rho_probe_fail_vs_residual=rho(d["ln_probe_lr_fail"], d["err"]),
               rho_probe_best_vs_residual=rho(d["ln_probe_lr_best"], d["err"]),
               rho_probe_fail_vs_ln_lr_fail=rho(d["ln_probe_lr_fail"], ln_fail),
               rho_class_medians=rho(fam["probe"], fam["err"]),
               median_residual_abs_log10=float(d["err"].abs().median()),
               seconds_median=float(d["seconds"].median()), per_class=per,
               machine=platform.platform(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    OUT.write_text(json.dumps(out, indent=1))
    return out


ABLATION_OUT = ROOT / "benchmarks" / "results" / "probe_ablation.json"
PROBE_COLUMN = "ln_probe_lr_fail"


def probe_column(nets: pd.DataFrame) -> np.ndarray:
    """ln_probe_lr_fail per network from the cache (by parent model); a probe that never crossed
    sits half a decade above the grid; NaN (corpus centre) where no probe was run."""
    cache = pd.read_parquet(CACHE).set_index("pid")
    pid = nets["parent_id"].fillna(nets["model_id"])
    v = pid.map(cache[PROBE_COLUMN]).astype(float).to_numpy()
    ran = pid.map(cache["probe_l0"]).astype(float).notna().to_numpy()
    return np.where(ran & ~np.isfinite(v), math.log(GRID[-1] * 10 ** 0.5), v)


def ablation(corpora: list[str], n_boot: int = 1000) -> dict:
    """Paired leave-one-class-out comparison: the shipped form (linear part and the tree groups
    of ``reports/heldout_v3.json``) against it with ``ln_probe_lr_fail`` as one more linear column
    (prior sd 0.5 per ln unit, centred, an unprobed network at the centre)."""
    from risk_model import heldout_v3 as H
    from risk_model.heldout import paired_delta

    groups = tuple(json.loads((ROOT / "reports" / "heldout_v3.json").read_text())["groups"])
    nets, runs, _ = H.load_v3(corpora)
    nets[PROBE_COLUMN] = probe_column(nets)
    preds = {}
    for name, extra in (("shipped", ()), ("with probe", (PROBE_COLUMN,))):
        preds[name] = H.heldout_predictions(nets, runs, groups, split=H.loco_splits(nets), n_estimators=100,
                                            random_state=0, extra_columns=extra)
        print(f"[probe] ablation: {name} done", file=sys.stderr, flush=True)
    probed = np.isfinite(nets[PROBE_COLUMN].to_numpy(float))
    y = runs["failed"].to_numpy(int)
    cl = runs["model_id"].to_numpy()
    in_probed = runs["model_id"].isin(set(nets.loc[probed, "model_id"])).to_numpy()
    out = dict(benchmark="probe_ablation", corpora=corpora, networks=int(len(nets)), probed=int(probed.sum()),
               groups=list(groups), protocol="leave-one-class-out, shipped form, n_estimators=100, seed 0",
               delta_auroc_failed=paired_delta(y, preds["with probe"]["p_failed"], preds["shipped"]["p_failed"],
                                               cl, n_boot, 0),
               delta_auroc_failed_probed=paired_delta(y[in_probed], preds["with probe"]["p_failed"][in_probed],
                                                      preds["shipped"]["p_failed"][in_probed], cl[in_probed], n_boot, 0))
    for name, pr in preds.items():
        out[name] = dict(all=H.metrics(nets, runs, pr, n_boot=n_boot), probed=H.metrics(nets, runs, pr, probed, n_boot=n_boot),
                         per_class={f: H.metrics(nets, runs, pr, (nets["family"] == f).to_numpy(), n_boot=10)
                                    ["lr_fail_median_abs_log10_err"] for f in sorted(nets["family"].unique())})
    out.update(machine=platform.platform(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    ABLATION_OUT.write_text(json.dumps(out, indent=1, default=float))
    return out


COST_OUT = ROOT / "benchmarks" / "results" / "probe_ladder_cost.json"


def cost_gpt2(steps: int = 4) -> dict:
    """Seconds per probe step (one AdamW step on one probe batch, one thread) of GPT-2 124M at init
    (``transformers`` GPT2Config defaults), and the ladder's cost at that rate."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from risk_model.serve import single_threaded
    from risk_model.sweep.trainer import make_optimizer

    with single_threaded():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = GPT2LMHeadModel(GPT2Config())
        opt = make_optimizer("adamw", m.parameters(), 1e-3, 0.0, beta2=0.95, eps=1e-8)
        (x, y), = markov_batches(m.config.vocab_size, m.config.n_positions, 1)
        secs = []
        for _ in range(steps):
            t0 = time.perf_counter()
            probe_step(m, opt, x, y)
            secs.append(time.perf_counter() - t0)
    per = float(np.median(secs[1:] if len(secs) > 1 else secs))
    out = dict(benchmark="probe_ladder_cost", network="GPT-2 124M (GPT2Config defaults)", batch=B, seq_len=T,
               threads=1, seconds_per_step=secs, median_seconds_per_step=per,
               ladder_seconds_at_4_rungs=per * K * 4, load_average=list(os.getloadavg()),
               machine=platform.platform(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    COST_OUT.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", action="append", default=[])
    ap.add_argument("--limit", type=int)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--all", action="store_true", help="probe the networks that never learn too")
    ap.add_argument("--cost", action="store_true", help="time probe steps on GPT-2 124M")
    a = ap.parse_args()
    if not a.cost and not a.corpus:
        ap.error("--corpus is required (except with --cost)")
    if a.cost:
        print(json.dumps(cost_gpt2(), indent=1))
    elif a.ablation:
        o = ablation(a.corpus)
        print(json.dumps({k: o[k] for k in ("networks", "probed", "delta_auroc_failed", "delta_auroc_failed_probed")}
                         | {f"{n}, {s}": {k: o[n][s][k] for k in (
                             "max_safe_right", "max_safe_unsafe", "recommended_within_3x", "lr_fail_median_abs_log10_err")}
                            for n in ("shipped", "with probe") for s in ("all", "probed")}, indent=1, default=float))
    elif a.report:
        o = report(a.corpus)
        print(json.dumps({k: v for k, v in o.items() if k != "per_class"}, indent=1))
    else:
        compute(a.corpus, a.limit, learners_only=not a.all)


if __name__ == "__main__":
    main()
