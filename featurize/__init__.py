"""RKSP featurizer: any PyTorch network + probe inputs → per-layer Koopman spectral profile.

Depends on torch, numpy, scipy and pandas only; never imports ``risk_model``.
"""
from .capture import CaptureError, collect_snapshots, find_blocks, make_probe
from .dmd import DMDResult, dmd
from .profile import AGGREGATED, PROFILE_COLUMNS, SpectralProfile, profile
from .spectra import eigenvector_condition, kreiss_constant, spectral_masses, spectral_radius

__all__ = [
    "AGGREGATED", "CaptureError", "DMDResult", "PROFILE_COLUMNS", "SpectralProfile",
    "collect_snapshots", "dmd", "eigenvector_condition", "find_blocks", "kreiss_constant",
    "make_probe", "profile", "spectral_masses", "spectral_radius",
]
