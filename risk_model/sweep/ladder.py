"""Models, then learning-rate ladders: the sweep design of corpus-v2.

A *model* is an architecture + its initialisation + a seed (and the training recipe it is trained
with). It is built and profiled once, then trained at several learning rates of a half-decade
ladder, walking from a start rung until its stability boundary is bracketed: the last stable and
the first diverged rung are adjacent, or the top rung is stable. A model dead at init (step 1
already over the limits, before any update: no learning rate can matter) is trained once.

A ladder spec file (TOML)::

    name = "corpus-v2"
    kind = "ladder"
    n_models = 480
    seed = 2026
    max_width_depth = 131072     # d_model² × n_layers cap (CPU budget); draws above are redrawn
    max_cost = 1048576           # d_model² × n_layers × batch_size cap; the model and its recipe
                                 #   are redrawn together when above

    [model]                      # per key: a list (uniform choice; repeat to weight),
    family = ["gpt", "mamba"]    #   a scalar, or {log_uniform = [lo, hi]}
    norm = ["pre_ln", "none"]    # families with a fixed norm (hf_*) use theirs
    d_model = [32, 64, 128]
    n_layers = [2, 4, 8]
    head_dim = [16, 32]          # n_heads = d_model / head_dim
    init_std = {log_uniform = [0.002, 0.3]}

    [train]
    optimizer = ["adamw", "adamw", "lion", "sgd"]
    warmup_fraction = [0.0, 0.05, 0.2]   # warmup = round(fraction × steps)
    steps = 300

    [ladder]                     # rungs per optimizer, ascending
    adamw = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
    start = [3, 4, 5, 6]         # rung index the walk starts from (drawn per model); or a table
                                 #   per optimizer: start = {adamw = [5, 6, 7], sgd = [5, 6]}
    min_runs = 4                 # after bracketing, add neighbouring rungs up to this many runs

Keys of ``[model]`` and ``[train]`` are ``RunConfig`` fields (plus ``head_dim`` and
``warmup_fraction``); every draw is validated before any run starts (``SweepSpecError`` names the
key). ``model_id``: the first 16 hex digits of the sha1 of the model's architecture, init and seed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .archs import FAMILY_NORMS
from .spec import RUN_FIELDS, RunConfig, SweepSpecError, _coerce, make_config

MODEL_KEYS = ("family", "norm", "d_model", "n_layers", "n_heads", "mlp_ratio", "init_scale",
              "init_std", "embed_std", "out_std", "residual_scale", "n_experts", "top_k", "kan_grid",
              "seq_len", "vocab_size", "seed")
_EXTRA = {"head_dim", "warmup_fraction"}
_TOP_KEYS = {"name", "kind", "n_models", "seed", "max_width_depth", "max_cost", "model", "train", "ladder"}


def model_id(cfg: RunConfig) -> str:
    """sha1 of the model-defining fields (architecture, init, seed), first 16 hex digits."""
    d = {k: getattr(cfg, k) for k in MODEL_KEYS}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _dist(key: str, value):
    """Normalise one key's distribution: ("choice", [values]) or ("log_uniform", (lo, hi))."""
    if isinstance(value, dict):
        if set(value) != {"log_uniform"}:
            raise SweepSpecError(f"{key}: a table must be {{log_uniform = [lo, hi]}}, got {value!r}")
        lo_hi = value["log_uniform"]
        if (not isinstance(lo_hi, list) or len(lo_hi) != 2
                or not all(isinstance(v, (int, float)) and v > 0 for v in lo_hi) or lo_hi[0] > lo_hi[1]):
            raise SweepSpecError(f"{key}: log_uniform needs [lo, hi] with 0 < lo <= hi, got {lo_hi!r}")
        return ("log_uniform", (float(lo_hi[0]), float(lo_hi[1])))
    vals = value if isinstance(value, list) else [value]
    if not vals:
        raise SweepSpecError(f"{key}: empty list of values")
    if key == "head_dim":
        if not all(isinstance(v, int) and v >= 1 for v in vals):
            raise SweepSpecError(f"head_dim must be positive integers, got {vals!r}")
        return ("choice", vals)
    if key == "warmup_fraction":
        if not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in vals):
            raise SweepSpecError(f"warmup_fraction must be in [0, 1), got {vals!r}")
        return ("choice", [float(v) for v in vals])
    return ("choice", [_coerce(key, v) for v in vals])


def _draw(rng: np.random.Generator, dist):
    kind, arg = dist
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1]))))
    return arg[int(rng.integers(len(arg)))]


@dataclass
class LadderSpec:
    """A parsed ladder spec; ``units()`` gives the models to train, in a fixed order."""

    model: dict
    train: dict
    rungs: dict[str, list[float]]
    start: dict[str, list[int]]
    min_runs: int = 4
    n_models: int = 1
    seed: int = 0
    max_width_depth: int = 0
    max_cost: int = 0
    name: str = "sweep"
    source: str = field(default="", repr=False)

    def _draw_model(self, rng: np.random.Generator) -> dict:
        for _ in range(1000):
            d = {k: _draw(rng, dist) for k, dist in self.model.items()}
            width, depth = d.get("d_model", RunConfig.d_model), d.get("n_layers", RunConfig.n_layers)
            if not self.max_width_depth or width * width * depth <= self.max_width_depth:
                return d
        raise SweepSpecError("max_width_depth: no draw of d_model and n_layers fits under it")

    def units(self) -> list[dict]:
        """One dict per model: ``unit_id`` (= model_id), ``config`` (RunConfig fields, lr at the
        start rung), ``rungs``, ``start``, ``min_runs``. Validated; stable for a given spec."""
        rng = np.random.default_rng(self.seed)
        out: dict[str, dict] = {}
        for _ in range(self.n_models):
            for _ in range(1000):
                d = self._draw_model(rng)
                t = {k: _draw(rng, dist) for k, dist in self.train.items()}
                cost = (d.get("d_model", RunConfig.d_model) ** 2 * d.get("n_layers", RunConfig.n_layers)
                        * t.get("batch_size", RunConfig.batch_size))
                if not self.max_cost or cost <= self.max_cost:
                    break
            else:
                raise SweepSpecError("max_cost: no draw of d_model, n_layers and batch_size fits under it")
            seed = int(rng.integers(0, 2**31 - 1))
            fam = d.get("family", RunConfig.family)
            allowed = FAMILY_NORMS[fam]
            if d.get("norm", RunConfig.norm) not in allowed:
                d["norm"] = allowed[int(rng.integers(len(allowed)))]
            if "head_dim" in d:
                d["n_heads"] = n_heads_for(d.get("d_model", RunConfig.d_model), d.pop("head_dim"))
            frac = t.pop("warmup_fraction", None)
            if frac is not None:
                t["warmup"] = int(round(frac * t.get("steps", RunConfig.steps)))
            opt = t.get("optimizer", RunConfig.optimizer)
            if opt not in self.rungs:
                raise SweepSpecError(f"ladder: no rungs for optimizer {opt!r} ([ladder] {opt} = [...])")
            rungs = self.rungs[opt]
            starts = self.start.get(opt, self.start.get("*", [0]))
            start = min(int(starts[int(rng.integers(len(starts)))]), len(rungs) - 1)
            cfg = make_config(**d, **t, seed=seed, lr=rungs[start])
            out.setdefault(model_id(cfg), dict(unit_id=model_id(cfg), config=asdict(cfg), rungs=rungs,
                                               start=start, min_runs=self.min_runs))
        return list(out.values())


def n_heads_for(d_model: int, head_dim: int) -> int:
    """The most heads of at least ``head_dim`` channels that divide ``d_model``."""
    n = max(1, d_model // head_dim)
    while d_model % n:
        n -= 1
    return n


def parse_ladder_spec(data: dict, source: str = "") -> LadderSpec:
    """Validate a ladder spec mapping (as read from TOML); ``SweepSpecError`` names the key."""
    for key in data:
        if key not in _TOP_KEYS:
            raise SweepSpecError(f"unknown top-level key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    sections = {}
    for sec in ("model", "train"):
        table = data.get(sec, {})
        if not isinstance(table, dict):
            raise SweepSpecError(f"{sec}: must be a table")
        for key in table:
            if key not in RUN_FIELDS and key not in _EXTRA or key in ("seed", "lr"):
                raise SweepSpecError(f"{sec}.{key}: not a {sec} key")
        if "warmup" in table and "warmup_fraction" in table:
            raise SweepSpecError(f"{sec}.warmup: give warmup (steps) or warmup_fraction, not both")
        sections[sec] = {k: _dist(k, v) for k, v in table.items()}
    lad = data.get("ladder")
    if not isinstance(lad, dict):
        raise SweepSpecError("ladder: a [ladder] table with rungs per optimizer is required")
    rungs: dict[str, list[float]] = {}
    for key, vals in lad.items():
        if key in ("start", "min_runs"):
            continue
        if not isinstance(vals, list) or len(vals) < 2 \
                or not all(isinstance(v, (int, float)) and v > 0 for v in vals) \
                or any(b <= a for a, b in zip(vals, vals[1:])):
            raise SweepSpecError(f"ladder.{key}: rungs must be at least two ascending positive rates")
        _coerce("optimizer", key)
        rungs[key] = [float(v) for v in vals]
    start_in = lad.get("start", [0])
    start_in = start_in if isinstance(start_in, dict) else {"*": start_in}
    start: dict[str, list[int]] = {}
    for opt, vals in start_in.items():
        vals = vals if isinstance(vals, list) else [vals]
        if not vals or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in vals):
            raise SweepSpecError(f"ladder.start: rung indices >= 0, got {vals!r}")
        start[opt] = vals
    min_runs = lad.get("min_runs", 1)
    if not isinstance(min_runs, int) or min_runs < 1:
        raise SweepSpecError(f"ladder.min_runs must be a positive integer, got {min_runs!r}")
    n_models = data.get("n_models")
    if not isinstance(n_models, int) or isinstance(n_models, bool) or n_models < 1:
        raise SweepSpecError(f"n_models must be a positive integer, got {n_models!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise SweepSpecError(f"seed must be a non-negative integer, got {seed!r}")
    mwd = data.get("max_width_depth", 0)
    if not isinstance(mwd, int) or mwd < 0:
        raise SweepSpecError(f"max_width_depth must be a non-negative integer, got {mwd!r}")
    mc = data.get("max_cost", 0)
    if not isinstance(mc, int) or mc < 0:
        raise SweepSpecError(f"max_cost must be a non-negative integer, got {mc!r}")
    spec = LadderSpec(model=sections["model"], train=sections["train"], rungs=rungs, start=start,
                      min_runs=min_runs, n_models=n_models, seed=seed, max_width_depth=mwd, max_cost=mc,
                      name=str(data.get("name", "sweep")), source=source)
    spec.units()  # validates every draw before any run starts
    return spec


# ----------------------------------------------------------------------------------- training


def bracket(lrs: list[float], diverged: list[bool], rungs: list[float]) -> dict:
    """Per-model stability boundary from the runs of its ladder.

    ``lr_diverge_min``: the smallest LR that diverged (NaN if none); ``lr_stable_max``: the largest
    stable LR below it (NaN if none); ``bracketed``: those two are adjacent rungs, or nothing
    diverged and the top rung was run and stable.
    """
    div = sorted(lr for lr, d in zip(lrs, diverged) if d)
    lo = div[0] if div else math.inf
    stable = sorted(lr for lr, d in zip(lrs, diverged) if not d and lr < lo)
    s_max = stable[-1] if stable else math.nan
    if div:
        ok = bool(stable) and rungs.index(lo) - rungs.index(s_max) == 1
    else:
        ok = rungs[-1] in lrs
    return dict(lr_stable_max=s_max, lr_diverge_min=div[0] if div else math.nan, bracketed=ok)


def walk(first: int, n_rungs: int, min_runs: int, outcome) -> list[int]:
    """Rung indices run, in order: from ``first`` up while stable / down while diverged until the
    boundary is bracketed or a ladder end is hit, then neighbours (above the highest run, below the
    lowest, alternately) until ``min_runs``. ``outcome(i)`` trains rung ``i`` and returns
    ``"stable"``, ``"diverged"`` or ``"dead"`` (dead at init: the walk stops)."""
    done: dict[int, str] = {}
    i = first
    while True:
        done[i] = outcome(i)
        if done[i] == "dead":
            return list(done)
        step = 1 if done[i] == "stable" else -1
        j = i + step
        if not 0 <= j < n_rungs or j in done:
            break
        i = j
    turn = 0
    while len(done) < min_runs:
        cand = [k for k in (max(done) + 1, min(done) - 1) if 0 <= k < n_rungs]
        if not cand:
            break
        k = cand[turn % len(cand)]
        turn += 1
        done[k] = outcome(k)
    return list(done)


def build_and_profile(cfg: RunConfig):
    """The model of ``cfg`` at its initial weights (seeded by ``cfg.seed``) and its init profile:
    ``(model, n_params, aggregates, layers table or None, profile error, profile seconds)``."""
    import torch

    from .archs import build_network
    from .trainer import init_profile

    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model_args())
    n_params = sum(p.numel() for p in model.parameters())
    tp = time.perf_counter()
    aggs, layers, profile_error = init_profile(model, cfg)
    return model, n_params, aggs, layers, profile_error, time.perf_counter() - tp


def train_ladder(unit: dict) -> tuple[list[dict], "pd.DataFrame"]:
    """Build and profile one model, then train its ladder. Returns ``(rows, layers)``: one corpus
    row per run (with the model's boundary) and the per-layer init profile keyed by ``model_id``."""
    import featurize
    import pandas as pd
    import torch

    from .spec import config_id, run_id
    from .trainer import make_run_task, run_labels, train, versions

    t0 = time.perf_counter()
    cfg0 = RunConfig(**unit["config"])
    mid = model_id(cfg0)
    rungs = list(unit["rungs"])
    model0, n_params, aggs, layers, profile_error, profile_seconds = build_and_profile(cfg0)

    rows: list[dict] = []

    def outcome(i: int) -> str:
        cfg = replace(cfg0, lr=rungs[i])
        tr = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(model0)
        task = make_run_task(cfg)
        labels = run_labels(train(model, cfg, task), task)
        rows.append(dict(run_id=run_id(cfg), model_id=mid, config_id=config_id(cfg), **asdict(cfg),
                         rung=i, **labels, n_params=n_params, **aggs, profile_error=profile_error,
                         profile_seconds=profile_seconds, seconds=time.perf_counter() - tr))
        if labels["dead_at_init"]:
            return "dead"
        return "diverged" if labels["diverged"] else "stable"

    walk(int(unit["start"]), len(rungs), int(unit["min_runs"]), outcome)
    b = bracket([r["lr"] for r in rows], [r["diverged"] for r in rows], rungs)
    ver = versions()
    for r in rows:
        r.update(b, n_rungs_run=len(rows), model_seconds=time.perf_counter() - t0, versions=ver)
    if layers is None:
        layers = pd.DataFrame(columns=featurize.PROFILE_COLUMNS)
    layers = layers.copy()
    layers.insert(0, "model_id", mid)
    return rows, layers
