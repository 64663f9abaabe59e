"""Sweep runner: resume after SIGKILL, Dask backend, refusal of foreign output, CLI errors."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from risk_model.sweep.runner import CorpusError, load_corpus, run_sweep
from risk_model.sweep.spec import SweepSpecError
from sweep_proc import kill_after_parts, start_sweep

TINY_GRID = """
[grid]
d_model = 16
n_layers = 2
n_heads = 2
mlp_ratio = 2
seq_len = 12
vocab_size = 32
batch_size = 8
steps = {steps}
profile_samples = 48
profile_rank = 8
norm = ["pre_ln", "none", "rmsnorm"]
lr = [1e-3, 1e-2, 3.0]
"""


def write_spec(path: Path, n_runs: int, steps: int = 15, seed: int = 0) -> Path:
    path.write_text(f'n_runs = {n_runs}\nsampler = "lhs"\nseed = {seed}\n'
                    + TINY_GRID.format(steps=steps))
    return path


def test_sigkill_mid_sweep_loses_nothing_and_duplicates_nothing(tmp_path):
    spec = write_spec(tmp_path / "s.toml", n_runs=8, steps=40)
    out = tmp_path / "out"
    kill_after_parts(start_sweep(spec, out), out)
    parts = out / "parts"
    # what had finished before the kill, read straight from the part files
    before = {}
    for p in parts.glob("*.runs.parquet"):
        row = pd.read_parquet(p).iloc[0]
        before[row["run_id"]] = (row["seconds"], row["final_loss"])
    assert 2 <= len(before) < 8
    assert not (out / "runs.parquet").exists()  # killed before the final consolidation

    summary = run_sweep(spec, out, progress=False)
    runs, layers = load_corpus(out)
    assert len(runs) == 8 and runs["run_id"].is_unique
    assert summary["ran"] == 8 - len(before) and summary["already_done"] == len(before)
    for rid, (secs, loss) in before.items():  # kept as written, not re-run (wall time is unique)
        row = runs.set_index("run_id").loc[rid]
        assert row["seconds"] == secs and row["final_loss"] == loss
    assert len(layers) == 2 * 8 and not layers.duplicated(["run_id", "layer"]).any()
    assert not list(parts.glob("*.parquet"))  # parts merged away
    # and a third invocation is a no-op
    again = run_sweep(spec, out, progress=False)
    assert again["ran"] == 0 and again["runs"] == 8


def test_dask_backend_matches_joblib(tmp_path):
    distributed = pytest.importorskip("distributed")
    spec = write_spec(tmp_path / "s.toml", n_runs=3, steps=6, seed=1)
    run_sweep(spec, tmp_path / "jl", workers=2, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        summary = run_sweep(spec, tmp_path / "dk", backend="dask",
                            scheduler=cluster.scheduler_address, progress=False)
    assert summary["ran"] == 3
    a = pd.read_parquet(tmp_path / "jl" / "runs.parquet").set_index("run_id").sort_index()
    b = pd.read_parquet(tmp_path / "dk" / "runs.parquet").set_index("run_id").sort_index()
    assert list(a.index) == list(b.index) and len(a) == 3
    # same training on both backends (deterministic CPU runs)
    assert list(a["diverged"]) == list(b["diverged"])
    pd.testing.assert_series_equal(a["grad_norm_step1"], b["grad_norm_step1"], rtol=1e-5)
    la = pd.read_parquet(tmp_path / "jl" / "layers.parquet")
    lb = pd.read_parquet(tmp_path / "dk" / "layers.parquet")
    assert len(la) == len(lb) == 6


@pytest.mark.parametrize("content", ["foreign", "corrupt"])
def test_foreign_or_corrupt_parquet_in_out_is_refused(tmp_path, content):
    spec = write_spec(tmp_path / "s.toml", n_runs=2)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "runs.parquet"
    if content == "foreign":
        pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_parquet(target)
    else:
        target.write_bytes(b"PAR1 this is not really parquet")
    blob = target.read_bytes()
    with pytest.raises(CorpusError, match="runs.parquet"):
        run_sweep(spec, out, progress=False)
    assert target.read_bytes() == blob  # untouched
    assert sorted(p.name for p in out.iterdir()) == ["runs.parquet"]  # nothing run or written


def test_foreign_parquet_under_any_name_is_refused(tmp_path):
    spec = write_spec(tmp_path / "s.toml", n_runs=2)
    out = tmp_path / "out"
    out.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(out / "mine.parquet")
    with pytest.raises(CorpusError, match="mine.parquet"):
        run_sweep(spec, out, progress=False)


def test_invalid_spec_fails_before_any_run(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('n_runs = 2\n[grid]\nnorm = ["pre_ln", "layernorm"]\n')
    out = tmp_path / "out"
    with pytest.raises(SweepSpecError, match="norm"):
        run_sweep(spec, out, progress=False)
    assert not out.exists()


def test_cli_reports_one_line_and_exit_1(tmp_path):
    from typer.testing import CliRunner

    import typer
    from risk_model.sweep.cli import sweep_command

    app = typer.Typer()
    app.command()(sweep_command)
    spec = tmp_path / "bad.toml"
    spec.write_text('n_runs = 2\n[grid]\nlr = [0.0]\n')
    res = CliRunner().invoke(app, [str(spec), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    err = res.stderr.strip()
    assert err.startswith("error:") and "lr" in err and "\n" not in err


def test_parquet_files_are_tagged_and_complete(tmp_path):
    spec = write_spec(tmp_path / "s.toml", n_runs=2, steps=4)
    run_sweep(spec, tmp_path / "o", progress=False)
    for name in ("runs.parquet", "layers.parquet"):
        meta = pq.read_schema(tmp_path / "o" / name).metadata
        assert b"divergence_risk" in meta
    runs = pd.read_parquet(tmp_path / "o" / "runs.parquet")
    for col in ("run_id", "config_id", "family", "norm", "lr", "diverged", "diverge_step",
                "collapsed", "grad_norm_step1", "loss_spikes_1_500", "loss_curve", "m_near_mean",
                "versions", "seconds"):
        assert col in runs.columns
    assert len(runs.loc[0, "loss_curve"]) == 4
