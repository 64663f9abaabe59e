"""A sweep in a subprocess, killed with SIGKILL once it has finished some units (for resume and
orphan-worker tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_sweep(spec: Path, out: Path, *args: str) -> subprocess.Popen:
    """``python -m risk_model.sweep SPEC --out OUT --json ARGS`` from this checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "risk_model.sweep", str(spec), "--out", str(out), "--json", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after_parts(proc: subprocess.Popen, out: Path, n: int = 2, timeout: float = 300) -> None:
    """SIGKILL ``proc`` once ``out/parts`` holds ``n`` finished units (generous timeout: the machine
    may be busy); fails if the sweep ended first."""
    parts = out / "parts"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if len(list(parts.glob("*.runs.parquet"))) >= n or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "sweep finished before it could be killed: make runs longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
