"""Serving: network → init-time features → one ``Assessment`` (predictor v3, ``lrmodel.LRPredictor``).

``assess_network`` is the one serving path: ``risk predict``, ``risk score``, ``RiskMonitor.check``
and the MLflow pyfunc (``predict_table``, on feature rows) all end in ``assess_features``. It checks
dead-at-init, profiles the probe seeds, builds the features, flags what lies outside the corpus
(and widens the intervals there), words the recommendation and, on request, the what-if
neighbours of the recipe. No CLI formatting here, and no pandas, scikit-learn, xgboost or mlflow
(``risk predict`` imports this module).

A *bundle* directory holds ``manifest.json``, ``lr_predictor/`` (v3) and ``config_free/`` (the
paper's isotonic map on M≈1, shown for reference only). v1/v2 predictors are evaluation baselines
(``risk evaluate``); a bundle without a v3 predictor is refused with one line.

Examples
--------
>>> bundle = load_bundle()                                                      # doctest: +SKIP
>>> res = assess_network(model, bundle=bundle, request=Request(lrs=[1e-3]))     # doctest: +SKIP
>>> res.recommended_lr, res.max_safe_lr, res.predictions[0].p_failed            # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import PredictorError
from .labels import GRAD_LIMIT, LOSS_LIMIT, divergence_reason  # the label, as the sweep trainer applies it
from .predictor import FORMAT, FORMAT_VERSION, load_predictor, save_predictor

#: Risk bands on P(failed): below 0.2 low, below 0.5 medium, else high.
BANDS = ((0.2, "low"), (0.5, "medium"), (math.inf, "high"))
SAFE_THRESHOLD = 0.2
#: the P curve's grid (1e-6 … 10, ten points per decade) and the range beyond which a requested LR
#: is an extrapolation
LR_CURVE = np.logspace(-6, 1, 71)
LR_RANGE = (1e-6, 10.0)
SCHEDULES = ("constant", "cosine", "linear")


def risk_band(p: float) -> str:
    return next(name for hi, name in BANDS if p < hi)


# ==================================================================== bundles
@dataclass
class PredictorBundle:
    """The served v3 predictor and the paper's config-free score shown beside it.

    ``config_aware`` (v1) is kept only so that old bundles can be read and re-saved; it is not served.
    """

    config_aware: object | None
    config_free: object | None
    source: str
    name: str = "divergence-risk"
    version: str = "unversioned"
    lr_predictor: object | None = None   # lrmodel.LRPredictor

    @property
    def critical_lr(self):
        """The served learning-rate model (``RiskMonitor`` asks for it under this name)."""
        return self.lr_predictor

    @property
    def metadata(self) -> dict:
        p = self.lr_predictor or self.config_free or self.config_aware
        return getattr(p, "metadata_", {}) if p is not None else {}

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT + "-bundle", "format_version": FORMAT_VERSION, "name": self.name,
                    "version": self.version}
        for key, pred in (("config_aware", self.config_aware), ("config_free", self.config_free)):
            if pred is not None:
                save_predictor(pred, path / key, metadata)
                manifest[key] = key
        if self.lr_predictor is not None:
            self.lr_predictor.save(path / "lr_predictor")
            manifest["lr_predictor"] = "lr_predictor"
        (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return path


#: Profile settings when no predictor says otherwise.
PROFILE_DEFAULTS = {"n_samples": 512, "rank": 32, "seed": 0, "kreiss_grid": "31x12"}
#: Probe seeds a network is profiled with by ``risk predict`` and ``risk profile`` when the
#: predictor reads the spectral profile (``default_probe_seeds``).
PROBE_SEEDS = 3


def predictor_groups(bundle: "PredictorBundle") -> set[str]:
    """The tree feature groups the bundle's v3 predictor reads (empty: the linear part alone)."""
    lrp = bundle.lr_predictor
    if lrp is None:
        return set()
    return {g for m in (lrp.fail_, lrp.best_, lrp.diverge_) for g in m.groups}


def default_probe_seeds(bundle: "PredictorBundle") -> int:
    """``PROBE_SEEDS`` when the predictor reads the spectral profile; else 1: the answer does not
    depend on the probe, and the profile is shown from one seed (the cold start stays close to
    ``import torch``)."""
    return PROBE_SEEDS if "spectral" in predictor_groups(bundle) else 1


def profile_settings(bundle: "PredictorBundle | None" = None) -> dict:
    """The profile settings ``risk predict`` uses: those the predictor's corpus was profiled with.

    Without a bundle, the shipped predictor's, read from its metadata.json alone (the predictor
    itself is not loaded, so ``risk profile`` stays fast)."""
    if bundle is not None:
        meta = bundle.metadata
    else:
        meta = {}
        root = default_predictor_path()
        for sub in ("lr_predictor", "config_free", "config_aware", "."):
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
    ``models/default``), else this checkout's ``models/default``."""
    from importlib import resources

    try:
        res = resources.files("risk_model._models") / "default"
        if res.is_dir():
            return Path(str(res))
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "models" / "default"


_MANIFEST = ('{"format": "divergence-risk-predictor-bundle", "name": ..., "version": ..., '
             '"lr_predictor": "<subdirectory>", "config_free": "<subdirectory>"}')


def _read_manifest(file: Path) -> dict:
    """A bundle's manifest.json, checked; ``PredictorError`` naming the file and what was expected."""
    try:
        man = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PredictorError(f"{file}: not valid JSON ({getattr(e, 'msg', e.__class__.__name__)}); "
                             f"expected {_MANIFEST}") from e
    if not isinstance(man, dict):
        raise PredictorError(f"{file}: expected a JSON object {_MANIFEST}, found a {type(man).__name__}")
    subdirs = {k: man.get(k) for k in ("lr_predictor", "config_aware", "config_free") if man.get(k)}
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
        lrp = None
        if man.get("lr_predictor"):
            from .lrmodel import LRPredictor

            lrp = LRPredictor.load(path / man["lr_predictor"])
        return PredictorBundle(aware, free, str(path), man.get("name", "divergence-risk"), str(man.get("version")),
                               lr_predictor=lrp)
    if (path / "lr_predictor.json").exists():
        from .lrmodel import LRPredictor

        lrp = LRPredictor.load(path)
        return PredictorBundle(None, None, str(path), lrp.metadata_.get("name", "divergence-risk"),
                               str(lrp.metadata_.get("version", "unversioned")), lr_predictor=lrp)
    pred = load_predictor(path)
    meta = pred.metadata_
    return PredictorBundle(None, pred, str(path), meta.get("name", "divergence-risk"),
                           str(meta.get("version", "unversioned")))


def _served(bundle: PredictorBundle):
    if bundle.lr_predictor is None:
        raise PredictorError(f"{bundle.source}: no v3 predictor (lr_predictor/) in this bundle; v1/v2 predictors are "
                             "evaluation baselines now. Train one: risk train --corpus datasets/corpus-v2")
    return bundle.lr_predictor


# ==================================================================== request and result
@dataclass
class Request:
    """The training recipe the user states; ``None`` takes the training corpus's value."""

    lrs: list[float] = field(default_factory=list)
    width: int | None = None
    optimizer: str = "adamw"
    warmup: float | None = None
    batch_size: float | None = None      # sequences per optimizer step
    seq_len: float | None = None         # tokens per sequence
    steps: float | None = None
    threshold: float = SAFE_THRESHOLD
    grad_clip: float | None = None       # 0: no clipping
    weight_decay: float | None = None
    schedule: str = "constant"           # after the warmup: constant, cosine or linear decay
    beta2: float | None = None           # None: the corpus trainer's (AdamW 0.95, Lion 0.99)
    eps: float | None = None             # None: the corpus trainer's (AdamW 1e-8)


@dataclass
class Prediction:
    """At one learning rate: P(failed) (the headline), P(diverged) (the paper's label) and the
    risk band of P(failed); with several probe seeds, the min–max of P(failed) over them."""

    lr: float | None
    p_divergence: float
    risk: str
    p_failed: float | None = None
    p_low: float | None = None
    p_high: float | None = None


@dataclass
class Assessment:
    """What ``risk predict`` reports for one network (``to_dict`` is its JSON).

    Attributes
    ----------
    recommended_lr, recommended_lr_interval : predicted lr_best (median, capped at max_safe_lr) and
        the central 80% of lr_best
    max_safe_lr, max_safe_lr_interval : largest LR with P(failed) < threshold, and the central 80%
        of lr_fail
    predictions : one ``Prediction`` per requested LR
    curve : P(diverged) (``p``) and P(failed) (``p_failed``) over ``LR_CURVE``
    dead_at_init : loss, grad_norm, reason, when the network is over the limits before any update
    outside_corpus : per scale axis outside the corpus: value, corpus range, factor; and
        ``interval_widened`` (s_eff / s) and ``novel_class``
    what_if : rows for the recipe's neighbours (``--what-if``)
    warnings, notes : caveats (notes: what the corpus cannot tell)
    profile : the first seed's profile as JSON (without eigenvalues); ``prof``: the object (not JSON)
    """

    predictions: list[Prediction]
    max_safe_lr: float | None
    threshold: float
    predictor: dict
    profile: dict
    warnings: list[str]
    method: str = "lr_v3"
    max_safe_lr_interval: list | None = None
    recommended_lr: float | None = None
    recommended_lr_interval: list | None = None
    dead_at_init: dict | None = None
    curve: list = field(default_factory=list)
    paper_score: dict | None = None
    probe_seeds: dict | None = None
    outside_corpus: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recommendation: list[str] = field(default_factory=list)
    what_if: list | None = None
    recipe: dict = field(default_factory=dict)
    model: str | None = None
    prof: object | None = field(default=None, repr=False)
    lr_grid_top: float | None = None   # kept for readers of the v2 result; always None

    @property
    def worst(self) -> float:
        return max((p.p_failed for p in self.predictions), default=math.nan)

    def to_dict(self) -> dict:
        out = {"model": self.model, "predictions": [asdict(p) for p in self.predictions],
               "recommended_lr": self.recommended_lr, "recommended_lr_interval": self.recommended_lr_interval,
               "max_safe_lr": self.max_safe_lr, "max_safe_lr_interval": self.max_safe_lr_interval,
               "threshold": self.threshold, "dead_at_init": self.dead_at_init, "p_curve": self.curve,
               "paper_score": self.paper_score, "profile": self.profile, "predictor": self.predictor,
               "warnings": list(self.warnings), "notes": list(self.notes), "recommendation": list(self.recommendation),
               "outside_corpus": self.outside_corpus, "recipe": self.recipe}
        if self.probe_seeds is not None:
            out["probe_seeds"] = self.probe_seeds
        if self.what_if is not None:
            out["what_if"] = self.what_if
        return out


# ==================================================================== features
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


def check_request(request: Request, meta: dict) -> None:
    """``PredictorError`` for an LR that is not a positive number, an unknown optimizer or schedule."""
    for lr in request.lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise PredictorError(f"--lr must be a positive number, got {lr:g}")
    known = meta.get("optimizers", ["adamw", "lion", "sgd"])
    if request.optimizer.lower() not in known:
        raise PredictorError(f"--optimizer {request.optimizer!r} unknown to this predictor (trained on {', '.join(known)})")
    if request.schedule not in SCHEDULES:
        raise PredictorError(f"--schedule {request.schedule!r} unknown: choose one of {', '.join(SCHEDULES)}")


def recipe_of(request: Request, meta: dict, *, width, n_layers) -> dict:
    """The full recipe: the request's values, the corpus's where it gives none."""
    d = meta.get("config_defaults", {})
    pick = lambda v, k, default: v if v is not None else d.get(k, default)  # noqa: E731
    seq = pick(request.seq_len, "seq_len", None)   # None: a predictor saved before the sequence axis
    return dict(optimizer=request.optimizer.lower(), warmup=float(pick(request.warmup, "warmup", 0)),
                steps=float(pick(request.steps, "steps", 300)), grad_clip=float(pick(request.grad_clip, "grad_clip", 0.0)),
                weight_decay=float(pick(request.weight_decay, "weight_decay", 0.0)),
                batch_size=float(pick(request.batch_size, "batch_size", 16)),
                seq_len=None if seq is None else float(seq),
                d_model=float(width if width is not None else d.get("d_model", 64)),
                n_layers=float(n_layers), schedule=request.schedule, beta2=request.beta2, eps=request.eps)


def network_features(prof, init: dict, recipe: dict) -> dict[str, float]:
    """Every v3 feature of one network under ``recipe`` (``lrmodel``): scale columns, config,
    forward, gradient, curvature (NaN unless ``init`` carries them) and (with a profile) spectral."""
    from .init_features import curvature_feature_names
    from .lrmodel import init_scale_features, recipe_features
    from .threshold import SPECTRAL_COLUMNS, spectral_features

    feats = recipe_features(**recipe)
    feats.update(init_scale_features(init, recipe["d_model"]))
    feats.update({c: float(init.get(c, np.nan)) for c in curvature_feature_names()})
    if prof is not None:
        layers = {c: np.array([r.get(c, np.nan) for r in prof.rows], dtype=float) for c in SPECTRAL_COLUMNS}
        layers["degenerate"] = np.array([bool(r.get("degenerate")) for r in prof.rows])
        feats.update(spectral_features(layers))
    return feats


def _outside(feats: dict, meta: dict, recipe: dict) -> tuple[dict, list[str]]:
    """Scale axes outside the corpus (value, range, factor) and the tree features outside their
    training range."""
    axes = {}
    for key, (lo, hi) in (meta.get("scale_range") or {}).items():
        v = recipe.get(key)
        if v is None or not math.isfinite(v):
            continue
        if v > hi * (1 + 1e-9) or v < lo * (1 - 1e-9):
            axes[key] = dict(value=v, corpus=[lo, hi], factor=v / hi if v > hi else lo / v)
    oor = [f"{k}={feats[k]:.3g} (trained {lo:.3g}…{hi:.3g})" for k, (lo, hi) in (meta.get("feature_range") or {}).items()
           if k in feats and math.isfinite(feats[k]) and not lo - 1e-9 <= feats[k] <= hi + 1e-9]
    return axes, oor


_AXIS_WORD = dict(d_model="width", n_layers="depth", steps="steps", batch_size="batch", seq_len="sequence length")


def _paper_score(bundle: PredictorBundle, aggs: dict | None) -> dict | None:
    """The paper's config-free score (isotonic on layer-mean M≈1) with its measured held-out AUROC."""
    free = bundle.config_free
    if free is None or aggs is None or aggs.get("m_near_mean") is None:
        return None
    table = {k: np.array([np.nan if v is None else v]) for k, v in aggs.items()}
    auroc = free.metadata_.get("metrics", {}).get("auroc")
    return {"m_near_mean": aggs.get("m_near_mean"), "p_divergence": float(free.predict_proba(table)[0, 1]),
            "heldout_auroc": auroc, "beats_chance": bool(auroc is not None and auroc > 0.5)}


def _predictor_info(bundle, meta) -> dict:
    m = meta.get("metrics", {})
    return {"name": bundle.name, "version": bundle.version, "method": "lr_v3", "source": bundle.source,
            "auroc": m.get("auroc"), "ece": m.get("ece"), "auroc_diverged": m.get("auroc_diverged"),
            "max_safe_lr_right": m.get("max_safe_lr_right"), "max_safe_lr_unsafe": m.get("max_safe_lr_unsafe"),
            "recommended_within_3x": m.get("recommended_within_3x"), "groups": meta.get("groups"),
            "label": "failed (labels.failed)"}


def assess_features(feats: dict, *, bundle: PredictorBundle, request: Request, recipe: dict,
                    widen: float = 1.0) -> dict:
    """The numbers of one feature set: P(failed), P(diverged) per LR and on the curve,
    max_safe_lr, recommended_lr and their intervals, and what lies outside the corpus."""
    model = _served(bundle)
    meta = getattr(model, "metadata_", {}) or {}
    X = {k: np.array([float(v)]) for k, v in feats.items() if isinstance(v, (int, float))}
    lrs = [float(x) for x in request.lrs]
    p = model.predict(X, lrs=lrs, threshold=request.threshold, widen=widen)
    curve = model.predict(X, lrs=LR_CURVE, threshold=request.threshold, widen=widen)
    axes, oor = _outside(feats, meta, recipe)
    s0 = model.fail_.scale_ * widen
    return dict(
        p_failed=p["p_failed"][0].tolist(), p_diverged=p["p_diverged"][0].tolist(),
        max_safe_lr=float(p["max_safe_lr"][0]), max_safe_lr_interval=[float(p["max_safe_lo"][0]), float(p["max_safe_hi"][0])],
        recommended_lr=float(p["recommended_lr"][0]), lr_best=float(p["lr_best"][0]),
        recommended_lr_interval=[float(p["recommended_lo"][0]), float(p["recommended_hi"][0])],
        curve=[{"lr": float(x), "p": float(d), "p_failed": float(f)}
               for x, d, f in zip(LR_CURVE, curve["p_diverged"][0], curve["p_failed"][0])],
        axes=axes, oor=oor, widened=float(p["scale_fail"][0] / s0) if s0 > 0 else 1.0)


# ==================================================================== one assessment
def _degenerate_warning(prof) -> list[str]:
    if prof is None or not prof.degenerate_layers:
        return []
    return [f"degenerate layers (residual update ≈ 0, excluded from the aggregates): {prof.degenerate_layers}"]


def _constant_notes(meta: dict, recipe: dict) -> list[str]:
    """What the corpus cannot tell: the recipe knobs that did not vary in it, in one line."""
    const = meta.get("constant_recipe") or {}
    if not const:
        return []
    words = {"steps": "steps (always {v}: its slope is the prior's, 0, and the intervals widen away from {v})",
             "schedule": "--schedule (always {v})", "beta2": "--beta2 ({v})", "eps": "--eps ({v})"}
    parts = [words.get(k, k + " ({v})").format(v=v) for k, v in const.items()]
    return ["did not vary in the training corpus, so the predictor reads them but cannot tell their effect: "
            + "; ".join(parts)]


def recommendation(res: Assessment) -> list[str]:
    """What to do, worded from an assessment."""
    if res.dead_at_init is not None:
        return [f"no learning rate helps: {res.dead_at_init['reason']}. Lower the init scale (embeddings, "
                "output projections) or add normalisation, then check again"]
    rec, (rlo, rhi) = res.recommended_lr, res.recommended_lr_interval
    safe, (lo, hi) = res.max_safe_lr, res.max_safe_lr_interval
    out = []
    if safe < LR_RANGE[0]:
        out.append(f"no learning rate in {LR_RANGE[0]:g}…{LR_RANGE[1]:g} has P(failed) < {res.threshold:g}: this network "
                   "is unlikely to learn with this recipe (a run that never learns counts as failed); change the "
                   "recipe or the architecture")
        return out
    capped = " (capped at max_safe_lr)" if rec >= safe * (1 - 1e-9) and res.recommended_lr_interval[1] > safe else ""
    out.append(f"train at about {rec:.2g}{capped} (predicted best learning rate; 80% interval {rlo:.2g}–{rhi:.2g}); "
               f"stay at or below {safe:.2g}, where P(failed) < {res.threshold:g} (80% interval of the first failing "
               f"learning rate: {lo:.2g}–{hi:.2g})")
    if res.predictions and res.worst >= res.threshold:
        out.append(f"lower the learning rate: at {max(p.lr for p in res.predictions if p.p_failed >= res.threshold):.3g} "
                   f"P(failed) ≥ {res.threshold:g}")
    return out


def assess_critical(prof, init: dict, *, bundle: PredictorBundle, request: Request, n_layers: int | None = None,
                    width: int | None = None, widen: float = 1.0) -> Assessment:
    """One assessment from a profile (or None) and the init-time features (``init_features``).

    A network dead at init gets P = 1 at every LR and no max_safe_lr, without asking the model.
    """
    model = _served(bundle)
    meta = getattr(model, "metadata_", {}) or {}
    check_request(request, meta)
    nl = n_layers if n_layers is not None else (len(prof.rows) if prof is not None else math.nan)
    recipe = recipe_of(request, meta, width=width if width is not None else request.width, n_layers=nl)
    lrs = [float(x) for x in request.lrs]
    warnings = _degenerate_warning(prof)
    for lr in lrs:
        if not LR_RANGE[0] <= lr <= LR_RANGE[1]:
            warnings.append(f"--lr {lr:g} is outside [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]: the predictor extrapolates there")
    profile_json = {k: v for k, v in prof.to_dict().items() if k != "eigenvalues"} if prof is not None else {}
    aggs = prof.aggregates if prof is not None else None
    common = dict(threshold=request.threshold, predictor=_predictor_info(bundle, meta), profile=profile_json,
                  paper_score=_paper_score(bundle, aggs), recipe={k: v for k, v in recipe.items()}, prof=prof,
                  notes=_constant_notes(meta, recipe))
    dead = dead_at_init(init)
    if dead is not None:
        res = Assessment(predictions=[Prediction(lr, 1.0, "high", p_failed=1.0) for lr in lrs], max_safe_lr=None,
                         warnings=warnings + [f"dead at init: {dead['reason']} — the run diverges at step 1 whatever the "
                                              "learning rate (P = 1 at every LR)"],
                         dead_at_init=dead, curve=[{"lr": float(x), "p": 1.0, "p_failed": 1.0} for x in LR_CURVE[::5]],
                         **common)
        res.recommendation = recommendation(res)
        return res
    if prof is None and "spectral" in (meta.get("groups") or []):
        raise PredictorError("the network could not be profiled and is not dead at init")
    if request.width is None and width is None:
        warnings.append(f"model width unknown; assumed d_model={recipe['d_model']:g}")
    if request.seq_len is None and "ln_seq_len" in model.fail_.linear_columns_ and recipe["seq_len"] is not None:
        warnings.append(f"sequence length not stated (--seq-len); assumed the corpus's {recipe['seq_len']:g} tokens")
    feats = network_features(prof, init, recipe)
    n = assess_features(feats, bundle=bundle, request=request, recipe=recipe, widen=widen)
    outside = {}
    if n["axes"]:
        outside.update(n["axes"])
        words = [f"{_AXIS_WORD.get(k, k)} {a['value']:g} is {a['factor']:.1f}× outside the corpus's "
                 f"{a['corpus'][0]:g}–{a['corpus'][1]:g}" for k, a in n["axes"].items()]
        warnings.append("outside the training corpus: " + "; ".join(words) + f" — the linear scale part extrapolates "
                        f"and the intervals are {n['widened']:.2f}× as wide as inside it")
    outside["interval_widened"] = round(n["widened"] * widen, 4)
    if n["oor"]:
        more = f"; and {len(n['oor']) - 6} more" if len(n["oor"]) > 6 else ""
        warnings.append("features outside the training range (trees are flat there): " + "; ".join(n["oor"][:6]) + more)
    res = Assessment(
        predictions=[Prediction(lr, float(d), risk_band(float(f)), p_failed=float(f))
                     for lr, d, f in zip(lrs, n["p_diverged"], n["p_failed"])],
        max_safe_lr=n["max_safe_lr"], max_safe_lr_interval=n["max_safe_lr_interval"],
        recommended_lr=n["recommended_lr"], recommended_lr_interval=n["recommended_lr_interval"],
        curve=n["curve"], warnings=warnings, outside_corpus=outside, **common)
    res.recommendation = recommendation(res)
    return res


def assess(prof, *, bundle: PredictorBundle, request: Request) -> Assessment:
    """v1's profile-only entry point: served by v3 now, without the init-time features it needs,
    so only for a network whose features ``RiskMonitor`` cannot compute; refused with one line."""
    raise PredictorError("this predictor needs the init-time features of the network: use assess_network "
                         "(risk predict) or assess_critical")


# ==================================================================== threads
@contextlib.contextmanager
def single_threaded():
    """torch and BLAS on one thread each for the duration, as they were after. The per-layer
    matrices are small (d × N): one thread per computation is faster than several on a shared
    machine; the layers are shared among the cores instead (``profile_seeds(workers=...)``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with one_blas_thread():
            yield
    finally:
        torch.set_num_threads(threads)


def one_blas_thread():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def cores() -> int:
    """CPU cores this process may run on."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def profile_for(model, bundle, *, blocks=None, inputs=None, input_shape=None, seeds=(0,), progress=None):
    """Profiles for the probe ``seeds`` with the settings of the predictor's corpus, from one
    forward pass (``featurize.profile_seeds``). Call inside ``single_threaded()``."""
    from featurize import profile_seeds

    s = profile_settings(bundle)
    return profile_seeds(model, inputs, seeds=list(seeds), blocks=blocks, n_samples=int(s.get("n_samples", 2048)),
                         rank=s.get("rank", 32) or None, input_shape=input_shape,
                         kreiss_grid=s.get("kreiss_grid") or None, progress=progress, workers=cores())


# ==================================================================== the serving path
def _what_if(prof, init, *, bundle, request, n_layers, width, widen) -> list[dict]:
    """The recipe's neighbours: warmup ×4 and ÷4, clipping toggled, schedule cosine/constant, β2
    0.95/0.999, AdamW/Lion; each with recommended_lr and max_safe_lr."""
    meta = bundle.lr_predictor.metadata_
    base = recipe_of(request, meta, width=width, n_layers=n_layers)
    const = meta.get("constant_recipe") or {}
    steps = base["steps"]
    w = base["warmup"]
    rows = [("stated recipe", {})]
    rows.append((f"warmup ×4 ({min(steps, w * 4 if w else steps / 20):g} steps)",
                 dict(warmup=min(steps, w * 4 if w else steps / 20))))
    rows.append((f"warmup ÷4 ({w / 4:g} steps)", dict(warmup=w / 4)))
    rows.append(("clipping off" if base["grad_clip"] > 0 else "clipping on (1.0)",
                 dict(grad_clip=0.0 if base["grad_clip"] > 0 else 1.0)))
    rows.append(("cosine schedule" if base["schedule"] != "cosine" else "constant schedule",
                 dict(schedule="cosine" if base["schedule"] != "cosine" else "constant")))
    b2 = base["beta2"] if base["beta2"] is not None else {"adamw": 0.95, "lion": 0.99}.get(base["optimizer"])
    rows.append((f"β2 {0.999 if b2 == 0.95 else 0.95:g}", dict(beta2=0.999 if b2 == 0.95 else 0.95)))
    other = "lion" if base["optimizer"] == "adamw" else "adamw"
    rows.append((other if other != "adamw" else "AdamW", dict(optimizer=other, beta2=None, eps=None)))
    out = []
    for name, change in rows:
        req = replace(request, lrs=[], **{k: v for k, v in change.items() if k in Request.__dataclass_fields__})
        r = assess_critical(prof, init, bundle=bundle, request=req, n_layers=n_layers, width=width, widen=widen)
        note = None
        knob = next(iter(change), None)
        if knob in const or (knob == "beta2" and "beta2" in const):
            note = f"{knob} did not vary in the training corpus: same answer as the stated recipe by construction"
        elif knob is not None and not bundle.lr_predictor.reads(knob):
            note = (f"the predictor does not read {knob} (no feature group with it earned its place): same answer "
                    "as the stated recipe by construction")
        out.append(dict(change=name, recipe=change, recommended_lr=r.recommended_lr, max_safe_lr=r.max_safe_lr,
                        note=note))
    return out


def assess_network(model, *, bundle: PredictorBundle, request: Request, probe_seeds: int | None = None, blocks=None,
                   inputs=None, input_shape=None, label: str | None = None, what_if: bool = False,
                   progress=None) -> Assessment:
    """The serving path (module docstring): one network → one ``Assessment``.

    Parameters
    ----------
    model : nn.Module at its initial weights
    request : the recipe; ``lrs`` may be empty
    probe_seeds : profiles with seeds ``seed, seed+1, …`` (the predictor's seed first); the answer is
        that of the median max_safe_lr over them, with every seed's max_safe_lr in ``probe_seeds``;
        None: ``default_probe_seeds``
    inputs : a probe tensor (or a file) for networks without an embedding; ``input_shape`` likewise
    what_if : add the recipe's neighbours (``what_if``)
    """
    from featurize import CaptureError
    from featurize.capture import discover_blocks, load_probe

    from .features import infer_width, training_domain_problem
    from .init_features import init_features

    lrp = _served(bundle)
    meta = lrp.metadata_
    check_request(request, meta)
    if probe_seeds is None:
        probe_seeds = default_probe_seeds(bundle)
    seed0 = int(profile_settings(bundle)["seed"])
    seeds = [seed0 + i for i in range(probe_seeds)]
    probe = load_probe(inputs) if isinstance(inputs, (str, Path)) else inputs
    with single_threaded():
        _, mods = discover_blocks(model, blocks, inputs=probe, input_shape=input_shape, seed=seed0)
        init = init_features(model, blocks=mods)
        dead = dead_at_init(init)
        if dead is None and "curvature" in predictor_groups(bundle):
            from .init_features import curvature_features

            init.update(curvature_features(model, optimizer=request.optimizer,
                                           eps=request.eps if request.eps is not None else 1e-8))
        try:
            profs = profile_for(model, bundle, blocks=blocks, inputs=probe, input_shape=input_shape,
                                seeds=seeds if dead is None else [seed0], progress=progress)
        except CaptureError:
            if dead is None:
                raise
            profs = []  # dead: the activations may not allow a profile
    width = request.width or infer_width(model) or (profs[0].meta.get("width") if profs else None)
    problem = training_domain_problem(model, meta.get("families"))
    widen = float(meta.get("novel_class_widen", 2.0)) if problem and dead is None else 1.0
    results = [assess_critical(p, init, bundle=bundle, request=request, n_layers=len(mods), width=width, widen=widen)
               for p in profs] or [assess_critical(None, init, bundle=bundle, request=request, n_layers=len(mods),
                                                   width=width, widen=widen)]
    safes = [r.max_safe_lr or 0.0 for r in results]
    med = sorted(safes)[len(safes) // 2]
    k = safes.index(med)  # the first seed with the median max_safe_lr
    res = results[k]
    res.model = label
    if len(results) > 1:
        res.probe_seeds = dict(seeds=seeds, chosen=seeds[k], max_safe_lr=[r.max_safe_lr for r in results],
                               recommended_lr=[r.recommended_lr for r in results],
                               p_failed=[[p.p_failed for p in r.predictions] for r in results])
        pf = np.array([[p.p_failed for p in r.predictions] for r in results])
        if pf.size:
            for j, pr in enumerate(res.predictions):
                pr.p_low, pr.p_high = float(pf[:, j].min()), float(pf[:, j].max())
    else:
        res.probe_seeds = dict(seeds=seeds[:1], chosen=seeds[0])
    if problem and dead is None:
        res.warnings.insert(0, f"outside the training domain (every class seen): {problem}; the prediction is an "
                               f"extrapolation, its "
                               f"intervals widened {widen:.2g}× (the widest a held-out class needed)")
        res.outside_corpus["novel_class"] = problem
    if what_if:
        res.what_if = ([] if dead is not None else
                       _what_if(res.prof, init, bundle=bundle, request=request, n_layers=len(mods), width=width,
                                widen=widen))
    return res


# ==================================================================== the pyfunc's entry point
def predict_table(bundle: PredictorBundle, rows: dict, threshold: float = SAFE_THRESHOLD) -> dict:
    """Feature rows (``{column: array}``: the v3 feature columns and ``lr``) → ``p_failed``,
    ``p_divergence``, ``risk``, ``max_safe_lr``, ``recommended_lr`` per row, by the same model call
    as ``assess_features``."""
    model = _served(bundle)
    n = len(np.atleast_1d(next(iter(rows.values()))))
    lr = np.asarray(rows["lr"], dtype=float) if "lr" in rows else np.full(n, np.nan)
    X = {k: np.asarray(v, dtype=float) for k, v in rows.items() if k != "lr" and np.asarray(v).dtype.kind in "fiub"}
    pf, pdv = np.full(n, np.nan), np.full(n, np.nan)
    p = model.predict(X, lrs=[], threshold=threshold)
    for i in range(n):
        if math.isfinite(lr[i]):
            one = model.predict({k: v[i:i + 1] for k, v in X.items()}, lrs=[lr[i]], threshold=threshold)
            pf[i], pdv[i] = one["p_failed"][0, 0], one["p_diverged"][0, 0]
    return dict(p_failed=pf, p_divergence=pdv, risk=[risk_band(x) if math.isfinite(x) else None for x in pf],
                max_safe_lr=p["max_safe_lr"], recommended_lr=p["recommended_lr"])


# ==================================================================== plot
def plot_curve(result: dict, path: str | Path, title: str = "") -> Path:
    """PNG of P(failed) and P(diverged) against the learning rate, with max_safe_lr, the
    recommended LR and their 80% intervals, from ``Assessment.to_dict()``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot(111)
    curve = result.get("p_curve") or []
    ax.plot([c["lr"] for c in curve], [c.get("p_failed", c["p"]) for c in curve], color="C3", label="P(failed)")
    ax.plot([c["lr"] for c in curve], [c["p"] for c in curve], color="C1", ls="--", label="P(diverged), paper's label")
    if result.get("max_safe_lr") is not None:
        lo, hi = result.get("max_safe_lr_interval") or (None, None)
        if lo is not None:
            ax.axvspan(lo, hi, color="C0", alpha=0.12, label="80% interval of lr_fail")
        ax.axvline(result["max_safe_lr"], color="C0", label=f"max_safe_lr {result['max_safe_lr']:.2g}")
    if result.get("recommended_lr") is not None:
        ax.axvline(result["recommended_lr"], color="C2", label=f"recommended {result['recommended_lr']:.2g}")
    ax.axhline(result.get("threshold", SAFE_THRESHOLD), color="grey", lw=0.8, ls=":")
    for p in result.get("predictions", []):
        ax.plot([p["lr"]], [p.get("p_failed", p["p_divergence"])], "o", color="k")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("probability")
    ax.set_title(title or "training risk", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    return path
