"""Overhead of ``RiskMonitor.step`` during training; writes results/monitor.json.

A zoo GPT (pre-LN, d = 256, L = 6, seq 64, batch 16, AdamW) trains on random tokens. We time plain
training steps, and ``RiskMonitor.step`` calls on the same model (the cheap profile: rank-32 DMD,
N = 256 token states per layer, plus one prediction), interleaved in rounds so that load from other
processes hits both alike. The overhead at ``every`` = 50 is the time of one monitored step spread
over 50 training steps, as a percentage of the training step time. The pre-flight ``check()`` (the
same work as ``risk predict``) is timed once.

Run: ``python benchmarks/monitor.py`` (a few CPU-minutes); ``--quick`` for a smoke run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# benchmarks/featurize.py would shadow the featurize package when this file is run as a script
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from risk_model.monitor import RiskMonitor  # noqa: E402
from risk_model.zoo import build_model  # noqa: E402

OUT = Path(__file__).parent / "results" / "monitor.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--n-samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=10, help="training steps per round")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.d_model, a.n_layers, a.rounds, a.train_steps = 64, 2, 2, 3
    torch.manual_seed(0)
    model = build_model(dict(norm="pre_ln", d_model=a.d_model, n_layers=a.n_layers, n_heads=4, block_size=64,
                             vocab_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    mon = RiskMonitor(model, lr=3e-4, optimizer=opt, every=1, n_samples=a.n_samples)
    t0 = time.perf_counter()
    mon.check()
    check_s = time.perf_counter() - t0

    def train_step():
        x = torch.randint(0, 256, (16, 64))
        loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step()  # warm-up
    mon.step(0)
    step_s, monitor_s = [], []
    for r in range(a.rounds):
        for _ in range(a.train_steps):
            t = time.perf_counter()
            train_step()
            step_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        mon.step(r + 1)
        monitor_s.append(time.perf_counter() - t)
    step, monitor = statistics.median(step_s), statistics.median(monitor_s)
    res = dict(d_model=a.d_model, n_layers=a.n_layers, every=a.every, n_samples=a.n_samples, rank=32,
               train_step_s=step, monitor_step_s=monitor, profile_s=statistics.median(mon.history["seconds"]),
               overhead_pct=100 * monitor / (a.every * step), check_s=check_s,
               torch_threads=torch.get_num_threads(), rounds=a.rounds, quick=a.quick)
    print(json.dumps(res, indent=2))
    if not a.quick:
        OUT.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
