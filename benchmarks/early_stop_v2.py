"""Would an early stop on "loss above the initial loss for long enough" change a label? Checked on
corpus-v2's stored curves; writes ``benchmarks/results/early_stop_v2.json``.

Rule tested (on the 50-point ``loss_curve`` of a 300-step run, points ≈ 6.1 steps apart): stop
at the first point k (not the last) such that the ``w`` points ending at k are all above
``max(loss_curve[0], marginal_loss)`` (the initial loss, or R if higher); the stopped run's final
loss is that point's loss and it did not diverge (training ended there). Every label of
``risk_model.labels`` is then recomputed per model (``ladder_summary`` on ``final_loss``,
``diverged``, ``marginal_loss``; ``unstable`` on the truncated curve) and compared with the labels
of the full runs. ``w`` is given as a fraction of the curve (0.1 … 0.5 of the run).

    python benchmarks/early_stop_v2.py
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
REPO = HERE.parent


def main() -> None:
    import numpy as np
    import pandas as pd

    from risk_model.labels import ladder_summary, unstable

    r = pd.read_parquet(REPO / "datasets/corpus-v2/runs.parquet",
                        columns=["loss_curve", "final_loss", "marginal_loss", "diverged", "lr", "model_id"])

    def eq(a, b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

    out = []
    for frac in (0.1, 0.2, 0.3, 0.5):
        w = max(1, math.ceil(frac * 49))
        keys = ("failed", "never_learns", "lr_best", "lr_fail_min", "lr_fail_lo", "lr_diverge_min")
        changed = {k: 0 for k in keys}
        stopped = div_runs = unst = 0
        saved = 0.0
        for _, g in r.groupby("model_id"):
            R = float(g["marginal_loss"].iloc[0])
            fl, dv = list(g["final_loss"]), [bool(x) for x in g["diverged"]]
            full = ladder_summary(list(g["lr"]), fl, dv, R)
            fl2, dv2 = list(fl), list(dv)
            for i, c in enumerate(g["loss_curve"]):
                c = np.asarray(c, dtype=float)
                thr = max(c[0], R)
                for k in range(w, len(c) - 1):
                    if (c[k - w + 1:k + 1] > thr).all():
                        stopped += 1
                        saved += (len(c) - 1 - k) / 49
                        div_runs += dv[i]
                        unst += unstable(c, dv[i]) != unstable(c[:k + 1], False)
                        fl2[i], dv2[i] = float(c[k]), False
                        break
            s2 = ladder_summary(list(g["lr"]), fl2, dv2, R)
            for k in keys:
                changed[k] += not eq(full[k], s2[k])
        out.append(dict(window_fraction=frac, window_points=w, runs_stopped=stopped,
                        run_equivalents_saved=round(saved, 1), diverged_label_changed_runs=int(div_runs),
                        unstable_label_changed_runs=int(unst),
                        models_with_a_changed_label={k: int(v) for k, v in changed.items()}))
    res = dict(corpus="datasets/corpus-v2", runs=len(r), models=int(r["model_id"].nunique()), rules=out,
               conclusion="every window changes some label (diverged always: runs above their initial "
                          "loss for half the run still diverge later); the rule is not used")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "early_stop_v2.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
