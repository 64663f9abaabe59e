"""The scale exponents of lr_fail: fitted on corpus-v3's ladders alone, on corpus-v2 + corpus-v3
pooled, as shipped (slopes of the axes corpus-v3 varies from its networks, the rest pooled), and on
the fixed-architecture scale-ladder stages alone (each axis varied one at a time).

The linear part only (no trees), fail model, ``failed`` label, every network (no hold-out): the
slopes per unit of ln axis with their Laplace sd. Writes results/scale_slopes.json.

Run: ``python benchmarks/scale_slopes.py`` (about a CPU-minute).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package when this file is run as a script
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "scale_slopes.json"
CORPORA = [ROOT / "datasets" / "corpus-v2", ROOT / "datasets" / "corpus-v3"]


def main() -> int:
    import numpy as np

    from risk_model.heldout_v3 import _index, load_v3
    from risk_model.lrmodel import SCALE_COLUMNS, LogLRModel

    import pandas as pd

    nets, runs, _ = load_v3(CORPORA)
    stage = pd.read_parquet(CORPORA[1] / "runs.parquet", columns=["model_id", "stage"]).groupby("model_id")["stage"].first()
    ladders = nets["parent_id"].map(stage).fillna("").str.startswith("scale-").to_numpy() & nets["full_ladder"].to_numpy()
    out = {"networks": {"corpus-v2": int((~nets["full_ladder"]).sum()), "corpus-v3": int(nets["full_ladder"].sum()),
                        "corpus-v3 scale-ladder stages": int(ladders.sum())}}
    for name, mask, sr in (("corpus-v3 alone", nets["full_ladder"].to_numpy(), None),
                           ("pooled", np.ones(len(nets), bool), None),
                           ("shipped: ladder slopes", np.ones(len(nets), bool), nets["full_ladder"].to_numpy()),
                           # the fixed-architecture ladders alone (stages scale-width/-depth/-batch/-seq and
                           # their shorter horizons): each axis varied one at a time, gpt and hf_llama, AdamW
                           ("scale-ladder stages alone", ladders, None)):
        n = nets[mask].reset_index(drop=True)
        r = runs[runs["model_id"].isin(set(n["model_id"]))].reset_index(drop=True)
        m = LogLRModel(groups=(), n_estimators=0).fit(
            n, n["fail_lo"], n["fail_hi"], runs_model_index=_index(n, r), runs_lr=r["lr"].to_numpy(float),
            runs_y=r["failed"].to_numpy(int), groups=n["family"].to_numpy(), slope_rows=None if sr is None else sr[mask])
        sd = np.sqrt(np.diag(m.cov_))
        out[name] = {c: {"slope": float(b), "sd": float(s)} for c, b, s in zip(m.linear_columns_, m.coef_, sd)
                     if c in SCALE_COLUMNS or c == "task_synthetic"}
        out[name]["from_ladders"] = list(m.ladder_axes_)
        print(name, {c: round(v["slope"], 2) for c, v in out[name].items() if isinstance(v, dict)}, flush=True)
    OUT.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
