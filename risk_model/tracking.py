"""MLflow: tracking runs, the model registry, the pyfunc flavour of the predictor (DESIGN §8).

Store: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/`` (beside the database), unless
``MLFLOW_TRACKING_URI`` says otherwise. The predictor is logged as a *models-from-code* pyfunc
(``risk_model/pyfunc_model.py`` + the predictor directory as an artifact: JSON files, no pickle),
registered as ``divergence-risk``; the alias ``champion`` moves only when the new version's held-out
metrics are not worse than the champion's (or when forced).

Everything here imports mlflow; ``risk predict`` with the shipped predictor never imports this module.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import RiskError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MODEL_NAME = "divergence-risk"
EXPERIMENT = "divergence-risk"
CHAMPION = "champion"
#: "not worse": held-out AUROC may drop by at most this much, held-out Brier score (a proper scoring
#: rule: calibration and discrimination together) may rise by at most this much.
AUROC_TOLERANCE = 0.002
BRIER_TOLERANCE = 0.002
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
TAG_P, TAG_RISK, TAG_VERSION = "divergence_risk.p", "divergence_risk.risk", "divergence_risk.predictor_version"
_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


class TrackingError(RiskError, ValueError):
    """A registry or model URI problem the user can fix; the message says which."""


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the local sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def artifact_root(uri: str) -> str | None:
    """For a sqlite store, the artifact folder beside the database (created); else None (server's)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return db.parent.resolve().as_uri()


#: Loggers whose INFO/WARNING chatter (store migrations, registry notices) our calls silence.
_CHATTY = ("mlflow", "alembic")


@contextlib.contextmanager
def quiet_mlflow_logs():
    """mlflow's and alembic's loggers at ERROR for the duration, then at the levels they had: the
    caller's logging configuration is left as it was."""
    loggers = [logging.getLogger(name) for name in _CHATTY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quiet(fn):
    """Run ``fn`` inside ``quiet_mlflow_logs()``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with quiet_mlflow_logs():
            return fn(*args, **kwargs)

    return wrapper


@_quiet
def connect(uri: str | None = None, *, must_exist: bool = False) -> str:
    """Point mlflow's tracking and registry at ``uri`` (default ``tracking_uri()``); returns the URI.

    ``must_exist``: refuse a local sqlite store that is not there yet (reading commands must not
    create an empty registry as a side effect).
    """
    import mlflow

    uri = uri or tracking_uri()
    if must_exist and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise TrackingError(f"no MLflow registry at {uri} (set MLFLOW_TRACKING_URI, or run `risk train` first)")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@_quiet
def setup(uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """``connect`` (creating the store if needed), create/select the experiment; return its id."""
    import mlflow

    uri = connect(uri)
    root = artifact_root(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(experiment, artifact_location=f"{root}/{experiment}" if root else None)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@dataclass
class TrainRecord:
    run_id: str
    model_uri: str
    version: str | None
    promoted: bool
    reason: str


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def should_promote(new: dict, old: dict | None) -> tuple[bool, str]:
    """Promote when there is no champion, or the new held-out AUROC and Brier score are not worse
    than the champion's (within ``AUROC_TOLERANCE`` / ``BRIER_TOLERANCE``)."""
    if old is None:
        return True, "no champion yet"
    try:
        oa, ob = float(old["auroc"]), float(old["brier"])
    except (KeyError, TypeError, ValueError):
        return True, "champion has no held-out metrics"
    na, nb = float(new["auroc"]), float(new["brier"])
    if na >= oa - AUROC_TOLERANCE and nb <= ob + BRIER_TOLERANCE:
        return True, f"held-out AUROC {na:.4f} vs {oa:.4f}, Brier {nb:.4f} vs {ob:.4f}: not worse"
    return False, f"held-out AUROC {na:.4f} vs champion {oa:.4f}, Brier {nb:.4f} vs {ob:.4f}: worse, champion kept"


@_quiet
def log_training(*, bundle_dir: Path, params: dict, metrics: dict, heldout: dict, corpus_hash: str,
                 files: list[Path], register: bool = True, promote: bool = False, uri: str | None = None,
                 name: str = MODEL_NAME) -> TrainRecord:
    """Log one training run; log the predictor as a models-from-code pyfunc; register; maybe promote.

    ``heldout`` is ``{"auroc": .., "ece": .., "brier": ..}`` of the served predictor under grouped CV.
    """
    import mlflow
    from mlflow import MlflowClient

    setup(uri)
    with mlflow.start_run(run_name="train") as run:
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
        mlflow.log_metrics({k: v for k, v in metrics.items()})
        mlflow.set_tags({"corpus_hash": corpus_hash, **{f"heldout.{k}": f"{v:.6f}" for k, v in heldout.items()}})
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluation")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_FILE), artifacts={"predictor": str(bundle_dir)},
            pip_requirements=["divergence-risk", "xgboost-cpu>=2", "numpy", "pandas"],
        )
    if not register:
        return TrainRecord(run.info.run_id, info.model_uri, None, False, "not registered")
    client = MlflowClient()
    mv = mlflow.register_model(info.model_uri, name)
    for k, v in {"corpus_hash": corpus_hash, "run_id": run.info.run_id,
                 **{f"heldout.{k}": v for k, v in heldout.items()}}.items():
        client.set_model_version_tag(name, mv.version, k, str(v))
    champ = _champion(client, name)
    old = None if champ is None else {k: champ.tags.get(f"heldout.{k}") for k in ("auroc", "brier")}
    ok, reason = should_promote(heldout, old)
    if champ is not None and champ.tags.get("corpus_hash") not in (None, corpus_hash):
        reason += (f"; the champion was held out on another corpus ({champ.tags['corpus_hash'][:12]} against "
                   f"{corpus_hash[:12]}), so the comparison is only indicative")
    if promote and not ok:
        ok, reason = True, "promoted by --promote (" + reason + ")"
    if ok:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return TrainRecord(run.info.run_id, info.model_uri, str(mv.version), ok, reason)


@_quiet
def log_evaluation(*, params: dict, metrics: dict, corpus_hash: str, files: list[Path], uri: str | None = None) -> str:
    """Log an evaluation run (``risk evaluate``); returns the run id."""
    import mlflow

    setup(uri)
    with mlflow.start_run(run_name="evaluate") as run:
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
        mlflow.log_metrics(metrics)
        mlflow.set_tag("corpus_hash", corpus_hash)
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluation")
    return run.info.run_id


# ==================================================================== model URIs
def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` → (name, version, alias)."""
    m = _URI_RE.match(uri.strip())
    if not m:
        raise TrackingError(f"{uri!r} is not a registered-model URI: use models:/NAME/VERSION or models:/NAME@ALIAS")
    return m["name"], m["version"], m["alias"]


@_quiet
def resolve_version(uri: str, client=None):
    """The registry's ModelVersion for ``uri``; ``TrackingError`` for an unknown model/version/alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    name, version, alias = parse_model_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if not version.isdigit():
            raise TrackingError(f"{uri}: version must be a number, got {version!r}")
        return client.get_model_version(name, version)
    except MlflowException as e:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise TrackingError(f"{uri}: registered model {name!r} has no {what} (or does not exist)") from e


@_quiet
def load_pytorch_model(uri: str):
    """Load a registered MLflow PyTorch model (after checking its flavour)."""
    import mlflow

    mv = resolve_version(uri)
    pinned = f"models:/{mv.name}/{mv.version}"
    try:
        flavors = mlflow.models.get_model_info(pinned).flavors
    except Exception as e:  # noqa: BLE001 - missing/garbled MLmodel comes as several types
        raise TrackingError(f"{uri}: cannot read the model's MLmodel ({e.__class__.__name__})") from e
    if "pytorch" not in flavors:
        raise TrackingError(f"{uri} is not a PyTorch model (flavours: {', '.join(sorted(flavors))}); "
                            "log the network with mlflow.pytorch.log_model")
    import mlflow.pytorch
    import torch

    model = mlflow.pytorch.load_model(pinned, map_location="cpu")
    if isinstance(model, torch.fx.GraphModule):
        raise TrackingError(
            f"{uri} was logged as a torch.export program (MLflow's 'pt2' format): its blocks are traced away and "
            "cannot be hooked; log it with mlflow.pytorch.log_model(..., serialization_format='pickle')")
    return model, mv


@_quiet
def tag_version(mv, tags: dict, client=None) -> None:
    from mlflow import MlflowClient

    client = client or MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(mv.name, mv.version, k, str(v))


@_quiet
def all_versions(name: str, client=None) -> list[str]:
    """Every version of a registered model, as models:/NAME/VERSION URIs, oldest first."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    vs = client.search_model_versions(f"name = '{name}'")
    if not vs:
        raise TrackingError(f"no registered model named {name!r} (or it has no versions)")
    return [f"models:/{name}/{v.version}" for v in sorted(vs, key=lambda v: int(v.version))]


@_quiet
def download_predictor(uri: str):
    """A registered divergence-risk pyfunc → (local predictor directory, registry version)."""
    import mlflow

    mv = resolve_version(uri)
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}"))
    try:
        conf = yaml.safe_load((local / "MLmodel").read_text())
        rel = conf["flavors"]["python_function"]["artifacts"]["predictor"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        rel = None
    pred = local / rel if rel else None
    if pred is None or not pred.exists():
        raise TrackingError(f"{uri} is not a divergence-risk predictor (no artifacts/predictor in the model)")
    return pred, mv
