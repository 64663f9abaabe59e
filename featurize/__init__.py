"""RKSP featurizer: any PyTorch network + probe inputs → per-layer Koopman spectral profile.

Depends on torch, numpy and scipy (pandas only for ``SpectralProfile.layers``); never imports
``risk_model``. The schema (``PROFILE_COLUMNS``, ``AGGREGATED``, mass bands, ``aggregate``) is
numpy-only and loaded eagerly; everything that needs torch or scipy is imported on first use.
"""
from __future__ import annotations

import importlib
import sys
import types

from .schema import AGGREGATED, PROFILE_COLUMNS, aggregate

#: public name -> submodule that defines it (imported lazily, on first attribute access)
_LAZY = {
    "CaptureError": "capture", "collect_snapshots": "capture", "find_blocks": "capture", "make_probe": "capture",
    "DMDResult": "dmd", "dmd": "dmd",
    "SpectralProfile": "profile", "profile": "profile", "profile_seeds": "profile",
    "eigenvector_condition": "spectra", "kreiss_constant": "spectra", "spectral_masses": "spectra",
    "spectral_radius": "spectra",
}

__all__ = ["AGGREGATED", "PROFILE_COLUMNS", "aggregate", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """``featurize.profile`` and ``featurize.dmd`` are the functions, as they were when imported
    eagerly: importing the submodules of the same name must not rebind them to the modules."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("profile", "dmd") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
