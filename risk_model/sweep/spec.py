"""Run configurations, sweep spec files (TOML), sampling and run ids.

A spec file::

    name = "corpus-v1"
    n_runs = 1600            # total runs (configs × seeds_per_config)
    sampler = "lhs"          # "lhs" (Latin hypercube over each key's grid), "random" or "grid"
    seed = 0                 # sampling seed
    seeds_per_config = 2     # each sampled config runs with this many training seeds

    [grid]                   # one list of values per key; a scalar fixes the key
    family = ["gpt", "gpt", "moe", "kan"]   # repeating a value weights it
    norm = ["pre_ln", "post_ln", "rmsnorm", "deepnorm", "subln", "none"]
    lr = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    steps = 300

Keys of ``[grid]`` are the fields of ``RunConfig`` except ``seed`` (seeds come from
``seeds_per_config``). A key left out takes ``RunConfig``'s default. Every sampled config is
validated before any run starts; errors are ``SweepSpecError`` naming the key.

Run id: the first 16 hex digits of the sha1 of the config's canonical JSON (sorted keys, every
field, seed included). Config id: the same without ``seed``, so a config's seeds group together.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .archs import ARCH_ARG_NAMES, FAMILIES, FAMILY_NORMS, HF_FAMILIES, IMAGE_FAMILIES
from .tasks import IMAGE_TASKS, TASKS, check_task_data, digits_heldout_size
from risk_model.zoo import NORMS

OPTIMIZERS = ("adamw", "lion", "sgd")
SAMPLERS = ("lhs", "random", "grid")


class SweepSpecError(ValueError):
    """A sweep spec or run config is invalid; the message names the offending key."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run (and therefore its run id)."""

    # model (fields of zoo.TransformerConfig; block_size = seq_len)
    family: str = "gpt"
    norm: str = "pre_ln"
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    init_scale: float = 1.0
    init_std: float = 0.02        # base std of weight matrices (archs module doc)
    embed_std: float = 0.0        # 0: init_std
    out_std: float = 0.0          # 0: the family's own rule
    residual_scale: float = 1.0
    n_experts: int = 4
    top_k: int = 2
    kan_grid: int = 6
    # task
    task: str = "synthetic_lm"
    seq_len: int = 32
    vocab_size: int = 256
    # training
    optimizer: str = "adamw"
    lr: float = 1e-3
    warmup: int = 0
    weight_decay: float = 0.0
    batch_size: int = 16
    steps: int = 300
    grad_clip: float = 0.0        # 0: no clipping
    seed: int = 0
    # recipe knobs of corpus-v3 (trainer module doc)
    beta2: float = 0.95           # AdamW β2 (β1 = 0.9)
    eps: float = 1e-8             # AdamW ε
    momentum: float = 0.9         # SGD momentum
    schedule: str = "constant"    # after warmup: "constant" or "cosine" (to 10% of lr at the last step)
    accum: int = 1                # gradient accumulation: batch_size is split into this many micro-batches
    eval_batches: int = 0         # held-out batches of batch_size evaluated at the end (0: none, as v2)
    horizons: str = ""            # "300,1000": also evaluate (and give a row) after these many steps
    kss_alpha: float = 0.0
    kss_every: int = 10
    # init profile
    profile_samples: int = 512
    profile_rank: int = 32
    kreiss_grid: str = "61x18"    # "THETAxR" polar grid of the Kreiss search; "" = featurizer default

    def model_args(self) -> dict:
        """``archs.build_network`` arguments for this run."""
        args = {k: v for k, v in asdict(self).items() if k in ARCH_ARG_NAMES}
        args["block_size"] = self.seq_len
        return args


# fields added with corpus-v2: left out of the run id while at their default, so corpus-v1's
# run ids (and its resumable sweeps) stay what they were
_ID_OPTIONAL = {"init_std": 0.02, "embed_std": 0.0, "out_std": 0.0,
                # corpus-v3 recipe fields, likewise (corpus-v2's run ids stay)
                "beta2": 0.95, "eps": 1e-8, "momentum": 0.9, "schedule": "constant", "accum": 1,
                "eval_batches": 0}
# never in the run id: where a run is also read out does not change the run (its horizon rows have
# the run ids of the shorter runs they stand for)
_ID_EXCLUDED = ("horizons",)
SCHEDULES = ("constant", "cosine")


RUN_FIELDS = {f.name: f.type for f in fields(RunConfig)}
_INT = {k for k, t in RUN_FIELDS.items() if t == "int"}
_FLOAT = {k for k, t in RUN_FIELDS.items() if t == "float"}
_CHOICES = {"family": FAMILIES + IMAGE_FAMILIES, "norm": NORMS, "task": TASKS, "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES}


def horizon_steps(horizons: str) -> list[int]:
    """The step counts of a ``horizons`` string ("300,1000" -> [300, 1000]); ValueError if malformed."""
    if not horizons:
        return []
    parts = horizons.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"horizons must be comma-separated positive step counts, got {horizons!r}")
    return sorted({int(p) for p in parts})


def _coerce(key: str, value):
    if key not in RUN_FIELDS:
        raise SweepSpecError(f"unknown key {key!r} (known: {', '.join(sorted(RUN_FIELDS))})")
    if key in _INT:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise SweepSpecError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if key in _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SweepSpecError(f"{key} must be a number, got {value!r}")
        return float(value)
    if key == "kreiss_grid":
        ok = isinstance(value, str) and (value == "" or (
            len(value.split("x")) == 2 and all(p.isdigit() and int(p) >= 2 for p in value.split("x"))))
        if not ok:
            raise SweepSpecError(f"kreiss_grid must be 'THETAxR' (e.g. '61x18') or '', got {value!r}")
        return value
    if key == "horizons":
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        try:
            horizon_steps(value if isinstance(value, str) else "?")
        except ValueError as e:
            raise SweepSpecError(str(e)) from None
        return value
    if key in _CHOICES and value not in _CHOICES[key]:
        raise SweepSpecError(f"{key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    return value


def _single_checks(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """Checks that involve one key only."""
    checks = [
        ("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "must be > 0"),
        ("init_scale", cfg.init_scale > 0, "must be > 0"),
        ("init_std", cfg.init_std > 0 and math.isfinite(cfg.init_std), "must be > 0"),
        ("embed_std", cfg.embed_std >= 0, "must be >= 0 (0: init_std)"),
        ("out_std", cfg.out_std >= 0, "must be >= 0 (0: the family's rule)"),
        ("residual_scale", cfg.residual_scale > 0, "must be > 0"),
        ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"),
        ("grad_clip", cfg.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
        ("kss_alpha", cfg.kss_alpha >= 0, "must be >= 0"),
        ("warmup", cfg.warmup >= 0, "must be >= 0"),
        ("seed", cfg.seed >= 0, "must be >= 0"),
        ("beta2", 0 < cfg.beta2 < 1, "must be in (0, 1)"),
        ("eps", cfg.eps > 0, "must be > 0"),
        ("momentum", 0 <= cfg.momentum < 1, "must be in [0, 1)"),
        ("eval_batches", cfg.eval_batches >= 0, "must be >= 0 (0: no held-out evaluation)"),
    ]
    for key in ("d_model", "n_layers", "n_heads", "mlp_ratio", "n_experts", "top_k", "kan_grid",
                "seq_len", "vocab_size", "batch_size", "steps", "kss_every", "profile_samples",
                "profile_rank", "accum"):
        checks.append((key, getattr(cfg, key) >= 1, "must be >= 1"))
    return checks


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _cross_checks(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """Checks that relate two keys."""
    return [
        ("n_heads", cfg.d_model % cfg.n_heads == 0,
         f"must divide d_model={cfg.d_model}"),
        ("top_k", cfg.top_k <= cfg.n_experts, f"must be <= n_experts={cfg.n_experts}"),
        ("family", cfg.family not in HF_FAMILIES or _has_transformers(),
         "needs transformers: pip install -c constraints.txt 'divergence-risk[sweep]'"),
        ("norm", cfg.norm in FAMILY_NORMS[cfg.family],
         f"must be one of {', '.join(FAMILY_NORMS[cfg.family])} for family {cfg.family}"),
        ("seq_len", cfg.task != "assoc_recall" or cfg.seq_len >= 9,
         "must be >= 9 for assoc_recall (4 pairs + query)"),
        ("profile_samples", cfg.profile_samples >= 2, "must be >= 2"),
        ("accum", cfg.batch_size % cfg.accum == 0, f"must divide batch_size={cfg.batch_size}"),
        ("vocab_size", cfg.task != "text_bytes" or cfg.vocab_size == 256, "must be 256 for text_bytes"),
        # image families train on image tasks only, and image tasks need an image family
        ("task", cfg.family not in IMAGE_FAMILIES or cfg.task in IMAGE_TASKS,
         f"must be one of {', '.join(IMAGE_TASKS)} for family {cfg.family}"),
        ("family", cfg.task not in IMAGE_TASKS or cfg.family in IMAGE_FAMILIES,
         f"must be one of {', '.join(IMAGE_FAMILIES)} for task {cfg.task}"),
        ("eval_batches", cfg.task != "digits" or cfg.eval_batches * cfg.batch_size <= digits_heldout_size(),
         f"× batch_size={cfg.batch_size} must be at most the {digits_heldout_size()} held-out digits images"),
        ("horizons", all(h < cfg.steps for h in horizon_steps(cfg.horizons)),
         f"must all be below steps={cfg.steps}"),
        ("horizons", not cfg.horizons or cfg.schedule == "constant",
         "need schedule = 'constant' (a cosine schedule depends on the total steps)"),
        ("horizons", not cfg.horizons or cfg.kss_alpha == 0, "are not supported with KSS"),
    ]


def _raise_first(cfg: RunConfig, checks) -> None:
    for key, ok, msg in checks:
        if not ok:
            raise SweepSpecError(f"{key} {msg}, got {getattr(cfg, key)!r}")


def make_config(**kwargs) -> RunConfig:
    """A validated ``RunConfig``; raises ``SweepSpecError`` naming the first bad key."""
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in kwargs.items()})
    _raise_first(cfg, _single_checks(cfg))
    _raise_first(cfg, _cross_checks(cfg))
    if cfg.task in ("text_bytes",) + IMAGE_TASKS:   # missing or changed data: said before any run
        try:
            check_task_data(cfg.task)
        except ValueError as e:
            raise SweepSpecError(str(e)) from None
    return cfg


def _canonical(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def _id_fields(cfg: RunConfig) -> dict:
    d = asdict(cfg)
    for key in _ID_EXCLUDED:
        d.pop(key)
    for key, default in _ID_OPTIONAL.items():
        if d[key] == default:
            d.pop(key)
    return d


def run_id(cfg: RunConfig) -> str:
    """sha1 of the config's canonical JSON, first 16 hex digits."""
    return hashlib.sha1(_canonical(_id_fields(cfg)).encode()).hexdigest()[:16]


def config_id(cfg: RunConfig) -> str:
    """Like ``run_id`` but without ``seed``: the same for every seed of one config."""
    d = _id_fields(cfg)
    d.pop("seed")
    return hashlib.sha1(_canonical(d).encode()).hexdigest()[:16]


@dataclass
class SweepSpec:
    """A parsed spec file. ``configs()`` gives the runs it asks for, in a fixed order."""

    grid: dict[str, list]
    n_runs: int | None = None
    sampler: str = "lhs"
    seed: int = 0
    seeds_per_config: int = 1
    name: str = "sweep"
    source: str = field(default="", repr=False)

    def configs(self) -> list[RunConfig]:
        """The sampled run configs (validated), deduplicated by run id, in a stable order."""
        keys = sorted(self.grid)
        rng = np.random.default_rng(self.seed)
        if self.sampler == "grid":
            combos = [dict(zip(keys, vals))
                      for vals in itertools.product(*(self.grid[k] for k in keys))]
        else:
            n_cfg = math.ceil((self.n_runs or 1) / self.seeds_per_config)
            cols = {}
            for k in keys:
                vals = self.grid[k]
                if self.sampler == "lhs":   # each value gets n/len strata, randomly paired
                    strata = rng.permutation(n_cfg)
                    cols[k] = [vals[int(s * len(vals) // n_cfg)] for s in strata]
                else:
                    cols[k] = [vals[int(i)] for i in rng.integers(0, len(vals), n_cfg)]
            combos = [{k: cols[k][i] for k in keys} for i in range(n_cfg)]
        out: dict[str, RunConfig] = {}
        for combo in combos:
            seeds = rng.integers(0, 2**31 - 1, self.seeds_per_config)
            for s in seeds:
                cfg = make_config(**combo, seed=int(s))
                out.setdefault(run_id(cfg), cfg)
        cfgs = list(out.values())
        if self.sampler != "grid" and self.n_runs is not None:
            cfgs = cfgs[: self.n_runs]
        return cfgs


_TOP_KEYS = {"kind", "name", "n_runs", "sampler", "seed", "seeds_per_config", "grid"}


def parse_spec(data: dict, source: str = "") -> SweepSpec:
    """Validate a spec mapping (as read from TOML); raises ``SweepSpecError`` naming the key."""
    for key in data:
        if key not in _TOP_KEYS:
            raise SweepSpecError(f"unknown top-level key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    grid_in = data.get("grid")
    if not isinstance(grid_in, dict) or not grid_in:
        raise SweepSpecError("grid: a [grid] table with at least one key is required")
    grid: dict[str, list] = {}
    for key, vals in grid_in.items():
        if key == "seed":
            raise SweepSpecError("seed: not a grid key; seeds come from seeds_per_config")
        vals = list(vals) if isinstance(vals, list) else [vals]
        if not vals:
            raise SweepSpecError(f"{key}: empty list of values")
        grid[key] = [_coerce(key, v) for v in vals]
        for v in grid[key]:  # one-key checks (lr <= 0, ...) on every listed value
            one = RunConfig(**{key: v})
            _raise_first(one, [c for c in _single_checks(one) if c[0] == key])
    sampler = data.get("sampler", "lhs")
    if sampler not in SAMPLERS:
        raise SweepSpecError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    n_runs = data.get("n_runs")
    if sampler != "grid" and (not isinstance(n_runs, int) or isinstance(n_runs, bool) or n_runs < 1):
        raise SweepSpecError(f"n_runs must be a positive integer for sampler {sampler!r}, got {n_runs!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise SweepSpecError(f"seed must be a non-negative integer, got {seed!r}")
    spc = data.get("seeds_per_config", 1)
    if not isinstance(spc, int) or isinstance(spc, bool) or spc < 1:
        raise SweepSpecError(f"seeds_per_config must be a positive integer, got {spc!r}")
    spec = SweepSpec(grid=grid, n_runs=n_runs, sampler=sampler, seed=seed, seeds_per_config=spc,
                     name=str(data.get("name", "sweep")), source=source)
    spec.configs()  # validates every combination (e.g. n_heads vs d_model) before any run
    return spec


def read_toml(path: str | Path) -> tuple[dict, str]:
    """``(mapping, text)`` of a TOML spec file; ``SweepSpecError`` if unreadable or invalid."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SweepSpecError(f"cannot read spec {path}: {e.strerror or e}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SweepSpecError(f"spec {path} is not valid TOML: {e}") from e
    return data, text


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a TOML spec file (one run per sampled config)."""
    data, text = read_toml(path)
    return parse_spec(data, source=text)
