"""MLflow: `risk train` logging/registration/promotion and `risk score`, against a real local registry
(sqlite + artifacts) in a temporary directory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from risk_model import tracking
from risk_model.cli import app
from risk_model.corpus import load_corpus
from risk_model.serve import load_bundle
from risk_model.zoo import build_model, save_checkpoint
from ladder_subset import write_ladder_subset
from synth_corpus import make_corpus, write_corpus

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh registry; the working directory is the temp dir so nothing lands in the checkout."""
    root = tmp_path_factory.mktemp("store")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/db/mlflow.db")
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A ladder corpus of real corpus-v2 runs, and the same with its losses and labels shuffled."""
    from risk_model.sweep.runner import write_parquet_atomic

    good = write_ladder_subset(tmp_path_factory.mktemp("good"), families=("gpt", "moe"), per_class=10)
    noise = tmp_path_factory.mktemp("noise")
    for name in ("layers", "models"):
        write_parquet_atomic(pd.read_parquet(good / f"{name}.parquet"), noise / f"{name}.parquet", name)
    runs = pd.read_parquet(good / "runs.parquet")
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(runs))
    runs = runs.assign(final_loss=runs["final_loss"].to_numpy()[perm], diverged=runs["diverged"].to_numpy()[perm])
    write_parquet_atomic(runs, noise / "runs.parquet", "runs")
    return good, noise


def train(corpus, out, *extra):
    res = runner.invoke(app, ["train", "--corpus", str(corpus), "--out", str(out), "--rounds", "10",
                              "--n-boot", "20", "--groups", "config", *extra])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def trained(store, corpora):
    good, noise = corpora
    train(good, store / "out1")
    return store / "out1"


def test_tracking_leaves_the_callers_log_levels_alone(store):
    """Our calls quiet mlflow's and alembic's chatter while they run, and only then."""
    import logging

    loggers = [logging.getLogger("mlflow"), logging.getLogger("alembic")]
    saved = [lg.level for lg in loggers]
    try:
        loggers[0].setLevel(logging.DEBUG)
        loggers[1].setLevel(logging.INFO)
        tracking.connect()
        tracking.setup()
        assert [lg.level for lg in loggers] == [logging.DEBUG, logging.INFO]
        with tracking.quiet_mlflow_logs():
            assert [lg.level for lg in loggers] == [logging.ERROR, logging.ERROR]
        assert [lg.level for lg in loggers] == [logging.DEBUG, logging.INFO]
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def test_should_promote():
    assert tracking.should_promote({"auroc": 0.9, "brier": 0.05}, None)[0]
    assert tracking.should_promote({"auroc": 0.9, "brier": 0.05}, {"auroc": "0.9005", "brier": "0.049"})[0]
    assert not tracking.should_promote({"auroc": 0.85, "brier": 0.05}, {"auroc": "0.9", "brier": "0.05"})[0]
    assert not tracking.should_promote({"auroc": 0.95, "brier": 0.10}, {"auroc": "0.9", "brier": "0.05"})[0]


def test_train_logs_registers_and_serves_pyfunc(store, trained, corpora):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    champ = client.get_model_version_by_alias("divergence-risk", "champion")
    assert str(champ.version) == "1"
    run = client.get_run(champ.tags["run_id"])
    c = load_corpus(corpora[0])
    assert run.data.tags["corpus_hash"] == c.hash
    assert 0.5 < run.data.metrics["v3_lofo_auroc_failed"] <= 1.0
    assert {"groups", "rounds", "corpus_hash"} <= set(run.data.params)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/heldout_v3.md", "evaluation/heldout_v3_reliability.png"} <= arts
    # models-from-code: the MLmodel points at the code file; no pickled python model anywhere
    local = Path(mlflow.artifacts.download_artifacts("models:/divergence-risk/1"))
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "pyfunc_model.py" in mlmodel
    assert not list(local.rglob("*.pkl"))
    assert str(local).startswith(str(store)) or not (Path.cwd() / "mlruns").exists()
    # the served pyfunc predicts what the bundle's model predicts, row by row
    from risk_model.heldout_v3 import load_v3

    pyf = mlflow.pyfunc.load_model("models:/divergence-risk@champion")
    nets, _, _ = load_v3(corpora[0])
    feats = [c for c in nets.columns if nets[c].dtype.kind in "fiub" and c not in ("dead_at_init", "never_learns")]
    rows = nets[feats].iloc[:8].assign(lr=[1e-4, 1e-3, 1e-2, 1e-1] * 2)
    got = pyf.predict(rows)
    lrp = load_bundle(trained).lr_predictor
    for i in range(len(rows)):
        one = lrp.predict({k: rows[k].to_numpy()[i:i + 1] for k in feats}, lrs=[rows["lr"].iloc[i]])
        assert got["p_failed"].iloc[i] == pytest.approx(one["p_failed"][0, 0], rel=1e-9)
        assert got["max_safe_lr"].iloc[i] == pytest.approx(one["max_safe_lr"][0], rel=1e-9)


def test_champion_moves_only_when_not_worse(store, trained, corpora):
    from mlflow import MlflowClient

    good, noise = corpora
    res = train(noise, store / "out2")  # labels shuffled: held-out AUROC ≈ 0.5, worse
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("divergence-risk", "champion").version) == "1"
    assert "champion kept" in res.stdout
    assert "held out on another corpus" in res.stdout                 # noise and good differ in their hash
    train(noise, store / "out3", "--promote")
    assert str(client.get_model_version_by_alias("divergence-risk", "champion").version) == "3"
    train(good, store / "out4")  # better than the forced champion again
    assert str(client.get_model_version_by_alias("divergence-risk", "champion").version) == "4"


def test_train_bad_corpus_writes_nothing(tmp_path, monkeypatch, corpora):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/reg/mlflow.db")
    runs = pd.read_parquet(corpora[0] / "runs.parquet").drop(columns=["config_id", "warmup"])
    bad = write_corpus(tmp_path / "bad", runs, None)
    res = runner.invoke(app, ["train", "--corpus", str(corpora[0]), "--corpus", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "config_id, warmup" in res.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "reg").exists() and not (tmp_path / "mlruns").exists()


@pytest.fixture(scope="module")
def candidates(store):
    """Two versions of a registered PyTorch network, plus a registered non-PyTorch model."""
    import mlflow
    from sklearn.linear_model import LogisticRegression

    tracking.setup()
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_model(dict(norm="none", d_model=32, n_layers=2, n_heads=2, block_size=32))
        with mlflow.start_run():
            mlflow.pytorch.log_model(net, name="net", registered_model_name="candidate", pip_requirements=["torch"],
                                     serialization_format="pickle")
        nets.append(save_checkpoint(net, store / f"cand{seed}.pt"))
    with mlflow.start_run():  # MLflow 3's default PyTorch format: a traced program, not profilable
        mlflow.pytorch.log_model(net, name="net", registered_model_name="traced", pip_requirements=["torch"],
                                 input_example=np.zeros((1, 8), dtype=np.int64))
    with mlflow.start_run():
        mlflow.sklearn.log_model(LogisticRegression().fit([[0], [1]], [0, 1]), name="lr",
                                 registered_model_name="not-torch", pip_requirements=["scikit-learn"])
    return nets


def test_score_tags_model_versions(store, trained, candidates):
    from mlflow import MlflowClient

    res = runner.invoke(app, ["score", "models:/candidate/1", "--predictor", str(trained), "--lr", "1e-3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    tags = MlflowClient().get_model_version("candidate", "1").tags
    assert float(tags["divergence_risk.p"]) == pytest.approx(out["predictions"][0]["p_failed"], abs=1e-6)
    assert float(tags["divergence_risk.max_safe_lr"]) == pytest.approx(out["max_safe_lr"], rel=1e-2)
    assert tags["divergence_risk.risk"] == out["predictions"][0]["risk"]
    assert tags["divergence_risk.predictor_version"].startswith("divergence-risk/")
    # independent path: the same weights from a checkpoint file through `risk predict`
    res2 = runner.invoke(app, ["predict", str(candidates[0]), "--predictor", str(trained), "--lr", "1e-3", "--json"])
    assert json.loads(res2.stdout)["predictions"][0]["p_failed"] == pytest.approx(
        out["predictions"][0]["p_failed"], rel=1e-6)
    # the registered predictor serves the same numbers as its directory
    res3 = runner.invoke(app, ["predict", str(candidates[0]), "--predictor", "models:/divergence-risk/1",
                               "--lr", "1e-3", "--json"])
    assert res3.exit_code == 0, res3.output
    assert json.loads(res3.stdout)["predictions"][0]["p_failed"] == pytest.approx(
        out["predictions"][0]["p_failed"], rel=1e-6)
    res = runner.invoke(app, ["score", "--all", "candidate", "--predictor", str(trained)])
    assert res.exit_code == 0, res.output
    assert "divergence_risk.max_safe_lr" in MlflowClient().get_model_version("candidate", "2").tags


@pytest.mark.parametrize("uri, msg", [
    ("models:/candidate@nosuch", "no alias 'nosuch'"),
    ("models:/candidate/99", "no version 99"),
    ("models:/not-torch/1", "not a PyTorch model"),
    ("models:/traced/1", "torch.export program"),
    ("candidate/1", "not a registered-model URI"),
])
def test_score_bad_uri_writes_nothing(store, trained, candidates, uri, msg):
    from mlflow import MlflowClient

    def tags():
        return {(v.name, v.version): dict(v.tags) for v in MlflowClient().search_model_versions()}

    before = tags()
    res = runner.invoke(app, ["score", uri, "--predictor", str(trained), "--lr", "1e-3"])
    assert res.exit_code == 1 and msg in res.stderr and res.stderr.count("\n") == 1
    assert tags() == before


def test_score_without_registry_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none/mlflow.db")
    res = runner.invoke(app, ["score", "models:/candidate/1", "--lr", "1e-3"])
    assert res.exit_code == 1 and "no MLflow registry" in res.stderr
    assert not (tmp_path / "none").exists()
