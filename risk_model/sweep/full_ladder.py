"""Full learning-rate ladders: the sweep design of corpus-v3 (``kind = "full_ladder"``).

Each model (architecture + init + seed, with one recipe; ``ladder.model_id``) is built and
profiled once, then trained on half-decade rungs from a rung where training is clearly too slow,
past its best LR, to its first failed rung, with the labels of ``risk_model.labels``:

1. *Up*: from the start rung (a guess near lr_best), go up one rung at a time until the highest
   run is ``failed`` by ``ladder_summary`` over the runs so far while the model learns (it
   diverged, or it is above lr_best and lost more than half of what the best run learned), or the
   top rung is reached. While the model never learns, only a divergence stops the climb.
2. *Down*: from the lowest run, go down while the lowest run is the best so far or still within
   ``labels.too_slow`` of the best (it learned at least half of what the best learned); stop at
   the first clearly too slow rung or the bottom rung.
3. *Extra rung*: with ``extra_rung = true``, one run at the geometric mean of ``lr_fail_lo`` and
   ``lr_fail_min`` (√10 ≈ 3.16× apart on a half-decade ladder), so lr_fail is bracketed within
   √3.16 ≈ 1.78×.

``max_runs`` caps a ladder (the walk stops there). A model dead at init is trained once. The
per-model labels are computed from the runs at the end, per horizon: each ``steps`` read from the
ladder's runs (``trainer.horizon_rows``) gets its own ``ladder_summary``; the walk itself is
steered by the longest horizon only.

A spec file (TOML)::

    name = "corpus-v3"
    kind = "full_ladder"

    [ladder]                     # shared by every stage
    adamw = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
    start = {adamw = [5, 6]}     # as for kind = "ladder"
    extra_rung = true
    max_runs = 12
    horizons = [300, 1000]       # read every run longer than these at these steps too
                                 #   (constant schedule only; others run as they are)

    [[stage]]                    # stages run in the order given; each is a kind = "ladder" body
    name = "classes"             #   without [ladder]: n_models, seed, max_cost, [stage.model],
    n_models = 20                #   [stage.train]
    seed = 1
    [stage.model]
    family = ["gpt", "moe"]
    [stage.train]
    steps = 3000

Units come stage by stage, so every part a sweep commits extends a usable corpus.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, replace

from .ladder import build_and_profile, model_id, parse_ladder_spec
from .spec import RunConfig, SweepSpecError, horizon_steps

_TOP = {"name", "kind", "ladder", "stage"}
_STAGE_TOP = {"name", "n_models", "seed", "max_width_depth", "max_cost", "model", "train"}
_LADDER_EXTRA = {"extra_rung", "max_runs", "horizons"}


class FullLadderSpec:
    """A parsed ``full_ladder`` spec; ``units()`` gives the models to train, stage by stage."""

    def __init__(self, stages: list, names: list[str], extra_rung: bool, max_runs: int,
                 horizons: list[int], name: str = "sweep", source: str = ""):
        self.stages, self.names, self.extra_rung = stages, names, extra_rung
        self.max_runs, self.horizons, self.name, self.source = max_runs, horizons, name, source

    def units(self) -> list[dict]:
        out: dict[str, dict] = {}
        for stage, sname in zip(self.stages, self.names):
            for u in stage.units():
                cfg = RunConfig(**u["config"])
                hs = [h for h in self.horizons if h < cfg.steps] if cfg.schedule == "constant" else []
                cfg = replace(cfg, horizons=",".join(str(h) for h in hs))
                out.setdefault(u["unit_id"], dict(u, config=asdict(cfg), walk="full", stage=sname,
                                                  extra_rung=self.extra_rung, max_runs=self.max_runs))
        return list(out.values())


def parse_full_ladder_spec(data: dict, source: str = "") -> FullLadderSpec:
    """Validate a ``full_ladder`` spec mapping; ``SweepSpecError`` names the key."""
    for key in data:
        if key not in _TOP:
            raise SweepSpecError(f"unknown top-level key {key!r} (known: {', '.join(sorted(_TOP))})")
    lad = data.get("ladder")
    if not isinstance(lad, dict):
        raise SweepSpecError("ladder: a [ladder] table with rungs per optimizer is required")
    extra = lad.get("extra_rung", True)
    if not isinstance(extra, bool):
        raise SweepSpecError(f"ladder.extra_rung must be true or false, got {extra!r}")
    max_runs = lad.get("max_runs", 16)
    if not isinstance(max_runs, int) or isinstance(max_runs, bool) or max_runs < 2:
        raise SweepSpecError(f"ladder.max_runs must be an integer >= 2, got {max_runs!r}")
    hz = lad.get("horizons", [])
    if not isinstance(hz, list) or not all(isinstance(h, int) and h >= 1 for h in hz):
        raise SweepSpecError(f"ladder.horizons must be a list of positive step counts, got {hz!r}")
    body = {k: v for k, v in lad.items() if k not in _LADDER_EXTRA}
    stages_in = data.get("stage")
    if not isinstance(stages_in, list) or not stages_in:
        raise SweepSpecError("stage: at least one [[stage]] table is required")
    stages, names = [], []
    for i, st in enumerate(stages_in):
        if not isinstance(st, dict):
            raise SweepSpecError(f"stage {i}: must be a table")
        for key in st:
            if key not in _STAGE_TOP:
                raise SweepSpecError(f"stage {i}: unknown key {key!r} (known: {', '.join(sorted(_STAGE_TOP))})")
        sname = str(st.get("name", f"stage{i}"))
        try:
            stages.append(parse_ladder_spec({**{k: v for k, v in st.items() if k != "name"},
                                             "kind": "ladder", "ladder": body, "name": sname}))
        except SweepSpecError as e:
            raise SweepSpecError(f"stage {sname}: {e}") from None
        names.append(sname)
    spec = FullLadderSpec(stages, names, extra, max_runs, sorted(set(hz)),
                          name=str(data.get("name", "sweep")), source=source)
    for u in spec.units():  # validates the horizons against every draw's steps
        horizon_steps(u["config"]["horizons"])
        if u["config"]["eval_batches"] < 1:
            raise SweepSpecError("train.eval_batches: a full ladder is labelled on held-out batches; "
                                 f"give eval_batches >= 1 (stage {u['stage']})")
    return spec


# ----------------------------------------------------------------------------------- the walk


def full_walk(first: int, rungs: list[float], outcome, marginal_loss: float, *, extra_rung: bool = True,
              max_runs: int = 16) -> list[float]:
    """LRs run, in order (module doc). ``outcome(lr)`` trains at ``lr`` and returns
    ``(final_eval_loss, diverged, dead_at_init)``; ``marginal_loss`` is the task's R."""
    from ..labels import ladder_summary, too_slow

    res: dict[float, tuple[float, bool]] = {}

    def run(lr: float) -> bool:
        loss, div, dead = outcome(lr)
        res[lr] = (float(loss), bool(div))
        return bool(dead)

    def summary() -> dict:
        lrs = sorted(res)
        return ladder_summary(lrs, [res[x][0] for x in lrs], [res[x][1] for x in lrs], marginal_loss)

    if run(rungs[first]):
        return list(res)
    i = first
    while i + 1 < len(rungs) and len(res) < max_runs:      # up, until the highest run failed
        s = summary()
        top = max(res)
        if res[top][1] or (not s["never_learns"] and s["failed"][sorted(res).index(top)]):
            break
        i += 1
        run(rungs[i])
    i = first
    while i > 0 and len(res) < max_runs:                    # down, until clearly too slow
        s = summary()
        low = min(res)
        if s["never_learns"]:
            if first - i >= 2:                              # nothing learns: two rungs below are enough
                break
        elif low != s["lr_best"] and too_slow(res[low][0], s["best_loss"], marginal_loss):
            break
        i -= 1
        run(rungs[i])
    s = summary()
    if extra_rung and len(res) < max_runs and math.isfinite(s["lr_fail_min"]) and math.isfinite(s["lr_fail_lo"]):
        mid = math.sqrt(s["lr_fail_min"] * s["lr_fail_lo"])
        if s["lr_fail_min"] / s["lr_fail_lo"] > 2.0 and mid not in res:
            run(mid)
    return list(res)


def label_ladder(rows: list[dict]) -> None:
    """Add the per-model labels (``ladder_summary``) and per-run ``failed`` to ``rows`` in place,
    one ladder per ``steps`` (horizon)."""
    from ..labels import ladder_summary

    for h in sorted({r["steps"] for r in rows}):
        group = [r for r in rows if r["steps"] == h]
        s = ladder_summary([r["lr"] for r in group], [r["final_eval_loss"] for r in group],
                           [r["diverged"] for r in group], group[0]["marginal_loss"])
        per_model = {k: v for k, v in s.items() if k != "failed"}
        for r, f in zip(group, s["failed"]):
            r.update(failed=bool(f), **per_model, n_rungs_run=len(group))


def train_full_ladder(unit: dict, device: str = "cpu") -> tuple[list[dict], "pd.DataFrame"]:
    """Build and profile one model, walk its full ladder. Returns ``(rows, layers)``: one row per
    run and horizon (``trainer.horizon_rows``) with the per-model labels, and the init profile."""
    import featurize
    import pandas as pd
    import torch

    from .spec import config_id, run_id
    from .trainer import horizon_rows, make_run_task, train, versions

    t0 = time.perf_counter()
    cfg0 = RunConfig(**unit["config"])
    mid = model_id(cfg0)
    rungs = list(unit["rungs"])
    model0, n_params, aggs, layers, profile_error, profile_seconds = build_and_profile(cfg0)
    model0.to(device)
    rows: list[dict] = []

    def outcome(lr: float):
        cfg = replace(cfg0, lr=lr)
        tr = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(model0)
        task = make_run_task(cfg)
        res = train(model, cfg, task, device)
        secs = time.perf_counter() - tr
        out = horizon_rows(res, cfg, task)
        for c, lab in out:
            rows.append(dict(run_id=run_id(c), model_id=mid, config_id=config_id(c), **asdict(c),
                             rung=rungs.index(lr) if lr in rungs else -1, **lab, n_params=n_params,
                             **aggs, profile_error=profile_error, profile_seconds=profile_seconds,
                             # a horizon row cost nothing of its own: the run's time is on its last row
                             seconds=secs if c.steps == cfg.steps else 0.0, run_seconds=secs,
                             rows_per_run=len(out), stage=unit.get("stage", "")))
        last = out[-1][1]
        return last["final_eval_loss"], last["diverged"], last["dead_at_init"]

    first = int(unit["start"])
    R = make_run_task(replace(cfg0, eval_batches=0)).marginal_loss
    full_walk(first, rungs, outcome, R, extra_rung=bool(unit.get("extra_rung", True)),
              max_runs=int(unit.get("max_runs", 16)))
    label_ladder(rows)
    ver = versions()
    for r in rows:
        r.update(model_seconds=time.perf_counter() - t0, versions=ver)
    if layers is None:
        layers = pd.DataFrame(columns=featurize.PROFILE_COLUMNS)
    layers = layers.copy()
    layers.insert(0, "model_id", mid)
    return rows, layers
