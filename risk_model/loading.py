"""Model files → ``nn.Module`` (DESIGN §6), safe by default.

Accepted:
- a zoo checkpoint: a dict ``{"model_args": {...}, "state_dict": {...}}`` read with
  ``torch.load(weights_only=True)``;
- a Hugging Face model directory (``config.json`` + ``*.safetensors``, single or sharded with
  ``model.safetensors.index.json``, or ``pytorch_model.bin``), built with ``transformers`` from the
  config in float32, weights loaded without pickle (``risk_model.checkpoint``); ``open_streaming``
  gives the same model on the meta device with its weight source, for ``featurize.stream``;
- a PEFT LoRA adapter directory over a local base model directory: the base with the adapter merged;
- a whole pickled ``nn.Module`` (``torch.save(model)``) only with ``trust_pickle=True``: loading it
  runs arbitrary code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


from .checkpoint import Checkpoint, _torch_load, open_checkpoint
from .errors import ModelLoadError

__all__ = ["Checkpoint", "ModelLoadError", "is_hf_dir", "load_model", "open_checkpoint", "open_streaming"]


def _strip_compile_prefix(sd: dict) -> dict:
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def _import_transformers(path: Path):
    try:
        import transformers
    except ImportError as e:
        from .errors import install_hint

        raise ModelLoadError(
            f"{path} is a Hugging Face model directory, which needs transformers, the optional extra 'hf': "
            f"{install_hint('hf')}"
        ) from e
    return transformers


def _hf_config(path: Path):
    transformers = _import_transformers(path)
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ModelLoadError(f"{path}: cannot read config.json ({e.__class__.__name__}: {e})") from e


def _build_hf(path: Path, config, *, empty: bool) -> nn.Module:
    """The causal LM of ``config`` in float32 (whatever its ``torch_dtype``); ``empty``: parameters
    on the meta device, buffers real (nothing allocated for the weights)."""
    transformers = _import_transformers(path)
    import contextlib

    ctx = contextlib.nullcontext()
    if empty:
        try:
            from accelerate import init_empty_weights
        except ImportError as e:
            from .errors import install_hint

            raise ModelLoadError(f"streaming a Hugging Face model needs accelerate, in the extra 'hf': "
                                 f"{install_hint('hf')}") from e
        ctx = init_empty_weights(include_buffers=False)
    try:
        with ctx:
            return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ModelLoadError(f"{path}: cannot build a model from config.json ({e.__class__.__name__}: {e})") from e


def _skip_names(model: nn.Module) -> set[str]:
    """Names of the output head's parameters (e.g. ``lm_head.weight``): not needed for the residual
    stream, and tied to the input embedding or absent in many checkpoints."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    if prefix is None:
        return set()
    return {f"{prefix}.{n}" if prefix else n for n, _ in head.named_parameters(remove_duplicate=False)}


def _matched(path: Path, ckpt, model: nn.Module) -> set[str]:
    """Check the checkpoint against the model built from config.json, before any weight is read:
    every parameter but the output head's present, every stored shape the model's. Returns the
    output head's parameter names."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    ckpt.expect(names + [n for n, _ in model.named_buffers()], getattr(model, "base_model_prefix", ""))
    skip = _skip_names(model)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in ckpt and n not in skip]
    if missing:
        raise ModelLoadError(
            f"{path}: weights do not match config.json ({len(missing)} missing, e.g. {missing[0]})"
        )
    for n, p in [*params.items(), *model.named_buffers()]:
        if n in ckpt and tuple(ckpt.shape(n)) != tuple(p.shape):
            raise ModelLoadError(f"{ckpt.file_of(n)}: tensor {n} has shape {tuple(ckpt.shape(n))}, "
                                 f"config.json gives {tuple(p.shape)}")
    return skip


def _load_hf_dir(path: Path) -> nn.Module:
    """A Hugging Face directory (or a PEFT adapter directory over a local base) as a float32 model."""
    _import_transformers(path)
    ckpt = open_checkpoint(path)
    model = _build_hf(ckpt.model_dir, _hf_config(ckpt.model_dir), empty=False)
    _matched(path, ckpt, model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ckpt:
                p.copy_(ckpt.get(n))
        for n, b in model.named_buffers():
            if n in ckpt:
                b.copy_(ckpt.get(n))
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # as the config says (a tied head follows the loaded embedding)
    return model


def open_streaming(path: str | Path) -> tuple[nn.Module, "Checkpoint", set[str]]:
    """A Hugging Face directory for ``featurize.stream.stream_profile``: the model built on the meta
    device, its weight source (checked against the model: names and shapes) and the names of the
    output head's parameters (never needed)."""
    ckpt = open_checkpoint(Path(path))
    model = _build_hf(ckpt.model_dir, _hf_config(ckpt.model_dir), empty=True)
    return model, ckpt, _matched(Path(path), ckpt, model)


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json) or a PEFT adapter directory (adapter_config.json)."""
    path = Path(path)
    return path.is_dir() and ((path / "config.json").exists() or (path / "adapter_config.json").exists())


EXAMPLE_PREFIX = "example"
#: Built-in example networks: ``example`` (pre-LN) or ``example:<norm>``, a zoo GPT with d=64, L=4.
EXAMPLE_NORMS = ("pre_ln", "post_ln", "rmsnorm", "deepnorm", "subln", "none")


def is_example_name(spec: str) -> bool:
    """True for exactly ``example`` or ``example:<anything>`` (an unknown norm is then an error):
    a mistyped path such as ``example_model.pt`` is never the built-in network."""
    return spec == EXAMPLE_PREFIX or spec.startswith(EXAMPLE_PREFIX + ":")


def example_model(spec: str = "example") -> nn.Module:
    """The built-in example network named by ``spec`` (``example`` or ``example:<norm>``), seeded."""
    norm = spec.split(":", 1)[1] if ":" in spec else "pre_ln"
    if norm not in EXAMPLE_NORMS:
        raise ModelLoadError(f"unknown example {spec!r}: use example or example:<norm> with norm in {', '.join(EXAMPLE_NORMS)}")
    from risk_model.zoo import build_model

    torch.manual_seed(0)
    return build_model(dict(family="gpt", norm=norm, d_model=64, n_layers=4, n_heads=4,
                            vocab_size=256, block_size=64))


def load_model(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a network for profiling from any supported format (see module docstring).

    Raises
    ------
    ModelLoadError
        One-line, user-facing reason and what to do.
    """
    path = Path(path)
    if not path.exists() and is_example_name(str(path)):
        return example_model(str(path))
    if not path.exists():
        hint = " (the built-in network is named exactly `example` or `example:<norm>`)" if (
            str(path).startswith(EXAMPLE_PREFIX)) else ""
        raise ModelLoadError(f"{path}: no such file or directory{hint}")
    if path.is_dir():
        if is_hf_dir(path):
            return _load_hf_dir(path)
        if (path / "MLmodel").exists():
            raise ModelLoadError(f"{path} is an MLflow model directory: use its models:/ URI with `risk score`")
        raise ModelLoadError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    if path.suffix == ".safetensors":
        cfg = path.with_name("config.json")
        if cfg.exists():
            return _load_hf_dir(path.parent)
        raise ModelLoadError(f"{path}: a safetensors file needs its config.json beside it")
    try:
        obj = _torch_load(path)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - weights_only refused a pickled object
        if not trust_pickle:
            raise ModelLoadError(
                f"{path} holds a pickled Python object (a whole nn.Module?); loading it can run arbitrary code: "
                "re-run with --trust-pickle if you trust its source, or save a state-dict checkpoint"
            ) from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise ModelLoadError(f"{path}: cannot unpickle ({e2.__class__.__name__}: {e2})") from e2
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and "state_dict" in obj and ("model_args" in obj or "config" in obj):
        args = obj.get("model_args", obj.get("config"))
        if isinstance(args, str):
            args = json.loads(args)
        from risk_model.zoo import build_model

        try:
            model = build_model(dict(args))
        except (TypeError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{path}: model_args do not describe a zoo model ({e})") from e
        try:
            model.load_state_dict(_strip_compile_prefix(obj["state_dict"]))
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ModelLoadError(f"{path}: state_dict does not match model_args ({first[:150]})") from e
        return model
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"{path} is a bare state_dict without model_args: save {{'model_args': ..., 'state_dict': ...}} "
            "or use a Hugging Face model directory"
        )
    raise ModelLoadError(f"{path} is not a model checkpoint (found {type(obj).__name__})")
