"""How much does the profile depend on the probe seed? Writes results/probe_seed.json.

For a few zoo networks (seeded weights, fixed), profile each with probe seeds 0..S-1 at several
``n_samples`` (rank 32, Kreiss grid 31x12: the shipped predictor's settings otherwise) and measure,
for every profile aggregate the config-aware predictor uses, the seed-to-seed standard deviation
(averaged over networks). Compare it with the standard deviation of the same aggregate across the
training corpus (datasets/corpus-v1, one row per config). Also: the spread of the shipped
predictor's P(divergence) across seeds at a few learning rates, single-seed and averaged over
``--average`` seeds.

Run: ``nice python benchmarks/probe_seed.py`` (a few CPU-minutes); ``--quick`` for a smoke run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package when this file is run as a script
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NETWORKS = {
    "example (gpt pre_ln d64 L4)": dict(family="gpt", norm="pre_ln", d_model=64, n_layers=4, n_heads=4),
    "gpt none d64 L4": dict(family="gpt", norm="none", d_model=64, n_layers=4, n_heads=4),
    "gpt post_ln d96 L3": dict(family="gpt", norm="post_ln", d_model=96, n_layers=3, n_heads=4),
    "moe rmsnorm d64 L2": dict(family="moe", norm="rmsnorm", d_model=64, n_layers=2, n_heads=4),
}
LRS = [1e-3, 1e-2, 3e-2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--samples", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--average", type=int, default=3, help="probe seeds averaged in the averaged P")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "probe_seed.json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.samples = 2, [256]

    import featurize
    from risk_model.corpus import load_corpus
    from risk_model.features import profile_feature_names
    from risk_model.serve import Request, assess, load_bundle
    from risk_model.zoo import build_model

    torch.set_num_threads(1)
    bundle = load_bundle(ROOT / "models" / "default")
    names = profile_feature_names()
    corpus = load_corpus([ROOT / "datasets" / "corpus-v1"]).runs.drop_duplicates("config_id")
    corpus_sd = {n: float(np.nanstd(corpus[n].to_numpy(float))) for n in names if n in corpus}

    t0 = time.time()
    per_net: dict = {}
    for label, margs in NETWORKS.items():
        torch.manual_seed(0)
        model = build_model(dict(margs, vocab_size=256, block_size=64))
        per_net[label] = {}
        for n in args.samples:
            aggs, ps = [], []
            for s in range(args.seeds):
                prof = featurize.profile(model, n_samples=n, seed=s, rank=32, kreiss_grid="31x12")
                aggs.append(prof.aggregates)
                res = assess(prof, bundle=bundle, request=Request(lrs=LRS, width=margs["d_model"]))
                ps.append([p.p_divergence for p in res.predictions])
            ps = np.array(ps)  # (seeds, lrs)
            k = args.average
            avg = np.array([ps[i:i + k].mean(0) for i in range(0, len(ps) - k + 1, k)]) if len(ps) >= k else ps
            per_net[label][n] = dict(
                seed_sd={f: float(np.nanstd([a[f] for a in aggs], ddof=1)) for f in names},
                m_near_mean=[float(a["m_near_mean"]) for a in aggs],
                p_by_seed={f"{lr:g}": ps[:, j].round(4).tolist() for j, lr in enumerate(LRS)},
                p_range={f"{lr:g}": float(np.ptp(ps[:, j])) for j, lr in enumerate(LRS)},
                p_range_averaged={f"{lr:g}": float(np.ptp(avg[:, j])) for j, lr in enumerate(LRS)},
            )
            print(label, n, "M≈1 mean by seed", np.round(per_net[label][n]["m_near_mean"], 3),
                  "P range", per_net[label][n]["p_range"], flush=True)

    summary = {}
    for n in args.samples:
        ratio = {}
        for f in names:
            sd = float(np.mean([per_net[lab][n]["seed_sd"][f] for lab in per_net]))
            c = corpus_sd.get(f)
            ratio[f] = dict(seed_sd=sd, corpus_sd=c, ratio=(sd / c) if c else None)
        finite = [v["ratio"] for v in ratio.values() if v["ratio"] is not None and np.isfinite(v["ratio"])]
        summary[n] = dict(
            per_feature=ratio,
            median_ratio=float(np.median(finite)),
            max_ratio_feature=max(((f, v["ratio"]) for f, v in ratio.items() if v["ratio"] is not None),
                                  key=lambda t: t[1]),
            max_p_range=float(max(max(per_net[lab][n]["p_range"].values()) for lab in per_net)),
            max_p_range_averaged=float(max(max(per_net[lab][n]["p_range_averaged"].values()) for lab in per_net)),
        )
        print(n, "median seed/corpus sd ratio", round(summary[n]["median_ratio"], 3), "worst",
              summary[n]["max_ratio_feature"], "max P range", round(summary[n]["max_p_range"], 3),
              f"averaged over {args.average}", round(summary[n]["max_p_range_averaged"], 3), flush=True)
    out = dict(
        what="seed-to-seed sd of each profile aggregate (mean over networks) vs sd across corpus-v1 configs",
        settings=dict(rank=32, kreiss_grid="31x12", seeds=args.seeds, samples=args.samples, average=args.average,
                      lrs=LRS, networks=NETWORKS),
        summary={str(k): v for k, v in summary.items()},
        per_network={lab: {str(k): v for k, v in d.items()} for lab, d in per_net.items()},
        seconds=round(time.time() - t0, 1),
    )
    args.out.write_text(json.dumps(out, indent=1))
    print("written", args.out)


if __name__ == "__main__":
    main()
