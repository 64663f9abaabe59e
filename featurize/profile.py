"""SpectralProfile: the per-layer table, its aggregates, JSON round-trip and eigenvalue plot."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import capture as _capture
from .dmd import dmd
from .schema import AGGREGATED, CAP, DEGENERATE_UPDATE, EXPANSIVE, NEAR_LOW, PROFILE_COLUMNS, aggregate
from .spectra import eigenvector_condition, kreiss_constant, spectral_masses, spectral_radius

__all__ = ["AGGREGATED", "PROFILE_COLUMNS", "SpectralProfile", "layer_stats", "profile", "profile_seeds",
           "profile_snapshots"]


def parse_kreiss_grid(grid: "tuple[int, int] | str | None") -> tuple[int, int] | None:
    """``(n_theta, n_r)`` from a tuple or a ``"THETAxR"`` string such as ``"31x12"``; ``None``/``""``: default."""
    if grid is None or grid == "":
        return None
    try:
        n_theta, n_r = (int(v) for v in (grid.lower().split("x") if isinstance(grid, str) else grid))
    except (TypeError, ValueError):
        raise ValueError(f"kreiss_grid must be (n_theta, n_r) or 'THETAxR' like '31x12', got {grid!r}") from None
    if n_theta < 2 or n_r < 2:
        raise ValueError(f"kreiss_grid needs at least 2 points per axis, got {grid!r}")
    return n_theta, n_r


def layer_stats(
    X: np.ndarray, Y: np.ndarray, *, rank: int | None = 32, seed: int = 0,
    kreiss_grid: "tuple[int, int] | str | None" = None,
) -> dict:
    """Every profile column for one layer's snapshots ``X, Y`` of shape (d, N).

    ``kreiss_grid`` = (n_theta, n_r) of the Kreiss search's polar grid (default: the function's).
    """
    kreiss_grid = parse_kreiss_grid(kreiss_grid)
    kgrid = {} if kreiss_grid is None else dict(n_theta=kreiss_grid[0], n_r=kreiss_grid[1])
    res = dmd(X, Y, rank=rank, seed=seed)
    lam = res.eigenvalues
    rel = res.reliable
    masses_all = spectral_masses(lam)
    masses = spectral_masses(lam[rel]) if rel.any() else masses_all
    update = float(np.linalg.norm(Y - X) / (np.linalg.norm(X) + 1e-12))
    degenerate = bool(update < DEGENERATE_UPDATE)
    row = dict(
        **masses,
        rho=spectral_radius(lam),
        # a degenerate layer's operator is I plus an update at the level of rounding: its eigenvectors
        # and its η_nl (relative to the update) are rounding noise (κ(V) moved 5× with the BLAS thread
        # count on such layers), so they are left undefined; the other columns are stable there
        kappa_v=np.nan if degenerate else min(eigenvector_condition(res.V), CAP),
        kreiss=min(kreiss_constant(res.A, **kgrid), CAP),
        eta_nl=np.nan if degenerate else res.eta_nl,
        reliable_fraction=float(rel.mean()),
        degenerate=degenerate,
        **{f"{k}_all": v for k, v in masses_all.items()},
        update_ratio=update,
        rank=int(res.rank),
    )
    row["_eigenvalues"] = lam
    return row


#: Columns of the per-layer table holding numbers (floats; NaN when missing).
_FLOAT_COLUMNS = [c for c in PROFILE_COLUMNS if c not in ("layer", "name", "degenerate", "rank")]


def _clean(v):
    """A JSON-ready scalar: numpy scalars to Python, non-finite floats to None."""
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


@dataclass
class SpectralProfile:
    """Per-layer Koopman spectral profile of a network at one point of its training.

    Attributes
    ----------
    rows : list of dict, one per residual block, keys ``PROFILE_COLUMNS``
    aggregates : dict, ``{col}_{mean,max,min,std}`` for ``AGGREGATED`` plus ``n_layers``,
        ``n_degenerate`` (``featurize.schema.aggregate``)
    eigenvalues : list of complex arrays, one per layer
    meta : dict (blocks container, n_samples, seed, rank)
    layers : DataFrame with columns ``PROFILE_COLUMNS`` (built from ``rows`` on first use: the
        profile itself needs no pandas)
    """

    rows: list
    aggregates: dict
    eigenvalues: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: list[dict], meta: dict | None = None) -> "SpectralProfile":
        eigs = [np.asarray(r.pop("_eigenvalues", np.array([]))) for r in rows]
        rows = [{c: r.get(c, np.nan) for c in PROFILE_COLUMNS} for r in rows]
        for r in rows:
            r["degenerate"] = bool(r["degenerate"])
        prof = cls(rows=rows, aggregates={}, eigenvalues=eigs, meta=meta or {})
        prof.aggregates = aggregate(prof.columns())
        return prof

    def columns(self) -> dict[str, np.ndarray]:
        """The per-layer table as ``{column: array of shape (n_layers,)}``."""
        return {c: np.array([r[c] for r in self.rows], dtype=bool if c == "degenerate" else None)
                for c in PROFILE_COLUMNS}

    @functools.cached_property
    def layers(self):
        """DataFrame with columns ``PROFILE_COLUMNS``, one row per residual block."""
        import pandas as pd

        layers = pd.DataFrame(self.rows, columns=PROFILE_COLUMNS)
        layers["degenerate"] = layers["degenerate"].astype(bool)
        return layers

    @property
    def degenerate_layers(self) -> list[int]:
        return [int(r["layer"]) for r in self.rows if r["degenerate"]]

    def to_dict(self) -> dict:
        """``{"layers": [...], "aggregates": {...}, "eigenvalues": [[re, im], ...], "meta": {...}}``."""
        return dict(
            layers=[{k: _clean(v) for k, v in row.items()} for row in self.rows],
            aggregates={k: _clean(v) for k, v in self.aggregates.items()},
            eigenvalues=[[[float(z.real), float(z.imag)] for z in e] for e in self.eigenvalues],
            meta=self.meta,
        )

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "SpectralProfile":
        rows = []
        for r in d["layers"]:
            row = {c: r.get(c) for c in PROFILE_COLUMNS}
            for c in _FLOAT_COLUMNS:
                row[c] = np.nan if row[c] is None else float(row[c])
            row["degenerate"] = bool(row["degenerate"])
            rows.append(row)
        eigs = [np.array([complex(a, b) for a, b in e]) for e in d.get("eigenvalues", [])]
        aggs = {k: (np.nan if v is None else v) for k, v in d["aggregates"].items()}
        return cls(rows=rows, aggregates=aggs, eigenvalues=eigs, meta=d.get("meta", {}))

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "SpectralProfile":
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """PNG of each layer's eigenvalues against the unit circle and the near-unit band.

        Draws on its own Agg canvas (no pyplot, no change to matplotlib's global backend).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = max(1, len(self.eigenvalues))
        cols = min(n, 4)
        rows = (n + cols - 1) // cols
        fig = Figure(figsize=(3.2 * cols, 3.2 * rows))
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, cols, squeeze=False)
        t = np.linspace(0, 2 * np.pi, 400)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        for i, (ax, lam) in enumerate(zip(axes.ravel(), self.eigenvalues)):
            row = self.rows[i]
            for r, style in ((1.0, "k-"), (NEAR_LOW, "g:"), (EXPANSIVE, "r:")):
                ax.plot(r * np.cos(t), r * np.sin(t), style, lw=0.8)
            ax.scatter(lam.real, lam.imag, s=8, alpha=0.7)
            lim = max(1.2, float(np.max(np.abs(lam))) * 1.05 if lam.size else 1.2)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            flag = " (degenerate)" if row["degenerate"] else ""
            ax.set_title(f"layer {i}: M≈1={row['m_near']:.2f} ρ={row['rho']:.2f}{flag}", fontsize=8)
        fig.suptitle(title or f"DMD eigenvalues per layer (unit circle; band {NEAR_LOW:.2f}–{EXPANSIVE:.2f})",
                     fontsize=10)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path


def profile_snapshots(
    snaps: "_capture.Snapshots", *, rank: int | None = 32, seed: int = 0, progress=None,
    meta: dict | None = None, kreiss_grid: "tuple[int, int] | str | None" = None, workers: int = 1,
) -> SpectralProfile:
    """Profile already-collected snapshots (one row per layer); ``workers`` threads share the layers."""
    rows = _layer_rows([(snaps, seed)], rank=rank, kreiss_grid=kreiss_grid, workers=workers, progress=progress)
    return SpectralProfile.from_rows(rows[0], meta=meta)


def _layer_rows(jobs: list, *, rank: int | None, kreiss_grid, workers: int = 1, progress=None) -> list[list[dict]]:
    """``layer_stats`` of every layer of every ``(snapshots, seed)`` in ``jobs``: one list of rows per
    job. With ``workers`` > 1 the layers are shared among that many threads (the linear algebra
    releases the GIL); each layer's numbers do not depend on it. ``progress(done)`` counts layers."""
    tasks = [(j, i, name, X, Y, seed) for j, (snaps, seed) in enumerate(jobs)
             for i, (name, X, Y) in enumerate(zip(snaps.names, snaps.X, snaps.Y))]

    def one(task):
        j, i, name, X, Y, seed = task
        return dict(layer=i, name=name, **layer_stats(X, Y, rank=rank, seed=seed, kreiss_grid=kreiss_grid))

    rows: list[list[dict]] = [[] for _ in jobs]
    if workers > 1 and len(tasks) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            results = pool.map(one, tasks)
            for done, (task, row) in enumerate(zip(tasks, results), 1):
                rows[task[0]].append(row)
                if progress is not None:
                    progress(done)
    else:
        for done, task in enumerate(tasks, 1):
            rows[task[0]].append(one(task))
            if progress is not None:
                progress(done)
    return rows


def profile(
    model: nn.Module,
    inputs: torch.Tensor | str | Path | None = None,
    *,
    blocks: str | None = None,
    n_samples: int = 2048,
    seed: int = 0,
    rank: int | None = 32,
    input_shape: tuple[int, ...] | None = None,
    kreiss_grid: "tuple[int, int] | str | None" = None,
    progress=None,
) -> SpectralProfile:
    """Koopman spectral profile of ``model`` at its current weights, from one forward pass.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor, path to a tensor file, or None
        Probe inputs; by default random token ids from the model's embedding vocabulary (or
        Gaussian inputs of ``input_shape``), seeded by ``seed``.
    blocks : str, optional
        Dotted name of the residual-block container; discovered when omitted.
    n_samples : int, default 2048
        Token states per layer (N).
    rank : int or None, default 32
        Rank of the randomized DMD (the paper's recipe); ``None`` for full DMD.
    kreiss_grid : (int, int) or "THETAxR", optional
        (n_theta, n_r) of the Kreiss search's polar grid; coarser is faster (refinement follows).
    progress : callable, optional
        ``progress(stage, done, total)`` for progress bars.

    Returns
    -------
    SpectralProfile

    Examples
    --------
    >>> prof = profile(model)                                   # doctest: +SKIP
    >>> prof.aggregates["m_near_mean"]                          # doctest: +SKIP
    """
    return profile_seeds(model, inputs, seeds=[seed], blocks=blocks, n_samples=n_samples, rank=rank,
                         input_shape=input_shape, kreiss_grid=kreiss_grid, progress=progress)[0]


def profile_seeds(
    model: nn.Module,
    inputs: torch.Tensor | str | Path | None = None,
    *,
    seeds: "list[int]",
    blocks: str | None = None,
    n_samples: int = 2048,
    rank: int | None = 32,
    input_shape: tuple[int, ...] | None = None,
    kreiss_grid: "tuple[int, int] | str | None" = None,
    progress=None,
    workers: int = 1,
) -> list[SpectralProfile]:
    """``[profile(model, inputs, seed=s, ...) for s in seeds]`` from one forward pass.

    The seeds' probes are concatenated along the batch axis and run together; each seed keeps its
    own token states and its own snapshots, so every profile is the one ``profile`` gives for that
    seed. When the capture of all seeds at once would not fit in memory, the seeds are profiled one
    after the other instead.

    Parameters
    ----------
    seeds : list of int
        Probe seeds (each seeds its probe, its token-state sample and its randomized DMD).
    workers : int, default 1
        Threads for the per-layer spectra (DMD, Kreiss constant); the numbers do not depend on it.
        Each thread's torch calls use torch's own threads too: with ``workers`` > 1, set
        ``torch.set_num_threads(1)`` around the call.
    Other parameters : as ``profile``.

    Returns
    -------
    list of SpectralProfile, one per seed, in the order of ``seeds``.
    """
    if n_samples < 2:
        raise _capture.CaptureError(f"n_samples must be at least 2, got {n_samples}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("need at least one probe seed")
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
        return _profile(model, inputs, blocks=blocks, n_samples=n_samples, seeds=seeds, rank=rank,
                        input_shape=input_shape, kreiss_grid=kreiss_grid, progress=progress, workers=workers)


def _profile(model, inputs, *, blocks, n_samples, seeds, rank, input_shape, kreiss_grid, progress, workers):
    _capture.find_blocks(model, blocks)  # no blocks at all: said before anything else
    if isinstance(inputs, (str, Path)):
        inputs = _capture.load_probe(inputs)
    given = inputs if isinstance(inputs, torch.Tensor) else None
    name, mods = _capture.discover_blocks(model, blocks, inputs=given, input_shape=input_shape, seed=seeds[0])
    groups = [seeds]
    if len(seeds) > 1:
        try:  # all seeds' token states at once
            _capture.check_capture_memory(model, n_samples * len(seeds), len(mods), input_shape=input_shape,
                                          inputs=given)
        except _capture.CaptureError:  # one seed at a time, each checked on its own
            groups = [[s] for s in seeds]
    profs = []
    for group in groups:
        torch.manual_seed(group[0])  # inside profile_seeds' fork_rng
        if len(group) == 1:
            _capture.check_capture_memory(model, n_samples, len(mods), input_shape=input_shape, inputs=given)
        probes = [given if given is not None else
                  _capture.make_probe(model, n_samples, seed=s, input_shape=input_shape) for s in group]
        B = sum(p.shape[0] for p in probes) if given is None else given.shape[0]
        snaps = _capture.collect_snapshots_seeds(
            model, probes, group, blocks=mods, n_samples=n_samples,
            progress=(lambda done: progress("forward", done, B)) if progress else None,
        )
        L = sum(len(s.names) for s in snaps)
        rows = _layer_rows(list(zip(snaps, group)), rank=rank, kreiss_grid=kreiss_grid, workers=workers,
                           progress=(lambda done: progress("spectra", done, L)) if progress else None)
        profs += [SpectralProfile.from_rows(r, meta=dict(blocks=name, n_samples=n_samples, seed=s, rank=rank,
                                                         width=int(sn.X[0].shape[0]) if sn.X else None))
                  for r, sn, s in zip(rows, snaps, group)]
    return profs
