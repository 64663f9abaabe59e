"""Overhead of the failure detector during training; writes results/detector_overhead.json.

The model and training step of benchmarks/monitor.py (zoo GPT, pre-LN, d = 256, L = 6, seq 64,
batch 16, AdamW). Per round: plain training steps, timed; then the same steps each followed, every
``every`` steps, by what the callbacks add: the global gradient norm (what the Lightning callback
computes in ``on_before_optimizer_step``; the HF Trainer logs its own) and ``RiskMonitor.observe``.
The overhead at ``every`` = 10 is the median added time per checked step spread over 10 training
steps, as a percentage of the median training step.

Run: ``python benchmarks/detector_overhead.py`` (a CPU-minute); ``--quick`` for a smoke run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from risk_model.callbacks import _grad_norm  # noqa: E402
from risk_model.monitor import RiskMonitor  # noqa: E402
from risk_model.zoo import build_model  # noqa: E402

OUT = Path(__file__).parent / "results" / "detector_overhead.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    d, L = (64, 2) if a.quick else (256, 6)
    if a.quick:
        a.rounds, a.train_steps = 2, 4
    torch.manual_seed(0)
    model = build_model(dict(norm="pre_ln", d_model=d, n_layers=L, n_heads=4, block_size=64, vocab_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    mon = RiskMonitor(model, lr=3e-4, optimizer=opt, steps=10_000, action="stop")

    def train_step():
        x = torch.randint(0, 256, (16, 64))
        loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        return loss

    step_s, check_s, observe_s = [], [], []
    gstep = 0
    train_step()
    for _ in range(a.rounds):
        for _ in range(a.train_steps):
            t = time.perf_counter()
            train_step()
            opt.step()
            step_s.append(time.perf_counter() - t)
        for _ in range(a.train_steps // a.every or 1):
            loss = train_step()
            gstep += a.every
            t = time.perf_counter()
            gn = _grad_norm(model.parameters())
            t1 = time.perf_counter()
            mon.observe(gstep, float(loss.detach()), gn)
            t2 = time.perf_counter()
            opt.step()
            check_s.append(t2 - t)
            observe_s.append(t2 - t1)
    step, check = statistics.median(step_s), statistics.median(check_s)
    res = dict(d_model=d, n_layers=L, every=a.every, train_step_s=step, check_s=check,
               observe_s=statistics.median(observe_s), grad_norm_s=check - statistics.median(observe_s),
               overhead_pct=100 * check / (a.every * step), torch_threads=torch.get_num_threads(),
               rounds=a.rounds, quick=a.quick, failing=bool(mon.verdict.failing), load_avg_1min=os.getloadavg()[0])
    print(json.dumps(res, indent=2))
    if not a.quick:
        OUT.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
