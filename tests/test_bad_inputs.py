"""Issue 13: no silent wrong answer. Every bad input gets one clear line on stderr and exit code 1;
nothing computed is lost to an unwritable output; the shipped predictor is never overwritten."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
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
    ("manifest.json", '{"lr_predictor": "nowhere"}', "not a subdirectory"),
    ("lr_predictor/lr_predictor.json", '{"kind": "something else"}', "not a v3 predictor"),
    ("lr_predictor/lr_predictor.json", None, "not valid JSON"),  # truncated
    ("lr_predictor/metadata.json", "{", "not valid JSON"),
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
    (["predict", "example", "--lr", "1e-3", "--seq-len", "0"], "--seq-len"),
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


def test_network_outside_every_class_gets_a_wide_interval_and_a_warning_not_a_crash(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mlp.pt"
    torch.save(ResidualMLP(), path)
    args = ["predict", path, "--lr", "0.5", "--lr", "1e-3", "--trust-pickle", "--input-shape", "8,32", "--probe-seeds", "1"]
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert any("outside the training domain" in w for w in out["warnings"]), out["warnings"]
    assert not any("assumed d_model" in w for w in out["warnings"]), out["warnings"]  # width 32 is known
    assert out["outside_corpus"]["novel_class"] and out["outside_corpus"]["interval_widened"] > 1
    assert out["max_safe_lr"] > 0 and len(out["predictions"]) == 2
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "outside the training domain" in " ".join(res.stdout.split())


def test_zoo_transformer_is_inside_the_training_domain():
    res = invoke("predict", "example", "--lr", "1e-3", "--json")
    assert res.exit_code == 0, res.output
    assert not any("training domain" in w for w in json.loads(res.stdout)["warnings"])


# ------------------------------------------------------------------ 3. probe seeds: same settings, spread shown
def test_profile_and_predict_use_the_predictors_settings_and_the_median_probe_seed():
    import featurize
    from risk_model.init_features import init_features
    from risk_model.loading import example_model
    from risk_model.serve import Request, assess_critical, load_bundle, predictor_groups

    meta = json.loads((SHIPPED / "lr_predictor" / "metadata.json").read_text())
    settings = meta["profile_settings"]
    prof_out = json.loads(invoke("profile", "example", "--json").stdout)
    one = invoke("predict", "example", "--lr", "1e-2", "--lr", "3e-2", "--probe-seeds", "1", "--json")
    assert one.exit_code == 0, one.output
    one = json.loads(one.stdout)
    assert one["probe_seeds"]["seeds"] == [0]
    default = json.loads(invoke("predict", "example", "--lr", "1e-2", "--json").stdout)
    pred = invoke("predict", "example", "--lr", "1e-2", "--lr", "3e-2", "--probe-seeds", "3", "--json")
    assert pred.exit_code == 0, pred.output
    pred = json.loads(pred.stdout)
    if "spectral" in meta["groups"]:
        # a predictor that reads the profile: three probe seeds by default, and the answer moves with them
        assert "spectral" in predictor_groups(load_bundle(SHIPPED))
        assert default["probe_seeds"]["seeds"] == [0, 1, 2]
        assert len(set(pred["probe_seeds"]["max_safe_lr"])) == 3
    else:
        # one that does not: one probe seed by default, and its answer does not depend on the probe
        assert default["probe_seeds"]["seeds"] == [0]
        assert one["max_safe_lr"] == pytest.approx(pred["max_safe_lr"], rel=1e-12)
    # same network, same settings, same seed (the one whose max_safe_lr is shown): the same profile in both commands
    chosen = pred["probe_seeds"]["chosen"]
    assert pred["profile"]["meta"]["seed"] == chosen
    same = json.loads(invoke("profile", "example", "--seed", str(chosen), "--probe-seeds", "1", "--json").stdout)
    assert same["meta"]["n_samples"] == pred["profile"]["meta"]["n_samples"] == settings["n_samples"]
    assert same["aggregates"]["m_near_mean"] == pytest.approx(pred["profile"]["aggregates"]["m_near_mean"])
    # every seed's max_safe_lr, recomputed here from three independent profiles; the median is shown
    bundle, net = load_bundle(SHIPPED), example_model()
    init = init_features(net)
    safes = []
    for s in range(3):
        prof = featurize.profile(net, n_samples=settings["n_samples"], seed=s, rank=settings["rank"],
                                 kreiss_grid=settings["kreiss_grid"])
        r = assess_critical(prof, init, bundle=bundle, request=Request(lrs=[1e-2, 3e-2]), n_layers=4, width=64)
        safes.append(r.max_safe_lr)
    np.testing.assert_allclose(pred["probe_seeds"]["max_safe_lr"], safes, rtol=1e-6)
    assert pred["max_safe_lr"] == pytest.approx(sorted(safes)[1], rel=1e-9)
    assert pred["probe_seeds"]["seeds"] == [0, 1, 2]
    # the profile command shows how far the aggregates move over the same seeds
    lo, hi = prof_out["probe_seeds"]["aggregates_min_max"]["m_near_mean"]
    assert lo <= prof_out["aggregates"]["m_near_mean"] <= hi and hi > lo


def test_unwritable_plot_is_refused_before_any_work(tmp_path):
    res = invoke("predict", "example", "--lr", "1e-3", "--plot", "/proc/eig.png")
    assert_one_line_error(res, "/proc", "cannot write")
    assert res.stdout == ""


def test_failed_plot_write_keeps_the_printed_results_and_leaves_no_file(tmp_path, monkeypatch):
    import errno

    from featurize.profile import SpectralProfile

    def full_disk(self, path, **kw):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SpectralProfile, "plot", full_disk)
    target = tmp_path / "eig.png"
    res = invoke("predict", "example", "--lr", "1e-3", "--probe-seeds", "1", "--plot", target)
    assert_one_line_error(res, str(target), "No space left")
    assert "P(failed)" in res.stdout and "largest safe learning rate" in res.stdout
    assert list(tmp_path.iterdir()) == []  # no truncated plot, no temporary file


def test_evaluate_refuses_an_unwritable_report_directory_before_loading_anything():
    res = invoke("evaluate", "--corpus", "nowhere", "--out", "/proc/report", "--no-track")
    assert_one_line_error(res, "/proc/report", "cannot write")


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    from risk_model.outputs import atomic_path

    f = tmp_path / "evaluation.md"
    f.write_text("old report")
    with pytest.raises(OSError):
        with atomic_path(f) as tmp:
            tmp.write_text("half a new rep")
            raise OSError("disk full")
    assert f.read_text() == "old report" and sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.md"]
    with atomic_path(f) as tmp:
        tmp.write_text("new report")
    assert f.read_text() == "new report" and sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.md"]


# ------------------------------------------------------------------ 5. memory estimated before capture
def test_too_many_samples_are_refused_with_the_estimate_and_the_limit():
    import re

    res = invoke("profile", "example", "--n-samples", "1000000000", "--probe-seeds", "1")
    line = assert_one_line_error(res, "GB", "available", "--n-samples")
    need, limit = (float(v) for v in re.findall(r"([\d.]+) GB", line)[:2])
    # the float64 snapshot matrices alone: 2 (X, Y) x 4 blocks x d=64 x N x 8 bytes
    assert need >= 2 * 4 * 64 * 1e9 * 8 / 1e9
    with open("/proc/meminfo") as f:
        avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:")) / 1e9
    assert limit == pytest.approx(avail, rel=0.25)


# ------------------------------------------------------------------ 7. risk train keeps the shipped predictor
def test_train_writes_a_new_directory_and_replacing_needs_a_flag(tmp_path, monkeypatch):
    from ladder_subset import write_ladder_subset

    corpus = write_ladder_subset(tmp_path / "corpus", families=("gpt", "moe"), per_class=8)
    work = tmp_path / "checkout"
    shutil.copytree(SHIPPED, work / "models" / "default")
    before = {p.relative_to(work): p.read_bytes() for p in (work / "models").rglob("*") if p.is_file()}
    monkeypatch.chdir(work)
    res = invoke("train", "--corpus", corpus, "--out", "models/default", "--no-track")
    assert_one_line_error(res, "models/default", "--replace")
    res = invoke("train", "--corpus", corpus, "--rounds", "5", "--n-boot", "10", "--groups", "config", "--no-track")
    assert res.exit_code == 0, res.output
    after = {p.relative_to(work): p.read_bytes() for p in (work / "models").rglob("*") if p.is_file()}
    assert {k: after[k] for k in before} == before  # the shipped predictor is byte-for-byte untouched
    new = {k.parts[1] for k in after if k not in before}
    assert len(new) == 1 and (work / "models" / new.pop() / "manifest.json").exists()


# ------------------------------------------------------------------ 8. wrong input shape, missing extras
def test_wrong_input_shape_is_one_line(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mlp.pt"
    torch.save(ResidualMLP(d=32), path)
    res = invoke("profile", path, "--trust-pickle", "--input-shape", "8,16", "--probe-seeds", "1")
    assert_one_line_error(res, "--input-shape", "(8, 16)")


@pytest.mark.parametrize("module, extra, args", [
    ("transformers", "hf", ["profile", "{hf}", "--probe-seeds", "1"]),
    ("netcal", "ml", ["evaluate", "--corpus", "nowhere", "--no-track"]),
    ("mlflow", "ml", ["train", "--corpus", "nowhere"]),
    ("mlflow", "ml", ["score", "models:/x/1", "--lr", "1e-3"]),
])
def test_missing_extra_names_the_extra_and_the_pip_command(module, extra, args, tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if not installed
    res = invoke(*[a.format(hf=hf) for a in args])
    assert_one_line_error(res, f"'{extra}'", f"pip install -c constraints.txt 'divergence-risk[{extra}]'")
