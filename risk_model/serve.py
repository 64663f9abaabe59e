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
from .labels import GRAD_LIMIT, LOSS_LIMIT, divergence_reason  # the label, as the sweep trainer applies it
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
    critical_lr: object | None = None    # threshold.CriticalLRModel (predictor v2), when shipped

    @property
    def metadata(self) -> dict:
        p = self.critical_lr or self.config_aware or self.config_free
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
        if self.critical_lr is not None:
            self.critical_lr.save(path / "critical_lr")
            manifest["critical_lr"] = "critical_lr"
        (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return path


#: Profile settings when no predictor says otherwise (the shipped corpus's: ``datasets/corpus-v1/spec.toml``).
PROFILE_DEFAULTS = {"n_samples": 512, "rank": 32, "seed": 0, "kreiss_grid": "31x12"}
#: Probe seeds a network is profiled with by ``risk predict`` and ``risk profile``: the P(divergence)
#: of one seed varies by up to 0.15 between seeds, the mean of 3 by up to 0.03
#: (``benchmarks/results/probe_seed.json``).
PROBE_SEEDS = 3


def profile_settings(bundle: "PredictorBundle | None" = None) -> dict:
    """The profile settings ``risk predict`` uses: those the predictor's corpus was profiled with.

    Without a bundle, the shipped predictor's, read from its metadata.json alone (the predictor
    itself is not loaded, so ``risk profile`` stays as fast as before)."""
    if bundle is not None:
        meta = bundle.metadata
    else:
        meta = {}
        root = default_predictor_path()
        for sub in ("config_aware", "config_free", "."):
            f = root / sub / "metadata.json"
            if f.exists():
                try:
                    meta = json.loads(f.read_text())
                except (json.JSONDecodeError, OSError):
                    meta = {}
                break
    got = meta.get("profile_settings") if isinstance(meta, dict) else None
    return dict(PROFILE_DEFAULTS, **(got or {}))


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
        crit = None
        if man.get("critical_lr"):
            from .threshold import CriticalLRModel

            crit = CriticalLRModel.load(path / man["critical_lr"])
        return PredictorBundle(aware, free, str(path), man.get("name", "divergence-risk"), str(man.get("version")),
                               critical_lr=crit)
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
    grad_clip: float | None = None       # 0: no clipping
    weight_decay: float | None = None


@dataclass
class Prediction:
    """P(divergence) at one learning rate; with several probe seeds, their mean and their min–max."""

    lr: float | None
    p_divergence: float
    risk: str
    p_low: float | None = None
    p_high: float | None = None


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
    probe_seeds : per-seed details when combined over probe seeds (``combine_probe_seeds``)
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
        return max((p.p_divergence for p in self.predictions), default=math.nan)

    probe_seeds: dict | None = None
    #: predictor v2 (critical-LR model): the 80% interval of the critical LR, the dead-at-init
    #: verdict (loss, grad_norm, reason) when the network is over the limits before any update,
    #: P(divergence) over a log grid of LRs, and the paper's config-free score for reference
    max_safe_lr_interval: list | None = None
    dead_at_init: dict | None = None
    curve: list = field(default_factory=list)
    paper_score: dict | None = None

    def to_dict(self) -> dict:
        out = {"predictions": [asdict(p) for p in self.predictions], "max_safe_lr": self.max_safe_lr,
               "profile": self.profile, "predictor": self.predictor, "warnings": list(self.warnings)}
        if self.probe_seeds is not None:
            out["probe_seeds"] = self.probe_seeds
        if self.method == "critical_lr":
            out.update(max_safe_lr_interval=self.max_safe_lr_interval, dead_at_init=self.dead_at_init,
                       threshold=self.threshold, p_curve=self.curve, paper_score=self.paper_score)
        return out


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


def combine_probe_seeds(results: list[Assessment], seeds: list[int]) -> Assessment:
    """One assessment from the same request on profiles of one network with different probe seeds.

    The probe inputs are random, so each profile aggregate varies with the seed
    (``benchmarks/probe_seed.py``). Per learning rate: P(divergence) is the mean over the seeds, its
    min–max is ``p_low``/``p_high``, the risk band follows the mean. ``max_safe_lr`` is the smallest
    over the seeds (safe under every probe; None if one has none). The profile shown is the first
    seed's; ``probe_seeds`` in the result lists each seed's P, max_safe_lr and M≈1 mean.
    """
    first = results[0]
    if len(results) == 1:
        first.probe_seeds = dict(seeds=list(seeds))
        return first
    ps = np.array([[p.p_divergence for p in r.predictions] for r in results])  # (seeds, lrs)
    mean = ps.mean(axis=0)
    preds = [Prediction(p.lr, float(m), risk_band(m), float(lo), float(hi))
             for p, m, lo, hi in zip(first.predictions, mean, ps.min(axis=0), ps.max(axis=0))]
    safes = [r.max_safe_lr for r in results]
    warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
    combined = Assessment(
        predictions=preds, max_safe_lr=None if any(v is None for v in safes) else min(safes),
        lr_grid_top=first.lr_grid_top, threshold=first.threshold, method=first.method, predictor=first.predictor,
        profile=first.profile, warnings=warnings)
    combined.probe_seeds = dict(seeds=list(seeds), p_divergence=ps.round(6).tolist(), max_safe_lr=safes,
                                m_near_mean=[r.profile["aggregates"].get("m_near_mean") for r in results])
    return combined


# ==================================================================== predictor v2: critical LR
#: P(divergence) curve grid (1e-6 … 10, ten points per decade) and the range beyond which a
#: requested LR is an extrapolation
LR_CURVE = np.logspace(-6, 1, 71)
LR_RANGE = (1e-6, 10.0)


def dead_at_init(init: dict) -> dict | None:
    """The dead-at-init verdict from the probe's initial loss and gradient norm (``init_features``),
    or None: the divergence label (``labels.divergence_reason``) met before any update."""
    loss, gn = init.get("init_loss", math.nan), init.get("grad_norm", math.nan)
    if loss is None or gn is None:
        return None
    if (isinstance(loss, float) and math.isnan(loss)) and (isinstance(gn, float) and math.isnan(gn)):
        return None  # no LM head: nothing measured
    why = divergence_reason(loss, gn)
    if why is None:
        return None
    reason = {"nonfinite": "non-finite loss or gradient at the initial weights",
              "loss": f"initial loss {loss:.3g} > {LOSS_LIMIT:g}",
              "grad_norm": f"initial gradient norm {gn:.3g} > {GRAD_LIMIT:g}"}[why]
    return {"loss": loss if math.isfinite(loss) else None, "grad_norm": gn if math.isfinite(gn) else None,
            "reason": reason}


def _paper_score(bundle: PredictorBundle, aggs: dict) -> dict | None:
    """The paper's config-free score (isotonic on layer-mean M≈1) with its measured held-out AUROC."""
    free = bundle.config_free
    if free is None or aggs is None or aggs.get("m_near_mean") is None:
        return None
    table = {k: np.array([np.nan if v is None else v]) for k, v in aggs.items()}
    auroc = free.metadata_.get("metrics", {}).get("auroc")
    return {"m_near_mean": aggs.get("m_near_mean"), "p_divergence": float(free.predict_proba(table)[0, 1]),
            "heldout_auroc": auroc, "beats_chance": bool(auroc is not None and auroc > 0.5)}


def assess_critical(prof, init: dict, *, bundle: PredictorBundle, request: Request,
                    n_layers: int | None = None, width: int | None = None) -> Assessment:
    """Predictor v2: P(divergence) = σ((ln lr − ln lr*(x)) / s) from the init-time features.

    Parameters
    ----------
    prof : SpectralProfile, or None when the network cannot be profiled (non-finite activations)
    init : ``init_features.init_features`` of the network
    request : the user's training recipe; ``lrs`` may be empty (then the answer is max_safe_lr
        with its interval and the curve)

    A network dead at init gets P = 1 at every LR and no max_safe_lr, without asking the model.
    """
    from .threshold import SPECTRAL_COLUMNS, config_features, spectral_features

    model = bundle.critical_lr
    meta = getattr(model, "metadata_", {}) or {}
    defaults = meta.get("config_defaults", {})
    metrics = meta.get("metrics", {})
    warnings = _degenerate_warning(prof) if prof is not None else []
    lrs = [float(x) for x in request.lrs]
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise PredictorError(f"--lr must be a positive number, got {lr:g}")
        if not LR_RANGE[0] <= lr <= LR_RANGE[1]:
            warnings.append(f"--lr {lr:g} is outside [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]: the predictor "
                            "extrapolates there")
    known = meta.get("optimizers", ["adamw", "lion", "sgd"])
    optimizer = request.optimizer.lower()
    if optimizer not in known:
        raise PredictorError(f"--optimizer {optimizer!r} unknown to this predictor (trained on {', '.join(known)})")
    predictor = {"name": bundle.name, "version": bundle.version, "method": "critical_lr",
                 "auroc": metrics.get("auroc"), "ece": metrics.get("ece"), "source": bundle.source,
                 "max_safe_lr_right": metrics.get("max_safe_lr_right")}
    profile_json = {k: v for k, v in prof.to_dict().items() if k != "eigenvalues"} if prof is not None else {}
    aggs = prof.aggregates if prof is not None else None
    dead = dead_at_init(init)
    if dead is not None:
        return Assessment(
            predictions=[Prediction(lr, 1.0, "high") for lr in lrs], max_safe_lr=None, lr_grid_top=None,
            threshold=request.threshold, method="critical_lr", predictor=predictor, profile=profile_json,
            warnings=warnings + [f"dead at init: {dead['reason']} — the run diverges at step 1 whatever the "
                                 "learning rate (P = 1 at every LR)"],
            dead_at_init=dead, curve=[{"lr": float(x), "p": 1.0} for x in LR_CURVE[::5]],
            paper_score=_paper_score(bundle, aggs))
    if prof is None:
        raise PredictorError("the network could not be profiled and is not dead at init")
    pick = lambda v, k, d: v if v is not None else defaults.get(k, d)  # noqa: E731
    rows = prof.rows if hasattr(prof, "rows") else prof.layers.to_dict("records")
    layers = {c: np.array([r.get(c, np.nan) for r in rows], dtype=float)
              for c in SPECTRAL_COLUMNS}
    layers["degenerate"] = np.array([bool(r.get("degenerate")) for r in rows])
    feats = spectral_features(layers)
    for k, v in init.items():
        feats.setdefault(k, v)
    feats.update(config_features(
        optimizer=optimizer, warmup=pick(request.warmup, "warmup", 0), steps=pick(request.steps, "steps", 300),
        grad_clip=pick(request.grad_clip, "grad_clip", 0.0), weight_decay=pick(request.weight_decay, "weight_decay", 0.0),
        batch_size=pick(request.batch_size, "batch_size", 16),
        d_model=width if width is not None else defaults.get("d_model", 64),
        n_layers=n_layers if n_layers is not None else len(rows), init=init))
    X = {k: np.array([v], dtype=float) for k, v in feats.items() if isinstance(v, (int, float))}
    safe = model.max_safe_lr(X, threshold=request.threshold, interval=0.8)
    p_lr = model.proba_at(X, lrs)[0] if lrs else np.array([])
    curve = model.proba_at(X, LR_CURVE)[0]
    ranges = meta.get("feature_range", {})
    oor = [f"{k}={X[k][0]:.3g} (trained {lo:.3g}…{hi:.3g})" for k, (lo, hi) in ranges.items()
           if k in X and math.isfinite(X[k][0]) and not lo - 1e-9 <= X[k][0] <= hi + 1e-9]
    if oor:
        more = f"; and {len(oor) - 6} more" if len(oor) > 6 else ""
        warnings.append("features outside the training range (extrapolating): " + "; ".join(oor[:6]) + more)
    return Assessment(
        predictions=[Prediction(lr, float(p), risk_band(float(p))) for lr, p in zip(lrs, p_lr)],
        max_safe_lr=float(safe["max_safe_lr"][0]), lr_grid_top=None, threshold=request.threshold,
        method="critical_lr", predictor=predictor, profile=profile_json, warnings=warnings,
        max_safe_lr_interval=[float(safe["low"][0]), float(safe["high"][0])], dead_at_init=None,
        curve=[{"lr": float(x), "p": float(p)} for x, p in zip(LR_CURVE, curve)],
        paper_score=_paper_score(bundle, aggs))


def plot_curve(result: dict, path: str | Path, title: str = "") -> Path:
    """PNG of P(divergence) against the learning rate, with max_safe_lr and its 80% interval, from a
    critical-LR result as ``Assessment.to_dict`` gives it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot(111)
    curve = result.get("p_curve") or []
    ax.plot([c["lr"] for c in curve], [c["p"] for c in curve], color="C3")
    if result.get("max_safe_lr") is not None:
        lo, hi = result.get("max_safe_lr_interval") or (None, None)
        if lo is not None:
            ax.axvspan(lo, hi, color="C0", alpha=0.15, label="80% interval of the critical LR")
        ax.axvline(result["max_safe_lr"], color="C0", label=f"max_safe_lr {result['max_safe_lr']:.2g}")
    ax.axhline(result.get("threshold", SAFE_THRESHOLD), color="grey", lw=0.8, ls="--")
    for p in result.get("predictions", []):
        ax.plot([p["lr"]], [p["p_divergence"]], "o", color="k")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("P(divergence)")
    ax.set_title(title or "divergence risk", fontsize=9)
    if result.get("max_safe_lr") is not None:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    return path
