"""The wheel carries the shipped predictor (models/default) and serving finds it as package data."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_the_default_predictor(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("featurize", "risk_model", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("divergence_risk-*.whl")
    shipped = sorted(p for p in (ROOT / "models" / "default").rglob("*.json"))
    assert shipped, "models/default is empty"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for p in shipped:
            arc = "risk_model/_models/default/" + p.relative_to(ROOT / "models" / "default").as_posix()
            assert arc in names, f"{arc} missing from the wheel"
            assert z.read(arc) == p.read_bytes()
        assert "risk_model/serve.py" in names and "featurize/schema.py" in names

    # installed (not editable) in a fresh venv whose dependencies come from this one, run elsewhere
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_deps.pth").write_text("\n".join(deps) + "\n")  # a path line: no editable finder runs
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # what `pip install --no-deps` puts there (the console script aside)
    py = venv / "bin" / "python"
    code = ("import sys, risk_model; assert risk_model.__file__.startswith(sys.argv[1]), risk_model.__file__; "
            "from risk_model.cli import app; app(['predict', 'example', '--lr', '1e-3', '--json'])")
    res = subprocess.run([str(py), "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    out = json.loads(res.stdout)
    assert out["predictions"][0]["lr"] == 1e-3
    assert out["predictor"]["source"].startswith(str(site))  # the bundled copy, found by importlib.resources


def test_default_predictor_is_found():
    """In the wheel it is package data; in an editable install, this checkout's models/default."""
    from risk_model.serve import default_predictor_path, load_bundle

    path = default_predictor_path()
    assert (path / "manifest.json").is_file()
    assert (path / "manifest.json").read_bytes() == (ROOT / "models" / "default" / "manifest.json").read_bytes()
    b = load_bundle()
    assert b.lr_predictor is not None and b.config_free is not None
