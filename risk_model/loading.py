"""Model files → ``nn.Module`` (DESIGN §6), safe by default.

Accepted:
- a zoo checkpoint: a dict ``{"model_args": {...}, "state_dict": {...}}`` read with
  ``torch.load(weights_only=True)``;
- a Hugging Face model directory (``config.json`` + ``*.safetensors`` or ``pytorch_model.bin``),
  built with ``transformers`` from the config, weights loaded without pickle;
- a whole pickled ``nn.Module`` (``torch.save(model)``) only with ``trust_pickle=True``: loading it
  runs arbitrary code.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn


from .errors import ModelLoadError

__all__ = ["ModelLoadError", "load_model"]


def _strip_compile_prefix(sd: dict) -> dict:
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def _load_hf_dir(path: Path) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        from .errors import install_hint

        raise ModelLoadError(
            f"{path} is a Hugging Face model directory, which needs transformers, the optional extra 'hf': "
            f"{install_hint('hf')}"
        ) from e
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ModelLoadError(f"{path}: cannot build a model from config.json ({e.__class__.__name__}: {e})") from e
    st_files = sorted(path.glob("*.safetensors"))
    if st_files:
        from safetensors.torch import load_file

        sd: dict = {}
        for f in st_files:
            try:
                sd.update(load_file(str(f)))
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"{f} is not a readable safetensors file ({e.__class__.__name__})") from e
    elif (path / "pytorch_model.bin").exists():
        sd = _torch_load(path / "pytorch_model.bin")
    else:
        raise ModelLoadError(f"{path} has config.json but no weights (*.safetensors or pytorch_model.bin)")
    missing, unexpected = model.load_state_dict(_strip_compile_prefix(sd), strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing:
        raise ModelLoadError(
            f"{path}: weights do not match config.json ({len(real_missing)} missing, e.g. {real_missing[0]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        if "Weights only load failed" in str(e):
            raise
        raise ModelLoadError(f"{path} is truncated or not a PyTorch file ({msg[:120]})") from e
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint ({e.__class__.__name__})") from e


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
        if (path / "config.json").exists():
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
