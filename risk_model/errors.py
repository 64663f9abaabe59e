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


class ResourceError(RiskError):
    """Not enough memory or disk for the chosen path, found before starting; the message gives the estimate."""


#: Optional extras of the package and the modules they bring (pyproject ``optional-dependencies``).
EXTRAS = {"mlflow": "ml", "netcal": "ml", "transformers": "hf", "accelerate": "hf", "dask": "cluster",
          "distributed": "cluster", "lightning": "lightning"}


def install_hint(extra: str) -> str:
    """The exact command that installs an optional extra (with the project's pins)."""
    return f"pip install -c constraints.txt 'divergence-risk[{extra}]'"


def missing_extra_message(module: str | None) -> str | None:
    """One line naming the extra that provides ``module`` (a top-level name) and how to install it;
    None when the module is not one an extra provides."""
    top = (module or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f"{top} is not installed: it comes with the optional extra '{extra}': {install_hint(extra)}"
