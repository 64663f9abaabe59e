"""Run a sweep spec: resumable, append-only Parquet, joblib or Dask.

Layout of an output folder::

    OUT/runs.parquet     one row per finished run (consolidated)
    OUT/layers.parquet   one row per run and layer (consolidated)
    OUT/parts/<unit>.layers.parquet, OUT/parts/<unit>.runs.parquet
                         one pair per unit finished since the last consolidation
    OUT/errors.jsonl     runs that raised (not stored; retried by the next invocation)

A *unit* is what one worker does in one go: a run (a ``sweep`` spec; layers keyed by ``run_id``)
or a model with its learning-rate ladder (a ``ladder`` spec, ``risk_model.sweep.ladder``, or a
``full_ladder`` spec, ``risk_model.sweep.full_ladder``: one row per run and horizon; its runs and
its layers keyed by ``model_id``). Every file is written to a temporary name and moved
into place with ``os.replace``, so a reader (or a killed sweep) only ever sees complete files. A
unit counts as finished once its ``runs`` part exists (its ``layers`` part is written first). Consolidation merges the parts into
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

from risk_model.errors import CorpusError

from .spec import RunConfig, parse_spec, read_toml, run_id

META_KEY = b"divergence_risk"
FORMAT = "sweep/1"
RUNS, LAYERS, PARTS = "runs.parquet", "layers.parquet", "parts"
BACKENDS = ("joblib", "dask")


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


def unit_key(columns) -> str:
    """The column that names a unit: ``model_id`` in ladder corpora, ``run_id`` otherwise."""
    return "model_id" if "model_id" in columns else "run_id"


def done_unit_ids(out: Path) -> set[str]:
    """Unit ids (run ids, or model ids of ladders) already finished in ``out``."""
    ids: set[str] = set()
    if (out / RUNS).exists():
        key = unit_key(pq.read_schema(out / RUNS).names)
        ids |= set(pq.read_table(out / RUNS, columns=[key]).column(key).to_pylist())
    ids |= {p.name.split(".")[0] for p in (out / PARTS).glob("*.runs.parquet")}
    return ids


def write_unit(out: Path, uid: str, rows: list[dict], layers: pd.DataFrame) -> None:
    """Persist one finished unit as a pair of part files (layers first, runs last)."""
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(layers, parts / f"{uid}.layers.parquet", "layers")
    write_parquet_atomic(pd.DataFrame(rows), parts / f"{uid}.runs.parquet", "runs")


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
    key = unit_key(runs[0].columns if runs else _read(run_parts[0]).columns)
    done = set(runs[0][key]) if runs else set()
    for p in run_parts:
        uid = p.name.split(".")[0]
        lp = parts / f"{uid}.layers.parquet"
        if uid in done:
            continue
        runs.append(_read(p))
        if lp.exists():
            layers.append(_read(lp))
        done.add(uid)
    runs_df = pd.concat(runs, ignore_index=True).drop_duplicates("run_id", keep="first")
    layers = [df for df in layers if len(df)]
    layers_df = (pd.concat(layers, ignore_index=True) if layers else pd.DataFrame())
    if len(layers_df):
        layers_df = layers_df[layers_df[key].isin(set(runs_df[key]))]
        layers_df = layers_df.drop_duplicates([key, "layer"], keep="first")
    write_parquet_atomic(layers_df.reset_index(drop=True), out / LAYERS, "layers")
    write_parquet_atomic(runs_df.reset_index(drop=True), out / RUNS, "runs")
    for p in run_parts:  # only after both consolidated files are in place
        p.unlink(missing_ok=True)
        (parts / p.name.replace(".runs.", ".layers.")).unlink(missing_ok=True)
    for p in parts.glob("*.layers.parquet"):  # orphans of units that never finished
        if p.name.split(".")[0] in set(runs_df[key]):
            p.unlink(missing_ok=True)
    return len(runs_df), len(layers_df)


def load_corpus(out: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, layers)`` of a sweep folder as stored (a ladder's layers keyed by ``model_id``, the
    per-step curves kept), consolidating any leftover parts first; read by
    ``risk_model.corpus.read_tables``. ``risk_model.corpus.load_corpus`` validates and merges."""
    from risk_model.corpus import read_tables

    out = Path(out)
    check_out_dir(out)
    consolidate(out)
    if not (out / RUNS).exists():
        raise CorpusError(f"{out} holds no {RUNS}")
    runs, layers = read_tables(out, curves=True)
    return runs, (layers if layers is not None else pd.DataFrame())


# ----------------------------------------------------------------------------------- execution


def load_any_spec(path: str | Path):
    """A ``SweepSpec`` (one run per config) or, for ``kind = "ladder"``, a ``LadderSpec``."""
    data, text = read_toml(path)
    if data.get("kind", "runs") == "full_ladder":
        from .full_ladder import parse_full_ladder_spec

        return parse_full_ladder_spec(data, source=text)
    if data.get("kind", "runs") == "ladder":
        from .ladder import parse_ladder_spec

        return parse_ladder_spec(data, source=text)
    if data.get("kind", "runs") != "runs":
        from .spec import SweepSpecError

        raise SweepSpecError(f"kind must be 'runs', 'ladder' or 'full_ladder', got {data['kind']!r}")
    return parse_spec(data, source=text)


def spec_units(spec) -> list[dict]:
    """The units of work of a spec: ladder units as they are, or ``{"unit_id", "config"}`` per run."""
    if hasattr(spec, "units"):
        return spec.units()
    return [dict(unit_id=run_id(c), config=asdict(c)) for c in spec.configs()]


_WATCHED: set[int] = set()


def _die_with(parent_pid: int) -> None:
    """In a worker process: exit as soon as ``parent_pid`` (the sweep) is gone, so a killed sweep
    leaves no worker training and writing on (once per worker process; a daemon thread polls)."""
    if parent_pid in _WATCHED or parent_pid == os.getpid():
        return
    _WATCHED.add(parent_pid)
    import threading

    def watch() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # pid reused by a process we may not signal: the sweep is gone
                os._exit(1)
            if os.getppid() == 1:   # re-parented to init
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="die-with-sweep", daemon=True).start()


def execute(unit: dict, out: str | None = None, parent_pid: int | None = None, device: str = "cpu") -> dict:
    """Do one unit in this process. With ``out`` it is stored there and a short summary returned;
    without, the summary carries ``rows`` and ``layers`` for the caller to store. With
    ``parent_pid`` (local worker processes) the process exits when that process is gone.
    ``device``: where full-ladder units train (``"cuda"`` on a GPU machine; the profile stays on CPU)."""
    if parent_pid is not None:
        _die_with(parent_pid)
    import torch

    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    cpu0 = time.process_time()
    try:
        with threadpool_limits(1):
            if unit.get("walk") == "full":
                from .full_ladder import train_full_ladder

                rows, layers = train_full_ladder(unit, device)
            elif "rungs" in unit:
                from .ladder import train_ladder

                rows, layers = train_ladder(unit)
            else:
                from .trainer import train_run

                row, layers = train_run(RunConfig(**unit["config"]))
                rows = [row]
    except Exception as e:  # noqa: BLE001 - recorded in errors.jsonl, the unit is retried later
        return dict(unit_id=unit["unit_id"], error=f"{type(e).__name__}: {e}"[:500])
    res = dict(unit_id=unit["unit_id"], runs=len(rows), diverged=sum(bool(r["diverged"]) for r in rows),
               seconds=sum(r["seconds"] for r in rows), cpu_seconds=time.process_time() - cpu0)
    if out is None:
        res.update(rows=rows, layers=layers)
    else:
        write_unit(Path(out), unit["unit_id"], rows, layers)
    return res


def _results(todo: list[dict], out: Path, workers: int, backend: str, scheduler: str | None,
             device: str = "cpu"):
    """Yield each run's summary as it finishes (in completion order)."""
    if backend == "dask":
        from dask.distributed import Client, as_completed

        with Client(scheduler) as client:
            futures = client.map(execute, todo, pure=False, device=device)  # results come back; stored here
            for fut in as_completed(futures):
                res = fut.result()
                if "rows" in res:
                    write_unit(out, res["unit_id"], res.pop("rows"), res.pop("layers"))
                yield res
    elif workers <= 1:
        for cfg in todo:
            yield execute(cfg, str(out), device=device)
    else:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=workers, return_as="generator_unordered", batch_size=1,
                       pre_dispatch="2*n_jobs")
        yield from par(delayed(execute)(cfg, str(out), os.getpid(), device) for cfg in todo)


class _Progress:
    """A rich progress bar with ETA on a terminal; periodic one-line reports otherwise."""

    def __init__(self, total: int, enabled: bool, unit: str = "runs"):
        self.total, self.enabled, self.done, self.div, self.runs = total, enabled, 0, 0, 0
        self.unit = unit
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
                self.task = self.bar.add_task(self.unit, total=total)

    def update(self, res: dict) -> None:
        self.done += 1
        self.div += int(res.get("diverged", 0))
        self.runs += int(res.get("runs", 0))
        if self.bar is not None:
            self.bar.update(self.task, advance=1,
                            description=f"{self.unit} ({self.runs} runs, {self.div} diverged)")
        elif self.enabled and (self.done % max(1, self.total // 100) == 0 or self.done == self.total):
            el = time.time() - self.t0
            eta = el / self.done * (self.total - self.done)
            print(f"[sweep] {self.done}/{self.total} {self.unit}, {self.runs} runs, diverged {self.div}, "
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
    device: str = "cpu",
) -> dict:
    """Run every config of a spec that ``out_dir`` does not hold yet.

    Parameters
    ----------
    spec_path : path of a TOML sweep spec (see ``risk_model.sweep.spec``)
    out_dir : output folder (created); resumable and append-only
    workers : joblib processes (ignored by the Dask backend)
    backend : ``"joblib"`` or ``"dask"`` (then ``scheduler`` is the scheduler address)
    progress : show a progress bar with ETA (on stderr)
    device : ``"cpu"`` or ``"cuda"``: where full-ladder units train

    Returns
    -------
    dict with ``planned`` and ``already_done`` (units: runs, or models of a ladder spec), ``ran``
    (runs done now), ``failed`` (units), ``diverged`` (among the new runs),
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
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    t0 = time.time()
    spec = load_any_spec(spec_path)
    units = spec_units(spec)
    out = Path(out_dir)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob(".*.tmp")) + list((out / PARTS).glob(".*.tmp")):
        stale.unlink(missing_ok=True)
    consolidate(out)
    done = done_unit_ids(out)
    todo = [u for u in units if u["unit_id"] not in done]
    bar = _Progress(len(todo), progress, "models" if hasattr(spec, "units") else "runs")
    ran = failed = diverged = 0
    cpu = 0.0
    try:
        for res in _results(todo, out, workers, backend, scheduler, device):
            if "error" in res:
                failed += 1
                with open(out / "errors.jsonl", "a") as fh:
                    fh.write(json.dumps(res) + "\n")
            else:
                ran += res["runs"]
                diverged += res["diverged"]
                cpu += res.get("cpu_seconds", 0.0)
            bar.update(res)
    finally:
        bar.close()
    n_runs, n_layers = consolidate(out)
    return dict(planned=len(units), already_done=len(units) - len(todo), ran=ran,
                failed=failed, diverged=diverged, runs=n_runs, layer_rows=n_layers,
                seconds=round(time.time() - t0, 2), cpu_seconds=round(cpu, 2), runs_path=str(out / RUNS),
                layers_path=str(out / LAYERS))
