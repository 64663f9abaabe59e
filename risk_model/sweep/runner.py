"""Run a sweep spec: resumable, append-only Parquet, joblib or Dask.

Layout of an output folder::

    OUT/runs.parquet     one row per finished run (consolidated)
    OUT/layers.parquet   one row per run and layer (consolidated)
    OUT/parts/<run_id>.layers.parquet, OUT/parts/<run_id>.runs.parquet
                         one pair per run finished since the last consolidation
    OUT/errors.jsonl     runs that raised (not stored; retried by the next invocation)

Every file is written to a temporary name and moved into place with ``os.replace``, so a reader
(or a killed sweep) only ever sees complete files. A run counts as finished once its
``runs`` part exists (its ``layers`` part is written first). Consolidation merges the parts into
``runs.parquet``/``layers.parquet`` (deduplicated by run id; layers before runs) and only then
deletes the parts, so a kill at any point loses no finished run and duplicates none. It runs when
a sweep starts (leftovers of a killed one) and when it ends.

Every Parquet file carries the schema-metadata key ``divergence_risk``; an output folder holding
any other (or unreadable) Parquet file is refused and left untouched.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .spec import RunConfig, load_spec, run_id

META_KEY = b"divergence_risk"
FORMAT = "sweep/1"
RUNS, LAYERS, PARTS = "runs.parquet", "layers.parquet", "parts"
BACKENDS = ("joblib", "dask")


class CorpusError(ValueError):
    """An output folder or corpus file cannot be used (foreign, corrupt, inconsistent)."""


# ----------------------------------------------------------------------------------- storage


def write_parquet_atomic(df: pd.DataFrame, path: Path, kind: str) -> Path:
    """Write ``df`` to ``path`` via a temporary file and ``os.replace`` (never a partial file)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps({"format": FORMAT, "kind": kind}).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _check_file(path: Path) -> str:
    """The ``kind`` of one of our Parquet files; ``CorpusError`` for foreign or corrupt ones."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path} is not readable Parquet (corrupt?): refusing to use it") from e
    raw = (schema.metadata or {}).get(META_KEY)
    try:
        info = json.loads(raw) if raw else None
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CorpusError(f"{path} is not a divergence-risk sweep file: refusing to overwrite it")
    return str(info.get("kind"))


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that holds foreign or corrupt Parquet files."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} exists and is not a folder")
    for path in sorted(out.glob("*.parquet")) + sorted((out / PARTS).glob("*.parquet")):
        _check_file(path)


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path} is not readable Parquet (corrupt?): refusing to use it") from e


def done_run_ids(out: Path) -> set[str]:
    """Run ids already finished in ``out`` (consolidated or in parts)."""
    ids: set[str] = set()
    if (out / RUNS).exists():
        ids |= set(pq.read_table(out / RUNS, columns=["run_id"]).column("run_id").to_pylist())
    ids |= {p.name.split(".")[0] for p in (out / PARTS).glob("*.runs.parquet")}
    return ids


def write_run(out: Path, row: dict, layers: pd.DataFrame) -> None:
    """Persist one finished run as a pair of part files (layers first, runs last)."""
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    rid = row["run_id"]
    write_parquet_atomic(layers, parts / f"{rid}.layers.parquet", "layers")
    write_parquet_atomic(pd.DataFrame([row]), parts / f"{rid}.runs.parquet", "runs")


def consolidate(out: Path) -> tuple[int, int]:
    """Merge parts into ``runs.parquet``/``layers.parquet``; returns (runs, layer rows)."""
    parts = out / PARTS
    run_parts = sorted(parts.glob("*.runs.parquet")) if parts.exists() else []
    if not run_parts:
        if (out / RUNS).exists():
            return len(_read(out / RUNS)), len(_read(out / LAYERS)) if (out / LAYERS).exists() else 0
        return 0, 0
    runs = [_read(out / RUNS)] if (out / RUNS).exists() else []
    layers = [_read(out / LAYERS)] if (out / LAYERS).exists() else []
    done = set(runs[0]["run_id"]) if runs else set()
    for p in run_parts:
        rid = p.name.split(".")[0]
        lp = parts / f"{rid}.layers.parquet"
        if rid in done:
            continue
        runs.append(_read(p))
        if lp.exists():
            layers.append(_read(lp))
        done.add(rid)
    runs_df = pd.concat(runs, ignore_index=True).drop_duplicates("run_id", keep="first")
    layers = [df for df in layers if len(df)]
    layers_df = (pd.concat(layers, ignore_index=True) if layers else pd.DataFrame())
    if len(layers_df):
        layers_df = layers_df[layers_df["run_id"].isin(set(runs_df["run_id"]))]
        layers_df = layers_df.drop_duplicates(["run_id", "layer"], keep="first")
    write_parquet_atomic(layers_df.reset_index(drop=True), out / LAYERS, "layers")
    write_parquet_atomic(runs_df.reset_index(drop=True), out / RUNS, "runs")
    for p in run_parts:  # only after both consolidated files are in place
        p.unlink(missing_ok=True)
        (parts / p.name.replace(".runs.", ".layers.")).unlink(missing_ok=True)
    for p in parts.glob("*.layers.parquet"):  # orphans of runs that never finished
        if p.name.split(".")[0] in set(runs_df["run_id"]):
            p.unlink(missing_ok=True)
    return len(runs_df), len(layers_df)


def load_corpus(out: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, layers)`` of a sweep folder, consolidating any leftover parts first."""
    out = Path(out)
    check_out_dir(out)
    consolidate(out)
    if not (out / RUNS).exists():
        raise CorpusError(f"{out} holds no {RUNS}")
    layers = _read(out / LAYERS) if (out / LAYERS).exists() else pd.DataFrame()
    return _read(out / RUNS), layers


# ----------------------------------------------------------------------------------- execution


def execute(cfg: dict, out: str | None = None) -> dict:
    """Run one config in this process. With ``out`` the run is stored there and a short summary
    returned; without, the summary carries ``row`` and ``layers`` for the caller to store."""
    import torch

    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    from .trainer import train_run

    cfg_obj = RunConfig(**cfg)
    try:
        with threadpool_limits(1):
            row, layers = train_run(cfg_obj)
    except Exception as e:  # noqa: BLE001 - recorded in errors.jsonl, the run is retried later
        return dict(run_id=run_id(cfg_obj), error=f"{type(e).__name__}: {e}"[:500])
    res = dict(run_id=row["run_id"], diverged=row["diverged"], seconds=row["seconds"])
    if out is None:
        res.update(row=row, layers=layers)
    else:
        write_run(Path(out), row, layers)
    return res


def _results(todo: list[dict], out: Path, workers: int, backend: str, scheduler: str | None):
    """Yield each run's summary as it finishes (in completion order)."""
    if backend == "dask":
        from dask.distributed import Client, as_completed

        with Client(scheduler) as client:
            futures = client.map(execute, todo, pure=False)  # results come back; stored here
            for fut in as_completed(futures):
                res = fut.result()
                if "row" in res:
                    write_run(out, res.pop("row"), res.pop("layers"))
                yield res
    elif workers <= 1:
        for cfg in todo:
            yield execute(cfg, str(out))
    else:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=workers, return_as="generator_unordered", batch_size=1,
                       pre_dispatch="2*n_jobs")
        yield from par(delayed(execute)(cfg, str(out)) for cfg in todo)


class _Progress:
    """A rich progress bar with ETA on a terminal; periodic one-line reports otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.div = total, enabled, 0, 0
        self.t0 = time.time()
        self.bar = None
        if enabled and total:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                           TimeElapsedColumn, TimeRemainingColumn)

                self.bar = Progress("[progress.description]{task.description}", BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(), "eta",
                                    TimeRemainingColumn(), console=console)
                self.bar.start()
                self.task = self.bar.add_task("runs", total=total)

    def update(self, res: dict) -> None:
        self.done += 1
        self.div += bool(res.get("diverged"))
        if self.bar is not None:
            self.bar.update(self.task, advance=1,
                            description=f"runs (diverged {self.div}/{self.done})")
        elif self.enabled and (self.done % max(1, self.total // 100) == 0 or self.done == self.total):
            el = time.time() - self.t0
            eta = el / self.done * (self.total - self.done)
            print(f"[sweep] {self.done}/{self.total} runs, diverged {self.div}, "
                  f"elapsed {el / 60:.1f} min, eta {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_sweep(
    spec_path: str | Path,
    out_dir: str | Path,
    workers: int = 1,
    backend: str = "joblib",
    scheduler: str | None = None,
    progress: bool = True,
) -> dict:
    """Run every config of a spec that ``out_dir`` does not hold yet.

    Parameters
    ----------
    spec_path : path of a TOML sweep spec (see ``risk_model.sweep.spec``)
    out_dir : output folder (created); resumable and append-only
    workers : joblib processes (ignored by the Dask backend)
    backend : ``"joblib"`` or ``"dask"`` (then ``scheduler`` is the scheduler address)
    progress : show a progress bar with ETA (on stderr)

    Returns
    -------
    dict with ``planned``, ``already_done``, ``ran``, ``failed``, ``diverged`` (among the new),
    ``runs`` and ``layer_rows`` (in the consolidated corpus), ``seconds``, ``runs_path``,
    ``layers_path``.

    Raises
    ------
    SweepSpecError : invalid spec (before any run starts)
    CorpusError : ``out_dir`` holds foreign or corrupt Parquet
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "dask" and not scheduler:
        raise ValueError("backend dask needs a scheduler address (--scheduler tcp://HOST:PORT)")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.time()
    spec = load_spec(spec_path)
    configs = spec.configs()
    out = Path(out_dir)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob(".*.tmp")) + list((out / PARTS).glob(".*.tmp")):
        stale.unlink(missing_ok=True)
    consolidate(out)
    done = done_run_ids(out)
    todo = [asdict(c) for c in configs if run_id(c) not in done]
    bar = _Progress(len(todo), progress)
    ran = failed = diverged = 0
    try:
        for res in _results(todo, out, workers, backend, scheduler):
            if "error" in res:
                failed += 1
                with open(out / "errors.jsonl", "a") as fh:
                    fh.write(json.dumps(res) + "\n")
            else:
                ran += 1
                diverged += bool(res["diverged"])
            bar.update(res)
    finally:
        bar.close()
    n_runs, n_layers = consolidate(out)
    return dict(planned=len(configs), already_done=len(configs) - len(todo), ran=ran,
                failed=failed, diverged=diverged, runs=n_runs, layer_rows=n_layers,
                seconds=round(time.time() - t0, 2), runs_path=str(out / RUNS),
                layers_path=str(out / LAYERS))


if __name__ == "__main__":  # python -m risk_model.sweep.runner SPEC --out DIR [...]
    from .cli import main

    main()
