"""Streaming capture: profile a network whose weights need not fit in memory, one block at a time.

The network is given as a *skeleton*: its modules built with every parameter on the ``meta`` device
(buffers real), plus a *weight source* that reads one named tensor at a time (e.g. from sharded
safetensors). One forward pass of the probe runs through the skeleton; a pre-hook on each residual
block materialises that block's weights from the source in the compute dtype, the block runs, a
post-hook takes its ``N`` snapshot pairs, profiles the layer at once (DMD, masses, κ(V), Kreiss…) and
puts the block's weights back on ``meta``. Peak memory is the modules outside the blocks (embeddings,
final norm) plus one block, its activations and one layer's snapshots, whatever the depth.

The probe, the sampled token states and the per-layer statistics are those of ``featurize.profile``
(same seeds, same column order), so both paths give the same profile for the same weights and
compute dtype. Several probe seeds share one pass: their probes are concatenated along the batch
axis, so each block is read once.

Compute dtype: float32 by default, whatever the checkpoint's dtype (bf16/fp16 tensors are widened
when a block is materialised). A residual block's update ``f(x)`` is often much smaller than ``x``
at initialization; holding ``x + f(x)`` in bfloat16 (8 significant bits) would round away a large
part of the update the DMD measures.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from . import capture as _capture
from .capture import CaptureError

__all__ = ["WeightSource", "StreamEstimate", "estimate_stream", "stream_profile", "skeleton_parameters"]


class WeightSource(Protocol):
    """Where the skeleton's weights come from, one tensor at a time."""

    def names(self) -> Iterable[str]:
        """Names of the tensors this source holds, as the skeleton's ``named_parameters`` spells them."""

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype (a fresh CPU tensor)."""

    def nbytes(self, name: str) -> int:
        """Bytes ``name`` takes in its stored dtype."""


def skeleton_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of ``model``, tied parameters once (under their first name)."""
    return dict(model.named_parameters())


def _block_prefixes(model: nn.Module, mods: Sequence[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in mods]


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, *, buffer: bool = False) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if buffer:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _owned_by(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


@dataclass
class StreamEstimate:
    """What a streamed profile will cost, worked out before it starts.

    Attributes
    ----------
    n_blocks : int
    seconds : float
        Expected wall time: the blocks' forward FLOPs at ``GEMM_EFFICIENCY`` of the matmul rate
        measured on this machine, plus reading the weights, plus one DMD per layer and probe seed.
    peak_bytes : int
        Expected peak memory above what the process holds now: the modules outside the blocks, the
        largest block (compute dtype, plus its largest tensor in stored dtype while it is widened),
        the activations of the probe and one layer's snapshots.
    gflops : float
        The matmul rate measured for the estimate (GFLOP/s).
    """

    n_blocks: int
    seconds: float
    peak_bytes: int
    gflops: float

    def describe(self) -> str:
        mins = self.seconds / 60
        when = f"{self.seconds:.0f} s" if self.seconds < 90 else f"{mins:.0f} min"
        return (f"≈ {when} for {self.n_blocks} blocks (at {self.gflops:.0f} GFLOP/s), "
                f"peak ≈ {self.peak_bytes / 1e9:.1f} GB above the process's current memory")


#: Fraction of the square-matmul rate a block's forward pass reaches (its norms, softmax, activations
#: and thin matmuls run slower). Calibrated on the 7B shape of benchmarks/big_model.py on a 2-core CPU,
#: where the bare rate predicted 2 min for a 195 s run; with 0.6 it says about 4 min, on the safe
#: side. Small models' time is mostly process start-up, which is not estimated.
GEMM_EFFICIENCY = 0.6


def _matmul_gflops(device: str, dtype: torch.dtype, size: int = 1536) -> float:
    """GFLOP/s of a (size × size) @ (size × size) product on ``device``, best of three."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def estimate_stream(
    model: nn.Module, source: WeightSource, *, blocks: str | None = None, n_samples: int = 2048,
    n_seeds: int = 1, rank: int | None = 32, dtype: torch.dtype = torch.float32, device: str = "cpu",
    read_gbps: float = 1.0, skip: Iterable[str] = (),
) -> StreamEstimate:
    """Time and memory a ``stream_profile`` of ``model`` will take (see ``StreamEstimate``).

    ``read_gbps`` is the assumed reading rate of the weights (GB/s; a cold disk may be slower);
    ``skip`` as in ``stream_profile`` (never read).
    """
    skip = set(skip)
    _, mods = _capture.find_blocks(model, blocks)
    prefixes = _block_prefixes(model, mods)
    params = skeleton_parameters(model)
    have = set(source.names())
    size = torch.empty((), dtype=dtype).element_size()
    block_numel, block_read, largest_read = [], [], 0
    for p in prefixes:
        own = [n for n in params if _owned_by(n, p)]
        block_numel.append(sum(params[n].numel() for n in own))
        reads = [source.nbytes(n) for n in own if n in have]
        block_read.append(sum(reads))
        largest_read = max([largest_read, *reads])
    embedding = _embedding_owners(model)
    outside = [n for n in params if n in have and n not in skip and not any(_owned_by(n, p) for p in prefixes)]
    outside_embed = sum(params[n].numel() for n in outside if n.rpartition(".")[0] in embedding)
    outside_rest = sum(params[n].numel() for n in outside if n.rpartition(".")[0] not in embedding)
    width = _capture_width(model)
    tokens = n_samples * n_seeds
    widest = max((max(q.shape) for n, q in params.items() if q.ndim == 2 and any(_owned_by(n, p) for p in prefixes)),
                 default=width)
    act = tokens * (12 * width + 3 * widest) * size  # residual stream, attention projections, MLP hidden
    snaps = n_samples * width * (2 * (4 + 8) + 3 * 8)  # one layer's X, Y in float32 and float64 + DMD copies
    # the embeddings are freed when the first block starts: they and a block are never held together
    peak = (max(outside_embed * size, max(block_numel, default=0) * size + largest_read)
            + outside_rest * size + act + snaps)
    gflops = _matmul_gflops(device, dtype)
    r = (rank or width) + 10
    dmd_flops = 12 * width * n_samples * r  # range finder, power iterations and projections
    flops = sum(2 * n * tokens for n in block_numel) + len(mods) * n_seeds * dmd_flops
    seconds = flops / (GEMM_EFFICIENCY * gflops * 1e9) + sum(block_read) / (read_gbps * 1e9)
    return StreamEstimate(n_blocks=len(mods), seconds=seconds, peak_bytes=int(peak), gflops=gflops)


def _embedding_owners(model: nn.Module) -> set[str]:
    """Dotted names of the model's ``nn.Embedding`` modules (read before the blocks, freed after)."""
    return {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}


def _capture_width(model: nn.Module) -> int:
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise CaptureError(f"{type(model).__name__} has no nn.Embedding: streaming needs a token model")
    return int(emb.embedding_dim)


def _release_freed_memory() -> None:
    """Give the memory of the block just freed back to the operating system (glibc's ``malloc_trim``;
    a no-op elsewhere): otherwise the allocator keeps it and the process's footprint grows block by block."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _forward_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` where the forward takes it: a KV cache of every layer is not needed here."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


@torch.no_grad()
def stream_profile(
    model: nn.Module,
    source: WeightSource,
    *,
    blocks: str | None = None,
    n_samples: int = 2048,
    seeds: Sequence[int] = (0,),
    rank: int | None = 32,
    kreiss_grid: "tuple[int, int] | str | None" = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    skip: Iterable[str] = (),
    progress=None,
) -> list:
    """Spectral profiles of a skeleton network, one per probe seed, streaming its weights block by block.

    Parameters
    ----------
    model : nn.Module
        Parameters on the ``meta`` device, buffers real (e.g. built under
        ``accelerate.init_empty_weights(include_buffers=False)``); it must embed tokens
        (``nn.Embedding``).
    source : WeightSource
        Every parameter of ``model`` by name, except those in ``skip``.
    blocks : str, optional
        Dotted name of the residual-block container; discovered when omitted.
    n_samples : int, default 2048
        Token states per layer (N), per probe seed.
    seeds : sequence of int, default (0,)
        Probe seeds; seed ``s`` gives the probe, token sample and randomized DMD of
        ``featurize.profile(..., seed=s)``.
    rank, kreiss_grid
        As ``featurize.profile``.
    dtype : torch.dtype, default float32
        Compute dtype the weights are materialised in.
    device : str, default "cpu"
    skip : iterable of str
        Parameters never needed before the last block's output (an LM head): left on ``meta``.
    progress : callable, optional
        ``progress("blocks", done, total)`` after each block.

    Returns
    -------
    list of SpectralProfile, one per seed (``meta["streamed"]`` is True)
    """
    from threadpoolctl import threadpool_limits

    from .profile import SpectralProfile, layer_stats

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise CaptureError("give at least one probe seed")
    if n_samples < 2:
        raise CaptureError(f"n_samples must be at least 2, got {n_samples}")
    container, mods = _capture.find_blocks(model, blocks)
    prefixes = _block_prefixes(model, mods)
    names = [f"{type(m).__name__}[{i}]" for i, m in enumerate(mods)]
    params = skeleton_parameters(model)  # canonical name -> parameter (tied ones once)
    first = {id(q): n for n, q in params.items()}
    alias = {n: first[id(q)] for n, q in model.named_parameters(remove_duplicate=False)}  # every name -> canonical
    have = set(source.names())
    skip = set(skip)
    missing = [n for n in params if n not in have and n not in skip]
    if missing:
        raise CaptureError(f"the checkpoint has no tensor for {missing[0]} ({len(missing)} parameters missing)")
    if hasattr(source, "shape"):
        for n, q in params.items():
            if n in have and tuple(source.shape(n)) != tuple(q.shape):
                raise CaptureError(f"the checkpoint's {n} has shape {tuple(source.shape(n))}, the model {tuple(q.shape)}")
    in_block = {n: i for n in alias for i, p in enumerate(prefixes) if _owned_by(n, p)}
    embedding = _embedding_owners(model)

    def load(name: str) -> torch.Tensor:
        t = source.get(name)
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    def fill(names: list[str]) -> None:
        """Materialise every name from its canonical tensor (aliases share one tensor)."""
        got: dict[str, torch.Tensor] = {}
        for n in names:
            c = alias[n]
            if c not in got:
                got[c] = load(c)
            _set_tensor(model, n, got[c])

    def empty(names: list[str]) -> None:
        for n in names:
            q = params[alias[n]]
            _set_tensor(model, n, torch.empty(q.shape, dtype=q.dtype, device="meta"))

    block_names = [[n for n in alias if in_block.get(n) == i] for i in range(len(mods))]
    # The modules outside the blocks (embeddings, final norm) are loaded first. Once the blocks start,
    # the embeddings that have run go back to meta, and come back if called again.
    outside: dict[str, list[str]] = {}  # owning module -> its own parameter names outside the blocks
    for n in alias:
        if n not in in_block and alias[n] not in skip:
            outside.setdefault(n.rpartition(".")[0], []).append(n)
    fill([n for names_ in outside.values() for n in names_])
    ran: set[str] = set()
    for n, b in list(model.named_buffers()):  # persistent buffers the checkpoint holds
        if n in have:
            _set_tensor(model, n, load(n), buffer=True)
        elif b.device.type != "meta" and str(device) != "cpu":
            _set_tensor(model, n, b.to(device), buffer=True)

    with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
        probes = [_capture.make_probe(model, n_samples, seed=s) for s in seeds]  # each (B_s, T)
    totals = [p.numel() for p in probes]
    offsets = np.cumsum([0, *totals[:-1]])
    selections = [torch.as_tensor(np.sort(np.random.default_rng(s).choice(t, size=n_samples, replace=False)) + o)
                  for s, t, o in zip(seeds, totals, offsets)]
    T = max(p.shape[1] for p in probes)
    if any(p.shape[1] != T for p in probes):
        raise CaptureError("probes of different lengths cannot share a pass")
    inputs = torch.cat(probes).to(device)  # (sum B_s, T)

    rows: list[list[dict]] = [[] for _ in seeds]
    last = len(mods) - 1

    def materialise(i: int):
        def pre_hook(module, args, kwargs):
            for owner in ran:
                empty(outside[owner])
            ran.clear()
            fill(block_names[i])
            left = next((n for n, q in module.named_parameters(remove_duplicate=False) if q.device.type == "meta"), None)
            if left is not None:  # a meta weight would give garbage, not an error: refuse
                raise CaptureError(f"block {names[i]}: its parameter {left} was not loaded from the checkpoint")
        return pre_hook

    def reload(owner: str):
        def pre_hook(module, args):
            if any(model.get_parameter(n).device.type == "meta" for n in outside[owner]):
                fill(outside[owner])
        return pre_hook

    def mark(owner: str):
        def hook(module, args, output):
            ran.add(owner)
        return hook

    def take(i: int):
        def hook(module, args, kwargs, output):
            xf, yf, keep = _capture.block_states(names[i], args, kwargs, output)  # (B*T, d) each
            for k, (s, sel) in enumerate(zip(seeds, selections)):
                X = xf[sel.to(xf.device)].to(keep).cpu().T.double().numpy()  # (d, N)
                Y = yf[sel.to(yf.device)].to(keep).cpu().T.double().numpy()  # (d, N)
                _capture.check_finite(names[i], X, Y)
                with threadpool_limits(limits=1, user_api="blas"):  # numpy's BLAS threads fight torch's otherwise
                    row = layer_stats(X, Y, rank=rank, seed=s, kreiss_grid=kreiss_grid)
                rows[k].append(dict(layer=i, name=names[i], **row))
            empty(block_names[i])  # back to meta: the block's memory is freed
            _release_freed_memory()
            if progress is not None:
                progress("blocks", i + 1, len(mods))
            if i == last:
                raise _capture._StopForward
        return hook

    handles = []
    for owner in outside:
        if owner in embedding:  # embeddings run before the blocks; everything else stays loaded
            mod = model.get_submodule(owner)
            handles += [mod.register_forward_pre_hook(reload(owner)), mod.register_forward_hook(mark(owner))]
    for i, m in enumerate(mods):
        handles.append(m.register_forward_pre_hook(materialise(i), with_kwargs=True))
        handles.append(m.register_forward_hook(take(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):  # a model drawing random numbers leaves the caller's RNG alone
            torch.default_generator.manual_seed(seeds[0])  # the CPU generator only: CUDA's are not restored
            model(inputs, **_forward_kwargs(model))
    except _capture._StopForward:
        pass
    except CaptureError:
        raise
    except NotImplementedError as e:  # a meta tensor reached an operation: a weight was never loaded
        raise CaptureError(f"a weight the forward pass needs was not loaded ({str(e).splitlines()[0][:160]})") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        empty([n for n, q in model.named_parameters(remove_duplicate=False) if q.device.type != "meta"])
        _release_freed_memory()
    if any(len(r) != len(mods) for r in rows):
        raise CaptureError("not every block was called in the forward pass")
    width = _capture_width(model)
    return [SpectralProfile.from_rows(r, meta=dict(blocks=container, n_samples=n_samples, seed=s, rank=rank,
                                                   width=width, streamed=True, compute_dtype=str(dtype).removeprefix("torch.")))
            for r, s in zip(rows, seeds)]
