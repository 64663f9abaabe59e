"""Does ``torch.compile`` pay on this CPU for ladder-sized runs? Times one training run of the
benchmark model (GPT pre-LN, d 32, L 2, text_bytes, seq 32, batch 8) eagerly and compiled (the
model compiled once, as a ladder would reuse it for every rung), and writes
``benchmarks/results/compile.json``: compile seconds, seconds per step both ways, the steps a
ladder must run to amortise the compile, and whether the losses match bitwise (they need to, for
labels identical to the plain runner's).

    python benchmarks/compile.py --steps 300
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    import torch

    from risk_model.sweep.archs import build_network
    from risk_model.sweep.spec import make_config
    from risk_model.sweep.trainer import make_run_task

    torch.set_num_threads(1)
    cfg = make_config(task="text_bytes", d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8,
                      steps=args.steps, lr=3e-3)

    def run(compiled: bool):
        torch.manual_seed(0)
        model = build_network(cfg.model_args())
        fwd = torch.compile(model) if compiled else model
        task = make_run_task(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), foreach=True)
        losses, t_first = [], None
        t0 = time.perf_counter()
        for step in range(cfg.steps):
            x, y = task.batch()
            loss = task.loss(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step == 0:
                t_first = time.perf_counter() - t0
                t1 = time.perf_counter()
        per_step = (time.perf_counter() - t1) / (cfg.steps - 1)
        return losses, t_first, per_step

    le, fe, pe = run(False)
    lc, fc, pc = run(True)
    saved = pe - pc
    res = dict(benchmark="compile", steps=cfg.steps, eager_seconds_per_step=round(pe, 5),
               compiled_seconds_per_step=round(pc, 5), compile_seconds=round(fc - fe, 2),
               steps_to_amortise=round((fc - fe) / saved) if saved > 0 else None,
               losses_bitwise_equal=le == lc, max_abs_loss_diff=max(abs(a - b) for a, b in zip(le, lc)),
               torch=torch.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "compile.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
