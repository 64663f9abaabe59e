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
    help="Probability that a transformer training run diverges, from one forward pass at init.",
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
    """Probability that a transformer training run diverges, from one forward pass at init."""


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
ProbeSeedsOpt = typer.Option(3, "--probe-seeds", help="Profile with this many probe seeds and show how much the "
                             "numbers move between them; `risk predict`: P(divergence) is their mean, shown with its "
                             "min–max, and the largest safe LR is the smallest over the seeds.")
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

    The table is that of --seed; the aggregates line shows their range over the probe seeds."""
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
LrOpt = typer.Option(None, "--lr", help="Training learning rate; repeat for several. Without it: the paper's config-free estimate.")
OptimizerOpt = typer.Option("adamw", "--optimizer", help="Training optimizer (one the predictor was trained on).")
WarmupOpt = typer.Option(None, "--warmup", help="Warmup steps (default: the training corpus's median).")
BatchOpt = typer.Option(None, "--batch-size", help="Batch size (default: the training corpus's median).")
StepsOpt = typer.Option(None, "--steps", help="Training steps (default: the training corpus's median).")
PredictorOpt = typer.Option(None, "--predictor", help="Predictor directory or registered MLflow model URI (models:/NAME@ALIAS); default: the shipped one in models/.")
ThresholdOpt = typer.Option(0.2, "--threshold", help="P(divergence) under which a learning rate counts as safe.")


def _check_at_least(minimum: float, **options) -> None:
    """Each ``--option-name=value`` given (not None) must be a finite number ≥ ``minimum``."""
    import math

    for name, v in options.items():
        if v is not None and not (math.isfinite(v) and v >= minimum):
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {v:g}")


def _check_run_config(warmup, batch_size, steps) -> None:
    _check_at_least(0, warmup=warmup)
    _check_at_least(1, batch_size=batch_size, steps=steps)


def _check_lrs(lrs: Optional[list[float]]) -> list[float]:
    import math

    lrs = list(lrs or [])
    for v in lrs:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"--lr must be a positive number, got {v:g}")
    return lrs


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


def _profile_for(model_obj, bundle, *, blocks, inputs, input_shape, seeds):
    """Profiles for the probe ``seeds``, with the settings the predictor's training corpus was
    profiled with, from one forward pass; the per-layer spectra share the machine's cores. Call it
    inside ``_single_threaded()``."""
    from featurize import profile_seeds
    from risk_model.serve import profile_settings

    settings = profile_settings(bundle)
    shape = _parse_shape(input_shape)
    bar = LazyProgress()
    try:
        return profile_seeds(model_obj, inputs, seeds=list(seeds), blocks=blocks,
                             n_samples=int(settings.get("n_samples", 2048)), rank=settings.get("rank", 32) or None,
                             input_shape=shape, kreiss_grid=settings.get("kreiss_grid") or None, progress=bar,
                             workers=_cores())
    finally:
        bar.close()


def _cores() -> int:
    """CPU cores this process may run on."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _single_threaded():
    """torch and BLAS on one thread each for the duration, as they were after. The per-layer
    matrices are small (d × N): one thread per computation is faster than several, and far faster
    on a shared machine (measured: 7 s vs 20 s for d=256, L=6 on 2 busy cores); the layers are
    shared among the cores instead (``profile_seeds(workers=...)``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _one_blas_thread():
            yield
    finally:
        torch.set_num_threads(threads)


def _one_blas_thread():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def kss_sentence() -> str:
    """The KSS recommendation, worded from its measured effect (``serve.KSS_EFFECT``): recommended
    only when it reduced divergence significantly (one-sided Fisher exact test, p < 0.05)."""
    from risk_model.serve import KSS_EFFECT as k

    off = k["diverged_without"] / k["runs_without"]
    on = k["diverged_with"] / k["runs_with"]
    measured = (f"{100 * off:.0f}% → {100 * on:.0f}% of runs diverged without → with KSS ({k['runs_without']} vs "
                f"{k['runs_with']} runs, one-sided Fisher p={k['fisher_p']:.2g}, "
                f"{k['overhead_pct']:.0f}% step-time overhead)")
    if on < off and k["fisher_p"] < 0.05:
        return f"enable KSS during training (α=0.15); measured here: {measured}"
    if on < off:
        return (f"KSS is not recommended as a fix yet: its measured reduction is not significant ({measured}); "
                "lower the learning rate instead")
    return (f"KSS is not recommended as a fix yet: in our measurement it did not reduce divergence ({measured}); "
            "lower the learning rate instead")


def recommendations(res) -> list[str]:
    """What to do, worded from an ``Assessment``."""
    safe, threshold = res.max_safe_lr, res.threshold
    if res.worst < threshold:
        return ["risk is low at the given setting" + (f"; learning rates up to {safe:.2g} stay below "
                                                      f"P(divergence) {threshold:g}" if safe else "")]
    if safe is not None:
        first = f"lower the learning rate to at most {safe:.2g} (largest rate with P(divergence) < {threshold:g})"
    elif res.method == "xgboost":
        first = (f"no learning rate in 1e-5…1 is below P(divergence) {threshold:g} for this model: change the "
                 "architecture (normalisation, init scale)")
    else:
        first = "give --lr to find the largest safe learning rate"
    return [first, kss_sentence()]


def _print_assessment(out: dict, prof, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    if out["predictor"].get("method") == "critical_lr":
        return _print_assessment_v2(out, prof, console)
    console.print(f"[bold]{out['model']}[/]")
    probe = out.get("probe_seeds") or {}
    n_seeds = len(probe.get("seeds", [])) or 1
    t = Table(title="P(divergence)" + (f", mean over {n_seeds} probe seeds" if n_seeds > 1 else ""))
    cols = ("learning rate", "P(divergence)") + (("min–max over seeds",) if n_seeds > 1 else ()) + ("risk",)
    for c in cols:
        t.add_column(c, justify="right")
    colour = {"low": "green", "medium": "yellow", "high": "red"}
    for p in out["predictions"]:
        spread = (f"{p['p_low']:.3f}–{p['p_high']:.3f}",) if n_seeds > 1 else ()
        t.add_row("—" if p["lr"] is None else f"{p['lr']:.3g}", f"{p['p_divergence']:.3f}", *spread,
                  f"[{colour[p['risk']]}]{p['risk']}[/]")
    console.print(t)
    if out["max_safe_lr"] is not None:
        per_seed = [v for v in probe.get("max_safe_lr", []) if v is not None]
        spread = (f" (smallest over {n_seeds} probe seeds; they give {min(per_seed):.3g}–{max(per_seed):.3g})"
                  if n_seeds > 1 and per_seed and min(per_seed) != max(per_seed) else "")
        console.print(f"largest safe learning rate (P < threshold): {out['max_safe_lr']:.3g}{spread}")
    console.print(profile_table(prof))
    a = prof.aggregates
    m = [v for v in probe.get("m_near_mean", []) if v is not None]
    m_spread = f" (probe seeds: {min(m):.3f}–{max(m):.3f})" if len(m) > 1 else ""
    console.print(f"profile of probe seed {prof.meta.get('seed')}: M≈1 mean {a['m_near_mean']:.3f}{m_spread}   "
                  f"ρ max {a['rho_max']:.3f}   κ(V) max {a['kappa_v_max']:.3g}   "
                  f"Kreiss max {a['kreiss_max']:.3g}   layers {a['n_layers']}")
    pr = out["predictor"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    console.print(f"predictor {pr['name']} {pr['version']} ({pr['method']}): held-out AUROC {fmt(pr['auroc'])}, "
                  f"ECE {fmt(pr['ece'])}")
    for w in out["warnings"]:
        console.print(f"[yellow]warning: {w}[/]")
    for r in out["recommendation"]:
        console.print(f"recommendation: {r}")


def _assess_model(model_obj, label: str, bundle, *, lrs, optimizer, warmup, batch_size, steps, threshold,
                  blocks, inputs, input_shape, probe_seeds: int = 3, grad_clip=None, weight_decay=None):
    """Profile + assess one model; the JSON-ready result (with its wording) and the profile."""
    if getattr(bundle, "critical_lr", None) is not None:
        return _assess_model_v2(model_obj, label, bundle, lrs=lrs, optimizer=optimizer, warmup=warmup,
                                batch_size=batch_size, steps=steps, threshold=threshold, blocks=blocks,
                                inputs=inputs, input_shape=input_shape, probe_seeds=probe_seeds,
                                grad_clip=grad_clip, weight_decay=weight_decay)
    from risk_model.features import infer_width
    from risk_model.serve import Request, assess

    from risk_model.serve import combine_probe_seeds, profile_settings

    seed0 = int(profile_settings(bundle)["seed"])
    seeds = [seed0 + i for i in range(probe_seeds)]
    with _single_threaded():
        profs = _profile_for(model_obj, bundle, blocks=blocks, inputs=inputs, input_shape=input_shape, seeds=seeds)
    prof = profs[0]
    width = infer_width(model_obj) or prof.meta.get("width")  # the residual stream's width as profiled
    req = Request(lrs=list(lrs), width=width, optimizer=optimizer, warmup=warmup,
                  batch_size=batch_size, steps=steps, threshold=threshold)
    res = combine_probe_seeds([assess(p, bundle=bundle, request=req) for p in profs], seeds)
    out = {"model": label, **res.to_dict(), "recommendation": recommendations(res)}
    _flag_outside_domain(out, model_obj, bundle)
    return out, prof


def _flag_outside_domain(out: dict, model_obj, bundle) -> None:
    """No confident advice for a network unlike anything in the training corpus: a warning first,
    and the recommendation replaced."""
    from risk_model.features import training_domain_problem

    problem = training_domain_problem(model_obj, bundle.metadata.get("families"))
    if problem:
        out["warnings"].insert(0, f"outside the training domain: {problem}; P(divergence) and max_safe_lr are "
                                  "extrapolations, not measurements")
        out["recommendation"] = ["no advice: the network is outside the predictor's training domain; measure "
                                 "its stability directly (a short run at each candidate learning rate)"]


def _print_assessment_v2(out: dict, prof, console) -> None:
    """Words a critical-LR result: the verdict first, then the curve, the profile and the caveats."""
    from rich.table import Table

    console.print(f"[bold]{out['model']}[/]")
    dead = out.get("dead_at_init")
    if dead is not None:
        console.print(f"[red]dead at init[/]: {dead['reason']}; P(divergence) = 1 at every learning rate")
    else:
        lo, hi = out["max_safe_lr_interval"]
        console.print(f"largest safe learning rate (P < {out['threshold']:g}): "
                      f"[bold]{out['max_safe_lr']:.3g}[/]   80% interval of the critical learning rate: "
                      f"{lo:.3g} – {hi:.3g}")
    colour = {"low": "green", "medium": "yellow", "high": "red"}
    if out["predictions"]:
        t = Table(title="P(divergence)")
        for c in ("learning rate", "P(divergence)", "risk"):
            t.add_column(c, justify="right")
        for p in out["predictions"]:
            t.add_row(f"{p['lr']:.3g}", f"{p['p_divergence']:.3f}", f"[{colour[p['risk']]}]{p['risk']}[/]")
        console.print(t)
    decades = [c for c in out.get("p_curve", []) if abs(math.log10(c["lr"]) - round(math.log10(c["lr"]))) < 1e-6]
    if decades and dead is None:
        console.print("P(divergence) by learning rate: " + "  ".join(f"{c['lr']:.0e} {c['p']:.2f}" for c in decades))
    seeds = (out.get("probe_seeds") or {}).get("max_safe_lr") or []
    if len([v for v in seeds if v]) > 1:
        console.print(f"max_safe_lr over {len(seeds)} probe seeds: " + ", ".join(f"{v:.3g}" for v in seeds if v)
                      + " (the median is shown)")
    if prof is not None:
        console.print(profile_table(prof))
    paper = out.get("paper_score")
    if paper:
        auroc = paper.get("heldout_auroc")
        console.print(f"paper's config-free score (layer-mean M≈1 {paper['m_near_mean']:.3f} → P {paper['p_divergence']:.2f}): "
                      f"held-out AUROC {'n/a' if auroc is None else f'{auroc:.3f}'}"
                      + ("" if paper.get("beats_chance") else " — no better than chance here, shown for reference only"))
    pr = out["predictor"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    console.print(f"predictor {pr['name']} {pr['version']} (critical learning rate): leave-one-architecture-out "
                  f"AUROC {fmt(pr['auroc'])}, ECE {fmt(pr['ece'])}, max_safe_lr right for {fmt(pr.get('max_safe_lr_right'))} "
                  "of held-out networks")
    for w in out["warnings"]:
        console.print(f"[yellow]warning: {w}[/]")
    for r in out["recommendation"]:
        console.print(f"recommendation: {r}")


def recommendations_v2(res) -> list[str]:
    """What to do, worded from a critical-LR ``Assessment``."""
    if res.dead_at_init is not None:
        return [f"no learning rate helps: {res.dead_at_init['reason']}. Lower the init scale (embeddings, "
                "output projections) or add normalisation, then check again"]
    safe, (lo, hi) = res.max_safe_lr, res.max_safe_lr_interval
    span = f"(80% interval of the critical learning rate: {lo:.2g}–{hi:.2g})"
    if not res.predictions:
        return [f"train at a learning rate of at most {safe:.2g}, where P(divergence) < {res.threshold:g} {span}"]
    if res.worst < res.threshold:
        return [f"risk is low at the given setting; learning rates up to {safe:.2g} stay below P(divergence) "
                f"{res.threshold:g} {span}"]
    return [f"lower the learning rate to at most {safe:.2g} (P(divergence) < {res.threshold:g}) {span}"]


def _assess_model_v2(model_obj, label, bundle, *, lrs, optimizer, warmup, batch_size, steps, threshold, blocks,
                     inputs, input_shape, probe_seeds: int = 3, grad_clip=None, weight_decay=None):
    """Predictor v2: one forward + backward pass for the init-time scale features, the spectral
    profile per probe seed, the critical-LR model; the result with the median max_safe_lr over seeds."""
    import numpy as np

    from featurize import CaptureError
    from featurize.capture import discover_blocks, load_probe
    from risk_model.features import infer_width
    from risk_model.init_features import init_features
    from risk_model.serve import Request, assess_critical, dead_at_init, profile_settings

    seed0 = int(profile_settings(bundle)["seed"])
    seeds = [seed0 + i for i in range(probe_seeds)]
    profs = []
    with _single_threaded():
        _, mods = discover_blocks(model_obj, blocks, inputs=load_probe(inputs) if inputs is not None else None,
                                  input_shape=_parse_shape(input_shape), seed=seed0)  # the blocks the profile finds
        init = init_features(model_obj, blocks=mods)
        if dead_at_init(init) is None:
            profs = _profile_for(model_obj, bundle, blocks=blocks, inputs=inputs, input_shape=input_shape,
                                 seeds=seeds)
        else:  # dead: one profile for the record if the activations allow it
            try:
                profs = _profile_for(model_obj, bundle, blocks=blocks, inputs=inputs, input_shape=input_shape,
                                     seeds=[seed0])
            except CaptureError:
                profs = []
    width = infer_width(model_obj) or (profs[0].meta.get("width") if profs else None)
    req = Request(lrs=list(lrs), width=width, optimizer=optimizer, warmup=warmup, batch_size=batch_size,
                  steps=steps, threshold=threshold, grad_clip=grad_clip, weight_decay=weight_decay)
    results = [assess_critical(p, init, bundle=bundle, request=req, n_layers=len(mods), width=width)
               for p in profs] or [assess_critical(None, init, bundle=bundle, request=req, n_layers=len(mods),
                                                   width=width)]
    safes = [r.max_safe_lr or 0.0 for r in results]
    k = int(np.argsort(safes)[len(safes) // 2])
    res = results[k]
    if len(results) > 1:
        res.probe_seeds = dict(seeds=seeds, max_safe_lr=[r.max_safe_lr for r in results],
                               p_divergence=[[p.p_divergence for p in r.predictions] for r in results])
    out = {"model": label, **res.to_dict(), "recommendation": recommendations_v2(res)}
    if res.dead_at_init is None:  # dead at init is measured, not extrapolated
        _flag_outside_domain(out, model_obj, bundle)
    return out, (profs[k] if profs else None)


@app.command("predict")
@user_errors
def predict_cmd(
    model: Path = ModelArg,
    lr: Optional[list[float]] = LrOpt,
    optimizer: str = OptimizerOpt,
    warmup: Optional[int] = WarmupOpt,
    batch_size: Optional[int] = BatchOpt,
    steps: Optional[int] = StepsOpt,
    predictor: Optional[str] = PredictorOpt,
    threshold: float = ThresholdOpt,
    blocks: Optional[str] = BlocksOpt,
    inputs: Optional[Path] = InputsOpt,
    input_shape: Optional[str] = ShapeOpt,
    trust_pickle: bool = TrustOpt,
    probe_seeds: int = ProbeSeedsOpt,
    clip: Optional[float] = typer.Option(None, "--clip", help="Gradient-norm clipping of the run (0: none; default none)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay of the run (default 0)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of each layer's eigenvalues (and, with the "
                                        "critical-LR predictor, PATH-risk.png: P(divergence) by learning rate)."),
) -> None:
    """P(divergence) of training MODEL at each --lr, the largest safe LR, and the profile behind it."""
    from risk_model.loading import load_model

    lrs = _check_lrs(lr)
    _check_run_config(warmup, batch_size, steps)
    _check_at_least(1, probe_seeds=probe_seeds)
    _check_output_path(plot, ".png")
    if not 0 < threshold < 1:
        raise UsageError(f"--threshold must be in (0, 1), got {threshold}")
    bundle = _load_predictor(predictor)
    with _single_threaded():  # copying the weights in: a second torch thread only waits on a busy machine
        model_obj = load_model(model, trust_pickle=trust_pickle)
    for name, v in (("--clip", clip), ("--weight-decay", weight_decay)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise UsageError(f"{name} must be a number >= 0, got {v}")
    out, prof = _assess_model(model_obj, str(model), bundle, lrs=lrs, optimizer=optimizer, warmup=warmup,
                              batch_size=batch_size, steps=steps, threshold=threshold, blocks=blocks,
                              inputs=inputs, input_shape=input_shape, probe_seeds=probe_seeds,
                              grad_clip=clip, weight_decay=weight_decay)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        _print_assessment(out, prof)
    if prof is not None:
        _write_plot(prof, plot, f"{model.name}: DMD eigenvalues per layer", say=not as_json)
    if plot is not None and out.get("p_curve"):
        from risk_model.outputs import atomic_path
        from risk_model.serve import plot_curve

        curve_path = plot.with_name(plot.stem + "-risk.png")
        try:
            with atomic_path(curve_path) as tmp:
                plot_curve(out, tmp, title=f"{model.name}: P(divergence) by learning rate")
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
    steps: Optional[int] = StepsOpt,
    predictor: Optional[str] = PredictorOpt,
    threshold: float = ThresholdOpt,
    blocks: Optional[str] = BlocksOpt,
    input_shape: Optional[str] = ShapeOpt,
    probe_seeds: int = ProbeSeedsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Profile registered MLflow PyTorch model(s), predict, and tag each model version with the result.

    Tags: divergence_risk.p, divergence_risk.risk, divergence_risk.predictor_version (the p at the
    first --lr, or the config-free estimate).
    """
    from risk_model import tracking

    lrs = _check_lrs(lr)
    _check_run_config(warmup, batch_size, steps)
    _check_at_least(1, probe_seeds=probe_seeds)
    if not 0 < threshold < 1:
        raise UsageError(f"--threshold must be in (0, 1), got {threshold}")
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
        out, prof = _assess_model(model_obj, u, bundle, lrs=lrs, optimizer=optimizer, warmup=warmup,
                                  batch_size=batch_size, steps=steps, threshold=threshold, blocks=blocks,
                                  inputs=None, input_shape=input_shape, probe_seeds=probe_seeds)
        results.append((mv, out, prof))
    for mv, out, _ in results:
        first = out["predictions"][0]
        tags = {tracking.TAG_P: f"{first['p_divergence']:.6f}", tracking.TAG_RISK: first["risk"],
                tracking.TAG_VERSION: f"{out['predictor']['name']}/{out['predictor']['version']}"}
        if first["lr"] is not None:
            tags["divergence_risk.lr"] = f"{first['lr']:g}"
        tracking.tag_version(mv, tags)
    if as_json:
        payload = [o for _, o, _ in results]
        typer.echo(json.dumps(payload[0] if model_uri else payload, indent=2))
        return
    for mv, out, prof in results:
        _print_assessment(out, prof)
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


@app.command("train")
@user_errors
def train_cmd(
    corpus: list[Path] = CorpusOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the trained predictor bundle; default: a new "
                                       "directory models/<version> (the shipped models/default is never replaced "
                                       "without --replace).", show_default=False),
    replace: bool = typer.Option(False, "--replace", help="Allow --out to name an existing predictor (such as the "
                                 "shipped models/default) and replace it."),
    calibration: str = CalibrationOpt,
    n_splits: int = SplitsOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the folds and the trees."),
    rounds: int = typer.Option(300, "--rounds", help="Boosting rounds of the XGBoost predictor."),
    promote: bool = typer.Option(False, "--promote", help="Move the alias champion to this version even if its held-out metrics are worse."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log to MLflow and register the model."),
) -> None:
    """Train the config-aware and config-free predictors, write them to --out, log and register them in MLflow."""
    import shutil
    import tempfile

    from risk_model.evaluate import evaluate_corpus, flat_metrics
    from risk_model.outputs import check_writable_dir
    from risk_model.train import train_bundle

    _check_cv_options(calibration, n_splits)
    _check_at_least(0, seed=seed)
    _require("netcal", *(["mlflow"] if track else []))
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    xgb_params = {"num_boost_round": rounds}
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} is a file: --out must be a directory")
        if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
            raise UsageError(f"{out} exists and is not a predictor bundle: choose another --out")
        if (out / "manifest.json").exists() and not replace:
            raise UsageError(f"{out} already holds a predictor: add --replace to replace it, or choose another --out")
    check_writable_dir(out.parent if out is not None else Path("models"), what="predictor")
    c = _load_corpus_verbose(corpus)
    if c.runs["diverged"].nunique() < 2:
        raise UsageError("the corpus holds one class only: need diverged and stable runs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res = evaluate_corpus(c, out_dir=tmp / "evaluation", n_splits=n_splits, seed=seed,
                              calibration=calibration, holdouts=(), baselines=False, xgb_params=xgb_params)
        bundle = train_bundle(c, res["summary"], calibration=calibration, n_splits=n_splits, seed=seed,
                              xgb_params=xgb_params)
        if len(corpus) == 1 and "model_id" in c.runs.columns:  # a ladder corpus: predictor v2 too
            from risk_model.train import train_critical_lr

            typer.echo("fitting the critical-LR predictor (leave-one-class-out metrics first) ...", err=True)
            bundle.critical_lr = train_critical_lr(corpus[0], seed=seed)
            bundle.version = bundle.critical_lr.metadata_["version"]
            cm = bundle.critical_lr.metadata_["metrics"]
            typer.echo(f"critical-LR predictor: leave-one-class-out AUROC {cm['auroc']:.4f}, ECE {cm['ece']:.4f}, "
                       f"max_safe_lr right for {cm['max_safe_lr_right']:.1%} of held-out networks")
        staged = bundle.save(tmp / "bundle")
        if out is None:
            out = _new_predictor_dir(Path("models"), bundle.version)
        out.parent.mkdir(parents=True, exist_ok=True)
        # copy beside the target, then swap it in: a failed copy leaves the old predictor whole
        swap = out.with_name(f".{out.name}.new")
        if swap.exists():
            shutil.rmtree(swap)
        shutil.copytree(staged, swap)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            swap.rename(out)
            shutil.rmtree(old)
        else:
            swap.rename(out)
        xs = res["summary"]["xgboost"]
        typer.echo(f"trained on {len(c.runs)} runs (corpus {c.hash[:12]}): grouped-CV AUROC {xs['auroc']:.4f} "
                   f"[{xs['auroc_lo']:.4f}, {xs['auroc_hi']:.4f}], ECE {xs['ece']:.4f}; written to {out}")
        if track:
            from risk_model import tracking

            params = dict(calibration=calibration, n_splits=n_splits, seed=seed, rounds=rounds, n_runs=len(c.runs),
                          corpus=",".join(map(str, corpus)), corpus_hash=c.hash, predictor_version=bundle.version,
                          n_samples=c.profile_settings["n_samples"], rank=c.profile_settings["rank"])
            rec = tracking.log_training(bundle_dir=out, params=params, metrics=flat_metrics(res),
                                        heldout={k: xs[k] for k in ("auroc", "ece", "brier")}, corpus_hash=c.hash,
                                        files=res["files"], promote=promote)
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
    """Grouped CV, leave-one-family/norm-out, baselines table, ROC and reliability plots → --out and MLflow."""
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
                  ", ".join(sorted(k for k in ladder_keys if k != "kind")))
    except ImportError:  # pragma: no cover - the ladder sweep is optional
        ladder = ""
    return ("Spec keys (TOML). Top level: kind (\"runs\", the default" + ladder + "); name; n_runs (runs to sample); sampler (" + "|".join(SAMPLERS) +
            "); seed (of the sampler); seeds_per_config (training seeds per sampled config); table \\[grid]: a value or "
            "a list of values per run key, any of: " + ", ".join(grid) + ". Keys left out take their default. "
            "Example: datasets/corpus-v1/spec.toml.")


app.command("sweep", cls=_SweepCommand)(sweep_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
