"""``risk sweep``: run a sweep spec into a resumable output folder (thin layer over ``run_sweep``).

Top-level imports stay light (typer, pathlib); torch and friends load inside the command.
"""
from __future__ import annotations

import json as _json
from pathlib import Path
from typing import Optional

import typer


def sweep_command(
    spec: Path = typer.Argument(..., help="Sweep spec (TOML): grid of values per key, n_runs, sampler, seed."),
    out: Path = typer.Option(..., "--out", help="Output folder (resumable; runs.parquet + layers.parquet)."),
    workers: int = typer.Option(1, "--workers", help="Parallel joblib worker processes."),
    backend: str = typer.Option("joblib", "--backend", help="joblib (local processes) or dask."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (with --backend dask)."),
    json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda: where full-ladder runs train."),
) -> None:
    """Train every run of SPEC that OUT does not hold yet and label it (diverged, collapsed).

    Killed and started again, it resumes: finished runs are kept, none is duplicated.
    """
    from risk_model.errors import CorpusError

    from .runner import run_sweep
    from .spec import SweepSpecError

    try:
        summary = run_sweep(spec, out, workers=workers, backend=backend, scheduler=scheduler,
                            progress=not json, device=device)
    except (SweepSpecError, CorpusError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(1)
    if json:
        typer.echo(_json.dumps(summary))
    else:
        typer.echo(
            f"{summary['ran']} runs done now ({summary['diverged']} diverged, {summary['failed']} failed), "
            f"{summary['already_done']} already there; corpus: {summary['runs']} runs in "
            f"{summary['runs_path']} ({summary['seconds']:.0f} s)"
        )


def main() -> None:
    """Entry point for ``python -m risk_model.sweep``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name="sweep")(sweep_command)
    app()
