"""Predictor v3's corpora (risk_model.heldout_v3.load_v3): several corpora pooled, and a full-ladder
corpus's shorter horizons as ladders of their own. The truth for the latter is
``test_full_ladder.test_horizon_row_equals_a_separate_shorter_run`` (a row read at step h of a
constant-schedule run is the h-step run); here, that each such ladder gets its own id, recipe and
labels, computed by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ladder_subset import CORPUS_V3, write_ladder_subset
from risk_model.heldout_v3 import horizon_ladders, load_v3


def _ladder(mid, steps, horizon_of, lrs, losses, schedule="constant"):
    return pd.DataFrame(dict(model_id=mid, steps=steps, horizon_of=horizon_of, lr=lrs, final_loss=losses,
                             diverged=False, marginal_loss=5.0, schedule=schedule, family="gpt"))


def test_shorter_horizons_become_ladders_of_their_own():
    runs = pd.concat([
        _ladder("a", 1000, 1000, [1e-3, 1e-2, 1e-1], [2.0, 1.0, 4.9]),
        _ladder("a", 300, 1000, [1e-3, 1e-2, 1e-1], [3.0, 2.0, 2.5]),
        _ladder("c", 300, 1000, [1e-3, 1e-2], [3.0, 2.0], schedule="cosine"),   # not a 300-step run
        _ladder("c", 1000, 1000, [1e-3, 1e-2], [2.0, 1.5], schedule="cosine"),
        _ladder("v2", 300, np.nan, [1e-3], [4.0]),                              # a corpus without horizons
    ], ignore_index=True)
    models = pd.DataFrame(dict(model_id=["a", "c", "v2"], family="gpt", steps=[1000, 1000, 300], warmup=50))
    r, m = horizon_ladders(runs, models)
    assert sorted(r["model_id"].unique()) == ["a", "a@300", "c", "v2"]
    assert len(r) == len(runs) - 2                                           # the cosine run's step-300 rows
    assert m.set_index("model_id").loc["a@300", ["steps", "warmup"]].tolist() == [300, 50]
    from risk_model.lrmodel import ladder_targets

    t, failed = ladder_targets(r)
    # a@300: best 2.0 at 1e-2, limit 2 + ½(5 − 2) = 3.5: 2.5 at 1e-1 did not fail; a: best 1.0, limit 3.0: 4.9 fails
    assert failed[r["model_id"] == "a@300"].tolist() == [False, False, False]
    assert failed[r["model_id"] == "a"].tolist() == [False, False, True]
    assert t.loc["a@300", "fail_hi"] == math.inf and t.loc["a", "fail_hi"] == 1e-1


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    v2 = write_ladder_subset(tmp_path_factory.mktemp("v2"), families=("gpt", "moe"), per_class=4)
    v3 = write_ladder_subset(tmp_path_factory.mktemp("v3"), families=("gpt", "hf_llama"), per_class=4,
                             corpus=CORPUS_V3)
    return v2, v3


def test_two_corpora_pool_with_their_source_and_the_full_length_recipe(pooled):
    v2, v3 = pooled
    nets, runs, c = load_v3([v2, v3])
    assert set(nets["source"]) == {str(v2), str(v3)}
    raw = pd.read_parquet(v3 / "runs.parquet")
    full = raw[raw["steps"] == raw["horizon_of"]].groupby("model_id")["steps"].first()
    v3n = nets[nets["source"] == str(v3)].set_index("model_id")
    for mid, steps in full.items():                                         # the model's steps: its full length
        assert v3n.loc[mid, "steps"] == steps
    short = raw[raw["steps"] < raw["horizon_of"]]
    want = {f"{m}@{s}" for m, s in zip(short["model_id"], short["steps"])}
    assert want and want <= set(v3n.index)
    for key in list(want)[:3]:
        mid, s = key.split("@")
        assert v3n.loc[key, "steps"] == int(s) and v3n.loc[key, "parent_id"] == mid
        assert sorted(runs.loc[runs["model_id"] == key, "lr"]) == sorted(short.loc[
            (short["model_id"] == mid) & (short["steps"] == int(s)), "lr"])
    assert (nets.loc[nets["source"] == str(v3), "task_synthetic"].isin([0.0, 1.0])).all()
    assert (nets.loc[nets["source"] == str(v2), "task_synthetic"] == 1.0).all()   # corpus-v2: generated data only


def test_train_on_two_corpora_records_both(pooled, tmp_path, monkeypatch):
    from risk_model.cli import app

    v2, v3 = pooled
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "--corpus", str(v2), "--corpus", str(v3), "--out", str(tmp_path / "p"),
                                   "--rounds", "10", "--n-boot", "20", "--groups", "config", "--no-track",
                                   "--report-dir", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "p" / "lr_predictor" / "metadata.json").read_text())
    assert meta["corpus_sources"] == [str(v2), str(v3)]
    nets, _, _ = load_v3([v2, v3])
    assert meta["n_networks"] == len(nets)
    assert meta["scale_range"]["steps"] == [300.0, float(nets["steps"].max())] and nets["steps"].max() >= 1000
    md = (tmp_path / "rep" / "heldout_v3.md").read_text()
    assert f"*{v3}* (all classes)" in md and "shorter horizon" in md


def test_evaluate_refuses_a_corpus_without_ladders_beside_a_full_ladder_one(pooled, tmp_path):
    from risk_model.cli import app

    _, v3 = pooled
    v1 = CORPUS_V3.parent / "corpus-v1"
    res = CliRunner().invoke(app, ["evaluate", "--corpus", str(v3), "--corpus", str(v1), "--out", str(tmp_path / "r"),
                                   "--no-track"])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "rows," not in ln and "full-ladder" not in ln]
    assert res.exit_code == 1 and len(lines) == 1 and str(v1) in lines[0] and "ladder" in lines[0], res.stderr
    assert not (tmp_path / "r" / "heldout_v3.md").exists()


def test_leave_largest_out_never_fits_on_a_scored_models_shorter_horizons():
    from risk_model.heldout_v3 import LARGEST_SPLITS, largest_fit_sets, largest_split

    nets = pd.DataFrame(dict(model_id=["a", "a@300", "a@1000", "b", "b@300", "c"],
                             parent_id=["a", "a", "a", "b", "b", "c"],
                             d_model=[64, 64, 64, 512, 512, 128], steps=[3000, 300, 1000, 300, 300, 1000],
                             n_layers=2))
    rule = LARGEST_SPLITS[0][3]                                  # width ≤ 256 and steps ≤ 1000
    fit, small = largest_split(nets, rule)
    assert small.tolist() == [False, True, True, False, False, True]
    assert fit.tolist() == [False, False, False, False, False, True]   # only c: a and b are scored
    # the "as defined" protocol fits on every ladder inside the rule: a's 300- and 1000-step horizons too
    sets, _ = largest_fit_sets(nets, rule)
    assert {k: v.tolist() for k, v in sets.items()} == {"strict": fit.tolist(), "as defined": small.tolist()}
