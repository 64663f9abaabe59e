"""Issue 13: no silent wrong answer. Every bad input gets one clear line on stderr and exit code 1;
nothing computed is lost to an unwritable output; the shipped predictor is never overwritten."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from risk_model.cli import app

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "default"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, *needles):
    """Exit code 1, a single `error:` line on stderr, no traceback, every needle in it."""
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------ 1. only `example` is the example
@pytest.mark.parametrize("name", ["example_model.pt", "examples/my_net.pt", "example.pt", "examplex"])
def test_mistyped_path_is_no_such_file_not_the_example(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the names do not exist here
    res = invoke("predict", name, "--lr", "1e-3")
    assert_one_line_error(res, name, "no such file")
    res = invoke("profile", name)
    assert_one_line_error(res, name, "no such file")


def test_exact_example_names_still_mean_the_builtin_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from risk_model.loading import load_model

    m = load_model("example:none")
    assert type(m).__name__ == "TransformerLM" and m.config.norm == "none" and m.config.d_model == 64


# ------------------------------------------------------------------ 9. corrupt predictor files
@pytest.fixture
def bundle_copy(tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(SHIPPED, dst)
    return dst


@pytest.mark.parametrize("rel, text, expected", [
    ("manifest.json", "[1, 2]", "JSON object"),
    ("manifest.json", "{not json", "not valid JSON"),
    ("manifest.json", '{"config_aware": "nowhere"}', "not a subdirectory"),
    ("config_aware/calibrator.json", '{"kind": "platt"}', '"a": number'),
    ("config_aware/calibrator.json", '"platt"', "JSON object"),
    ("config_aware/booster.json", '{"learner": {}}', "XGBoost JSON model"),
    ("config_aware/booster.json", None, "XGBoost JSON model"),  # truncated
    ("config_free/isotonic.json", '{"kind": "isotonic", "x": [1, 2]}', '"y": [numbers]'),
])
def test_corrupt_predictor_file_is_named_with_what_was_expected(bundle_copy, rel, text, expected):
    from risk_model.errors import PredictorError
    from risk_model.serve import load_bundle

    f = bundle_copy / rel
    f.write_text(f.read_text()[:4000] if text is None else text)
    with pytest.raises(PredictorError) as ei:
        load_bundle(bundle_copy)
    msg = str(ei.value)
    assert str(f) in msg and expected in msg, msg
    assert "\n" not in msg


# ------------------------------------------------------------------ 10. help and --version
def test_version_prints_the_package_version():
    from importlib.metadata import version

    res = invoke("--version")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == version("divergence-risk")


@pytest.mark.parametrize("cmd", ["predict", "profile", "train", "evaluate", "sweep", "score"])
def test_help_shows_no_bool_metavar(cmd):
    res = invoke(cmd, "--help")
    assert res.exit_code == 0
    assert "<bool>" not in res.stdout


def test_predict_help_names_the_example_and_sweep_help_lists_spec_keys():
    from risk_model.sweep.spec import RUN_FIELDS, _TOP_KEYS

    text = " ".join(invoke("predict", "--help").stdout.split())
    assert "example:<norm>" in text
    text = " ".join(invoke("sweep", "--help").stdout.replace("│", " ").split())
    words = set(text.replace(",", " ").replace(";", " ").replace("(", " ").split())
    for key in sorted(_TOP_KEYS) + sorted(RUN_FIELDS):
        assert key in words or f"[{key}]" in words, key


# ------------------------------------------------------------------ 2. numeric options, training domain
@pytest.mark.parametrize("args, option", [
    (["predict", "example", "--lr", "1e-3", "--warmup", "-5"], "--warmup"),
    (["predict", "example", "--lr", "1e-3", "--steps", "0"], "--steps"),
    (["predict", "example", "--lr", "1e-3", "--batch-size", "0"], "--batch-size"),
    (["predict", "example", "--lr", "1e-3", "--threshold", "1.5"], "--threshold"),
    (["profile", "example", "--seed", "-1"], "--seed"),
    (["profile", "example", "--rank", "-3"], "--rank"),
    (["profile", "example", "--n-samples", "1"], "--n-samples"),
    (["score", "models:/x/1", "--lr", "1e-3", "--steps", "-2"], "--steps"),
    (["score", "models:/x/1", "--threshold", "0"], "--threshold"),
    (["train", "--corpus", "nowhere", "--seed", "-1", "--no-track"], "--seed"),
    (["evaluate", "--corpus", "nowhere", "--seed", "-1", "--no-track"], "--seed"),
    (["evaluate", "--corpus", "nowhere", "--n-boot", "0", "--no-track"], "--n-boot"),
])
def test_out_of_range_numbers_are_refused_at_the_boundary(args, option):
    assert_one_line_error(invoke(*args), option)


class ResidualMLPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """Not a transformer and not a language model: no embedding, no attention."""

    def __init__(self, d=32, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualMLPBlock(d) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_network_outside_the_training_domain_gets_a_warning_and_no_advice(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mlp.pt"
    torch.save(ResidualMLP(), path)
    args = ["predict", path, "--lr", "0.5", "--lr", "1e-3", "--trust-pickle", "--input-shape", "8,32"]
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert any("outside the training domain" in w for w in out["warnings"]), out["warnings"]
    assert not any("assumed d_model" in w for w in out["warnings"]), out["warnings"]  # width 32 is known
    assert not any("lower the learning rate" in r for r in out["recommendation"]), out["recommendation"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert "outside the training domain" in text and "lower the learning rate" not in text


def test_zoo_transformer_is_inside_the_training_domain():
    res = invoke("predict", "example", "--lr", "1e-3", "--json")
    assert res.exit_code == 0, res.output
    assert not any("training domain" in w for w in json.loads(res.stdout)["warnings"])
