"""Weights of a Hugging Face model directory, read one tensor at a time and checked before any work.

``open_checkpoint(DIR)`` reads only the headers: the safetensors shards named by
``model.safetensors.index.json`` (or every ``*.safetensors`` of the directory, or one
``pytorch_model.bin``), or a PEFT LoRA adapter directory over a local base model. It refuses, with
one line naming the file, a shard missing from the index, a truncated shard and an index naming a
tensor its shard does not hold. ``Checkpoint.get(name)`` then reads one tensor (``_orig_mod.``
prefixes of ``torch.compile`` removed; for an adapter, the base weight with ``scaling · B @ A`` added in
float32), which is what ``featurize.stream`` needs to build one block at a time.
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path

import torch

from .errors import ModelLoadError

__all__ = ["Checkpoint", "open_checkpoint"]

INDEX = "model.safetensors.index.json"
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2"}


def _key(name: str) -> str:
    return name.removeprefix("_orig_mod.")


#: a safetensors header longer than this is taken for a corrupt length prefix
MAX_HEADER = 100 * 2**20


def _check_entry(file: Path, key: str, t) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, a byte range that holds it."""
    ok = (isinstance(t, dict) and t.get("dtype") in _DTYPES and isinstance(t.get("shape"), list)
          and all(isinstance(v, int) and v >= 0 for v in t["shape"])
          and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
          and all(isinstance(v, int) for v in t["data_offsets"]) and 0 <= t["data_offsets"][0] <= t["data_offsets"][1])
    if ok:
        numel = 1
        for v in t["shape"]:
            numel *= v
        itemsize = torch.empty((), dtype=getattr(torch, _DTYPES[t["dtype"]])).element_size()
        ok = t["data_offsets"][1] - t["data_offsets"][0] == numel * itemsize
    if not ok:
        raise ModelLoadError(f"{file}: corrupt safetensors header entry for tensor {key}")


def read_header(file: Path) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "data_offsets", "data_start"}}`` of one safetensors file,
    checked against the file's size (a truncated download fails here, naming the file)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise ModelLoadError(f"{file}: not a safetensors file (header length {n} bytes)")
            if n > size - 8:
                raise ModelLoadError(f"{file}: truncated safetensors file ({size} bytes, header says {n + 8} at least)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"{file}: cannot read ({e.strerror or e.__class__.__name__})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: not a safetensors file (unreadable header)") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    for key, t in header.items():
        _check_entry(file, key, t)
        t["data_start"] = 8 + n
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{file}: truncated safetensors file ({size} bytes, its tensors need {8 + n + end})")
    return header


def _torch_load(path: Path, *, mmap: bool = False):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        if "Weights only load failed" in str(e):
            raise
        raise ModelLoadError(f"{path} is truncated or not a PyTorch file ({msg[:120]})") from e
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint ({e.__class__.__name__})") from e


class Checkpoint:
    """Tensors of one model directory by name (see module docstring).

    Attributes
    ----------
    model_dir : Path
        The directory holding ``config.json`` (the base model's, for an adapter).
    dtype : str
        The stored dtype of most of the weights (``"bfloat16"``, ``"float32"``…).
    files : list of Path
        The weight files read.
    """

    def __init__(self, model_dir: Path, where: dict[str, tuple[Path, str]], sizes: dict[str, int],
                 dtypes: dict[str, str], files: list[Path], state_dict: dict | None = None,
                 info: dict[str, dict] | None = None):
        self.model_dir = model_dir
        self._where = where  # model name -> (file, key in file)
        self._sizes = sizes
        self._dtypes = dtypes
        self.files = files
        self._state_dict = state_dict
        self._info = info or {}  # model name -> safetensors header entry
        counts: dict[str, int] = {}
        for name, dt in dtypes.items():
            counts[dt] = counts.get(dt, 0) + sizes.get(name, 0)
        self.dtype = max(counts, key=counts.get) if counts else "float32"

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def nbytes(self, name: str) -> int:
        return self._sizes[name]

    def shape(self, name: str) -> tuple[int, ...]:
        file, key = self._where[name]
        if self._state_dict is not None:
            return tuple(self._state_dict[key].shape)
        return tuple(self._info[name]["shape"])

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def expect(self, names, prefix: str = "") -> None:
        """Also answer to the model's parameter ``names`` that the checkpoint stores without the
        model's ``prefix`` (a base-model checkpoint such as the Hub's GPT-2: ``h.0…`` for
        ``transformer.h.0…``)."""
        if not prefix:
            return
        for n in names:
            short = n.removeprefix(prefix + ".")
            if n not in self._where and short != n and short in self._where:
                for table in (self._where, self._sizes, self._dtypes, self._info):
                    if short in table:
                        table[n] = table[short]

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, read with plain file reads (no memory map, so the
        pages read do not stay in this process's memory)."""
        file, key = self._where[name]
        if self._state_dict is not None:
            return self._state_dict[key]
        info = self._info[name]
        begin, end = (int(v) for v in info["data_offsets"])
        dtype = getattr(torch, _DTYPES.get(info["dtype"], ""), None)
        if dtype is None:
            raise ModelLoadError(f"{file}: tensor {key} has dtype {info['dtype']}, which torch cannot hold")
        buf = bytearray(end - begin)
        try:
            with open(file, "rb") as f:
                f.seek(info["data_start"] + begin)
                got = f.readinto(buf)
        except OSError as e:
            raise ModelLoadError(f"{file}: cannot read ({e.strerror or e.__class__.__name__})") from e
        if got != len(buf):
            raise ModelLoadError(f"{file}: truncated while reading {key}")
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def _safetensors_dir(path: Path) -> Checkpoint:
    index = path / INDEX
    where: dict[str, tuple[Path, str]] = {}
    sizes: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    info: dict[str, dict] = {}
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index (no weight_map)") from e
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{f}: shard named in {INDEX} is missing")
        headers = {f: read_header(f) for f in files}
        for key, fname in weight_map.items():
            f = path / fname
            if key not in headers[f]:
                raise ModelLoadError(f"{index} names tensor {key} in {f.name}, which does not hold it")
        pairs = [(key, path / fname) for key, fname in weight_map.items()]
    else:
        files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter_model"))
        headers = {f: read_header(f) for f in files}
        pairs = [(key, f) for f in files for key in headers[f]]
    for key, f in pairs:
        t = headers[f][key]
        name = _key(key)
        where[name] = (f, key)
        info[name] = t
        sizes[name] = int(t["data_offsets"][1]) - int(t["data_offsets"][0])
        dtypes[name] = _DTYPES.get(t["dtype"], t["dtype"].lower())
    return Checkpoint(path, where, sizes, dtypes, files, info=info)


def _bin_dir(path: Path) -> Checkpoint:
    f = path / "pytorch_model.bin"
    try:
        sd = _torch_load(f, mmap=True)  # memory-mapped: tensors are read when used
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - weights_only refused an object
        raise ModelLoadError(f"{f} holds objects other than tensors; save the weights as safetensors") from e
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"{f} is not a state dict")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    where = {_key(k): (f, k) for k in sd}
    sizes = {_key(k): v.numel() * v.element_size() for k, v in sd.items()}
    dtypes = {_key(k): str(v.dtype).removeprefix("torch.") for k, v in sd.items()}
    return Checkpoint(path, where, sizes, dtypes, [f], state_dict=sd)


class _LoraCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter merged into the weights it targets, in float32."""

    def __init__(self, base: Checkpoint, adapter_dir: Path, deltas: dict[str, tuple], overrides: dict, files):
        self.__dict__.update(base.__dict__)
        self._base = base
        self.adapter_dir = adapter_dir
        self._deltas = deltas  # weight name -> (A, B, scaling, transpose)
        self._overrides = overrides  # weight name -> tensor (modules_to_save)
        self.files = [*base.files, *files]

    def get(self, name: str) -> torch.Tensor:
        if name in self._overrides:
            return self._overrides[name]
        t = self._base.get(name)
        if name not in self._deltas:
            return t
        A, B, scaling, transpose = self._deltas[name]
        delta = (B.float() @ A.float()) * scaling  # (out, in)
        return t.float() + (delta.T if transpose else delta)


def _adapter_dir(path: Path) -> Checkpoint:
    cfg_file = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_file}: not a readable adapter config") from e
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelLoadError(f"{cfg_file}: only LoRA adapters can be merged (peft_type {cfg.get('peft_type')})")
    if cfg.get("use_dora"):
        raise ModelLoadError(f"{cfg_file}: DoRA adapters are not supported; merge it (merge_and_unload) and save the model")
    base_name = cfg.get("base_model_name_or_path") or ""
    candidates = [Path(base_name)] if os.path.isabs(base_name) else [path / base_name, Path(base_name)]
    base_dir = next((c for c in candidates if base_name and (c / "config.json").exists()), None)
    if base_dir is None:
        raise ModelLoadError(
            f"{cfg_file}: base model {base_name!r} is not a local model directory: download it and set "
            "base_model_name_or_path to its path"
        )
    base = _model_dir(base_dir)
    st = path / "adapter_model.safetensors"
    if st.exists():
        h = read_header(st)
        adapter = Checkpoint(path, {k: (st, k) for k in h}, {}, {}, [st], info=h)
        tensors = {k: adapter.get(k) for k in h}
    elif (path / "adapter_model.bin").exists():
        tensors = _torch_load(path / "adapter_model.bin")
        st = path / "adapter_model.bin"
    else:
        raise ModelLoadError(f"{path} has adapter_config.json but no adapter_model.safetensors")
    alpha, alpha_pattern = float(cfg.get("lora_alpha", 8)), cfg.get("alpha_pattern") or {}
    rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    pairs: dict[str, dict] = {}
    overrides: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix("base_model.model.")
        if re.search(r"\.lora_[AB]\.bias$", name):
            raise ModelLoadError(f"{st}: LoRA biases (lora_bias=True) are not supported; merge the adapter "
                                 "(merge_and_unload) and save the model")
        m = re.match(r"(.*)\.lora_(embedding_)?([AB])(\.weight)?$", name)
        if m is None:  # a trained tensor of the base (bias="all", modules_to_save): replaces the base's
            plain = _key(name.replace(".modules_to_save", "").replace(".base_layer.", "."))
            if plain not in base:
                raise ModelLoadError(f"{st}: adapter tensor {key} matches no tensor of the base model")
            overrides[plain] = t
            continue
        module, emb, ab = m.group(1), m.group(2), m.group(3)
        pairs.setdefault(_key(module), {})[ab] = t
        pairs[_key(module)]["embedding"] = bool(emb)
    deltas = {}
    for module, d in pairs.items():
        if "A" not in d or "B" not in d:
            raise ModelLoadError(f"{st}: LoRA pair for {module} is incomplete")
        weight = f"{module}.weight"
        if weight not in base:
            raise ModelLoadError(f"{st}: adapter targets {module}, which the base model does not have")
        a = next((v for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", module)), alpha)
        r = d["A"].shape[0]
        scaling = float(a) / (r ** 0.5 if rslora else r)
        A, B = d["A"], d["B"]
        deltas[weight] = (A, B, scaling, d["embedding"] or fan_in_fan_out)
    return _LoraCheckpoint(base, path, deltas, overrides, [st])


def _model_dir(path: Path) -> Checkpoint:
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    if (path / INDEX).exists() or any(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter_model")):
        return _safetensors_dir(path)
    if (path / "pytorch_model.bin").exists():
        return _bin_dir(path)
    raise ModelLoadError(f"{path} has config.json but no weights (*.safetensors or pytorch_model.bin)")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """The weights of a Hugging Face model directory or a LoRA adapter directory, headers checked."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return _adapter_dir(path)
    return _model_dir(path)
