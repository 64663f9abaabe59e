"""Serving: a profile + a training request → an ``Assessment`` (P per LR, risk bands, ``max_safe_lr``,
warnings). No CLI wording, no pandas, scikit-learn, xgboost or mlflow: ``risk predict`` imports it.

A *bundle* directory (``manifest.json`` + ``config_aware/`` + ``config_free/``) holds both served
predictors; the shipped default is ``models/default`` of the repository, which the wheel carries as
the package data ``risk_model._models/default`` (found with ``importlib.resources``).

Examples
--------
>>> bundle = load_bundle()                                                   # doctest: +SKIP
>>> result = assess(prof, bundle=bundle, request=Request(lrs=[1e-3], width=256))  # doctest: +SKIP
>>> result.max_safe_lr, [p.p_divergence for p in result.predictions]         # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import PredictorError
from .features import request_table
from .predictor import FORMAT, FORMAT_VERSION, load_predictor, predictor_method, save_predictor

#: Risk bands on P(divergence): below 0.2 low, below 0.5 medium, else high.
BANDS = ((0.2, "low"), (0.5, "medium"), (math.inf, "high"))
SAFE_THRESHOLD = 0.2
LR_GRID = np.logspace(-5, 0, 51)  # 1e-5 … 1, ten points per decade

#: KSS's measured effect (``python benchmarks/kss.py`` → benchmarks/results/kss.json; a test checks
#: they agree): No-Norm runs diverged without → with KSS, and the one-sided Fisher exact p-value.
KSS_EFFECT = dict(runs_without=24, diverged_without=17, runs_with=24, diverged_with=16, overhead_pct=3.7,
                  fisher_p=0.5)


def risk_band(p: float) -> str:
    return next(name for hi, name in BANDS if p < hi)


# ==================================================================== bundles
@dataclass
class PredictorBundle:
    """The config-aware and the config-free predictor served together (either may be absent)."""

    config_aware: object | None
    config_free: object | None
    source: str
    name: str = "divergence-risk"
    version: str = "unversioned"

    @property
    def metadata(self) -> dict:
        p = self.config_aware or self.config_free
        return p.metadata_ if p is not None else {}

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT + "-bundle", "format_version": FORMAT_VERSION, "name": self.name,
                    "version": self.version}
        for key, pred in (("config_aware", self.config_aware), ("config_free", self.config_free)):
            if pred is not None:
                save_predictor(pred, path / key, metadata)
                manifest[key] = key
        (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return path


def default_predictor_path() -> Path:
    """The shipped predictor: package data ``risk_model._models/default`` (the repository's
    ``models/default``, mapped there by pyproject's ``package-dir``), else this checkout's
    ``models/default``."""
    from importlib import resources

    try:
        res = resources.files("risk_model._models") / "default"
        if res.is_dir():
            return Path(str(res))
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "models" / "default"


_MANIFEST = ('{"format": "divergence-risk-predictor-bundle", "name": ..., "version": ..., '
             '"config_aware": "<subdirectory>", "config_free": "<subdirectory>"}')


def _read_manifest(file: Path) -> dict:
    """A bundle's manifest.json, checked; ``PredictorError`` naming the file and what was expected."""
    try:
        man = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PredictorError(f"{file}: not valid JSON ({getattr(e, 'msg', e.__class__.__name__)}); "
                             f"expected {_MANIFEST}") from e
    if not isinstance(man, dict):
        raise PredictorError(f"{file}: expected a JSON object {_MANIFEST}, found a {type(man).__name__}")
    subdirs = {k: man.get(k) for k in ("config_aware", "config_free") if man.get(k)}
    bad = [k for k, v in subdirs.items() if not isinstance(v, str) or not (file.parent / v).is_dir()]
    if not subdirs or bad:
        what = f"{bad[0]} = {man.get(bad[0])!r} is not a subdirectory" if bad else "it names no predictor"
        raise PredictorError(f"{file}: {what}; expected {_MANIFEST}")
    return man


def load_bundle(path: str | Path | None = None) -> PredictorBundle:
    """A bundle directory, a single predictor directory, or the shipped default (``None``)."""
    path = Path(path) if path is not None else default_predictor_path()
    if not path.exists():
        hint = " (train one with `risk train`)" if path == default_predictor_path() else ""
        raise PredictorError(f"{path}: no such predictor{hint}")
    if (path / "manifest.json").exists():
        man = _read_manifest(path / "manifest.json")
        aware = load_predictor(path / man["config_aware"]) if man.get("config_aware") else None
        free = load_predictor(path / man["config_free"]) if man.get("config_free") else None
        return PredictorBundle(aware, free, str(path), man.get("name", "divergence-risk"), str(man.get("version")))
    pred = load_predictor(path)
    meta = pred.metadata_
    aware, free = (pred, None) if predictor_method(pred) == "xgboost" else (None, pred)
    return PredictorBundle(aware, free, str(path), meta.get("name", "divergence-risk"),
                           str(meta.get("version", "unversioned")))


# ==================================================================== one assessment
@dataclass
class Request:
    """What the user says about the training run; ``None`` takes the training corpus's median."""

    lrs: list[float] = field(default_factory=list)
    width: int | None = None
    optimizer: str = "adamw"
    warmup: float | None = None
    batch_size: float | None = None
    steps: float | None = None
    threshold: float = SAFE_THRESHOLD


@dataclass
class Prediction:
    lr: float | None
    p_divergence: float
    risk: str


@dataclass
class Assessment:
    """What ``risk predict`` reports for one profiled model.

    Attributes
    ----------
    predictions : one ``Prediction`` per requested LR (one with ``lr=None``: the config-free estimate)
    max_safe_lr : largest grid LR (inside the corpus's LR range) below the threshold, like every
        smaller one; None without ``--lr`` or when none is
    lr_grid_top : the largest LR of that grid (max_safe_lr == lr_grid_top: capped by the corpus)
    threshold : the P(divergence) threshold used
    method : "xgboost" (config-aware) or "isotonic" (config-free)
    predictor : name, version, method, held-out auroc / ece, source
    profile : the profile as JSON (without eigenvalues)
    warnings : list of str
    """

    predictions: list[Prediction]
    max_safe_lr: float | None
    lr_grid_top: float | None
    threshold: float
    method: str
    predictor: dict
    profile: dict
    warnings: list[str]

    @property
    def worst(self) -> float:
        return max(p.p_divergence for p in self.predictions)

    def to_dict(self) -> dict:
        return {"predictions": [asdict(p) for p in self.predictions], "max_safe_lr": self.max_safe_lr,
                "profile": self.profile, "predictor": self.predictor, "warnings": list(self.warnings)}


def max_safe_lr(predictor, base, threshold: float = SAFE_THRESHOLD, grid: np.ndarray = LR_GRID) -> float | None:
    """Largest grid learning rate whose P(divergence) and that of every smaller grid rate are below
    ``threshold``; None when even the smallest is not.

    ``base`` is a request table (DataFrame or mapping column -> array); its first row is used.
    ``assess`` restricts the grid (1e-5…1, ten per decade) to the corpus's learning-rate range.
    """
    table = {k: np.repeat(np.asarray(base[k])[:1], len(grid)) for k in base}
    table["lr"] = np.asarray(grid, dtype=float)
    p = predictor.predict_proba(table)[:, 1]
    ok = p < threshold
    if not ok[0]:
        return None
    first_bad = np.argmin(ok) if not ok.all() else len(ok)
    return float(grid[first_bad - 1])


def _degenerate_warning(prof) -> list[str]:
    if not prof.degenerate_layers:
        return []
    return [f"degenerate layers (residual update ≈ 0, excluded from the aggregates): {prof.degenerate_layers}"]


def assess(prof, *, bundle: PredictorBundle, request: Request) -> Assessment:
    """P(divergence) of one profiled model under ``request``.

    With ``request.lrs`` the config-aware predictor gives P(divergence) per learning rate and the
    largest safe one; without, the paper's config-free isotonic map on M≈1 gives one probability.

    Raises
    ------
    PredictorError : the bundle lacks the predictor the request needs, or an unknown optimizer
    """
    warnings = _degenerate_warning(prof)
    aggs = prof.aggregates
    safe = top = None
    if request.lrs:
        for lr in request.lrs:
            if not (math.isfinite(lr) and lr > 0):
                raise PredictorError(f"--lr must be a positive number, got {lr:g}")
        pred = bundle.config_aware
        if pred is None:
            raise PredictorError(f"{bundle.source} has no config-aware predictor: drop --lr for the "
                                 "config-free estimate, or give a bundle/XGBoost predictor")
        defaults = pred.metadata_.get("config_defaults", {})
        optimizer = request.optimizer.lower()
        known = pred.estimator_.optimizers_
        if optimizer not in known:
            raise PredictorError(f"--optimizer {optimizer!r} unknown to this predictor (trained on {', '.join(known)})")
        width = request.width
        if width is None:
            width = defaults.get("d_model", 64)
            warnings.append(f"model width unknown; assumed d_model={width}")
        pick = lambda v, k, d: v if v is not None else defaults.get(k, d)  # noqa: E731
        table = request_table(aggs, lrs=list(request.lrs), optimizer=optimizer,
                              warmup=pick(request.warmup, "warmup", 0),
                              batch_size=pick(request.batch_size, "batch_size", 16),
                              steps=pick(request.steps, "steps", 300), d_model=width)
        p = pred.predict_proba(table)[:, 1]
        predictions = [Prediction(float(lr), float(pi), risk_band(pi)) for lr, pi in zip(request.lrs, p)]
        lo, hi = pred.feature_range_.get("log10_lr", [-5.0, 0.0])
        grid = LR_GRID[(LR_GRID >= 10 ** lo * (1 - 1e-9)) & (LR_GRID <= 10 ** hi * (1 + 1e-9))]
        safe = max_safe_lr(pred, table, request.threshold, grid=grid if len(grid) else LR_GRID)
        top = float(grid[-1]) if len(grid) else None
        if safe is not None and top is not None and safe >= top:
            warnings.append(f"every learning rate the training corpus covers (up to {top:.2g}) is below "
                            f"P(divergence) {request.threshold:g}; max_safe_lr is capped there, beyond it the "
                            "predictor would only extrapolate")
        oor = pred.out_of_range(table)
        if oor:
            more = f"; and {len(oor) - 6} more" if len(oor) > 6 else ""
            warnings.append("features outside the training range (extrapolating): " + "; ".join(oor[:6]) + more)
    else:
        pred = bundle.config_free
        if pred is None:
            raise PredictorError(f"{bundle.source} has no config-free predictor: give the training learning rate with --lr")
        table = {k: np.array([np.nan if v is None else v]) for k, v in aggs.items()}
        p = pred.predict_proba(table)[:, 1]
        predictions = [Prediction(None, float(p[0]), risk_band(p[0]))]
        warnings.append("no --lr given: using the paper's config-free predictor (isotonic on layer-mean M≈1), "
                        "which cannot tell a safe learning rate from an unsafe one")
        oor = pred.out_of_range(table)
        if oor:
            warnings.append("features outside the training range (extrapolating): " + "; ".join(oor))
    metrics = pred.metadata_.get("metrics", {})
    method = predictor_method(pred)
    return Assessment(
        predictions=predictions, max_safe_lr=safe, lr_grid_top=top, threshold=request.threshold, method=method,
        predictor={"name": bundle.name, "version": bundle.version, "method": method,
                   "auroc": metrics.get("auroc"), "ece": metrics.get("ece"), "source": bundle.source},
        profile={k: v for k, v in prof.to_dict().items() if k != "eigenvalues"},
        warnings=warnings,
    )
