"""Find the residual blocks of any ``nn.Module``, build probe inputs, collect snapshot pairs.

One forward pass with hooks on every block gives, per block ``l``, the token states entering it
(``X_l``) and leaving it (``Y_l``). The hooks keep only the ``N`` sampled token states as they go,
so memory stays at ``N × d`` per layer whatever the probe size (DESIGN §2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


class CaptureError(ValueError):
    """The model cannot be profiled as given (no blocks, bad probe, non-finite activations)."""


_LEAF_TYPES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Dropout, nn.Identity)


def _is_block_like(m: nn.Module) -> bool:
    """A composite module (one with children) or a parameter block (``_is_parameter_block``)."""
    if isinstance(m, _LEAF_TYPES):
        return False
    return any(True for _ in m.children()) or _is_parameter_block(m)


def _is_parameter_block(m: nn.Module) -> bool:
    """A hand-written block: parameters or buffers of its own and no child modules (torch's own
    layers, nn.Linear, nn.Conv1d, nn.RMSNorm, …, are not blocks)."""
    if any(True for _ in m.children()) or type(m).__module__.startswith("torch."):
        return False
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError as e:
        raise CaptureError(f"no submodule named {name!r} in {type(model).__name__}") from e


def _candidates(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Every ``nn.ModuleList``/``nn.Sequential`` with its longest run of consecutive same-class,
    block-like children."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        run: list[nn.Module] = []
        best_run: list[nn.Module] = []
        for c in mod.children():
            if run and type(c) is type(run[-1]) and _is_block_like(c):
                run.append(c)
            else:
                run = [c] if _is_block_like(c) else []
            if len(run) > len(best_run):
                best_run = list(run)
        if best_run:
            out.append((name, best_run))
    return out


@torch.no_grad()
def _shape_preserving(model: nn.Module, candidates: list, probe: torch.Tensor) -> list[bool] | None:
    """Per candidate: whether each of its blocks was called by ``model(probe)`` and gave back the
    shape it was given. None when the forward pass fails (nothing is learned then)."""
    seen: dict[int, bool] = {}
    blocks = {id(b): b for _, run in candidates for b in run}

    def hook(module, args, kwargs, output):
        if id(module) not in seen:
            x, y = _block_io(args, kwargs, output)
            seen[id(module)] = x is not None and y is not None and x.shape == y.shape
        if len(seen) == len(blocks):
            raise _StopForward

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks.values()]
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.random.fork_rng(devices=[]):
            model(probe.to(device))
    except _StopForward:
        pass
    except (RuntimeError, ValueError, IndexError, TypeError):  # the model refused the probe: no shape information
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [all(seen.get(id(b), False) for b in run) for _, run in candidates]


def find_blocks(model: nn.Module, blocks: str | None = None, *,
                probe: torch.Tensor | None = None) -> tuple[str, list[nn.Module]]:
    """The residual blocks of ``model`` and the dotted name of their container.

    Automatic discovery picks, among ``nn.ModuleList``/``nn.Sequential`` containers, the longest
    run of consecutive children of one class that are blocks: composite modules, or hand-written
    modules that hold parameters or buffers but no child modules (raw ``nn.Parameter`` weights;
    torch's own layers such as ``nn.Linear`` are not blocks). The shallowest container wins (so
    experts inside a block or heads inside attention never beat the block list), then the longest,
    then one of composite blocks. With ``probe`` (an input the model takes, e.g. one example) and
    more than one candidate, one forward pass checks each candidate's blocks, and containers whose
    blocks are all called and map the stream to the same shape win over the others. Works for our
    zoo (``blocks``), nanoGPT and HF GPT-2 (``transformer.h``), HF Llama (``model.layers``) and an
    ``nn.Sequential`` of blocks.

    Parameters
    ----------
    model : nn.Module
    blocks : str, optional
        Dotted name of the container to use instead (e.g. ``"transformer.h"``).
    probe : Tensor, optional
        Model input for the shape check (a single example is enough).

    Returns
    -------
    (name, list of modules)

    Raises
    ------
    CaptureError : no candidate container; or, with ``probe``, none whose blocks keep the shape
    """
    if blocks is not None:
        container = _get_submodule(model, blocks)
        children = list(container.children())
        if not children:
            raise CaptureError(f"{blocks!r} has no child modules to use as blocks")
        return blocks, children
    found = _candidates(model)
    if not found:
        raise CaptureError(
            f"no residual blocks found in {type(model).__name__}: "
            "name the container of the blocks with --blocks (e.g. transformer.h)"
        )
    keys = [(-(name.count(".") + (1 if name else 0)), len(run), not _is_parameter_block(run[0]))
            for name, run in found]
    if probe is not None and len(found) > 1:
        ok = _shape_preserving(model, found, probe)
        if ok is not None:
            if not any(ok):
                raise CaptureError(
                    f"no container of blocks in {type(model).__name__} maps the residual stream to the same shape "
                    f"(candidates: {', '.join(name or '<model>' for name, _ in found)}): "
                    "name the container of the blocks with --blocks"
                )
            keys = [(o, *k) for o, k in zip(ok, keys)]
    best = max(range(len(found)), key=lambda i: keys[i])  # the first of equals, as named_modules lists them
    return found[best]


def discover_blocks(model: nn.Module, blocks: str | None = None, *, inputs: torch.Tensor | None = None,
                    input_shape: tuple[int, ...] | None = None, seed: int = 0) -> tuple[str, list[nn.Module]]:
    """``find_blocks`` with the shape check on one example of the probe: the first example of
    ``inputs``, else of ``make_probe(model, seed=seed, input_shape=input_shape)`` (no check when
    neither can be had; the capture's hook still refuses a block that changes the shape)."""
    name, mods = find_blocks(model, blocks)
    if blocks is not None or len(_candidates(model)) < 2:
        return name, mods
    try:
        probe = inputs[:1] if inputs is not None else make_probe(model, 1, seed=seed, input_shape=input_shape)[:1]
    except CaptureError:
        return name, mods
    return find_blocks(model, probe=probe)


class _StopForward(Exception):
    """Raised by the last block's hook: nothing after the blocks (e.g. an LM head) needs computing."""


@dataclass
class Snapshots:
    """Snapshot pairs of every block: ``X[l], Y[l]`` of shape (d, N)."""

    names: list[str]
    X: list[np.ndarray]
    Y: list[np.ndarray]


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj:
        return _first_tensor(obj[0])
    if isinstance(obj, dict):
        for key in ("hidden_states", "last_hidden_state", "x", "h"):
            if key in obj:
                return _first_tensor(obj[key])
    if hasattr(obj, "last_hidden_state"):
        return obj.last_hidden_state
    return None


def _block_io(args, kwargs, output) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The stream tensor a block was given (first positional argument, else ``hidden_states``) and
    the one it returned, from a forward hook's arguments; None where there is none."""
    x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
    return _first_tensor(x), _first_tensor(output)


def _zero_first(output):
    """``output`` with its first tensor (the branch's contribution to the stream) set to zero."""
    if isinstance(output, torch.Tensor):
        return torch.zeros_like(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (torch.zeros_like(output[0]), *output[1:])
    return None


def residual_stages(block: nn.Module, args: tuple, kwargs: dict) -> float:
    """How many residual branches of ``block`` run one after another (serial stages): 2 for a
    pre- or post-LN block (attention, then the MLP on the updated stream), 1 for a parallel block
    (attention and MLP both read the block's input: GPT-J, GPT-NeoX with parallel residual, Phi,
    Falcon) or a block with a single mixer (Mamba).

    Measured, not read off names: the block's direct children that hold a matrix (≥ 2-D
    parameter) and read a tensor of the stream's width are its branches, in call order (an MLP
    whose two matrices are direct children, as in OPT, is one branch: its second matrix reads the
    hidden width). The block is run on ``args, kwargs`` (its captured
    inputs) once as is, then once per later branch with the outputs of all earlier ones zeroed; a
    branch whose input changes depends on an earlier one and starts a new stage. Runs without
    gradients; the caller sets eval mode. Returns NaN when a branch's output cannot be zeroed or
    the block does not run on its inputs again.
    """
    branches = [m for m in block.children() if any(p.dim() >= 2 for p in m.parameters())]
    # a key/value cache from the captured call would grow with every re-run: run without one
    kwargs = {k: (False if k == "use_cache" else None if ("past" in k or k.endswith("cache")) else v)
              for k, v in kwargs.items()}
    order: list[nn.Module] = []
    seen: dict[int, torch.Tensor] = {}

    def record(store):
        def pre(m, a, kw):
            x = _block_io(a, kw, None)[0]
            if id(m) not in store and isinstance(x, torch.Tensor):
                store[id(m)] = x.detach().clone()
                if store is seen:
                    order.append(m)
        return pre

    class _NotZeroable(Exception):
        pass

    def zero(_m, _a, out):
        z = _zero_first(out)
        if z is None:
            raise _NotZeroable
        return z

    def run(store, zeroed=()):
        hs = [m.register_forward_pre_hook(record(store), with_kwargs=True) for m in branches]
        hs += [m.register_forward_hook(zero) for m in zeroed]
        try:
            with torch.no_grad():
                block(*args, **kwargs)
        finally:
            for h in hs:
                h.remove()

    try:
        run(seen)
        stream = _block_io(args, kwargs, None)[0]
        if not isinstance(stream, torch.Tensor):
            return math.nan
        # a branch reads the stream (width d); a layer inside one (an MLP's second matrix, on the
        # hidden width) does not start a stage of its own
        order[:] = [m for m in order if seen[id(m)].shape[-1] == stream.shape[-1]]
        stages = 1
        for k in range(1, len(order)):
            after: dict[int, torch.Tensor] = {}
            run(after, zeroed=order[:k])
            x0, x1 = seen[id(order[k])], after.get(id(order[k]))
            if x1 is None or x1.shape != x0.shape:
                return math.nan
            stages += int(not torch.equal(x0, x1))
    except Exception:  # noqa: BLE001 - a block that cannot be re-run on its inputs: unknown
        return math.nan
    return float(stages)


def block_states(name: str, args, kwargs, output) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """The token states entering and leaving a block, from a forward hook's ``args, kwargs, output``.

    Returns
    -------
    (x, y, keep): x, y of shape (b*T, d), as computed; ``keep`` the dtype to store them in (half
    precision widened to float32, float64 kept).

    Raises
    ------
    CaptureError : the block takes or returns no tensor, or changes the stream's shape
    """
    x, y = _block_io(args, kwargs, output)
    if x is None or y is None:
        raise CaptureError(f"block {name} takes or returns no tensor")
    if x.shape != y.shape:
        raise CaptureError(
            f"block {name} maps shape {tuple(x.shape)} to {tuple(y.shape)}: "
            "not a residual block; name the right container with --blocks"
        )
    xf = x.reshape(-1, x.shape[-1]).detach()  # (b*T, d)
    yf = y.reshape(-1, y.shape[-1]).detach()  # (b*T, d)
    return xf, yf, torch.promote_types(xf.dtype, torch.float32)


def check_finite(name: str, X: np.ndarray, Y: np.ndarray) -> None:
    """Refuse one block's snapshots holding NaN or inf (the network overflows at initialization)."""
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise CaptureError(
            f"non-finite activations at initialization in block {name}: "
            "the network already overflows; check its init scale"
        )


def context_length(model: nn.Module) -> int | None:
    """The context length a model declares in its config (n_positions, max_position_embeddings, …)."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "block_size", "seq_len", "n_ctx"):
        val = getattr(cfg, key, None) if cfg is not None else None
        if val is None and isinstance(cfg, dict):
            val = cfg.get(key)
        if isinstance(val, int) and val > 0:
            return val
    return None


def declared_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The per-example input shape a model declares as ``model.input_shape``, or None."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, (tuple, list)) and shape and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        return tuple(shape)
    return None


def make_probe(
    model: nn.Module,
    n_samples: int = 2048,
    *,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Probe inputs for one forward pass, seeded.

    Token ids uniform over the vocabulary of the model's first ``nn.Embedding`` when it has one,
    otherwise standard Gaussian inputs of ``input_shape`` (per example, without the batch axis),
    which defaults to the shape the model declares in an ``input_shape`` attribute (a tuple of
    positive ints, as the zoo's vision transformer does). Enough examples are drawn to hold
    ``n_samples`` token states.

    Returns
    -------
    Tensor of shape (B, T) (token ids) or (B, *input_shape)
    """
    gen = torch.Generator().manual_seed(seed)
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if input_shape is None and emb is not None:
        ctx = context_length(model)
        T = seq_len or min(64, ctx) if ctx else (seq_len or 64)
        B = math.ceil(n_samples / T)
        return torch.randint(0, emb.num_embeddings, (B, T), generator=gen)
    if input_shape is None:
        input_shape = declared_input_shape(model)
    if input_shape is None:
        raise CaptureError(
            f"{type(model).__name__} has no nn.Embedding: give the input shape (--input-shape) "
            "or a tensor file of probe inputs (--inputs)"
        )
    per_example = int(np.prod(input_shape[:-1])) if len(input_shape) > 1 else 1
    B = math.ceil(n_samples / per_example)
    return torch.randn((B, *input_shape), generator=gen)


def capture_bytes(n_samples: int, width: int, n_layers: int, probe_values: int = 0) -> int:
    """Peak memory (bytes) of capturing and profiling ``n_samples`` token states of width ``width``
    in each of ``n_layers`` blocks.

    Per layer the hooks keep ``X`` and ``Y`` (N × d) in float32 and copy them to float64 (d × N)
    after the pass: 2·L·N·d·(4 + 8) bytes. The DMD of one layer then needs about three more
    float64 copies of a d × N matrix (centring, whitening, projections). ``probe_values`` counts the
    probe tensor's values (8 bytes each at most).
    """
    per_state = 2 * n_layers * width * (4 + 8) + 3 * width * 8
    return int(n_samples) * per_state + 8 * int(probe_values)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` of /proc/meminfo), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_capture_memory(model: nn.Module, n_samples: int, n_layers: int, *,
                         input_shape: tuple[int, ...] | None = None, inputs: torch.Tensor | None = None) -> None:
    """Refuse, before any work, a capture that will not fit in memory.

    The residual width is taken from the first ``nn.Embedding`` (else the last axis of the inputs);
    the estimate is ``capture_bytes``; the limit is the memory available now.

    Raises
    ------
    CaptureError : one line with the estimate and the limit
    """
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is not None:
        width = emb.embedding_dim
    elif inputs is not None and inputs.ndim >= 2:
        width = int(inputs.shape[-1])
    elif input_shape:
        width = int(input_shape[-1])
    else:
        return
    probe = n_samples if emb is not None else n_samples * width
    need = capture_bytes(n_samples, width, n_layers, probe_values=probe)
    limit = available_memory()
    if limit is not None and need > limit:
        raise CaptureError(
            f"n_samples={n_samples} needs about {need / 1e9:.1f} GB to profile ({n_layers} blocks of width {width}), "
            f"more than the {limit / 1e9:.1f} GB of memory available: lower --n-samples"
        )


def load_probe(path: str | Path) -> torch.Tensor:
    """A probe tensor saved with ``torch.save`` (loaded with ``weights_only=True``)."""
    try:
        t = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CaptureError(f"cannot read probe tensor file {path}: {e.__class__.__name__}") from e
    if isinstance(t, dict) and len(t) == 1:
        t = next(iter(t.values()))
    if not isinstance(t, torch.Tensor):
        raise CaptureError(f"{path} does not hold a tensor (got {type(t).__name__})")
    return t


@torch.no_grad()
def collect_snapshots(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    blocks: str | None = None,
    n_samples: int = 2048,
    seed: int = 0,
    batch_size: int = 16,
    progress=None,
) -> Snapshots:
    """Run ``inputs`` through ``model`` in micro-batches and keep ``n_samples`` token states per block.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor of shape (B, T, ...) or (B, T)
    blocks : str, optional
        Dotted name of the block container; discovered when omitted.
    n_samples : int
        Token states kept per layer, drawn uniformly without replacement from batch × positions.
    progress : callable, optional
        Called with the number of examples done after each micro-batch.

    Returns
    -------
    Snapshots with ``X[l], Y[l]`` of shape (d, N).
    """
    return collect_snapshots_seeds(model, [inputs], [seed], blocks=blocks, n_samples=n_samples,
                                   batch_size=batch_size, progress=progress)[0]


@torch.no_grad()
def _measured_states_per_example(model: nn.Module, first_block: nn.Module, example: torch.Tensor,
                                 device) -> int | None:
    """Token states the first block sees for one example (B = 1), from a forward pass stopped
    there; None when the pass fails (the capture then reports it)."""
    seen: list[int] = []

    def hook(module, args, kwargs, output):
        x, _ = _block_io(args, kwargs, output)
        if x is not None:
            seen.append(int(x.reshape(-1, x.shape[-1]).shape[0]))
        raise _StopForward

    handle = first_block.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.random.fork_rng(devices=[]):
            model(example.to(device))
    except _StopForward:
        pass
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    finally:
        handle.remove()
    return seen[0] if seen else None


def _states_per_example(inputs: torch.Tensor) -> int:
    """Token states one example of ``inputs`` gives: T for token ids (B, T) or features
    (B, T, d_in), 1 for feature vectors (B, d_in)."""
    tokens_per_example = int(np.prod(inputs.shape[1:2])) if inputs.ndim >= 2 else 1
    if inputs.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16) and inputs.ndim == 2:
        tokens_per_example = 1
    return tokens_per_example


@torch.no_grad()
def collect_snapshots_seeds(
    model: nn.Module,
    probes: list[torch.Tensor],
    seeds: list[int],
    *,
    blocks: "str | list[nn.Module] | None" = None,
    n_samples: int = 2048,
    batch_size: int = 16,
    progress=None,
) -> list[Snapshots]:
    """``collect_snapshots(model, probes[k], seed=seeds[k])`` for every k, from one forward pass.

    The probes (one per seed, of one shape, or the same tensor for every seed) are run together,
    concatenated along the batch axis, in micro-batches of ``batch_size`` examples; each seed keeps
    the token states of its own probe that ``collect_snapshots`` would draw for it, in the same
    order, so the snapshots are the same. ``blocks``: the container's dotted name, the block
    modules themselves, or None to discover them (``find_blocks``, shape-checked on one example).

    Returns
    -------
    list of Snapshots, one per seed, with ``X[l], Y[l]`` of shape (d, N).
    """
    if n_samples < 2:
        raise CaptureError(f"n_samples must be at least 2, got {n_samples}")
    if len(probes) != len(seeds) or not seeds:
        raise ValueError(f"need one probe per seed, got {len(probes)} probes and {len(seeds)} seeds")
    if isinstance(blocks, (list, tuple)):
        mods = list(blocks)
    else:
        _, mods = find_blocks(model, blocks, probe=None if blocks is not None else probes[0][:1])
    names = [f"{type(m).__name__}[{i}]" for i, m in enumerate(mods)]
    shared = all(p is probes[0] for p in probes)
    if not shared and any(p.shape[1:] != probes[0].shape[1:] or p.dtype != probes[0].dtype for p in probes):
        raise ValueError("the probes of one pass need one per-example shape and dtype")
    inputs = probes[0] if shared else torch.cat(probes)  # (sum B, T, ...)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # probe goes where the model is
    tokens_per_example = _states_per_example(inputs)
    if inputs.is_floating_point() and inputs.ndim >= 3:
        # feature inputs (B, *shape): the tokens per example are the model's (a ViT cuts an 8×8
        # image into 16 patches); token ids (B, T) give T states each, as assumed
        was_training = model.training
        model.eval()
        try:
            tokens_per_example = _measured_states_per_example(model, mods[0], inputs[:1], device) \
                or tokens_per_example
        finally:
            model.train(was_training)
    chosen = []  # per seed: sorted indices into the flat token states of `inputs`
    offset = 0
    for probe, seed in zip(probes, seeds):
        total = probe.shape[0] * tokens_per_example
        if total < n_samples:
            raise CaptureError(f"probe holds {total} token states, fewer than n_samples={n_samples}")
        rng = np.random.default_rng(seed)
        chosen.append(np.sort(rng.choice(total, size=n_samples, replace=False)) + offset)
        offset += 0 if shared else total
    B = inputs.shape[0]

    store_x: list[list[list[torch.Tensor]]] = [[[] for _ in mods] for _ in seeds]  # [seed][layer]
    store_y: list[list[list[torch.Tensor]]] = [[[] for _ in mods] for _ in seeds]
    state = {"sel": [], "seen": set()}
    last = len(mods) - 1

    def make_hook(i: int):
        def hook(module, args, kwargs, output):
            xf, yf, keep = block_states(names[i], args, kwargs, output)  # (b*T, d) each
            for k, sel in state["sel"]:
                store_x[k][i].append(xf[sel].to(keep).cpu())  # float64 per layer at the end
                store_y[k][i].append(yf[sel].to(keep).cpu())
            state["seen"].add(i)
            if i == last and len(state["seen"]) == len(mods):
                raise _StopForward

        return hook

    handles = [m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(mods)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, B, batch_size):
            stop = min(B, start + batch_size)
            lo, hi = start * tokens_per_example, stop * tokens_per_example
            sels = [(k, c[(c >= lo) & (c < hi)] - lo) for k, c in enumerate(chosen)]
            sels = [(k, torch.as_tensor(idx)) for k, idx in sels if idx.size]
            if not sels:
                continue
            state["sel"] = sels
            state["seen"] = set()
            try:
                model(inputs[start:stop].to(device))
            except _StopForward:
                pass
            except CaptureError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as e:  # the model refused the probe
                first = (str(e).splitlines() or [e.__class__.__name__])[0][:160]
                raise CaptureError(
                    f"the forward pass of {type(model).__name__} failed on probe inputs of shape "
                    f"{tuple(inputs.shape[1:])} per example ({e.__class__.__name__}: {first}): give the shape "
                    "the model takes with --input-shape (without the batch axis), or probe inputs with --inputs"
                ) from e
            if progress is not None:
                progress(stop)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for k in range(len(seeds)):
        X, Y = [], []
        for i, name in enumerate(names):
            if not store_x[k][i]:
                raise CaptureError(f"block {name} was never called in the forward pass")
            x = torch.cat(store_x[k][i]).T.double().numpy()  # (d, N)
            y = torch.cat(store_y[k][i]).T.double().numpy()  # (d, N)
            check_finite(name, x, y)
            X.append(x)
            Y.append(y)
        out.append(Snapshots(names=names, X=X, Y=Y))
    return out
