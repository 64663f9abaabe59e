"""`risk predict` with predictor v3: the recommendation first, max_safe_lr and recommended_lr with
intervals, P(failed) and P(diverged) curves, what-if, the dead-at-init answer, networks outside the
corpus, the JSON contract, formats, bad input and the import-light path. The predictor here is fitted
on a subset of the real corpus-v2 (real training outcomes) with few trees."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from risk_model.cli import app
from risk_model.lrmodel import LRPredictor, ladder_targets, network_table
from risk_model.serve import LOSS_LIMIT, PredictorBundle, dead_at_init, load_bundle
from risk_model.zoo import build_model, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "datasets" / "corpus-v2"
runner = CliRunner()


def corpus_subset(per_class=20):
    models = pd.read_parquet(CORPUS / "models.parquet")
    models = models[~models["dead_at_init"]].groupby("family").head(per_class)
    keep = set(models["model_id"])
    layers = pd.read_parquet(CORPUS / "layers.parquet")
    runs = pd.read_parquet(CORPUS / "runs.parquet")
    return models, layers[layers["model_id"].isin(keep)], runs[runs["model_id"].isin(keep)].reset_index(drop=True)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    models, layers, runs = corpus_subset()
    nets = network_table(models, layers, runs).reset_index(drop=True)
    _, failed = ladder_targets(runs)
    idx = {m: i for i, m in enumerate(nets["model_id"])}
    m = LRPredictor(groups=("config", "gradient"), n_estimators=20, n_splits=3).fit(
        nets, runs["model_id"].map(idx), runs["lr"], failed, runs["diverged"], groups=nets["family"])
    m.metadata_ = {"version": "test-v3", "optimizers": ["adamw", "lion", "sgd"], "groups": ["config", "gradient"],
                   "families": sorted(nets["family"].unique()),
                   "metrics": {"auroc": 0.9, "ece": 0.03, "max_safe_lr_right": 0.7, "max_safe_lr_unsafe": 0.01},
                   "profile_settings": {"n_samples": 128, "rank": 8, "seed": 0, "kreiss_grid": "21x8"},
                   "config_defaults": {"warmup": 15, "batch_size": 16, "steps": 300, "d_model": 64},
                   "scale_range": {k: [float(nets[k].min()), float(nets[k].max())]
                                   for k in ("d_model", "n_layers", "steps", "batch_size")},
                   "feature_range": {"warmup_fraction": [0.0, 0.2]}, "novel_class_widen": 1.7,
                   "constant_recipe": {"steps": "300", "schedule": "constant", "beta2": "adamw 0.95, lion 0.99"}}
    shipped = load_bundle(ROOT / "models" / "default")
    out = tmp_path_factory.mktemp("b") / "bundle"
    PredictorBundle(None, shipped.config_free, "", version="test-v3", lr_predictor=m).save(out)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(dict(norm="pre_ln", d_model=32, n_layers=2, n_heads=2, block_size=32))
    return save_checkpoint(model, tmp_path_factory.mktemp("m") / "tiny.pt")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args):
    res = run("predict", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_json_keeps_v2_keys_adds_v3_and_the_numbers_are_the_models(ckpt, bundle_dir):
    out = run_json(ckpt, "--lr", "1e-4", "--lr", "3e-2", "--predictor", bundle_dir, "--probe-seeds", "1")
    v2 = {"model", "predictions", "max_safe_lr", "max_safe_lr_interval", "dead_at_init", "p_curve", "paper_score",
          "profile", "predictor", "warnings", "probe_seeds", "recommendation", "threshold"}
    assert v2 | {"recommended_lr", "recommended_lr_interval"} <= set(out)
    assert {"lr", "p_divergence", "risk", "p_failed"} <= set(out["predictions"][0])
    # independent recomputation: rebuild the network, its init features and the feature row by hand
    from risk_model.init_features import init_features
    from risk_model.lrmodel import init_scale_features, recipe_features

    ck = torch.load(ckpt, weights_only=True)
    net = build_model(ck["model_args"])
    net.load_state_dict(ck["state_dict"])
    init = init_features(net)
    feats = recipe_features(optimizer="adamw", warmup=15, steps=300, grad_clip=0, weight_decay=0, batch_size=16,
                            d_model=32, n_layers=2)
    feats.update(init_scale_features(init, 32))
    b = load_bundle(bundle_dir)
    want = b.lr_predictor.predict({k: np.array([v]) for k, v in feats.items()}, lrs=[1e-4, 3e-2])
    np.testing.assert_allclose([p["p_failed"] for p in out["predictions"]], want["p_failed"][0], rtol=1e-6)
    np.testing.assert_allclose([p["p_divergence"] for p in out["predictions"]], want["p_diverged"][0], rtol=1e-6)
    assert out["max_safe_lr"] == pytest.approx(float(want["max_safe_lr"][0]), rel=1e-6)
    for p in out["predictions"]:
        assert p["risk"] == ("low" if p["p_failed"] < 0.2 else "medium" if p["p_failed"] < 0.5 else "high")
    lo, hi = out["recommended_lr_interval"]
    assert lo <= out["recommended_lr"] <= out["max_safe_lr"] * (1 + 1e-9)


def test_curves_are_monotone_and_max_safe_lr_is_where_p_failed_crosses(ckpt, bundle_dir):
    out = run_json(ckpt, "--predictor", bundle_dir, "--probe-seeds", "1")
    lrs = np.array([c["lr"] for c in out["p_curve"]])
    pf, pd_ = np.array([c["p_failed"] for c in out["p_curve"]]), np.array([c["p"] for c in out["p_curve"]])
    assert (np.diff(pf) >= -1e-12).all() and (np.diff(pd_) >= -1e-12).all() and (pf >= pd_ - 1e-12).all()
    assert np.interp(np.log(out["max_safe_lr"]), np.log(lrs), pf) == pytest.approx(0.2, abs=0.03)
    lo, hi = out["max_safe_lr_interval"]
    assert lo < hi


def test_text_leads_with_the_recommendation_and_plots(ckpt, bundle_dir, tmp_path):
    res = run("predict", ckpt, "--predictor", bundle_dir, "--probe-seeds", "1", "--lr", "1e-3", "--plot",
              tmp_path / "e.png")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1].startswith("recommended learning rate") and lines[2].startswith("largest safe learning rate")
    assert "paper's config-free score" in res.stdout and "did not vary in the training corpus" in res.stdout
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "e-risk.png").stat().st_size > 0


def test_what_if_rows_are_the_neighbours_answers(ckpt, bundle_dir):
    out = run_json(ckpt, "--predictor", bundle_dir, "--probe-seeds", "1", "--warmup", "40", "--what-if")
    rows = {r["change"].split(" (")[0]: r for r in out["what_if"]}
    assert list(rows) == ["stated recipe", "warmup ×4", "warmup ÷4", "clipping on", "cosine schedule", "β2 0.999",
                          "lion"]
    assert rows["stated recipe"]["max_safe_lr"] == out["max_safe_lr"]
    # each row is what risk predict answers for that recipe
    for args, key in ((("--warmup", "160"), "warmup ×4"), (("--warmup", "40", "--clip", "1.0"), "clipping on"),
                      (("--warmup", "40", "--optimizer", "lion"), "lion")):
        other = run_json(ckpt, "--predictor", bundle_dir, "--probe-seeds", "1", *args)
        assert rows[key]["max_safe_lr"] == pytest.approx(other["max_safe_lr"], rel=1e-9)
        assert rows[key]["recommended_lr"] == pytest.approx(other["recommended_lr"], rel=1e-9)
    # knobs that never varied in the corpus: the same answer, and the row says why
    for key in ("cosine schedule", "β2 0.999"):
        assert rows[key]["max_safe_lr"] == pytest.approx(out["max_safe_lr"], rel=1e-12) and rows[key]["note"]
    # this predictor reads the config group: warmup and clipping move it, and their rows carry no note
    assert rows["warmup ×4"]["note"] is None and rows["clipping on"]["note"] is None


def test_what_if_says_when_the_predictor_does_not_read_a_knob(ckpt, bundle_dir, tmp_path):
    """A predictor with the linear part only (no config group): warmup and clipping cannot move
    its answer, and those rows say so."""
    from risk_model.lrmodel import LRPredictor

    shipped = load_bundle(bundle_dir)
    models, layers, runs = corpus_subset()
    nets = network_table(models, layers, runs).reset_index(drop=True)
    _, failed = ladder_targets(runs)
    idx = {m: i for i, m in enumerate(nets["model_id"])}
    m = LRPredictor(groups=(), n_estimators=0, n_splits=3).fit(nets, runs["model_id"].map(idx), runs["lr"], failed,
                                                               runs["diverged"], groups=nets["family"])
    m.metadata_ = shipped.lr_predictor.metadata_
    assert not m.reads("warmup") and not m.reads("grad_clip") and m.reads("optimizer")
    PredictorBundle(None, shipped.config_free, "", version="test-linear", lr_predictor=m).save(tmp_path / "b")
    out = run_json(ckpt, "--predictor", tmp_path / "b", "--probe-seeds", "1", "--warmup", "40", "--what-if")
    rows = {r["change"].split(" (")[0]: r for r in out["what_if"]}
    for key in ("warmup ×4", "warmup ÷4", "clipping on"):
        assert rows[key]["max_safe_lr"] == pytest.approx(out["max_safe_lr"], rel=1e-12)
        assert "does not read" in rows[key]["note"]
    assert rows["lion"]["note"] is None and rows["lion"]["max_safe_lr"] != pytest.approx(out["max_safe_lr"])


def test_unknown_schedule_is_one_line_naming_the_choices(ckpt, bundle_dir):
    res = run("predict", ckpt, "--predictor", bundle_dir, "--schedule", "warmup_stable_decay")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    assert "constant, cosine, linear" in res.stderr


def test_a_network_dead_at_init_gets_the_dead_answer_also_with_what_if(bundle_dir, tmp_path):
    torch.manual_seed(0)
    net = build_model(dict(family="gpt", norm="none", d_model=32, n_layers=2, n_heads=2, block_size=32, init_std=3.0))
    ck = save_checkpoint(net, tmp_path / "dead.pt")
    out = run_json(ck, "--predictor", bundle_dir, "--lr", "1e-5", "--probe-seeds", "1", "--what-if")
    assert out["dead_at_init"] is not None and out["max_safe_lr"] is None and out["what_if"] == []
    assert [(p["p_failed"], p["p_divergence"]) for p in out["predictions"]] == [(1.0, 1.0)]
    res = run("predict", ck, "--predictor", bundle_dir, "--probe-seeds", "1", "--what-if")
    assert res.exit_code == 0 and "dead at init" in res.stdout and "no change of the recipe" in res.stdout
    # independent check: the real loss of the network on random tokens is over the limit
    ids = torch.randint(0, 256, (8, 33))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(net(ids[:, :-1]).reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert float(loss) > LOSS_LIMIT or not math.isfinite(float(loss))


def test_dead_at_init_rule():
    assert dead_at_init({"init_loss": 5.5, "grad_norm": 3.0}) is None
    assert "loss" in dead_at_init({"init_loss": 60.0, "grad_norm": 3.0})["reason"]
    assert "gradient" in dead_at_init({"init_loss": 5.0, "grad_norm": 600.0})["reason"]
    assert "non-finite" in dead_at_init({"init_loss": float("inf"), "grad_norm": 1.0})["reason"]
    assert dead_at_init({"init_loss": float("nan"), "grad_norm": float("nan")}) is None


def test_wider_than_the_corpus_says_how_far_and_widens_the_interval(bundle_dir, tmp_path):
    torch.manual_seed(0)
    wide = save_checkpoint(build_model(dict(norm="pre_ln", d_model=1024, n_layers=2, n_heads=16, block_size=32)),
                           tmp_path / "wide.pt")
    narrow = save_checkpoint(build_model(dict(norm="pre_ln", d_model=64, n_layers=2, n_heads=2, block_size=32)),
                             tmp_path / "narrow.pt")
    w = run_json(wide, "--predictor", bundle_dir, "--probe-seeds", "1")
    n = run_json(narrow, "--predictor", bundle_dir, "--probe-seeds", "1")
    hi = load_bundle(bundle_dir).lr_predictor.metadata_["scale_range"]["d_model"][1]
    assert w["outside_corpus"]["d_model"]["factor"] == pytest.approx(1024 / hi)
    assert w["outside_corpus"]["interval_widened"] > 1.0 and "d_model" not in n["outside_corpus"]
    assert any(f"width 1024 is {1024 / hi:.1f}× outside" in x for x in w["warnings"])
    ratio = lambda o: math.log(o["max_safe_lr_interval"][1] / o["max_safe_lr_interval"][0])  # noqa: E731
    assert ratio(w) > ratio(n)


def test_steps_beyond_the_corpus_widen_the_interval_but_keep_the_median(ckpt, bundle_dir):
    a = run_json(ckpt, "--predictor", bundle_dir, "--probe-seeds", "1")
    b = run_json(ckpt, "--predictor", bundle_dir, "--probe-seeds", "1", "--steps", "3000")
    span = lambda o: o["max_safe_lr_interval"][1] / o["max_safe_lr_interval"][0]  # noqa: E731
    mid = lambda o: math.sqrt(o["max_safe_lr_interval"][1] * o["max_safe_lr_interval"][0])  # noqa: E731
    assert span(b) > span(a) and mid(b) == pytest.approx(mid(a), rel=1e-6)
    assert "steps" in b["outside_corpus"]


def test_hugging_face_directory(bundle_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=128)).save_pretrained(tmp_path / "hf")
    out = run_json(tmp_path / "hf", "--lr", "1e-3", "--predictor", bundle_dir, "--probe-seeds", "1")
    assert len(out["profile"]["layers"]) == 2 and out["recipe"]["d_model"] == 32
    assert not any("width unknown" in w for w in out["warnings"])


@pytest.mark.parametrize("lr", ["0", "-1e-3", "nan"])
def test_bad_learning_rate(ckpt, bundle_dir, lr):
    res = run("predict", ckpt, "--predictor", bundle_dir, f"--lr={lr}")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "--lr must be a positive number" in res.stderr


def test_missing_predictor_and_a_bundle_without_v3(ckpt, bundle_dir, tmp_path):
    import shutil

    v1 = tmp_path / "v1"
    shutil.copytree(bundle_dir, v1)
    shutil.rmtree(v1 / "lr_predictor")
    man = json.loads((v1 / "manifest.json").read_text())
    man.pop("lr_predictor")
    (v1 / "manifest.json").write_text(json.dumps(man))
    for pred, msg in ((v1, "no v3 predictor"), (tmp_path / "nope", "no such predictor")):
        res = run("predict", ckpt, "--predictor", pred, "--lr", "1e-3")
        assert res.exit_code == 1 and msg in res.stderr and res.stderr.count("\n") == 1


def test_predict_imports_nothing_heavy(ckpt, bundle_dir):
    """`risk predict` with a directory predictor: no mlflow, pandas, scikit-learn, xgboost or matplotlib."""
    code = f"""
import sys, json
from risk_model.cli import app
try:
    app(["predict", {str(ckpt)!r}, "--lr", "1e-3", "--json", "--predictor", {str(bundle_dir)!r}, "--probe-seeds", "1"])
except SystemExit as e:
    assert e.code in (0, None), e.code
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"mlflow", "pandas", "sklearn", "xgboost", "matplotlib"}})
print("HEAVY " + ",".join(heavy) if heavy else "NO_HEAVY")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "NO_HEAVY"
    assert json.loads(res.stdout[: res.stdout.rindex("}") + 1])["predictions"][0]["lr"] == 1e-3


def test_probe_seeds_the_median_seed_is_shown_with_every_seeds_value(ckpt, bundle_dir):
    out = run_json(ckpt, "--predictor", bundle_dir, "--probe-seeds", "3")
    ps = out["probe_seeds"]
    assert ps["seeds"] == [0, 1, 2] and len(ps["max_safe_lr"]) == 3
    assert out["max_safe_lr"] == sorted(ps["max_safe_lr"])[1]
