"""The shipped predictor on Hugging Face families the corpus never contained, against their measured ladders.

For each family (a small causal LM built from its ``transformers`` config, at the library's own
random init, dropout 0, byte vocabulary), ``risk_model.serve.assess_network`` answers at init for
the stated recipe (the serving path of ``risk predict``: the family is outside every class seen, so
its intervals are widened). Then the network is trained on a full ladder, exactly as corpus-v3 walks
one (``sweep.full_ladder.full_walk``: half-decade rungs from 1e-3 up to the first failed rung, down
until clearly too slow, an extra rung between the last good and the first failed), with the sweep's
trainer on the byte-level text task, and labelled with ``risk_model.labels`` (``ladder_summary``).

Scores, per family and pooled: ``max_safe_lr`` right (in [last not-failed LR / 2, first failed LR))
or unsafe (at or above the first failed LR), ``recommended_lr`` within 3x of the measured lr_best,
and P(failed) at every rung run against its label (AUROC, Brier, log-loss). Results are written
after each family (``benchmarks/results/unseen_families.json``), so a cut run keeps what it did.

    python -u benchmarks/unseen_families.py [--families opt,falcon] [--steps 1000]   # ~5 min a family
    python -u benchmarks/unseen_families.py --rescore   # the current predictor on the stored ladders
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's risk_model, not an installed one

OUT = ROOT / "benchmarks" / "results" / "unseen_families.json"
RUNGS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
START = RUNGS.index(1e-3)
#: design of each family, in the words of the README table
DESIGN = {
    "opt": "post-LN (OPT-350m's layout), learned positions, ReLU MLP",
    "falcon": "parallel attention + MLP, multi-query attention, rotary",
    "olmo2": "norm after each sublayer inside the residual, qk-norm, SwiGLU",
    "xglm": "sinusoidal positions, embeddings scaled by sqrt(d)",
    "gpt_bigcode": "GPT-2 layout with multi-query attention",
    "stablelm": "LayerNorm, rotary on 25% of the head, SwiGLU",
    "mistral": "grouped-query attention (1 KV head), sliding window, RMSNorm",
}


def build(family: str, d: int, n_layers: int, n_heads: int, seq_len: int, vocab: int):
    """The family's causal LM at the library's random init (seeded by the caller)."""
    import transformers as T

    c = dict(vocab_size=vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "opt":
        cfg = T.OPTConfig(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=n_heads, ffn_dim=4 * d,
                          max_position_embeddings=seq_len, word_embed_proj_dim=d, do_layer_norm_before=False,
                          dropout=0.0, attention_dropout=0.0, **c)
        return T.OPTForCausalLM(cfg)
    if family == "falcon":
        cfg = T.FalconConfig(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=n_heads, multi_query=True,
                             parallel_attn=True, alibi=False, hidden_dropout=0.0, attention_dropout=0.0, **c)
        return T.FalconForCausalLM(cfg)
    if family == "olmo2":
        cfg = T.Olmo2Config(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                            intermediate_size=4 * d, max_position_embeddings=seq_len, **c)
        return T.Olmo2ForCausalLM(cfg)
    if family == "xglm":
        cfg = T.XGLMConfig(d_model=d, num_layers=n_layers, attention_heads=n_heads, ffn_dim=4 * d,
                           max_position_embeddings=seq_len, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, **c)
        return T.XGLMForCausalLM(cfg)
    if family == "gpt_bigcode":
        cfg = T.GPTBigCodeConfig(n_embd=d, n_layer=n_layers, n_head=n_heads, n_positions=seq_len, n_inner=4 * d,
                                 multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **c)
        return T.GPTBigCodeForCausalLM(cfg)
    if family == "stablelm":
        cfg = T.StableLmConfig(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               num_key_value_heads=n_heads, intermediate_size=4 * d, max_position_embeddings=seq_len,
                               partial_rotary_factor=0.25, **c)
        return T.StableLmForCausalLM(cfg)
    if family == "mistral":
        cfg = T.MistralConfig(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                              num_key_value_heads=1, intermediate_size=4 * d, max_position_embeddings=seq_len, **c)
        return T.MistralForCausalLM(cfg)
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(DESIGN)}")


def one_family(family: str, args, bundle, stored: dict | None = None) -> dict:
    """Predict, walk the ladder (or, with ``stored``, reuse the runs of an earlier result for this
    family: ``--rescore``, a new predictor on the same measured ladders), score."""
    import numpy as np
    import torch

    from risk_model.labels import ladder_summary
    from risk_model.serve import Request, assess_network
    from risk_model.sweep.full_ladder import full_walk
    from risk_model.sweep.spec import RunConfig
    from risk_model.sweep.trainer import horizon_rows, make_run_task, train

    cfg0 = RunConfig(family="hf_gpt2", d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                     task="text_bytes", seq_len=args.seq_len, vocab_size=256, optimizer="adamw",
                     warmup=args.warmup, batch_size=args.batch_size, steps=args.steps, beta2=0.95, eps=1e-8,
                     eval_batches=4, seed=0)  # family: the trainer does not read it (the network is ours)
    torch.manual_seed(cfg0.seed)
    model0 = build(family, args.d_model, args.n_layers, args.n_heads, args.seq_len, 256)
    req = Request(lrs=list(RUNGS), optimizer="adamw", warmup=args.warmup, batch_size=args.batch_size,
                  seq_len=args.seq_len, steps=args.steps, grad_clip=0.0, weight_decay=0.0, schedule="constant",
                  beta2=0.95, eps=1e-8)
    t0 = time.perf_counter()
    res = assess_network(copy.deepcopy(model0), bundle=bundle, request=req, label=family)
    predict_s = time.perf_counter() - t0
    p_at = {float(p.lr): float(p.p_failed) for p in res.predictions}

    runs: dict[float, tuple[float, bool]] = {}

    def outcome(lr: float):
        cfg = replace(cfg0, lr=lr)
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(model0)
        task = make_run_task(cfg)
        tr = train(model, cfg, task)
        lab = horizon_rows(tr, cfg, task)[-1][1]
        runs[lr] = (float(lab["final_eval_loss"]), bool(lab["diverged"]))
        print(f"  {family} lr {lr:g}: eval loss {lab['final_eval_loss']:.3f}{' diverged' if lab['diverged'] else ''}",
              flush=True)
        return lab["final_eval_loss"], lab["diverged"], lab["dead_at_init"]

    t1 = time.perf_counter()
    R = make_run_task(replace(cfg0, eval_batches=0)).marginal_loss
    if stored is None:
        full_walk(START, RUNGS, outcome, R, extra_rung=True, max_runs=12)
        train_s = time.perf_counter() - t1
    else:
        runs.update({float(r["lr"]): (float(r["final_eval_loss"]), bool(r["diverged"])) for r in stored["runs"]})
        train_s = float(stored["train_seconds"])
    lrs = sorted(runs)
    s = ladder_summary(lrs, [runs[x][0] for x in lrs], [runs[x][1] for x in lrs], R)
    extra = [x for x in lrs if x not in p_at]  # the extra rung: ask the predictor there too
    if extra:
        res2 = assess_network(copy.deepcopy(model0), bundle=bundle, request=replace(req, lrs=extra), label=family)
        p_at.update({float(p.lr): float(p.p_failed) for p in res2.predictions})
    safe = float(res.max_safe_lr or 0.0)  # None: dead at init, no LR is safe
    rec = float(res.recommended_lr) if res.recommended_lr is not None else math.nan
    fmin, flo = s["lr_fail_min"], s["lr_fail_lo"]
    right = bool(math.isfinite(fmin) and math.isfinite(flo) and flo / 2 <= safe < fmin) or \
        bool(not math.isfinite(fmin) and math.isfinite(flo) and safe >= flo / 2)
    unsafe = bool(math.isfinite(fmin) and safe >= fmin)
    learns = not s["never_learns"] and math.isfinite(s["lr_best"])
    return dict(
        family=family, design=DESIGN[family], n_params=int(sum(p.numel() for p in model0.parameters())),
        marginal_loss=R, runs=[dict(lr=x, final_eval_loss=runs[x][0], diverged=runs[x][1], failed=bool(f),
                                    p_failed=p_at.get(x)) for x, f in zip(lrs, s["failed"])],
        lr_best=s["lr_best"], best_loss=s["best_loss"], never_learns=bool(s["never_learns"]),
        lr_fail_min=fmin, lr_fail_lo=flo, lr_diverge_min=s["lr_diverge_min"],
        max_safe_lr=safe, max_safe_lr_interval=list(res.max_safe_lr_interval or []), recommended_lr=rec,
        recommended_lr_interval=list(res.recommended_lr_interval or []),
        max_safe_right=right, max_safe_unsafe=unsafe,
        recommended_within_3x=bool(abs(math.log(rec / s["lr_best"])) <= math.log(3.0)) if learns and rec > 0 else None,
        warnings=list(res.warnings), predict_seconds=round(predict_s, 1), train_seconds=round(train_s, 1),
        best_vs_marginal=float(s["best_loss"] / R) if np.isfinite(s["best_loss"]) else None,
    )


def pooled(rows: list[dict]) -> dict:
    import numpy as np

    from risk_model.evaluate import auroc, brier, log_loss

    y = np.array([r["failed"] for f in rows for r in f["runs"] if r["p_failed"] is not None], int)
    p = np.array([r["p_failed"] for f in rows for r in f["runs"] if r["p_failed"] is not None], float)
    rec = [f["recommended_within_3x"] for f in rows if f["recommended_within_3x"] is not None]
    return dict(families=len(rows), runs=int(len(y)), failed=int(y.sum()),
                auroc=float(auroc(y, p)) if 0 < y.sum() < len(y) else None,
                brier=brier(y, p) if len(y) else None, log_loss=log_loss(y, p) if len(y) else None,
                max_safe_right=float(np.mean([f["max_safe_right"] for f in rows])),
                max_safe_unsafe=float(np.mean([f["max_safe_unsafe"] for f in rows])),
                recommended_within_3x=float(np.mean(rec)) if rec else None, n_learn=len(rec))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(DESIGN), help="comma-separated, from: " + ", ".join(DESIGN))
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--rescore", action="store_true",
                    help="reuse the measured ladders in --out (same network and recipe) and score the current predictor")
    args = ap.parse_args(argv)
    stored = {}
    if args.rescore:
        old = json.loads(args.out.read_text())
        want = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, vocab=256)
        if old["network"] != want or old["recipe"]["steps"] != args.steps or old["recipe"]["warmup"] != args.warmup:
            sys.exit(f"--rescore: {args.out} was measured on another network or recipe")
        stored = {f["family"]: f for f in old["families"]}
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in fams:
        if f not in DESIGN:
            sys.exit(f"unknown family {f!r}; choose from {', '.join(DESIGN)}")

    import torch

    from risk_model.serve import load_bundle

    torch.set_num_threads(1)
    bundle = load_bundle()
    rows = []
    for fam in fams:
        print(f"{fam}: predicting, then walking its ladder ...", flush=True)
        if args.rescore and fam not in stored:
            sys.exit(f"--rescore: no measured ladder for {fam} in {args.out}")
        r = one_family(fam, args, bundle, stored.get(fam))
        rows.append(r)
        print(f"{fam}: max_safe {r['max_safe_lr']:.3g} (first failed {r['lr_fail_min']:g}, last good below it "
              f"{r['lr_fail_lo']:g}) right {r['max_safe_right']} unsafe {r['max_safe_unsafe']}; recommended "
              f"{r['recommended_lr']:.3g} vs lr_best {r['lr_best']:g}; best/marginal {r['best_vs_marginal']:.2f}",
              flush=True)
        out = dict(benchmark="unseen_families", predictor=bundle.metadata.get("version"),
                   recipe=dict(task="text_bytes", optimizer="adamw", beta2=0.95, eps=1e-8, warmup=args.warmup,
                               steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               schedule="constant", grad_clip=0.0, weight_decay=0.0),
                   network=dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, vocab=256),
                   rungs=RUNGS, pooled=pooled(rows), families=rows,
                   machine=platform.platform(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=float) + "\n")
        tmp.replace(args.out)
    print(json.dumps(out["pooled"], indent=1))


if __name__ == "__main__":
    main()
