"""Library code leaves the process's global state as it found it: matplotlib's backend (no pyplot, no
``matplotlib.use``), the logging configuration (tracking), and `risk`'s error handling lets a bug show
as a bug. (torch's RNG: ``test_profile``, ``test_capture``, ``test_threshold``.)"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_matplotlib_use_or_pyplot_in_library_code():
    for f in [*(ROOT / "featurize").rglob("*.py"), *(ROOT / "risk_model").rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "use" and getattr(node.value, "id", "") == "matplotlib":
                raise AssertionError(f"{f}: matplotlib.use")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("pyplot" in n for n in names), f"{f}: imports pyplot"


def test_plots_leave_matplotlibs_backend_and_pyplot_alone(tmp_path):
    """Every plot the library draws, in a fresh process: the backend setting is the one before, and
    pyplot (which would pick and fix a backend) was never imported."""
    code = f"""
import sys, json
from pathlib import Path
import numpy as np
import matplotlib
raw = lambda: dict.__getitem__(matplotlib.rcParams, "backend")  # reading rcParams["backend"] would resolve it
before = raw()
from featurize import SpectralProfile
from risk_model.evaluate import plot_reliability
from risk_model.serve import plot_curve
tmp = Path({str(tmp_path)!r})
prof = SpectralProfile.from_rows([dict(layer=0, name="b", m_exp=0.0, m_near=1.0, m_mid=0.0, m_con=0.0, rho=1.0,
                                        degenerate=False, _eigenvalues=np.array([1.0, 0.5j]))])
prof.plot(tmp / "eig.png")
plot_curve({{"p_curve": [{{"lr": 1e-4, "p": 0.1}}, {{"lr": 1e-2, "p": 0.6}}], "max_safe_lr": 1e-3,
            "max_safe_lr_interval": [5e-4, 2e-3], "threshold": 0.2, "predictions": []}}, tmp / "curve.png")
rng = np.random.default_rng(0)
y = rng.integers(0, 2, 200)
plot_reliability({{"y": y, "oof": {{"m": rng.uniform(size=200)}}}}, tmp / "rel.png", names=["m"])
print(json.dumps({{"same_backend": raw() == before, "pyplot": "matplotlib.pyplot" in sys.modules,
                  "files": sorted(p.name for p in tmp.iterdir())}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"same_backend": True, "pyplot": False, "files": ["curve.png", "eig.png", "rel.png"]}


def test_a_bug_in_a_library_function_shows_as_a_traceback():
    """`user_errors` turns the project's own errors into one line; a plain ValueError raised inside a
    library function (a bug) must reach the user as a traceback, not as a tidy `error:` line."""
    code = """
import importlib

P = importlib.import_module("featurize.profile")  # the module (the package attribute is the function)

def broken(eigenvalues):
    raise ValueError("a bug inside spectral_radius")

P.spectral_radius = broken
from risk_model.cli import app
app(["predict", "example", "--lr", "1e-3", "--probe-seeds", "1", "--json"])
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == "ValueError: a bug inside spectral_radius"
    assert "error: " not in res.stderr.splitlines()[0]
