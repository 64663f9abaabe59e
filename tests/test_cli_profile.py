"""`risk profile`: formats, JSON schema, and one-line errors for bad input (nothing written)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import LinearBlock

ROOT = Path(__file__).resolve().parents[1]


def risk(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-m", "risk_model.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 1, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.blocks = nn.Sequential(*[LinearBlock(torch.eye(8).numpy() * 0.95) for _ in range(2)])

    def forward(self, idx):
        return self.blocks(self.emb(idx))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    return d


def test_hf_directory_json_schema_and_plot(hf_dir, tmp_path):
    res = risk("profile", str(hf_dir), "--n-samples", "256", "--json", "--plot", str(tmp_path / "e.png"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert [r["layer"] for r in d["layers"]] == [0, 1]
    assert {"m_exp", "m_near", "m_mid", "m_con", "rho", "kappa_v", "kreiss", "eta_nl",
            "reliable_fraction", "degenerate", "name"} <= set(d["layers"][0])
    assert {"m_near_mean", "m_near_max", "m_near_min", "m_near_std"} <= set(d["aggregates"])
    for r in d["layers"]:
        assert abs(r["m_exp"] + r["m_near"] + r["m_mid"] + r["m_con"] - 1) < 1e-9
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_table_output(hf_dir, tmp_path):
    res = risk("profile", str(hf_dir), "--n-samples", "128", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "M≈1" in res.stdout and "GPT2Block[1]" in res.stdout


def test_pickled_module_needs_trust_flag(tmp_path):
    torch.save(Net(), tmp_path / "whole.pt")
    res = risk("profile", str(tmp_path / "whole.pt"), "--plot", str(tmp_path / "x.png"), cwd=tmp_path)
    assert_one_line_error(res, "--trust-pickle")
    assert not (tmp_path / "x.png").exists()
    ok = risk("profile", str(tmp_path / "whole.pt"), "--trust-pickle", "--n-samples", "64", "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["layers"]) == 2


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not a model")
    buf = tmp_path / "full.pt"
    torch.save({"model_args": {"family": "gpt"}, "state_dict": {"w": torch.zeros(1000)}}, buf)
    (tmp_path / "trunc.pt").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    torch.save(nn.Linear(3, 3), tmp_path / "linear.pt")
    bad_net = Net()
    with torch.no_grad():
        bad_net.blocks[0].lin.weight.fill_(float("nan"))
    torch.save(bad_net, tmp_path / "nan.pt")
    before = set(os.listdir(tmp_path))
    plot = str(tmp_path / "never.png")
    assert_one_line_error(risk("profile", str(tmp_path / "notes.txt"), "--plot", plot, cwd=tmp_path), "not a PyTorch")
    assert_one_line_error(risk("profile", str(tmp_path / "trunc.pt"), "--plot", plot, cwd=tmp_path), "truncated")
    assert_one_line_error(risk("profile", str(tmp_path / "missing.pt"), cwd=tmp_path), "no such file")
    assert_one_line_error(risk("profile", str(tmp_path / "linear.pt"), "--trust-pickle", "--plot", plot, cwd=tmp_path),
                          "no residual blocks", "--blocks")
    assert_one_line_error(risk("profile", str(tmp_path / "nan.pt"), "--trust-pickle", "--plot", plot, cwd=tmp_path),
                          "non-finite")
    assert_one_line_error(risk("profile", "example", "--n-samples", "1", "--plot", plot, cwd=tmp_path), "at least 2")
    assert set(os.listdir(tmp_path)) == before
