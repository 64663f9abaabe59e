"""Corpus schema, validation, merging and the aggregate rule (checked against the featurizer's own)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from featurize.profile import aggregate
from risk_model.corpus import CorpusError, aggregate_layers, corpus_hash, load_corpus
from synth_corpus import make_corpus, write_corpus


@pytest.fixture(scope="module")
def tables():
    return make_corpus(n_configs=12, seeds=2, seed=3)


def test_aggregates_match_featurizer_rule(tables):
    runs, layers = tables
    layers = layers.copy()
    first, second = runs["run_id"].iloc[0], runs["run_id"].iloc[1]
    # one run with a degenerate layer (excluded), one with every layer degenerate (all used)
    idx_first = layers.index[layers["run_id"] == first]
    layers.loc[idx_first[0], "degenerate"] = True
    layers.loc[idx_first[0], "m_near"] = 0.99
    layers.loc[layers["run_id"] == second, "degenerate"] = True
    layers.loc[layers.index[layers["run_id"] == runs["run_id"].iloc[2]][0], "kappa_v"] = np.inf
    got = aggregate_layers(layers)
    for rid in runs["run_id"].iloc[:4]:
        rows = layers[layers["run_id"] == rid].reset_index(drop=True)
        want = aggregate(rows.drop(columns="run_id"))
        for k, v in want.items():
            if k == "n_layers":
                continue
            assert got.loc[rid, k] == pytest.approx(v, nan_ok=True), (rid, k)
        use = rows[~rows["degenerate"]] if not rows["degenerate"].all() else rows
        assert got.loc[rid, "update_ratio_max"] == pytest.approx(use["update_ratio"].max())
        assert got.loc[rid, "m_near_all_std"] == pytest.approx(np.std(use["m_near_all"].to_numpy()))


def test_missing_columns_are_named(tmp_path, tables):
    runs, layers = tables
    write_corpus(tmp_path / "c", runs.drop(columns=["lr", "diverged"]), layers)
    with pytest.raises(CorpusError, match=r"missing required columns: lr, diverged"):
        load_corpus(tmp_path / "c")
    write_corpus(tmp_path / "d", runs, layers.drop(columns=["m_near"]))
    with pytest.raises(CorpusError, match="m_near"):
        load_corpus(tmp_path / "d")
    with pytest.raises(CorpusError, match="no runs.parquet"):
        load_corpus(tmp_path / "nowhere")


def test_merge_reports_bad_rows_and_drops_duplicates(tmp_path, tables):
    runs, layers = tables
    base = write_corpus(tmp_path / "base", runs, layers)
    new_runs, new_layers = make_corpus(n_configs=3, seeds=2, seed=99)
    new_runs = new_runs.copy()
    new_runs.loc[0, "lr"] = 0.0                         # bad: lr
    new_runs.loc[1, "diverged"] = np.nan                # bad: label
    orphan = new_runs.loc[2, "run_id"]
    new_layers = new_layers[new_layers["run_id"] != orphan]  # bad: no profile
    dup = runs.iloc[[0, 1]].copy()                      # duplicates of base runs
    new_runs = pd.concat([new_runs, dup], ignore_index=True)
    new_layers = pd.concat([new_layers, layers[layers["run_id"].isin(dup["run_id"])]], ignore_index=True)
    new = write_corpus(tmp_path / "new", new_runs, new_layers)
    c = load_corpus([base, new])
    rep = c.reports[1]
    reasons = dict(zip(rep.bad["run_id"], rep.bad["reason"]))
    assert set(reasons) == {new_runs.loc[0, "run_id"], new_runs.loc[1, "run_id"], orphan}
    assert "lr" in reasons[new_runs.loc[0, "run_id"]]
    assert "diverged" in reasons[new_runs.loc[1, "run_id"]]
    assert "profile" in reasons[orphan]
    assert sorted(rep.duplicates) == sorted(dup["run_id"])
    assert len(c.runs) == len(runs) + 3  # 6 new rows − 3 bad; the 2 duplicates dropped
    assert c.runs["run_id"].is_unique
    assert any("rejected" in line for line in rep.lines())


def test_hash_identifies_labelled_runs(tables):
    runs, _ = tables
    h = corpus_hash(runs)
    assert corpus_hash(runs.sample(frac=1.0, random_state=1)) == h
    flipped = runs.copy()
    flipped.loc[0, "diverged"] = 1 - flipped.loc[0, "diverged"]
    assert corpus_hash(flipped) != h


def test_profile_settings_read_from_corpus(tmp_path, tables):
    runs, layers = tables
    c = load_corpus(write_corpus(tmp_path / "c", runs, layers))
    assert c.profile_settings["n_samples"] == 256 and c.profile_settings["rank"] == 16


def test_ladder_corpus_check_on_the_shipped_corpora(tmp_path):
    from pathlib import Path

    from risk_model.corpus import is_ladder_corpus, not_ladder_corpora

    data = Path(__file__).resolve().parents[1] / "datasets"
    # corpus-v1: one row per run, no model_id; v2 and v3: ladders with a layers table
    assert not is_ladder_corpus(data / "corpus-v1")
    assert is_ladder_corpus(data / "corpus-v2") and is_ladder_corpus(data / "corpus-v3")
    # a runs table with model_id but no layers table beside it is not one either
    (tmp_path / "runs.parquet").write_bytes((data / "corpus-v3" / "runs.parquet").read_bytes())
    assert not_ladder_corpora([data / "corpus-v2", tmp_path, tmp_path / "missing"]) == [str(tmp_path), str(tmp_path / "missing")]
