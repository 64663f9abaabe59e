"""Corpus-v2 design: architectures, init knobs, ladder walk and bracketing, ladder sweeps."""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from featurize.capture import find_blocks
from risk_model.sweep.archs import FAMILIES, FAMILY_NORMS, MambaConfig, SelectiveSSM, build_network, logits_of
from risk_model.sweep.ladder import bracket, model_id, parse_ladder_spec, walk
from risk_model.sweep.runner import load_corpus, run_sweep
from risk_model.sweep.spec import RunConfig, SweepSpecError, make_config, run_id
from sweep_proc import kill_after_parts, start_sweep

REPO = Path(__file__).resolve().parent.parent
RUNGS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]


# ----------------------------------------------------------------------------------- walk


@pytest.mark.parametrize("min_runs", [1, 4])
def test_walk_brackets_every_monotone_boundary_from_every_start(min_runs):
    n = len(RUNGS)
    for first_bad in range(n + 1):          # rungs >= first_bad diverge (n: none diverges)
        truth = [i >= first_bad for i in range(n)]
        for start in range(n):
            ran: list[int] = []

            def outcome(i):
                ran.append(i)
                return "diverged" if truth[i] else "stable"

            order = walk(start, n, min_runs, outcome)
            assert order == ran and len(set(ran)) == len(ran)          # no rung twice
            assert len(ran) >= min(min_runs, n)
            b = bracket([RUNGS[i] for i in ran], [truth[i] for i in ran], RUNGS)
            # bracketed unless even the bottom rung diverges
            assert b["bracketed"] == (first_bad > 0), (first_bad, start, ran)
            if first_bad == n:
                assert math.isnan(b["lr_diverge_min"]) and b["lr_stable_max"] == RUNGS[-1]
            else:
                assert b["lr_diverge_min"] == RUNGS[first_bad]
                if first_bad > 0:
                    assert b["lr_stable_max"] == RUNGS[first_bad - 1]
            # contiguous walk: no more runs than the distance from the start to the boundary + 2
            if min_runs == 1:
                assert len(ran) <= abs(start - first_bad) + 2


def test_walk_stops_at_a_dead_model():
    ran = []
    assert walk(5, 10, 4, lambda i: ran.append(i) or "dead") == [5] and ran == [5]


def test_bracket_cases():
    # diverged at the bottom rung: nothing stable below, not bracketed
    assert not bracket([1e-4, 3e-4], [True, True], RUNGS)["bracketed"]
    # a gap between last stable and first diverged is not a bracket
    b = bracket([1e-3, 1e-2], [False, True], RUNGS)
    assert not b["bracketed"] and b["lr_stable_max"] == 1e-3 and b["lr_diverge_min"] == 1e-2
    # stable below the top rung only: not bracketed
    assert not bracket([1.0], [False], RUNGS)["bracketed"]
    # non-monotone: a stable run above the first divergence does not move the boundary
    b = bracket([1e-2, 3e-2, 0.1], [False, True, False], RUNGS)
    assert b["lr_diverge_min"] == 3e-2 and b["lr_stable_max"] == 1e-2 and b["bracketed"]


# ----------------------------------------------------------------------------------- spec

BASE = {
    "kind": "ladder", "n_models": 30, "seed": 1,
    "model": {"family": list(FAMILIES), "norm": ["pre_ln", "none"], "d_model": [32, 64],
              "n_layers": [2, 3], "head_dim": [16], "init_std": {"log_uniform": [0.002, 0.3]},
              "embed_std": {"log_uniform": [0.01, 0.1]}},
    "train": {"optimizer": ["adamw", "sgd"], "warmup_fraction": [0.0, 0.2], "steps": 300},
    "ladder": {"adamw": RUNGS, "sgd": [1e-2, 1e-1, 1.0], "start": {"adamw": [5], "sgd": [9]},
               "min_runs": 3},
}


def test_ladder_spec_draws_are_valid_deterministic_and_in_range():
    units = parse_ladder_spec(BASE).units()
    again = parse_ladder_spec(BASE).units()
    assert [u["unit_id"] for u in units] == [u["unit_id"] for u in again] and len(units) == 30
    for u in units:
        c = RunConfig(**u["config"])
        assert u["unit_id"] == model_id(c)
        assert 0.002 <= c.init_std <= 0.3 and 0.01 <= c.embed_std <= 0.1
        assert c.norm in FAMILY_NORMS[c.family] and c.n_heads == c.d_model // 16
        assert c.warmup in (0, 60)
        assert u["rungs"] == (RUNGS if c.optimizer == "adamw" else [1e-2, 1e-1, 1.0])
        assert u["start"] == (5 if c.optimizer == "adamw" else 2)   # clipped to the last rung
        assert c.lr == u["rungs"][u["start"]]
    # model ids depend on the model, not on the training recipe
    c = RunConfig(**units[0]["config"])
    from dataclasses import replace

    assert model_id(replace(c, lr=7.0, warmup=3)) == model_id(c)
    assert model_id(replace(c, init_std=c.init_std * 2)) != model_id(c)


@pytest.mark.parametrize("patch, key", [
    ({"model": {**BASE["model"], "init_std": {"log_uniform": [0.3, 0.002]}}}, "init_std"),
    ({"model": {**BASE["model"], "init_std": {"uniform": [0.1, 0.2]}}}, "init_std"),
    ({"model": {**BASE["model"], "family": ["gpt", "hf_bert"]}}, "family"),
    ({"train": {**BASE["train"], "optimizer": ["adamw", "lion"]}}, "lion"),
    ({"train": {**BASE["train"], "warmup_fraction": [1.5]}}, "warmup_fraction"),
    ({"train": {**BASE["train"], "lr": [1e-3]}}, "train.lr"),
    ({"ladder": {**BASE["ladder"], "adamw": [1e-3, 1e-4]}}, "ladder.adamw"),
    ({"ladder": {**BASE["ladder"], "min_runs": 0}}, "min_runs"),
    ({"n_models": 0}, "n_models"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_ladder_spec_names_the_key(patch, key):
    with pytest.raises(SweepSpecError, match=key.replace(".", r"\.")):
        parse_ladder_spec({**BASE, **patch})


def test_fixed_norm_families_refuse_another_norm():
    with pytest.raises(SweepSpecError, match="norm"):
        make_config(family="hf_llama", norm="pre_ln")


def test_v1_run_ids_do_not_change_with_the_new_init_fields():
    # run id of a corpus-v1 row, as stored in datasets/corpus-v1/runs.parquet
    runs = pd.read_parquet(REPO / "datasets/corpus-v1/runs.parquet").head(3)
    fields = set(RunConfig.__dataclass_fields__)
    for _, r in runs.iterrows():
        cfg = RunConfig(**{k: (r[k].item() if hasattr(r[k], "item") else r[k])
                           for k in fields if k in r.index})
        assert run_id(cfg) == r["run_id"]


# ----------------------------------------------------------------------------------- archs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_runs_and_is_profiled_block_by_block(family):
    torch.manual_seed(0)
    args = dict(family=family, norm=FAMILY_NORMS[family][0], d_model=32, n_layers=3, n_heads=2,
                mlp_ratio=2, vocab_size=40, block_size=12, init_std=0.02, embed_std=0.05,
                out_std=0.004, n_experts=2, top_k=1, kan_grid=3)
    net = build_network(args)
    x = torch.randint(0, 40, (2, 12))
    assert logits_of(net(x)).shape == (2, 12, 40)
    _, blocks = find_blocks(net)
    assert len(blocks) == 3
    # the init knobs reach the weights: measured stds of embeddings and output projections
    emb = next(m for m in net.modules() if isinstance(m, torch.nn.Embedding)).weight
    assert abs(emb.std().item() - 0.05) < 0.01
    outs = [p for n, p in net.named_parameters()
            if n.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight", "out_proj.weight",
                           "attention.dense.weight", "dense_4h_to_h.weight", "fc_out.weight",
                           "self_attn.dense.weight", "fc2.weight"))
            and "c_proj.spline" not in n]
    if family != "kan":
        assert outs and all(abs(p.std().item() - 0.004) < 0.001 for p in outs)


def test_selective_scan_matches_its_closed_form_and_is_causal():
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=8, d_state=4, expand=2)
    m = SelectiveSSM(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and p is not m.A_log:
                p.normal_(0, 0.3)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    y = m(x)
    # closed form: h_t = Σ_{s<=t} exp(Σ_{r=s+1..t} Δ_r A) Δ_s B_s x_s, y_t = C_t·h_t + D x_t
    with torch.no_grad():
        T = x.shape[1]
        xi, z = m.in_proj(x).chunk(2, dim=-1)
        xi = torch.nn.functional.silu(m.conv(xi.transpose(1, 2))[..., :T].transpose(1, 2))
        dt, Bm, Cm = m.x_proj(xi).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = torch.nn.functional.softplus(m.dt_proj(dt))
        A = -torch.exp(m.A_log)
        ref = torch.zeros_like(xi)
        for t in range(T):
            for s in range(t + 1):
                decay = torch.exp(dt[:, s + 1:t + 1].sum(1).unsqueeze(-1) * A)       # (B, di, n)
                h = decay * dt[:, s].unsqueeze(-1) * Bm[:, s].unsqueeze(1) * xi[:, s].unsqueeze(-1)
                ref[:, t] += (h * Cm[:, t].unsqueeze(1)).sum(-1)
        ref = m.out_proj((ref + xi * m.D) * torch.nn.functional.silu(z))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    x2 = x.clone()
    x2[:, 4] += 1.0
    y2 = m(x2)
    torch.testing.assert_close(y2[:, :4], y[:, :4])
    assert not torch.allclose(y2[:, 4:], y[:, 4:])


# ----------------------------------------------------------------------------------- sweeps

TINY_LADDER = """
kind = "ladder"
n_models = {n}
seed = {seed}
[model]
family = ["gpt", "mamba", "hf_llama"]
norm = "none"
d_model = 16
n_layers = 2
n_heads = 2
mlp_ratio = 2
seq_len = 12
vocab_size = 32
profile_samples = 48
profile_rank = 8
init_std = {{log_uniform = [0.01, 0.1]}}
[train]
batch_size = 8
steps = {steps}
[ladder]
adamw = [1e-3, 1e-1, 10.0, 1000.0]
start = 1
min_runs = 3
"""


def test_ladder_sweep_labels_real_runs_and_brackets(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(TINY_LADDER.format(n=3, seed=0, steps=20))
    summary = run_sweep(spec, tmp_path / "o", progress=False)
    runs, layers = load_corpus(tmp_path / "o")
    assert summary["planned"] == 3 and summary["ran"] == len(runs) and runs["run_id"].is_unique
    assert runs.groupby("model_id").size().ge(3).all()          # min_runs per model
    assert set(layers["model_id"]) == set(runs["model_id"]) and len(layers) == 2 * 3
    for mid, g in runs.groupby("model_id"):
        # same model, same init: the loss before any update does not depend on the LR
        assert np.allclose(g["init_loss"], g["init_loss"].iloc[0], rtol=1e-6)
        assert g["lr"].is_unique and g["bracketed"].nunique() == 1
        # lr 1000 with AdamW on a no-norm net diverges; the boundary read from the runs
        assert g.loc[g["lr"] == 1000.0, "diverged"].all()
        b = bracket(list(g["lr"]), list(g["diverged"]), [1e-3, 1e-1, 10.0, 1000.0])
        assert g["lr_diverge_min"].iloc[0] == b["lr_diverge_min"]
    for col in ("run_id", "model_id", "family", "norm", "d_model", "n_layers", "init_std", "lr",
                "optimizer", "warmup", "grad_clip", "weight_decay", "steps", "task", "batch_size",
                "seed", "diverged", "diverge_step", "diverge_reason", "dead_at_init", "collapsed",
                "init_loss", "init_loss_ratio", "final_loss", "grad_norm_init", "seconds",
                "versions", "lr_stable_max", "lr_diverge_min", "bracketed"):
        assert col in runs.columns, col
    # the initial loss of a near-uniform predictor is close to ln(vocab)
    assert np.allclose(runs["init_loss_ratio"], 1.0, atol=0.1)


def test_a_model_dead_at_init_is_flagged_and_trained_once(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(TINY_LADDER.format(n=1, seed=0, steps=5).replace(
        "init_std = {log_uniform = [0.01, 0.1]}", "init_std = 30.0").replace(
        'family = ["gpt", "mamba", "hf_llama"]', 'family = "gpt"'))
    run_sweep(spec, tmp_path / "o", progress=False)
    runs, _ = load_corpus(tmp_path / "o")
    assert len(runs) == 1
    r = runs.iloc[0]
    assert r["dead_at_init"] and r["diverge_step"] == 1 and not r["bracketed"]
    assert r["init_loss"] > 50 or r["grad_norm_init"] > 500 or not math.isfinite(r["init_loss"])


def test_sigkill_mid_ladder_sweep_loses_and_duplicates_nothing(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(TINY_LADDER.format(n=6, seed=3, steps=40))
    out = tmp_path / "out"
    kill_after_parts(start_sweep(spec, out), out)
    parts = out / "parts"
    before = {p.name.split(".")[0]: pd.read_parquet(p) for p in parts.glob("*.runs.parquet")}
    assert 2 <= len(before) < 6
    summary = run_sweep(spec, out, progress=False)
    runs, layers = load_corpus(out)
    assert runs["model_id"].nunique() == 6 and runs["run_id"].is_unique
    assert summary["already_done"] == len(before)
    for mid, df in before.items():   # kept as written (wall times are unique), not re-run
        kept = runs[runs["model_id"] == mid].set_index("run_id").sort_index()
        assert list(kept["seconds"]) == list(df.set_index("run_id").sort_index()["seconds"])
    assert not layers.duplicated(["model_id", "layer"]).any() and len(layers) == 2 * 6
    assert run_sweep(spec, out, progress=False)["ran"] == 0


def _children(pid: int) -> set[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc")
def test_workers_die_with_a_killed_sweep(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(TINY_LADDER.format(n=8, seed=5, steps=200))
    out = tmp_path / "out"
    proc = start_sweep(spec, out, "--workers", "2")
    try:
        deadline = time.time() + 300
        workers: set[int] = set()
        while time.time() < deadline and proc.poll() is None:
            # workers are busy once a unit's first run has started writing nothing yet: wait
            # until both have been handed a unit (their CPU time grows)
            workers = {p for p in _children(proc.pid)
                       if "loky" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="ignore")
                       and "popen_loky" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="ignore")}
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(workers) >= 2, "no workers seen"
        time.sleep(3)                                      # they are training now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 20
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and
                                             "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
                                             for p in workers):
            time.sleep(0.2)
        alive = [p for p in workers if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, f"workers {alive} outlived the killed sweep"
        n_parts = len(list((out / "parts").glob("*.runs.parquet")))
        time.sleep(2)                                      # and nothing more gets written
        assert len(list((out / "parts").glob("*.runs.parquet"))) == n_parts
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _children(proc.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def test_max_cost_caps_width_depth_and_batch_together():
    spec = {**BASE, "n_models": 40, "max_cost": 64 * 64 * 2 * 8,
            "model": {**BASE["model"], "d_model": [32, 64], "n_layers": [2, 3]},
            "train": {**BASE["train"], "batch_size": [8, 16]}}
    for u in parse_ladder_spec(spec).units():
        c = u["config"]
        assert c["d_model"] ** 2 * c["n_layers"] * c["batch_size"] <= 64 * 64 * 2 * 8
    with pytest.raises(SweepSpecError, match="max_cost"):
        parse_ladder_spec({**spec, "max_cost": 10})
