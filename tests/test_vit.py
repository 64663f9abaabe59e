"""The image class of corpus-v3: the zoo's ViT (family ``vit``) and the ``digits`` task."""
from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from risk_model.sweep import tasks
from risk_model.sweep.spec import SweepSpecError, make_config
from risk_model.zoo import build_model, load_checkpoint, save_checkpoint

TINY = dict(family="vit", d_model=32, n_layers=2, n_heads=2, mlp_ratio=2)


def test_vit_forward_shapes_patches_and_blocks():
    import featurize

    torch.manual_seed(0)
    model = build_model(TINY)
    images = torch.rand(5, 8, 8)
    assert model(images).shape == (5, 10)
    # 2x2 patches, row-major: patch k of the 4x4 grid holds pixels (2r..2r+1, 2c..2c+1), k = 4r + c
    img = torch.arange(64.0).reshape(1, 8, 8)
    p = model.patches(img)
    assert p.shape == (1, 16, 4)
    assert p[0, 0].tolist() == [0.0, 1.0, 8.0, 9.0] and p[0, 5].tolist() == [18.0, 19.0, 26.0, 27.0]
    x = torch.randn(5, 16, 32)
    for block in model.blocks:
        assert block(x).shape == (5, 16, 32)
    name, blocks = featurize.find_blocks(model)
    assert name == "blocks" and len(blocks) == 2
    # attention is bidirectional: changing the last patch changes the first token's output
    other = images.clone()
    other[:, 6:, 6:] += 1.0
    h0 = model.patch_embed(model.patches(images)) + model.pos_embed
    h1 = model.patch_embed(model.patches(other)) + model.pos_embed
    assert not torch.allclose(model.blocks[0](h0)[:, 0], model.blocks[0](h1)[:, 0])
    with pytest.raises(ValueError, match="8, 8"):
        model(torch.rand(2, 4, 4))


def test_vit_checkpoint_round_trip_and_profile_from_declared_shape(tmp_path):
    import featurize

    torch.manual_seed(1)
    model = build_model(TINY)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "vit.pt"))
    images = torch.rand(3, 8, 8)
    assert torch.equal(model(images), loaded(images))
    prof = featurize.profile(loaded, n_samples=64, rank=8, kreiss_grid="11x4")   # no input_shape given
    assert len(prof.layers) == 2 and np.isfinite(prof.layers["m_exp"]).all()


def test_capture_counts_the_vits_16_patch_tokens_per_image():
    from featurize.capture import collect_snapshots, make_probe

    torch.manual_seed(2)
    model = build_model(TINY)
    probe = make_probe(model, 64, seed=0)               # from the declared input shape
    assert probe.shape[1:] == (8, 8) and probe.dtype == torch.float32
    four = probe[:4]                                     # 4 images x 16 patches = 64 token states
    snaps = collect_snapshots(model, four, n_samples=64, seed=0)
    assert [x.shape for x in snaps.X] == [(32, 64), (32, 64)]
    # every token state of the 4 images is taken once: the block inputs are exactly these
    with torch.no_grad():
        h = model.patch_embed(model.patches(four)) + model.pos_embed      # (4, 16, 32)
    want = h.reshape(-1, 32).double().numpy()
    assert np.allclose(np.sort(snaps.X[0].T, axis=0), np.sort(want, axis=0), atol=1e-6)


def _entropy_nats(labels: np.ndarray) -> float:
    p = np.unique(labels, return_counts=True)[1] / len(labels)
    return float(-(p * np.log(p)).sum())


def test_digits_task_batches_split_and_marginal_loss():
    from sklearn.datasets import load_digits

    d = load_digits()
    task = tasks.make_task("digits", seed=0, batch_size=32)
    n_train = 1797 - 360
    assert len(task.train_y) == n_train and len(task.heldout_y) == 360
    # R: entropy of the training labels' prior, computed here from sklearn's own loader
    assert task.marginal_loss == pytest.approx(_entropy_nats(d.target[:n_train]), abs=1e-12)
    assert abs(task.marginal_loss - math.log(10)) < 0.01 and task.uniform_loss == pytest.approx(math.log(10))
    # the images are sklearn's, scaled to [0, 1]; the held-out split is the last 20% in file order
    assert np.allclose(task.heldout_x.numpy(), d.images[n_train:] / 16.0, atol=1e-6)
    assert task.heldout_y.tolist() == d.target[n_train:].tolist()
    x, y = task.batch()
    assert x.shape == (32, 8, 8) and x.dtype == torch.float32 and y.shape == (32,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    held = task.eval_set(8)
    assert len(held) == 8 and held[0][0].shape == (32, 8, 8)
    with pytest.raises(ValueError, match="360"):
        task.eval_set(12)
    # a uniform predictor's loss is ln 10
    assert float(task.loss(torch.zeros(32, 10), y)) == pytest.approx(math.log(10), rel=1e-6)


def test_digits_data_file_changed_or_missing_is_one_line_naming_the_file(tmp_path, monkeypatch):
    src = tasks.digits_file()
    changed = tmp_path / "digits.csv.gz"
    shutil.copy(src, changed)
    raw = gzip.decompress(changed.read_bytes()).decode()
    changed.write_bytes(gzip.compress(raw.replace("0.0,", "1.0,", 1).encode()))
    monkeypatch.setattr(tasks, "digits_file", lambda: changed)
    with pytest.raises(ValueError) as e:
        tasks.make_task("digits", seed=0, batch_size=8)
    assert str(changed) in str(e.value) and "sha256" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SweepSpecError, match="sha256"):   # refused before any run, by the spec check
        make_config(family="vit", task="digits", eval_batches=1)
    missing = tmp_path / "gone" / "digits.csv.gz"
    monkeypatch.setattr(tasks, "digits_file", lambda: missing)
    with pytest.raises(ValueError, match=str(missing)):
        tasks.digits_data()
    # `risk sweep` with a vit stage: one line on stderr naming the file, exit 1, nothing written
    from risk_model.cli import app

    spec = tmp_path / "spec.toml"
    spec.write_text(VIT_SPEC)
    res = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and not (tmp_path / "out").exists()
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and str(missing) in res.stderr


VIT_SPEC = """
name = "vit-check"
kind = "full_ladder"
[ladder]
adamw = [1e-3, 1e-2]
[[stage]]
name = "classes-vit"
n_models = 1
[stage.model]
family = "vit"
d_model = 16
n_layers = 1
n_heads = 2
[stage.train]
task = "digits"
steps = 10
eval_batches = 1
"""


def test_spec_rejects_other_families_and_tasks_naming_the_key():
    with pytest.raises(SweepSpecError, match=r"^task must be one of digits for family vit, got 'text_bytes'"):
        make_config(family="vit", task="text_bytes")
    with pytest.raises(SweepSpecError, match=r"^family must be one of vit for task digits, got 'gpt'"):
        make_config(family="gpt", task="digits")
    with pytest.raises(SweepSpecError, match=r"^eval_batches"):
        make_config(family="vit", task="digits", batch_size=64, eval_batches=8)   # 512 > 360 held out
    cfg = make_config(family="vit", task="digits", eval_batches=8, batch_size=32)
    assert cfg.model_args()["family"] == "vit"


def _train(lr: float, steps: int):
    from risk_model.sweep.archs import build_network
    from risk_model.sweep.trainer import make_run_task, run_labels, train, v3_labels

    cfg = make_config(family="vit", task="digits", d_model=32, n_layers=2, n_heads=2, mlp_ratio=2,
                      lr=lr, steps=steps, warmup=10, batch_size=32, eval_batches=4, seed=3)
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model_args())
    task = make_run_task(cfg)
    res = train(model, cfg, task)
    return task, {**run_labels(res, task), **v3_labels(res, steps)}


def test_short_real_training_learns_and_an_absurd_lr_diverges():
    from risk_model.serve import single_threaded

    # one thread (restored after): on a loaded 2-core machine two threads make this 10x slower
    with torch.random.fork_rng(devices=[]), single_threaded():
        task, good = _train(3e-3, 200)
        _, bad = _train(10.0, 200)
    R = task.marginal_loss
    assert not good["diverged"] and not good["collapsed"]
    assert good["final_eval_loss"] < 0.5 * R          # held-out cross-entropy well below the prior's
    assert bad["diverged"] and bad["diverge_step"] < 200 and bad["diverge_reason"]


def test_risk_predict_on_a_saved_vit_checkpoint(tmp_path):
    from risk_model.cli import app

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(TINY), tmp_path / "vit.pt")
    runner = CliRunner()
    for extra in (["--input-shape", "8,8"], []):   # the checkpoint's model declares its input shape
        res = runner.invoke(app, ["predict", str(ckpt), "--json", "--probe-seeds", "1", *extra])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert out["max_safe_lr"] is not None and out["max_safe_lr"] > 0
    bad = runner.invoke(app, ["predict", str(ckpt), "--json", "--probe-seeds", "1", "--input-shape", "4,4"])
    assert bad.exit_code == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "--input-shape" in bad.stderr


def test_a_vit_stage_runs_through_the_full_ladder_sweep(tmp_path):
    from risk_model.sweep.runner import load_corpus, run_sweep

    spec = tmp_path / "spec.toml"
    spec.write_text(VIT_SPEC.replace("n_heads = 2", 'n_heads = 2\nprofile_samples = 128\nkreiss_grid = "11x4"'))
    summary = run_sweep(spec, tmp_path / "out", progress=False)
    assert summary["failed"] == 0 and summary["ran"] >= 2
    runs, layers = load_corpus(tmp_path / "out")
    assert set(runs["family"]) == {"vit"} and set(runs["task"]) == {"digits"}
    assert (runs["profile_error"] == "").all() and len(layers) == 1       # one block profiled
    assert runs["failed"].notna().all() and runs["final_eval_loss"].notna().all()
    assert runs["marginal_loss"].iloc[0] == pytest.approx(tasks.make_task("digits", seed=0).marginal_loss)
    assert run_sweep(spec, tmp_path / "out", progress=False)["ran"] == 0   # resumed: nothing redone


def test_a_vit_is_in_the_training_domain_only_of_a_predictor_that_saw_one(tmp_path):
    from torch import nn

    from risk_model.cli import app
    from risk_model.features import training_domain_problem
    from risk_model.serve import load_bundle

    torch.manual_seed(0)
    vit = build_model(TINY)
    assert training_domain_problem(vit, families=("gpt", "vit")) is None
    assert "no token embedding" in training_domain_problem(vit, families=("gpt", "hf_llama"))
    mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))      # no attention: not an image transformer
    assert "no token embedding" in training_domain_problem(mlp, families=("gpt", "vit"))
    # the shipped predictor was trained with the vit class: no out-of-domain warning, no novel-class widening
    assert "vit" in load_bundle().lr_predictor.metadata_["families"]
    res = CliRunner().invoke(app, ["predict", str(save_checkpoint(vit, tmp_path / "v.pt")), "--json", "--probe-seeds", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert not any("training domain" in w for w in out["warnings"]) and not out["outside_corpus"].get("novel_class")


def test_init_features_of_a_vit_and_its_dead_at_init_answer(tmp_path):
    """A classifier at a small init has near-uniform logits, so its probe loss is ln C (analytic);
    one initialised 30× too large is over the loss limit before any update: the dead-at-init answer."""
    import math

    from risk_model.cli import app
    from risk_model.init_features import init_features

    torch.manual_seed(0)
    vit = build_model(TINY)
    torch.manual_seed(123)
    want = torch.rand(2)
    torch.manual_seed(123)
    f = init_features(vit)
    assert torch.equal(torch.rand(2), want)                                # the caller's RNG is left alone
    assert f["vocab_size"] == 10 and f["init_loss"] == pytest.approx(math.log(10), abs=0.02)
    assert math.isfinite(f["log10_grad_norm"]) and math.isfinite(f["update_ratio_mean"])
    torch.manual_seed(0)
    dead = build_model({**TINY, "init_std": 30.0})
    assert init_features(dead)["init_loss"] > 50
    res = CliRunner().invoke(app, ["predict", str(save_checkpoint(dead, tmp_path / "dead.pt")), "--json",
                                   "--probe-seeds", "1", "--lr", "1e-3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["dead_at_init"] is not None and "initial loss" in out["dead_at_init"]["reason"]
