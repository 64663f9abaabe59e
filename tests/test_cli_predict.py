"""`risk predict`: output contract, formats (zoo checkpoint, Hugging Face directory), warnings, bad input,
and the import-light default path (no mlflow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from featurize import profile
from risk_model.cli import app
from risk_model.corpus import load_corpus
from risk_model.predictor import BoostedRiskModel, CalibratedRiskModel, IsotonicRiskModel
from risk_model.serve import LR_GRID, PredictorBundle, load_bundle
from risk_model.zoo import build_model, save_checkpoint
from synth_corpus import make_corpus, write_corpus

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    runs, layers = make_corpus(n_configs=50, seeds=2, seed=2)
    c = load_corpus(write_corpus(tmp_path_factory.mktemp("c"), runs, layers))
    y, g = c.runs["diverged"], c.runs["config_id"]
    meta = dict(profile_settings={"n_samples": 128, "rank": 8, "seed": 0},
                config_defaults={"warmup": 0, "batch_size": 16, "steps": 300, "d_model": 64},
                metrics={"auroc": 0.9, "ece": 0.05})
    aware = CalibratedRiskModel(BoostedRiskModel(xgb_params={"num_boost_round": 30})).fit(c.runs, y, g)
    free = IsotonicRiskModel().fit(c.runs, y, g)
    path = tmp_path_factory.mktemp("bundle") / "b"
    PredictorBundle(aware, free, source="", version="test-1").save(path, meta)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(dict(norm="none", d_model=32, n_layers=2, n_heads=2, block_size=32))
    return save_checkpoint(model, tmp_path_factory.mktemp("m") / "tiny.pt")


def run_json(*args):
    res = runner.invoke(app, ["predict", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_predict_json_contract_and_values(ckpt, bundle_dir):
    out = run_json(ckpt, "--lr", "1e-4", "--lr", "3e-2", "--predictor", bundle_dir, "--probe-seeds", "1")
    assert set(out) >= {"model", "predictions", "max_safe_lr", "profile", "predictor", "warnings"}
    assert [p["lr"] for p in out["predictions"]] == [1e-4, 3e-2]
    # independent recomputation: profile the same weights with the bundle's settings, predict directly
    model = torch.load(ckpt, weights_only=True)
    net = build_model(model["model_args"])
    net.load_state_dict(model["state_dict"])
    prof = profile(net, n_samples=128, rank=8, seed=0)
    b = load_bundle(bundle_dir)
    lay = prof.layers[~prof.layers["degenerate"]]
    extra = {f"{c}_{s}": float(getattr(np, s)(lay[c].to_numpy()))
             for c in ("update_ratio", "m_exp_all", "m_near_all", "m_mid_all", "m_con_all")
             for s in ("mean", "max", "min", "std")}
    table = pd.DataFrame([dict(prof.aggregates, **extra, lr=lr, optimizer="adamw", warmup=0, batch_size=16, steps=300,
                               d_model=32) for lr in (1e-4, 3e-2)])
    want = b.config_aware.predict_proba(table)[:, 1]
    np.testing.assert_allclose([p["p_divergence"] for p in out["predictions"]], want, rtol=1e-6)
    for p in out["predictions"]:
        band = "low" if p["p_divergence"] < 0.2 else "medium" if p["p_divergence"] < 0.5 else "high"
        assert p["risk"] == band
    lo, hi = b.config_aware.feature_range_["log10_lr"]  # the scan stays inside the trained LR range
    lrs = LR_GRID[(np.log10(LR_GRID) >= lo - 1e-9) & (np.log10(LR_GRID) <= hi + 1e-9)]
    grid = pd.concat([table.iloc[[0]]] * len(lrs), ignore_index=True).assign(lr=lrs)
    pg = b.config_aware.predict_proba(grid)[:, 1]
    safe = out["max_safe_lr"]
    if safe is None:
        assert pg[0] >= 0.2
    else:
        assert all(pg[lrs <= safe] < 0.2) and (safe == lrs[-1] or pg[lrs > safe][0] >= 0.2)
    assert out["predictor"]["version"] == "test-1" and out["predictor"]["auroc"] == 0.9
    assert len(out["profile"]["layers"]) == 2
    assert out["profile"]["aggregates"]["m_near_mean"] == pytest.approx(prof.aggregates["m_near_mean"])


def test_without_lr_uses_config_free_predictor(ckpt, bundle_dir, tmp_path):
    out = run_json(ckpt, "--predictor", bundle_dir)
    assert len(out["predictions"]) == 1 and out["predictions"][0]["lr"] is None
    assert any("config-free" in w for w in out["warnings"])
    res = runner.invoke(app, ["predict", str(ckpt), "--predictor", str(bundle_dir), "--lr", "1e-3",
                              "--plot", str(tmp_path / "e.png")])
    assert res.exit_code == 0, res.output
    assert "P(divergence)" in res.stdout and (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_degenerate_layers_and_out_of_range_warn(bundle_dir, tmp_path):
    torch.manual_seed(0)
    net = build_model(dict(norm="pre_ln", d_model=32, n_layers=2, n_heads=2, block_size=32))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "c_proj" in name and name.startswith("blocks.1"):
                p.zero_()  # block 1's residual branch is off: degenerate
    path = save_checkpoint(net, tmp_path / "deg.pt")
    out = run_json(path, "--lr", "1e-3", "--warmup", "100000", "--predictor", bundle_dir)
    text = " ".join(out["warnings"])
    assert "degenerate layers" in text and "[1]" in text
    assert "warmup=1e+05" in text and "outside the training range" in text


def test_hugging_face_directory(bundle_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=128)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    out = run_json(tmp_path / "hf", "--lr", "1e-3", "--predictor", bundle_dir)
    assert len(out["profile"]["layers"]) == 2
    assert not any("width unknown" in w for w in out["warnings"])


@pytest.mark.parametrize("lr", ["0", "-1e-3", "nan"])
def test_bad_learning_rate(ckpt, bundle_dir, lr):
    res = runner.invoke(app, ["predict", str(ckpt), "--predictor", str(bundle_dir), f"--lr={lr}"])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "--lr must be a positive number" in res.stderr


def test_other_feature_schema_and_missing_predictor(ckpt, bundle_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    meta_path = bad / "config_aware" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["feature_names"] = meta["feature_names"] + ["grad_clip"]
    meta_path.write_text(json.dumps(meta))
    for pred, msg in ((bad, "another feature schema"), (tmp_path / "nope", "no such predictor")):
        res = runner.invoke(app, ["predict", str(ckpt), "--predictor", str(pred), "--lr", "1e-3"])
        assert res.exit_code == 1 and msg in res.stderr and res.stderr.count("\n") == 1


def test_default_predictor_path_imports_nothing_heavy(ckpt, bundle_dir):
    """`risk predict --lr` with a directory predictor: no mlflow, pandas, scikit-learn or xgboost."""
    code = f"""
import sys, json
import risk_model.serve as S
S.default_predictor_path = lambda: __import__("pathlib").Path({str(bundle_dir)!r})
from risk_model.cli import app
try:
    app(["predict", {str(ckpt)!r}, "--lr", "1e-3", "--json"])
except SystemExit as e:
    assert e.code in (0, None), e.code
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"mlflow", "pandas", "sklearn", "xgboost", "matplotlib"}})
print("HEAVY " + ",".join(heavy) if heavy else "NO_HEAVY")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "NO_HEAVY"
    assert json.loads(res.stdout[: res.stdout.rindex("}") + 1])["predictions"][0]["lr"] == 1e-3
