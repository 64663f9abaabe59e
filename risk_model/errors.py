"""The project's error types: what a user can cause and fix. The CLI turns exactly these (and the
featurizer's ``CaptureError``) into one line on stderr and exit code 1; anything else is a bug and
shows as one.
"""
from __future__ import annotations


class RiskError(Exception):
    """Base of the errors a user can cause (bad input, missing file, unusable artifact)."""


class UsageError(RiskError, ValueError):
    """A command-line argument or option value that cannot be used."""


class ModelLoadError(RiskError, ValueError):
    """A model file that cannot be loaded (unknown format, unsafe without opt-in, corrupt)."""


class CorpusError(RiskError, ValueError):
    """A corpus or sweep folder that cannot be used as given (missing file or columns, foreign or
    corrupt Parquet); the message says which."""


class PredictorError(RiskError, ValueError):
    """A predictor artifact that cannot be used (missing files, other feature schema, bad input)."""
