"""Profiling a Hugging Face checkpoint too big for memory: choose the path, estimate, stream.

``featurize.stream.stream_profile`` does the work on a meta-device skeleton and a weight source;
this module opens the directory (``loading.open_streaming``), decides whether to stream
(``should_stream``: automatic above ``AUTO_STREAM_BYTES`` of float32 weights), works out the cost
before anything heavy runs and refuses, with the estimate, a run that will not fit in memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ResourceError, UsageError

__all__ = ["AUTO_STREAM_BYTES", "StreamPlan", "check_device", "in_memory_bytes", "plan_stream", "should_stream"]

#: Float32 weights above this (bytes) are streamed block by block when the path is not chosen.
AUTO_STREAM_BYTES = 256 * 2**20


def check_device(device: str) -> str:
    """``device`` if torch can use it here (``cpu``, ``cuda``, ``cuda:N``), else one clear error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    return str(dev)


def in_memory_bytes(path: str | Path) -> int | None:
    """Float32 bytes of the weights of a Hugging Face directory (headers only), None for other models."""
    from .checkpoint import open_checkpoint
    from .loading import _import_transformers, is_hf_dir

    if not is_hf_dir(path):
        return None
    _import_transformers(path)  # a model directory needs the extra 'hf': say so before anything else
    ckpt = open_checkpoint(path)
    return 4 * sum(math.prod(ckpt.shape(n)) for n in ckpt.names())


def should_stream(path: str | Path, low_memory: bool | None, size: int | None) -> bool:
    """Stream when asked (``low_memory=True``), or, unset, for Hugging Face directories whose float32
    weights (``size``, from ``in_memory_bytes``) exceed ``AUTO_STREAM_BYTES``. ``low_memory=True`` on
    any other model is a usage error."""
    if low_memory and size is None:
        raise UsageError(f"{path}: --low-memory streams Hugging Face model directories only")
    if low_memory is None:
        return size is not None and size > AUTO_STREAM_BYTES
    return bool(low_memory)


def check_in_memory(path: str | Path, size: int | None) -> None:
    """Refuse, before loading, a Hugging Face model whose float32 weights (``size``, from
    ``in_memory_bytes``) exceed the memory available."""
    from featurize.capture import available_memory

    free = available_memory()
    if size is not None and free is not None and 2 * size > free:
        raise ResourceError(
            f"{path}: loading it whole needs about {2 * size / 1e9:.1f} GB (float32 weights and their copy), "
            f"more than the {free / 1e9:.1f} GB available: use --low-memory to stream it block by block"
        )


@dataclass
class StreamPlan:
    """An opened checkpoint, ready to stream, with its cost.

    Attributes
    ----------
    model : nn.Module on the meta device
    checkpoint : risk_model.checkpoint.Checkpoint
    skip : set of str, the output head's parameters
    estimate : featurize.stream.StreamEstimate
    """

    path: Path
    model: object
    checkpoint: object
    skip: set
    estimate: object

    def describe(self) -> str:
        ck = self.checkpoint
        return (f"streaming {self.estimate.n_blocks} blocks from {len(ck.files)} file(s) "
                f"({ck.dtype}, {ck.total_bytes / 1e9:.2f} GB): {self.estimate.describe()}")


def plan_stream(path: str | Path, *, blocks: str | None = None, n_samples: int = 2048, n_seeds: int = 1,
                rank: int | None = 32, device: str = "cpu") -> StreamPlan:
    """Open ``path`` for streaming and estimate the run; refuse it if the estimate exceeds the memory
    available now (``ResourceError`` with the estimate)."""
    from featurize.capture import available_memory
    from featurize.stream import estimate_stream

    from .loading import open_streaming

    model, ckpt, skip = open_streaming(path)
    est = estimate_stream(model, ckpt, blocks=blocks, n_samples=n_samples, n_seeds=n_seeds, rank=rank,
                          device=device, skip=skip)
    free = available_memory()
    if free is not None and est.peak_bytes > free:
        raise ResourceError(
            f"{path}: streaming needs about {est.peak_bytes / 1e9:.1f} GB of memory and {free / 1e9:.1f} GB "
            "are available: lower --n-samples or --probe-seeds"
        )
    return StreamPlan(Path(path), model, ckpt, skip, est)


def run_stream(plan: StreamPlan, *, seeds, blocks: str | None = None, n_samples: int = 2048,
               rank: int | None = 32, kreiss_grid=None, device: str = "cpu", progress=None) -> list:
    """The profiles of ``plan``'s model, one per probe seed (``featurize.stream.stream_profile``)."""
    from featurize.stream import stream_profile

    profs = stream_profile(plan.model, plan.checkpoint, blocks=blocks, n_samples=n_samples, seeds=seeds,
                           rank=rank, kreiss_grid=kreiss_grid, device=device, skip=plan.skip, progress=progress)
    for p in profs:
        p.meta["checkpoint_dtype"] = plan.checkpoint.dtype
    return profs
