"""`risk`: the command-line face of divergence-risk. A thin layer over library functions.

Heavy libraries (mlflow, xgboost, matplotlib, transformers) are imported inside commands only, so
`risk --help` and `risk predict` start fast.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="risk",
    help="Probability that a transformer training run diverges, from one forward pass at init.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Probability that a transformer training run diverges, from one forward pass at init."""
    if version:
        from risk_model import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


def fail(msg: str) -> None:
    """One line on stderr, exit code 1."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


def user_errors(fn):
    """Turn the library's user-facing errors into one stderr line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from featurize.capture import CaptureError
        from risk_model.loading import ModelLoadError

        try:
            return fn(*args, **kwargs)
        except (CaptureError, ModelLoadError, ValueError, FileNotFoundError) as e:
            fail(str(e).splitlines()[0] if str(e) else e.__class__.__name__)
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
    if path is None:
        return
    if path.suffix.lower() != suffix:
        fail(f"{path}: the plot is written as {suffix.upper()[1:]}, give a file name ending in {suffix}")
    if not path.parent.exists():
        fail(f"{path.parent}: directory does not exist")


def profile_table(prof) -> "object":
    from rich.table import Table

    table = Table(title="Koopman spectral profile (per residual block)")
    cols = [("layer", "d"), ("name", "s"), ("m_exp", ".3f"), ("m_near", ".3f"), ("m_mid", ".3f"),
            ("m_con", ".3f"), ("rho", ".3f"), ("kappa_v", ".3g"), ("kreiss", ".3g"), ("eta_nl", ".3f"),
            ("reliable_fraction", ".2f"), ("degenerate", "s")]
    for name, _ in cols:
        table.add_column(name.replace("reliable_fraction", "reliable"), justify="right")
    for row in prof.layers.to_dict("records"):
        cells = []
        for name, fmt in cols:
            v = row[name]
            cells.append(("yes" if v else "") if name == "degenerate" else format(v, fmt) if fmt != "s" else str(v))
        table.add_row(*cells)
    return table


def load_and_profile(model_path: Path, *, trust_pickle: bool, blocks, n_samples: int, seed: int,
                     rank: Optional[int], inputs: Optional[Path], input_shape: Optional[str]):
    """Shared by `profile` and `predict`: load a model file and profile it, with a progress bar."""
    from featurize import profile
    from risk_model.loading import load_model

    if n_samples < 2:
        raise ValueError(f"--n-samples must be at least 2, got {n_samples}")
    shape = None
    if input_shape:
        try:
            shape = tuple(int(s) for s in input_shape.replace("x", ",").split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--input-shape must look like 64,128 (got {input_shape!r})") from None
    model = load_model(model_path, trust_pickle=trust_pickle)
    bar = LazyProgress()
    try:
        return profile(model, inputs, blocks=blocks, n_samples=n_samples, seed=seed, rank=rank,
                       input_shape=shape, progress=bar)
    finally:
        bar.close()


ModelArg = typer.Argument(..., help="Model file: zoo checkpoint (.pt), Hugging Face directory, or pickled module with --trust-pickle.")
BlocksOpt = typer.Option(None, "--blocks", help="Dotted name of the residual-block container (default: discovered).")
SamplesOpt = typer.Option(2048, "--n-samples", help="Token states per layer (N).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the probe inputs and the randomized DMD.")
RankOpt = typer.Option(32, "--rank", help="Rank of the randomized DMD; 0 for full DMD.")
InputsOpt = typer.Option(None, "--inputs", help="Tensor file (torch.save) of probe inputs.")
ShapeOpt = typer.Option(None, "--input-shape", help="Per-example input shape for models without an embedding, e.g. 64,128.")
TrustOpt = typer.Option(False, "--trust-pickle", help="Allow loading a pickled nn.Module (runs code from the file).")


@app.command("profile")
@user_errors
def profile_cmd(
    model: Path = ModelArg,
    blocks: Optional[str] = BlocksOpt,
    n_samples: int = SamplesOpt,
    seed: int = SeedOpt,
    rank: int = RankOpt,
    inputs: Optional[Path] = InputsOpt,
    input_shape: Optional[str] = ShapeOpt,
    trust_pickle: bool = TrustOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of each layer's eigenvalues."),
) -> None:
    """Per-layer Koopman spectral profile of MODEL at its current weights (one forward pass)."""
    _check_output_path(plot, ".png")
    prof = load_and_profile(model, trust_pickle=trust_pickle, blocks=blocks, n_samples=n_samples, seed=seed,
                            rank=rank or None, inputs=inputs, input_shape=input_shape)
    if plot is not None:
        prof.plot(plot, title=f"{model.name}: DMD eigenvalues per layer")
    if as_json:
        d = prof.to_dict()
        d["model"] = str(model)
        typer.echo(json.dumps(d, indent=2))
        return
    from rich.console import Console

    console = Console()
    console.print(profile_table(prof))
    a = prof.aggregates
    console.print(
        f"M≈1 mean {a['m_near_mean']:.3f}  (paper's flow chart: < 0.3 low, > 0.5 high)   "
        f"ρ max {a['rho_max']:.3f}   κ(V) max {a['kappa_v_max']:.3g}   Kreiss max {a['kreiss_max']:.3g}"
    )
    if prof.degenerate_layers:
        console.print(f"[yellow]degenerate layers (update ≈ 0, excluded from aggregates): {prof.degenerate_layers}[/]")
    if plot is not None:
        console.print(f"plot written to {plot}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
