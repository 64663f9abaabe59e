"""`risk`: the command-line face of divergence-risk. A thin layer over library functions.

Heavy libraries (mlflow, xgboost, matplotlib, transformers) are imported inside commands only, so
`risk --help` and `risk predict` start fast.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from risk_model.errors import UsageError


def _flags_without_type(option_cls) -> None:
    """Typer's help prints ``<bool>`` after flags (``--json``, ``--help``) as if they took a value;
    show no type for flags instead."""
    shown = option_cls.display_type_rich

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    option_cls.display_type_rich = display_type_rich


_flags_without_type(typer.core.TyperOption)

app = typer.Typer(
    name="risk",
    help="Which learning rate to train a transformer at, and where its training fails, from the network at init.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    """``--version``: eager, so it answers before click asks for a command."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(version("divergence-risk"))
        except PackageNotFoundError:  # run from a source tree without installing
            from risk_model import __version__

            typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Which learning rate to train a transformer at, and where its training fails, from the network at init."""


def fail(msg: str) -> None:
    """One line on stderr, exit code 1."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


def user_errors(fn):
    """Turn the project's own error types (``risk_model.errors``, the featurizer's ``CaptureError``)
    into one stderr line and exit code 1. Anything else is a bug and shows as one."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from featurize.capture import CaptureError
        from risk_model.errors import RiskError

        try:
            return fn(*args, **kwargs)
        except (CaptureError, RiskError) as e:
            fail(str(e).splitlines()[0] if str(e) else e.__class__.__name__)
        except ModuleNotFoundError as e:  # an optional extra (ml, hf, cluster) is not installed
            from risk_model.errors import missing_extra_message

            msg = missing_extra_message(e.name)
            if msg is None:
                raise
            fail(msg)
        except KeyboardInterrupt:
            fail("interrupted")

    return wrapper


class LazyProgress:
    """A rich progress bar on stderr that appears only once work has taken more than a second."""

    def __init__(self, enabled: bool = True, delay: float = 1.0):
        self.enabled = enabled and sys.stderr.isatty()
        self.delay = delay
        self.t0 = time.monotonic()
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            if time.monotonic() - self.t0 < self.delay:
                return
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=True,
            )
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check_output_path(path: Optional[Path], suffix: str) -> None:
    """Before any work: the output file has the right suffix and its directory can be written."""
    from risk_model.outputs import check_writable_dir

    if path is None:
        return
    if path.suffix.lower() != suffix:
        fail(f"{path}: the plot is written as {suffix.upper()[1:]}, give a file name ending in {suffix}")
    if path.is_dir():
        fail(f"{path} is a directory: give a file name ending in {suffix}")
    if not path.parent.exists():
        fail(f"{path.parent}: directory does not exist")
    check_writable_dir(path.parent, create=False, what="plot")


def _write_plot(prof, path: Optional[Path], title: str, *, say: bool) -> None:
    """The optional eigenvalue plot, written after the results are printed, atomically; a failure
    is one line (exit 1) and loses nothing already printed."""
    from risk_model.outputs import atomic_path

    if path is None:
        return
    try:
        with atomic_path(path) as tmp:
            prof.plot(tmp, title=title)
    except OSError as e:
        fail(f"{path}: plot not written ({e.strerror or e.__class__.__name__}); the results above are complete")
    if say:
        typer.echo(f"plot written to {path}")


def profile_table(prof) -> "object":
    from rich.table import Table

    table = Table(title="Koopman spectral profile (per residual block)")
    cols = [("layer", "d"), ("name", "s"), ("m_exp", ".3f"), ("m_near", ".3f"), ("m_mid", ".3f"),
            ("m_con", ".3f"), ("rho", ".3f"), ("kappa_v", ".3g"), ("kreiss", ".3g"), ("eta_nl", ".3f"),
            ("reliable_fraction", ".2f"), ("degenerate", "s")]
    heads = dict(m_exp="M>1", m_near="M≈1", m_mid="Mmid", m_con="M<1", rho="ρ", kappa_v="κ(V)",
                 kreiss="Kreiss", eta_nl="η_nl", reliable_fraction="reliable", degenerate="degen.")
    for name, _ in cols:
        table.add_column(heads.get(name, name), justify="right", no_wrap=True)
    for row in prof.rows:
        cells = []
        for name, fmt in cols:
            v = row[name]
            cells.append(("yes" if v else "") if name == "degenerate" else format(v, fmt) if fmt != "s" else str(v))
        table.add_row(*cells)
    return table


def _parse_shape(input_shape: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"64,128"`` (or ``"64x128"``) → ``(64, 128)``; None stays None."""
    if not input_shape:
        return None
    try:
        return tuple(int(s) for s in input_shape.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--input-shape must look like 64,128 (got {input_shape!r})") from None


def load_and_profile(model_path: Path, *, trust_pickle: bool, blocks, n_samples: Optional[int], seed: int,
                     rank: Optional[int], inputs: Optional[Path], input_shape: Optional[str], probe_seeds: int = 1,
                     low_memory: Optional[bool] = None, device: str = "cpu", say=None):
    """`risk profile`: load a model file and profile it with probe seeds ``seed, seed + 1, …``, with a
    progress bar. ``n_samples``/``rank`` None: the shipped predictor's settings (as `risk predict`).
    Hugging Face directories are streamed block by block when ``low_memory`` (or, unset, when big:
    ``risk_model.streaming``); ``say`` gets the cost estimate first."""
    from featurize import profile
    from risk_model.loading import load_model
    from risk_model.serve import profile_settings

    settings = profile_settings()
    n_samples = settings["n_samples"] if n_samples is None else n_samples
    rank = settings["rank"] if rank is None else rank
    _check_at_least(2, n_samples=n_samples)
    _check_at_least(0, seed=seed, rank=rank)
    _check_at_least(1, probe_seeds=probe_seeds)
    shape = _parse_shape(input_shape)
    from risk_model import streaming

    device = streaming.check_device(device)
    seeds = list(range(seed, seed + probe_seeds))
    kreiss_grid = settings.get("kreiss_grid") or None
    size = streaming.in_memory_bytes(model_path)  # headers only; None for models other than HF directories
    if streaming.should_stream(model_path, low_memory, size):
        if inputs is not None or shape is not None:
            raise UsageError("--inputs and --input-shape do not apply to streamed token models; drop them or use --in-memory")
        plan = streaming.plan_stream(model_path, blocks=blocks, n_samples=n_samples, n_seeds=len(seeds),
                                     rank=rank or None, device=device)
        if say is not None:
            say(plan.describe())
        bar = LazyProgress(delay=0.0)
        try:
            return streaming.run_stream(plan, seeds=seeds, blocks=blocks, n_samples=n_samples, rank=rank or None,
                                        kreiss_grid=kreiss_grid, device=device, progress=bar)
        finally:
            bar.close()
    streaming.check_in_memory(model_path, size)
    model = load_model(model_path, trust_pickle=trust_pickle).to(device)
    bar = LazyProgress()
    try:
        with _one_blas_thread():
            return [profile(model, inputs, blocks=blocks, n_samples=n_samples, seed=s, rank=rank or None,
                            input_shape=shape, kreiss_grid=kreiss_grid, progress=bar)
                    for s in seeds]
    finally:
        bar.close()


ModelArg = typer.Argument(..., help="Model: a zoo checkpoint (.pt), a Hugging Face directory, `example` or "
                          "`example:<norm>` (the built-in 4-layer GPT, d=64; norm one of pre_ln, post_ln, rmsnorm, "
                          "deepnorm, subln, none), or a pickled module with --trust-pickle.")
BlocksOpt = typer.Option(None, "--blocks", help="Dotted name of the residual-block container (default: discovered).")
SamplesOpt = typer.Option(None, "--n-samples", help="Token states per layer (N); default: the predictor's setting "
                          "(512), as `risk predict` uses.", show_default=False)
SeedOpt = typer.Option(0, "--seed", help="Seed of the probe inputs and the randomized DMD (the first of --probe-seeds).")
RankOpt = typer.Option(None, "--rank", help="Rank of the randomized DMD, 0 for full DMD; default: the predictor's "
                       "setting (32).", show_default=False)
ProbeSeedsOpt = typer.Option(3, "--probe-seeds", help="Profile with this many probe seeds (--seed, --seed + 1, …) "
                             "and show the range of the aggregates over them.")
InputsOpt = typer.Option(None, "--inputs", help="Tensor file (torch.save) of probe inputs.")
ShapeOpt = typer.Option(None, "--input-shape", help="Per-example input shape for models without an embedding, e.g. 64,128.")
TrustOpt = typer.Option(False, "--trust-pickle", help="Allow loading a pickled nn.Module (runs code from the file).")


@app.command("profile")
@user_errors
def profile_cmd(
    model: Path = ModelArg,
    blocks: Optional[str] = BlocksOpt,
    n_samples: Optional[int] = SamplesOpt,
    seed: int = SeedOpt,
    rank: Optional[int] = RankOpt,
    inputs: Optional[Path] = InputsOpt,
    input_shape: Optional[str] = ShapeOpt,
    trust_pickle: bool = TrustOpt,
    probe_seeds: int = ProbeSeedsOpt,
    low_memory: Optional[bool] = typer.Option(
        None, "--low-memory/--in-memory", show_default=False,
        help="Stream a Hugging Face directory block by block from its (sharded) safetensors in float32, "
        "one block in memory at a time, or load it whole. Default: stream when its float32 weights exceed 256 MiB."),
    device: str = typer.Option("cpu", "--device", help="Where the forward pass runs: cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of each layer's eigenvalues."),
) -> None:
    """Per-layer Koopman spectral profile of MODEL at its current weights (one forward pass per probe seed).

    The table is that of --seed; the aggregates line shows their range over the probe seeds.

    Example: risk profile example --json
    """
    _check_output_path(plot, ".png")
    profs = load_and_profile(model, trust_pickle=trust_pickle, blocks=blocks, n_samples=n_samples, seed=seed,
                             rank=rank, inputs=inputs, input_shape=input_shape, probe_seeds=probe_seeds,
                             low_memory=low_memory, device=device, say=lambda m: typer.echo(m, err=True))
    prof = profs[0]
    spread = {k: [min(vals), max(vals)] for k in prof.aggregates
              if len(vals := [p.aggregates[k] for p in profs if p.aggregates.get(k) == p.aggregates.get(k)]) == len(profs)}
    if as_json:
        d = prof.to_dict()
        d["model"] = str(model)
        d["probe_seeds"] = {"seeds": [p.meta["seed"] for p in profs],
                            "aggregates_min_max": {k: [float(a), float(b)] for k, (a, b) in spread.items()}}
        typer.echo(json.dumps(d, indent=2))
    else:
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 120)
        console.print(profile_table(prof))
        a = prof.aggregates
        rng = lambda k: (f" ({spread[k][0]:.3g}–{spread[k][1]:.3g})" if len(profs) > 1 and k in spread else "")  # noqa: E731
        seeds = f"probe seed {seed}" + (f"; in brackets: min–max over seeds {seed}–{seed + len(profs) - 1}" if len(profs) > 1 else "")
        console.print(f"{seeds}, N = {prof.meta['n_samples']}, rank {prof.meta['rank']}")
        console.print(
            f"M≈1 mean {a['m_near_mean']:.3f}{rng('m_near_mean')}  (paper's flow chart: < 0.3 low, > 0.5 high)   "
            f"ρ max {a['rho_max']:.3f}{rng('rho_max')}   κ(V) max {a['kappa_v_max']:.3g}{rng('kappa_v_max')}   "
            f"Kreiss max {a['kreiss_max']:.3g}{rng('kreiss_max')}"
        )
        if prof.degenerate_layers:
            console.print(f"[yellow]degenerate layers (update ≈ 0, excluded from aggregates): {prof.degenerate_layers}[/]")
    _write_plot(prof, plot, f"{model.name}: DMD eigenvalues per layer", say=not as_json)


# ==================================================================== predict / score
LrOpt = typer.Option(None, "--lr", help="A learning rate to get P(failed) and P(diverged) at; repeat for several. "
                     "Without it: the recommended and the largest safe learning rate only.")
OptimizerOpt = typer.Option("adamw", "--optimizer", help="Training optimizer: adamw, lion or sgd.")
WarmupOpt = typer.Option(None, "--warmup", help="Warmup steps (default: the training corpus's median).")
BatchOpt = typer.Option(None, "--batch-size", help="Sequences per optimizer step, accumulation included (default: the training corpus's median).")
SeqLenOpt = typer.Option(None, "--seq-len", help="Tokens per training sequence (default: the training corpus's median).")
StepsOpt = typer.Option(None, "--steps", help="Training steps (default: the training corpus's median).")
PredictorOpt = typer.Option(None, "--predictor", help="Predictor directory or registered MLflow model URI (models:/NAME@ALIAS); default: the shipped one in models/.")
ThresholdOpt = typer.Option(0.2, "--threshold", help="P(failed) under which a learning rate counts as safe (max_safe_lr).")
ProbeSeedsPredictOpt = typer.Option(None, "--probe-seeds", help="Profile with this many probe seeds; the answer shown is "
                                    "the seed whose max_safe_lr is the median over them, with every seed's value beside it "
                                    "(default: 3 when the predictor reads the spectral profile, else 1; the shipped "
                                    "one does not read it).")
ScheduleOpt = typer.Option("constant", "--schedule", help="LR schedule after the warmup: constant, cosine or linear "
                           "(the training corpora hold constant only: the predictor reads it but cannot tell its effect).")
Beta2Opt = typer.Option(None, "--beta2", help="Optimizer β2 (default: the corpus trainer's, AdamW 0.95, Lion 0.99; "
                        "constant in the training corpora).")
EpsOpt = typer.Option(None, "--eps", help="Optimizer eps (default: the corpus trainer's, AdamW 1e-8; constant in the training corpora).")


def _check_at_least(minimum: float, **options) -> None:
    """Each ``--option-name=value`` given (not None) must be a finite number ≥ ``minimum``."""
    for name, v in options.items():
        if v is not None and not (math.isfinite(v) and v >= minimum):
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {v:g}")


def _check_run_config(warmup, batch_size, steps, seq_len=None) -> None:
    _check_at_least(0, warmup=warmup)
    _check_at_least(1, batch_size=batch_size, steps=steps, seq_len=seq_len)


def _check_lrs(lrs: Optional[list[float]]) -> list[float]:
    lrs = list(lrs or [])
    for v in lrs:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"--lr must be a positive number, got {v:g}")
    return lrs


def _request(*, lr, optimizer, warmup, batch_size, steps, threshold, clip=None, weight_decay=None,
             schedule="constant", beta2=None, eps=None, seq_len=None):
    """The parsed options as a ``serve.Request``, every value checked at the boundary."""
    from risk_model.serve import SCHEDULES, Request

    lrs = _check_lrs(lr)
    _check_run_config(warmup, batch_size, steps, seq_len)
    if not 0 < threshold < 1:
        raise UsageError(f"--threshold must be in (0, 1), got {threshold}")
    for name, v in (("--clip", clip), ("--weight-decay", weight_decay)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise UsageError(f"{name} must be a number >= 0, got {v}")
    if schedule not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if beta2 is not None and not (0 <= beta2 < 1):
        raise UsageError(f"--beta2 must be in [0, 1), got {beta2}")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise UsageError(f"--eps must be a positive number, got {eps}")
    return Request(lrs=lrs, optimizer=optimizer, warmup=warmup, batch_size=batch_size, seq_len=seq_len, steps=steps,
                   threshold=threshold, grad_clip=clip, weight_decay=weight_decay, schedule=schedule, beta2=beta2,
                   eps=eps)


def _load_predictor(predictor: Optional[str]):
    """The served bundle: shipped default (no mlflow import), a directory, or a models:/ URI."""
    from risk_model.serve import load_bundle

    if predictor and predictor.startswith(("models:/", "runs:/")):
        from risk_model import tracking

        tracking.connect(must_exist=True)
        path, mv = tracking.download_predictor(predictor)
        bundle = load_bundle(path)
        bundle.source, bundle.name, bundle.version = predictor, mv.name, str(mv.version)
        return bundle
    return load_bundle(Path(predictor) if predictor else None)


def _one_blas_thread():
    from risk_model.serve import one_blas_thread

    return one_blas_thread()


def _assess(model_obj, label: str, bundle, request, *, blocks=None, inputs=None, input_shape=None, probe_seeds=None,
            what_if=False):
    """``serve.assess_network`` with a progress bar; the result."""
    from risk_model.serve import assess_network

    bar = LazyProgress()
    try:
        return assess_network(model_obj, bundle=bundle, request=request, probe_seeds=probe_seeds, blocks=blocks,
                              inputs=inputs, input_shape=_parse_shape(input_shape), label=label, what_if=what_if,
                              progress=bar)
    finally:
        bar.close()


def _fmt_lr(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _print_result(out: dict, prof, console=None) -> None:
    """Words a result: the recommendation first, then the curve, what-if, the profile and the caveats."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    console.print(f"[bold]{out['model']}[/]")
    dead = out.get("dead_at_init")
    if dead is not None:
        console.print(f"[red]dead at init[/]: {dead['reason']}; P(failed) = P(diverged) = 1 at every learning rate")
    else:
        rlo, rhi = out["recommended_lr_interval"]
        lo, hi = out["max_safe_lr_interval"]
        console.print(f"recommended learning rate: [bold]{out['recommended_lr']:.3g}[/]   (80% interval {rlo:.3g} – {rhi:.3g})")
        console.print(f"largest safe learning rate (P(failed) < {out['threshold']:g}): [bold]{out['max_safe_lr']:.3g}[/]   "
                      f"(80% interval of the first failing learning rate {lo:.3g} – {hi:.3g})")
    for r in out["recommendation"]:
        console.print(f"recommendation: {r}")
    colour = {"low": "green", "medium": "yellow", "high": "red"}
    if out["predictions"]:
        seeds = len((out.get("probe_seeds") or {}).get("seeds", [])) > 1
        t = Table(title="At the learning rates asked")
        cols = ["learning rate", "P(failed)"] + (["min–max over seeds"] if seeds else []) + ["P(diverged)", "risk"]
        for c in cols:
            t.add_column(c, justify="right")
        for p in out["predictions"]:
            spread = [f"{p['p_low']:.3f}–{p['p_high']:.3f}"] if seeds and p.get("p_low") is not None else ([""] if seeds else [])
            t.add_row(f"{p['lr']:.3g}", f"{p['p_failed']:.3f}", *spread, f"{p['p_divergence']:.3f}",
                      f"[{colour[p['risk']]}]{p['risk']}[/]")
        console.print(t)
    decades = [c for c in out.get("p_curve", []) if abs(math.log10(c["lr"]) - round(math.log10(c["lr"]))) < 1e-6]
    if decades and dead is None:
        console.print("P(failed)   by learning rate: " + "  ".join(f"{c['lr']:.0e} {c['p_failed']:.2f}" for c in decades))
        console.print("P(diverged) by learning rate: " + "  ".join(f"{c['lr']:.0e} {c['p']:.2f}" for c in decades))
    wi = out.get("what_if")
    if wi is not None:
        if dead is not None:
            console.print("what-if: no change of the recipe helps a network that is dead at init")
        else:
            t = Table(title="What if (the stated recipe and its neighbours)")
            for c in ("recipe", "recommended lr", "max_safe_lr", "note"):
                t.add_column(c, justify="left" if c in ("recipe", "note") else "right")
            for r in wi:
                t.add_row(r["change"], _fmt_lr(r["recommended_lr"]), _fmt_lr(r["max_safe_lr"]), r.get("note") or "")
            console.print(t)
    seeds = (out.get("probe_seeds") or {}).get("max_safe_lr") or []
    if len([v for v in seeds if v]) > 1:
        console.print(f"max_safe_lr over {len(seeds)} probe seeds: " + ", ".join(f"{v:.3g}" for v in seeds if v)
                      + " (the median seed is shown)")
    if prof is not None:
        console.print(profile_table(prof))
    paper = out.get("paper_score")
    if paper:
        auroc = paper.get("heldout_auroc")
        console.print(f"paper's config-free score (layer-mean M≈1 {paper['m_near_mean']:.3f} → P(diverged) "
                      f"{paper['p_divergence']:.2f}): held-out AUROC {'n/a' if auroc is None else f'{auroc:.3f}'}"
                      + ("" if paper.get("beats_chance") else " — no better than chance, shown for reference only"))
    pr = out["predictor"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    console.print(f"predictor {pr['name']} {pr['version']} (v3, label `failed`): leave-one-architecture-out AUROC "
                  f"{fmt(pr['auroc'])}, ECE {fmt(pr['ece'])}; max_safe_lr right for {fmt(pr.get('max_safe_lr_right'))}, "
                  f"unsafe for {fmt(pr.get('max_safe_lr_unsafe'))} of held-out networks")
    for w in out["warnings"]:
        console.print(f"[yellow]warning: {w}[/]")
    for n in out.get("notes", []):
        console.print(f"note: {n}")


@app.command("predict")
@user_errors
def predict_cmd(
    model: Path = ModelArg,
    lr: Optional[list[float]] = LrOpt,
    optimizer: str = OptimizerOpt,
    warmup: Optional[int] = WarmupOpt,
    batch_size: Optional[int] = BatchOpt,
    seq_len: Optional[int] = SeqLenOpt,
    steps: Optional[int] = StepsOpt,
    clip: Optional[float] = typer.Option(None, "--clip", help="Gradient-norm clipping of the run (0: none; default none)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay of the run (default 0)."),
    schedule: str = ScheduleOpt,
    beta2: Optional[float] = Beta2Opt,
    eps: Optional[float] = EpsOpt,
    what_if: bool = typer.Option(False, "--what-if", help="Also answer for the recipe's neighbours: warmup ×4 and ÷4, "
                                 "clipping on/off, cosine/constant, β2 0.95/0.999, AdamW/Lion."),
    predictor: Optional[str] = PredictorOpt,
    threshold: float = ThresholdOpt,
    blocks: Optional[str] = BlocksOpt,
    inputs: Optional[Path] = InputsOpt,
    input_shape: Optional[str] = ShapeOpt,
    trust_pickle: bool = TrustOpt,
    probe_seeds: Optional[int] = ProbeSeedsPredictOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of each layer's eigenvalues and "
                                        "PATH-risk.png: P(failed) and P(diverged) by learning rate."),
) -> None:
    """Recommended learning rate, largest safe learning rate and P(failed) per LR for training MODEL with the stated recipe.

    From the network at init (one forward and one backward pass, and a spectral profile): the
    predicted best learning rate with an 80% interval, the largest learning rate with P(failed)
    below --threshold with its interval, P(failed) (and the paper's P(diverged)) at each --lr, and
    how far outside the training corpus the network lies.

    Example: risk predict example --lr 1e-3 --warmup 30 --what-if
    """
    from risk_model.loading import load_model
    from risk_model.serve import single_threaded

    request = _request(lr=lr, optimizer=optimizer, warmup=warmup, batch_size=batch_size, steps=steps,
                       threshold=threshold, clip=clip, weight_decay=weight_decay, schedule=schedule, beta2=beta2, eps=eps,
                       seq_len=seq_len)
    _check_at_least(1, probe_seeds=probe_seeds)
    _check_output_path(plot, ".png")
    bundle = _load_predictor(predictor)
    with single_threaded():  # copying the weights in: a second torch thread only waits on a busy machine
        model_obj = load_model(model, trust_pickle=trust_pickle)
    res = _assess(model_obj, str(model), bundle, request, blocks=blocks, inputs=inputs, input_shape=input_shape,
                  probe_seeds=probe_seeds, what_if=what_if)
    out = res.to_dict()
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        _print_result(out, res.prof)
    if res.prof is not None:
        _write_plot(res.prof, plot, f"{model.name}: DMD eigenvalues per layer", say=not as_json)
    if plot is not None and out.get("p_curve"):
        from risk_model.outputs import atomic_path
        from risk_model.serve import plot_curve

        curve_path = plot.with_name(plot.stem + "-risk.png")
        try:
            with atomic_path(curve_path) as tmp:
                plot_curve(out, tmp, title=f"{model.name}: P(failed) by learning rate")
        except OSError as e:
            fail(f"{curve_path}: plot not written ({e.strerror or e.__class__.__name__}); the results above are complete")
        if not as_json:
            typer.echo(f"risk curve written to {curve_path}")


@app.command("score")
@user_errors
def score_cmd(
    model_uri: Optional[str] = typer.Argument(None, help="Registered PyTorch model: models:/NAME/VERSION or models:/NAME@ALIAS."),
    all_versions: Optional[str] = typer.Option(None, "--all", help="Score every version of this registered model."),
    lr: Optional[list[float]] = LrOpt,
    optimizer: str = OptimizerOpt,
    warmup: Optional[int] = WarmupOpt,
    batch_size: Optional[int] = BatchOpt,
    seq_len: Optional[int] = SeqLenOpt,
    steps: Optional[int] = StepsOpt,
    clip: Optional[float] = typer.Option(None, "--clip", help="Gradient-norm clipping of the run (0: none; default none)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay of the run (default 0)."),
    schedule: str = ScheduleOpt,
    beta2: Optional[float] = Beta2Opt,
    eps: Optional[float] = EpsOpt,
    predictor: Optional[str] = PredictorOpt,
    threshold: float = ThresholdOpt,
    blocks: Optional[str] = BlocksOpt,
    input_shape: Optional[str] = ShapeOpt,
    probe_seeds: Optional[int] = ProbeSeedsPredictOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Assess registered MLflow PyTorch model(s) as `risk predict` does and tag each model version with the result.

    Tags: divergence_risk.recommended_lr, divergence_risk.max_safe_lr, divergence_risk.predictor_version,
    and with --lr divergence_risk.lr, divergence_risk.p (P(failed) at the first --lr) and divergence_risk.risk.

    Example: risk score models:/my-net/3 --lr 1e-3
    """
    from risk_model import tracking

    request = _request(lr=lr, optimizer=optimizer, warmup=warmup, batch_size=batch_size, steps=steps,
                       threshold=threshold, clip=clip, weight_decay=weight_decay, schedule=schedule, beta2=beta2, eps=eps,
                       seq_len=seq_len)
    _check_at_least(1, probe_seeds=probe_seeds)
    if (model_uri is None) == (all_versions is None):
        raise UsageError("give exactly one of MODEL_URI or --all NAME")
    tracking.connect(must_exist=True)
    uris = tracking.all_versions(all_versions) if all_versions else [model_uri]
    for u in uris:
        tracking.parse_model_uri(u)
    bundle = _load_predictor(predictor)
    results = []
    for u in uris:  # everything is computed before any tag is written
        model_obj, mv = tracking.load_pytorch_model(u)
        res = _assess(model_obj, u, bundle, request, blocks=blocks, input_shape=input_shape, probe_seeds=probe_seeds)
        results.append((mv, res.to_dict(), res.prof))
    for mv, out, _ in results:
        tags = {tracking.TAG_VERSION: f"{out['predictor']['name']}/{out['predictor']['version']}",
                "divergence_risk.max_safe_lr": _fmt_lr(out["max_safe_lr"]),
                "divergence_risk.recommended_lr": _fmt_lr(out["recommended_lr"])}
        if out["predictions"]:
            first = out["predictions"][0]
            tags.update({tracking.TAG_P: f"{first['p_failed']:.6f}", tracking.TAG_RISK: first["risk"],
                         "divergence_risk.lr": f"{first['lr']:g}"})
        tracking.tag_version(mv, tags)
    if as_json:
        payload = [o for _, o, _ in results]
        typer.echo(json.dumps(payload[0] if model_uri else payload, indent=2))
        return
    for mv, out, prof in results:
        _print_result(out, prof)
        typer.echo(f"tagged {mv.name} version {mv.version}")


# ==================================================================== train / evaluate
CorpusOpt = typer.Option(..., "--corpus", help="Corpus directory (runs.parquet + layers.parquet); repeat to add new sweep data.")


CalibrationOpt = typer.Option("platt", "--calibration", help="Calibrator of the XGBoost predictor: isotonic or platt.")
SplitsOpt = typer.Option(5, "--n-splits", help="Grouped-CV folds.")


def _check_cv_options(calibration: str, n_splits: int) -> None:
    from risk_model.predictor import CALIBRATIONS

    if calibration not in CALIBRATIONS:
        raise UsageError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if n_splits < 2:
        raise UsageError(f"--n-splits must be at least 2, got {n_splits}")


def _require(*modules: str) -> None:
    """Before any work: each module is importable, else one line naming its optional extra."""
    import importlib.util

    from risk_model.errors import missing_extra_message

    for m in modules:
        try:
            found = sys.modules[m] is not None if m in sys.modules else importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            fail(missing_extra_message(m) or f"{m} is not installed")


def _load_corpus_verbose(corpus: list[Path]):
    from risk_model.corpus import load_corpus

    c = load_corpus(list(corpus))
    for rep in c.reports:
        for line in rep.lines():
            typer.echo(line, err=True)
    return c


def _new_predictor_dir(root: Path, version: str) -> Path:
    """``root/<version>``, or ``root/<version>-2``, ``-3``, … : a directory that does not exist yet."""
    path, k = root / version, 1
    while path.exists():
        k += 1
        path = root / f"{version}-{k}"
    return path


GroupsOpt = typer.Option(None, "--groups", help="Tree feature groups of the v3 predictor, comma-separated from "
                         "config, forward, gradient, spectral; default: chosen by the ablation (a group ships only "
                         "if its leave-one-class-out gain has a 95% CI above 0).", show_default=False)


def _parse_groups(groups: Optional[str]):
    from risk_model.lrmodel import FEATURE_GROUPS

    if groups is None:
        return None
    got = tuple(g.strip() for g in groups.split(",") if g.strip())
    bad = [g for g in got if g not in FEATURE_GROUPS]
    if bad:
        raise UsageError(f"--groups: unknown group {bad[0]!r}; choose from {', '.join(FEATURE_GROUPS)}")
    return got


@app.command("train")
@user_errors
def train_cmd(
    corpus: list[Path] = CorpusOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the trained predictor bundle; default: a new "
                                       "directory models/<version> (the shipped models/default is never replaced "
                                       "without --replace).", show_default=False),
    replace: bool = typer.Option(False, "--replace", help="Allow --out to name an existing predictor (such as the "
                                 "shipped models/default) and replace it."),
    groups: Optional[str] = GroupsOpt,
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Also write the held-out evaluation "
                                              "(heldout_v3.md/.json/.png) here, e.g. reports.", show_default=False),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples of the CIs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the trees and the bootstrap."),
    rounds: int = typer.Option(100, "--rounds", help="Boosting rounds of each tree part (depth 2, eta 0.05)."),
    promote: bool = typer.Option(False, "--promote", help="Move the alias champion to this version even if its held-out metrics are worse."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log to MLflow and register the model."),
) -> None:
    """Train predictor v3 on ladder corpora: ablation, leave-one-class-out metrics, fit, write --out, register in MLflow.

    Labels: labels.failed (and the paper's diverged) per run, labels.ladder_summary per ladder. Several
    --corpus are pooled; a full-ladder corpus (corpus-v3) also gives a ladder per shorter horizon it
    was read at. The feature groups are chosen by the ablation unless --groups is given. Retraining
    the shipped predictor is this one command (about 10 minutes on 2 idle cores, 40 beside a sweep).

    Example: risk train --corpus datasets/corpus-v2 --corpus datasets/corpus-v3 --out models/default --replace
    """
    import shutil
    import tempfile

    from risk_model.outputs import check_writable_dir

    _check_at_least(0, seed=seed)
    _require("netcal", "xgboost", "sklearn", *(["mlflow"] if track else []))
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    if n_boot < 1:
        raise UsageError(f"--n-boot must be at least 1, got {n_boot}")
    chosen = _parse_groups(groups)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} is a file: --out must be a directory")
        if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
            raise UsageError(f"{out} exists and is not a predictor bundle: choose another --out")
        if (out / "manifest.json").exists() and not replace:
            raise UsageError(f"{out} already holds a predictor: add --replace to replace it, or choose another --out")
    check_writable_dir(out.parent if out is not None else Path("models"), what="predictor")
    _load_corpus_verbose(corpus)  # the schema check: a missing column is one line naming it
    from risk_model.corpus import not_ladder_corpora

    not_ladder = not_ladder_corpora(corpus)
    if not_ladder:
        raise UsageError(f"risk train needs ladder corpora (runs with model_id and a layers table, like "
                         f"datasets/corpus-v2 and datasets/corpus-v3); not one: {', '.join(not_ladder)} (the v1 "
                         "predictors are evaluation baselines now: risk evaluate)")
    from risk_model.heldout_v3 import evaluate_v3
    from risk_model.serve import PredictorBundle
    from risk_model.train import train_lr_predictor

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        typer.echo("leave-one-class-out evaluation (ablation first unless --groups) ...", err=True)
        ev = evaluate_v3(list(corpus), report_dir or (tmp / "evaluation"), n_boot=n_boot, seed=seed, n_estimators=rounds,
                         groups=chosen, do_ablation=chosen is None,
                         progress=lambda *a: typer.echo(" ".join(map(str, a)), err=True))
        lrp, free = train_lr_predictor(ev, seed=seed, n_estimators=rounds)
        bundle = PredictorBundle(None, free, "", version=lrp.metadata_["version"], lr_predictor=lrp)
        staged = bundle.save(tmp / "bundle")
        if out is None:
            out = _new_predictor_dir(Path("models"), bundle.version)
        out.parent.mkdir(parents=True, exist_ok=True)
        # copy beside the target, then swap it in: a failed copy leaves the old predictor whole
        swap = out.with_name(f".{out.name}.new")
        if swap.exists():
            shutil.rmtree(swap)
        shutil.copytree(staged, swap)
        if out.exists():  # what this command does not train (the in-flight detector) stays in the bundle
            for part in out.iterdir():
                if part.is_dir() and not (swap / part.name).exists():
                    shutil.copytree(part, swap / part.name)
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            swap.rename(out)
            shutil.rmtree(old)
        else:
            swap.rename(out)
        m = lrp.metadata_["metrics"]
        typer.echo(f"trained v3 on {lrp.metadata_['n_networks']} networks, {lrp.metadata_['n_runs']} runs (corpus "
                   f"{ev['corpus'].hash[:12]}), groups {', '.join(ev['groups']) or 'none (linear part only)'}: "
                   f"leave-one-class-out AUROC on failed {m['auroc']:.4f}, ECE {m['ece']:.4f}, max_safe_lr right "
                   f"{m['max_safe_lr_right']:.1%} / unsafe {m['max_safe_lr_unsafe']:.1%}; written to {out}")
        if track:
            from risk_model import tracking

            params = dict(seed=seed, rounds=rounds, n_boot=n_boot, groups=",".join(ev["groups"]),
                          n_runs=lrp.metadata_["n_runs"], corpus=",".join(map(str, corpus)), corpus_hash=ev["corpus"].hash,
                          predictor_version=bundle.version)
            metrics = {"v3_lofo_auroc_failed": m["auroc"], "v3_lofo_ece_failed": m["ece"], "v3_lofo_brier_failed": m["brier"],
                       "v3_lofo_auroc_diverged": m["auroc_diverged"], "v3_max_safe_lr_right": m["max_safe_lr_right"],
                       "v3_max_safe_lr_unsafe": m["max_safe_lr_unsafe"],
                       "v3_recommended_within_3x": m["recommended_within_3x"]}
            rec = tracking.log_training(bundle_dir=out, params=params,
                                        metrics={k: v for k, v in metrics.items() if v is not None and math.isfinite(v)},
                                        heldout={k: m[k] for k in ("auroc", "ece", "brier")}, corpus_hash=ev["corpus"].hash,
                                        files=ev["files"], promote=promote)
            typer.echo(f"MLflow run {rec.run_id}; registered {tracking.MODEL_NAME} version {rec.version}; "
                       f"champion {'moved' if rec.promoted else 'kept'} ({rec.reason})")


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    corpus: list[Path] = CorpusOpt,
    out: Path = typer.Option(Path("reports"), "--out", help="Directory for evaluation.md, roc.png, reliability.png."),
    calibration: str = CalibrationOpt,
    n_splits: int = SplitsOpt,
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples of the AUROC CI."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds, the trees and the bootstrap."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log the evaluation to MLflow."),
) -> None:
    """Evaluate the predictors held out and write reports to --out (and MLflow).

    On ladder corpora (corpus-v2, corpus-v3; several are pooled): predictor v3 left one architecture class out on the `failed`
    label (per class and pooled AUROC with CIs, ECE, max_safe_lr right/unsafe, recommended_lr
    within 3x), the feature-group ablation, leave-largest-out and the lr_fail plot
    (heldout_v3.*); the v2 critical-LR model (heldout.*) and the v1 grouped-CV baselines
    (evaluation.md) beside it on one corpus-v2-like corpus.

    Example: risk evaluate --corpus datasets/corpus-v2 --corpus datasets/corpus-v3 --out reports
    """
    from risk_model.evaluate import evaluate_corpus, flat_metrics

    from risk_model.evaluate import write_report
    from risk_model.outputs import check_writable_dir

    _check_cv_options(calibration, n_splits)
    _check_at_least(0, seed=seed)
    if n_boot < 1:
        raise UsageError(f"--n-boot must be at least 1, got {n_boot}")
    _require("netcal", *(["mlflow"] if track else []))
    check_writable_dir(out, what="report")  # before a minute of work, not after
    c = _load_corpus_verbose(corpus)
    full_ladder = "horizon_of" in c.runs.columns  # corpus-v3: labelled `failed`, few diverged runs per class
    res, metrics = {"files": []}, {}
    if full_ladder:
        typer.echo("a full-ladder corpus: predictor v3 only (P(failed), with the paper's P(diverged) beside it); the "
                   "v1/v2 baselines are fitted on `diverged` alone, which most classes here lack", err=True)
    else:
        bar = LazyProgress()
        try:
            res = evaluate_corpus(c, out_dir=None, n_splits=n_splits, n_boot=n_boot, seed=seed, calibration=calibration,
                                  progress=bar)
        finally:
            bar.close()
        for r in res["table"]:
            typer.echo(f"{r['name']:<50} AUROC {r['auroc']:.4f} [{r['auroc_lo']:.4f}, {r['auroc_hi']:.4f}]  "
                       f"ECE {r['ece']:.4f}  Brier {r['brier']:.4f}")
        try:
            res["files"] = write_report(res, c.runs.reset_index(drop=True), out)
        except OSError as e:
            fail(f"{out}: report not written ({e.strerror or e.__class__.__name__}); the results above are complete")
        typer.echo(f"report written to {out / 'evaluation.md'}")
        metrics = flat_metrics(res)
        if len(corpus) == 1 and "model_id" in c.runs.columns:  # a ladder corpus: predictor v2, held out by class
            from risk_model.heldout import FULL, evaluate_ladder

            typer.echo("leave-one-architecture-class-out evaluation of the critical-LR predictor ...", err=True)
            bar = LazyProgress()
            try:
                lad = evaluate_ladder(corpus[0], out, n_boot=n_boot, seed=seed,
                                      progress=lambda done, total: bar("classes", done, total))
            finally:
                bar.close()
            for name, m in lad["pooled"].items():
                typer.echo(f"{'held-out class: ' + name:<50} AUROC {m['auroc']:.4f} [{m['auroc_ci'][0]:.4f}, "
                           f"{m['auroc_ci'][1]:.4f}]  ECE {m['ece']:.4f}  Brier {m['brier']:.4f}")
            safe = lad["max_safe_lr"][FULL]
            typer.echo(f"max_safe_lr right for {safe['right']:.1%} of held-out networks, unsafe for {safe['unsafe']:.1%}")
            typer.echo(f"report written to {out / 'heldout.md'}")
            res["files"] = list(res["files"]) + [out / "heldout.md", out / "heldout.json", out / "heldout_reliability.png"]
            metrics.update({"v2_lofo_auroc": lad["pooled"][FULL]["auroc"], "v2_lofo_ece": lad["pooled"][FULL]["ece"],
                            "v2_lofo_brier": lad["pooled"][FULL]["brier"], "v2_max_safe_lr_right": safe["right"],
                            "v2_max_safe_lr_unsafe": safe["unsafe"]})
    if full_ladder or (len(corpus) == 1 and "model_id" in c.runs.columns):
        from risk_model.heldout_v3 import evaluate_v3

        from risk_model.corpus import not_ladder_corpora

        not_ladder = not_ladder_corpora(corpus)
        if not_ladder:
            raise UsageError(f"predictor v3 is evaluated on ladder corpora only; not one: {', '.join(not_ladder)}")

        typer.echo("predictor v3: ablation, leave-one-class-out on failed, leave-largest-out ...", err=True)
        ev = evaluate_v3(list(corpus), out, n_boot=n_boot, seed=seed,
                         progress=lambda *a: typer.echo(" ".join(map(str, a)), err=True))
        p3 = ev["pooled"]
        typer.echo(f"{'v3 held-out class, P(failed)':<50} AUROC {p3['failed']['auroc']:.4f} [{p3['failed']['auroc_ci'][0]:.4f}, "
                   f"{p3['failed']['auroc_ci'][1]:.4f}]  ECE {p3['failed']['ece']:.4f}; groups {', '.join(ev['groups'])}")
        typer.echo(f"report written to {out / 'heldout_v3.md'}")
        res["files"] = list(res["files"]) + list(ev["files"])
        metrics.update({"v3_lofo_auroc_failed": p3["failed"]["auroc"], "v3_lofo_ece_failed": p3["failed"]["ece"],
                        "v3_max_safe_lr_right": p3["max_safe_right"], "v3_max_safe_lr_unsafe": p3["max_safe_unsafe"]})
    if track:
        from risk_model import tracking

        run_id = tracking.log_evaluation(
            params=dict(calibration=calibration, n_splits=n_splits, n_boot=n_boot, seed=seed, n_runs=len(c.runs),
                        corpus=",".join(map(str, corpus))),
            metrics=metrics, corpus_hash=c.hash, files=res["files"])
        typer.echo(f"MLflow run {run_id}")


# ==================================================================== sweep
from risk_model.sweep.cli import sweep_command  # noqa: E402 - light: typer and pathlib only



class _SweepCommand(typer.core.TyperCommand):
    """`risk sweep`, whose --help lists the spec's keys. The list comes from the spec module, which
    imports torch: built only when this command's help is shown, so `risk --help` stays fast."""

    def format_help(self, ctx, formatter):
        if not getattr(self, "_keys_added", False):
            self.help = (self.help or "") + "\n\n" + _sweep_spec_keys()
            self._keys_added = True
        return super().format_help(ctx, formatter)


def _sweep_spec_keys() -> str:
    from dataclasses import fields

    from risk_model.sweep.spec import _CHOICES, SAMPLERS, RunConfig

    grid = []
    for f in fields(RunConfig):
        choices = _CHOICES.get(f.name)
        grid.append(f"{f.name} ({'|'.join(choices)})" if choices else f"{f.name} (default {f.default!r})")
    try:
        from risk_model.sweep.ladder import _TOP_KEYS as ladder_keys

        ladder = ("; kind = \"ladder\" instead reads a learning-rate ladder spec with keys " +
                  ", ".join(sorted(k for k in ladder_keys if k != "kind")) +
                  "; kind = \"full_ladder\" walks each model's ladder from too slow, past its best LR, to the "
                  "first failed rung, in [[stage]] tables (each a ladder body), with [ladder] keys adamw/lion/sgd "
                  "(rungs), start, extra_rung, max_runs, horizons (corpus-v3)")
    except ImportError:  # pragma: no cover - the ladder sweep is optional
        ladder = ""
    return ("Spec keys (TOML). Top level: kind (\"runs\", the default" + ladder + "); name; n_runs (runs to sample); sampler (" + "|".join(SAMPLERS) +
            "); seed (of the sampler); seeds_per_config (training seeds per sampled config); table \\[grid]: a value or "
            "a list of values per run key, any of: " + ", ".join(grid) + ". Keys left out take their default. "
            "Spec examples: datasets/corpus-v3/spec.toml (full_ladder), datasets/corpus-v2/spec.toml (ladder), "
            "datasets/corpus-v1/spec.toml.\n\n"
            "Example: risk sweep datasets/corpus-v2/spec.toml --out sweeps/corpus-v2 --workers 2")


app.command("sweep", cls=_SweepCommand)(sweep_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
