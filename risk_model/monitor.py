"""Divergence risk inside a training loop: a pre-flight check before the first step and a cheap
spectral watch during training.

``RiskMonitor.check()`` assesses the network with the function ``risk predict`` uses (its profile
settings, probe seeds and predictor) and returns what ``risk predict --json`` prints (P(failed) and
the paper's P(diverged) per learning rate, ``max_safe_lr``, warnings, recommendation). ``RiskMonitor.step(global_step)`` re-profiles every
``every`` steps with a cheap profile (rank-32 DMD, ``n_samples`` token states, 256 by default) and
records one row of ``HISTORY_COLUMNS``: M≈1 mean, ρ max, Kreiss max, the residual update ratio and
P(failed) and P(diverged) at the current learning rate. Failures during training are logged (logger
``risk_model.monitor``) and recorded, never raised.

The P(failed) of a step is the predictor applied to the weights of that step, profiled with a
smaller N than the corpus was: a trend to watch, not a calibrated probability. Whether a running
job *is* failing is the failure detector's call (``risk_model.detector``, in the callbacks).

Framework callbacks over this API: ``risk_model.callbacks``.

Examples
--------
>>> mon = RiskMonitor(model, lr=3e-4, optimizer="adamw", warmup=100, every=50)   # doctest: +SKIP
>>> res = mon.check()                                                           # doctest: +SKIP
>>> res["max_safe_lr"], [p["p_failed"] for p in res["predictions"]]             # doctest: +SKIP
>>> for step, batch in enumerate(loader, 1):                                    # doctest: +SKIP
...     loss = model(batch).loss; loss.backward(); opt.step(); opt.zero_grad()
...     mon.step(step, lr=opt.param_groups[0]["lr"])
>>> mon.history                                                                 # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

from .detector import check_marginal
from .errors import RiskError

logger = logging.getLogger(__name__)


def _p_failed(pred: dict) -> float:
    """P(failed) of one prediction of ``risk predict --json`` (a v2 predictor has only P(diverged))."""
    v = pred.get("p_failed")
    return float(pred["p_divergence"] if v is None else v)

#: Fixed column schema of ``RiskMonitor.history`` (one row per monitored step).
HISTORY_COLUMNS: list[str] = [
    "step",               # global (optimizer) step after which the weights were profiled
    "lr",                 # learning rate at that step (NaN: unknown)
    "p_divergence",       # P(diverged), the paper's label, at that LR with these weights (NaN: not computed)
    "p_failed",           # P(failed) (ours, the headline) at that LR with these weights (NaN: not computed)
    "max_safe_lr",        # largest LR below the threshold for these weights (NaN: none / not computed)
    "m_near_mean",        # layer-mean near-unit spectral mass M≈1
    "rho_max",            # largest spectral radius over layers
    "kreiss_max",         # largest Kreiss constant over layers
    "update_ratio_mean",  # layer-mean RMS(block update) / RMS(stream)
    "n_layers",
    "seconds",            # wall time of this check (profile + prediction)
    "error",              # "" when the check succeeded, else the exception, one line
]
_AGG_COLUMNS = ("m_near_mean", "rho_max", "kreiss_max", "update_ratio_mean")

#: torch optimizer class names -> the predictor's optimizer names
_OPTIMIZER_CLASSES = {"adamw": "adamw", "adam": "adamw", "sgd": "sgd", "lion": "lion"}


class RunFailingError(RiskError):
    """Raised by ``RiskMonitor.observe`` with ``action="stop"`` when the run is failing.

    Attributes
    ----------
    verdict : risk_model.detector.Verdict (step, P(failed), reason)
    """

    def __init__(self, message: str, verdict=None):
        super().__init__(message)
        self.verdict = verdict


#: what ``action`` may be, for the monitor and both callbacks
ACTIONS = ("warn", "stop")


class FailureWatch:
    """The failure detector applied to one training run, for the monitor and both callbacks: builds
    the ``detector.RunWatch`` once the planned steps are known, reads (step, loss, grad norm), logs
    one line when the run starts failing (logger ``risk_model.monitor``), and says once which input
    it lacks.

    Parameters
    ----------
    detector : FailureDetector, str or Path, optional
        The fitted detector or its JSON file; the shipped one (``models/default/detector``) when omitted.
    action : {"warn", "stop"}
        Only worded here (whether the caller stops).
    ladder : risk_model.ladder_watch.LadderWatch, optional
        Shared by the runs of one LR sweep: the run is also failing once it is far behind a
        lower-LR sibling (``ladder_watch``'s sibling rule, reason ``"behind siblings"``).
    """

    def __init__(self, detector=None, action="warn", ladder=None):
        check_ladder(ladder)
        self.detector = detector
        self.action = action
        self.ladder = ladder
        self.run = None
        self.ladder_run = None
        self.verdict = None
        self._said: set[str] = set()

    @property
    def failing(self) -> bool:
        """Whether the latest verdict says the run is failing."""
        return self.verdict is not None and self.verdict.failing

    def start(self, total_steps, *, prior: float | None = None, marginal_loss: float | None = None,
              lr: float | None = None) -> None:
        """Begin a run of ``total_steps`` planned steps (None: unknown, only the divergence rule acts).

        ``prior`` is the pre-flight P(failed) at the run's learning rate, ``marginal_loss`` the task's
        R (``detector.marginal_loss``). Without a detector of its own the watch takes the shipped one
        that reads what it is given (``FailureDetector.load_default``); a detector given that needs
        an input the run lacks is said once, and only the divergence rule acts. With a ``ladder``,
        the run joins it at its peak learning rate ``lr`` (without ``lr`` or the planned steps, said
        once, and the sibling rule does not act on this run)."""
        from .detector import FailureDetector, RunWatch

        det = self.detector
        if det is None:
            det = FailureDetector.load_default(prior=prior is not None, marginal=marginal_loss is not None)
        elif not isinstance(det, FailureDetector):
            det = FailureDetector.load(det)
        self.detector = det
        self.verdict = None
        lacks = [w for w, need, have in (("the pre-flight P(failed) (a learning rate and the pre-flight check)",
                                          det.use_prior, prior), ("marginal_loss", det.use_marginal, marginal_loss))
                 if need and have is None]
        if total_steps is None or not total_steps > 0:
            self.say_once("steps", "the failure detector needs the planned number of training steps (steps=...): "
                                   "only the divergence rule (non-finite, loss > 50, gradient norm > 500) is checked")
            self.run = RunWatch(None, None)
        elif lacks:
            self.say_once("lacks", f"this failure detector needs {' and '.join(lacks)}: only the divergence rule "
                                   f"(non-finite, loss > 50, gradient norm > 500) is checked")
            self.run = RunWatch(None, None)
        else:
            self.run = det.watch(total_steps, marginal_loss=marginal_loss, prior=prior)
        self.ladder_run = None
        if self.ladder is not None:
            if lr is None or total_steps is None or not total_steps > 0:
                self.say_once("ladder", "the sweep-aware rule needs the run's learning rate and planned steps: "
                                        "it does not act on this run")
            else:
                self.ladder_run = self.ladder.run(float(lr), total_steps)

    def say_once(self, key: str, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning("divergence-risk: %s", text)

    def missing(self, keys, where: str) -> None:
        """Say once that the inputs ``keys`` are missing from ``where``; nothing else happens."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        self.say_once("missing:" + ",".join(keys),
                      f"the failure detector needs {' and '.join(repr(k) for k in keys)} in {where}; "
                      f"without {'them' if len(keys) > 1 else 'it'} it does nothing")

    def observe(self, step, loss, grad_norm):
        """Read one step; returns the verdict (a ``detector.Verdict``), None before ``start``."""
        if self.run is None:
            return None
        was = self.failing
        v = self.run.update(step, loss, grad_norm)
        if self.ladder_run is not None:
            lv = self.ladder_run.update(step, loss, grad_norm)
            if lv is not None and lv.failing and not (v is not None and v.failing):
                v = lv
            if v is not None and v.failing:
                self.ladder_run.close()
        if v is not None and v.failing and not was:
            what = "stopping training" if self.action == "stop" else "training goes on (action='warn')"
            logger.warning("divergence-risk: %s; %s", v.message(), what)
        self.verdict = v
        return v

    def finish(self) -> None:
        """The run ended: its curve counts for its siblings (``ladder``) only up to its last point."""
        if self.ladder_run is not None:
            self.ladder_run.close()


def check_ladder(ladder) -> None:
    """``ladder`` must be a ``risk_model.ladder_watch.LadderWatch`` (or None)."""
    if ladder is not None:
        from .ladder_watch import LadderWatch

        if not isinstance(ladder, LadderWatch):
            raise TypeError(f"ladder must be a risk_model.ladder_watch.LadderWatch shared by the runs of one "
                            f"sweep, got {type(ladder).__name__}")


class DivergenceRiskError(RiskError):
    """Raised to stop training before its first optimizer step when P(failed) ≥ the threshold.

    Attributes
    ----------
    assessment : dict, the pre-flight result (``RiskMonitor.check()``)
    """

    def __init__(self, message: str, assessment=None):
        super().__init__(message)
        self.assessment = assessment


def optimizer_name(optimizer) -> str | None:
    """The predictor's name for an optimizer: a name ("adamw", "AdamW", HF's "adamw_torch_fused",
    "sgd", "lion_32bit") or a ``torch.optim.Optimizer`` instance; None when it is none of those."""
    if optimizer is None:
        return None
    name = optimizer if isinstance(optimizer, str) else type(optimizer).__name__
    name = name.lower()
    for key in ("adamw", "lion", "sgd", "adam"):  # adamw before adam
        if name.startswith(key) or f"_{key}" in name or f"{key}_" in name:
            return _OPTIMIZER_CLASSES[key]
    return None


def _probe_on_device(model, make_probe, n_samples, seed, input_shape, blocks):
    from featurize import find_blocks

    find_blocks(model, blocks)  # a model without blocks fails here, with the featurizer's message
    probe = make_probe(model, n_samples, seed=seed, input_shape=input_shape)
    param = next(model.parameters(), None)
    return probe if param is None else probe.to(param.device)


def make_request(**kwargs):
    """A ``serve.Request`` from the keyword arguments it has fields for (others are dropped, so
    callers may pass what newer predictors read, e.g. ``grad_clip``, ``weight_decay``)."""
    from .serve import Request

    names = {f.name for f in dataclasses.fields(Request)}
    return Request(**{k: v for k, v in kwargs.items() if k in names and v is not None})


def preflight_prior(assessment: dict | None) -> float | None:
    """The pre-flight P(failed) at the run's learning rate from a check's result (``check()``,
    ``risk predict --json``): the first prediction at a stated LR; None without one."""
    if not assessment:
        return None
    for p in assessment.get("predictions", []):
        if p.get("lr") is not None and p.get("p_failed") is not None and math.isfinite(p["p_failed"]):
            return float(p["p_failed"])
    return None


def check_watch(threshold: float, every) -> None:
    """The settings a monitor and both callbacks share: ``threshold`` in (0, 1), ``every`` ≥ 1 whole steps."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if int(every) != every or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")


class RiskMonitor:
    """Pre-flight divergence risk and a spectral watch of a network during training.

    Parameters
    ----------
    model : nn.Module
        The network being trained (profiled in place; its train/eval mode, gradients and the
        caller's RNG are left as they were).
    lr : float, optional
        Peak training learning rate. Without it the config-free predictor is used and the result
        says so.
    optimizer : str or torch.optim.Optimizer, default "adamw"
        Optimizer name ("adamw", "sgd", "lion"; HF names such as "adamw_torch" are understood) or
        the optimizer itself. An unknown one is assumed to be AdamW, and ``assumptions_`` says so.
    warmup, batch_size, steps : float, optional
        Warmup steps, batch size (sequences per optimizer step) and total steps; the training
        corpus's medians when omitted.
    seq_len : int, optional
        Tokens per training sequence; the training corpus's median when omitted.
    grad_clip, weight_decay : float, optional
        Passed on to predictors that read them.
    threshold : float, default 0.5
        P(failed) at or above which the run counts as risky; also the threshold of ``max_safe_lr``.
    every : int, default 50
        ``step()`` profiles when ``global_step % every == 0``.
    n_samples : int, default 256
        Token states per layer of ``step()``'s cheap profile (``check()`` uses the predictor's).
    rank : int, default 32
        Randomized-DMD rank of ``step()``'s profile.
    predictor : str, Path or serve.PredictorBundle, optional
        Predictor bundle; the shipped default when omitted.
    blocks : str, optional
        Dotted name of the residual-block container; discovered when omitted.
    input_shape : tuple of int, optional
        Per-example input shape for networks without an embedding.
    seed : int, default 0
        Seed of the probe inputs and the randomized DMD.
    action : {"warn", "stop"}, default "warn"
        What ``observe()`` does once the run is failing: "stop" raises ``RunFailingError`` (with
        the reason), "warn" logs one line and training goes on.
    detector : FailureDetector, str or Path, optional
        The failure detector of ``observe()``; when omitted, the shipped one that reads what this
        run gives: the pre-flight P(failed) at ``lr`` once ``check()`` has run, and ``marginal_loss``.
    marginal_loss : float, optional
        The task's marginal loss R (nats; ``detector.marginal_loss`` of a sample of the training
        targets): the detector then also reads how far the loss is above it.
    ladder : risk_model.ladder_watch.LadderWatch, optional
        One per LR sweep, shared by its runs' monitors: ``observe()`` also finds the run failing
        once it is far behind a lower-LR sibling (reason ``"behind siblings"``; needs ``lr`` and
        ``steps``). Call ``finish()`` when a run ends.

    Attributes
    ----------
    assessment_ : dict, the last ``check()`` (as ``risk predict --json``)
    assumptions_ : list of str, what was assumed for information that was missing
    history : pandas.DataFrame with columns ``HISTORY_COLUMNS``
    """

    def __init__(self, model, *, lr=None, optimizer="adamw", warmup=None, batch_size=None, steps=None,
                 seq_len=None, grad_clip=None, weight_decay=None, threshold=0.5, every=50, n_samples=256, rank=32,
                 predictor=None, blocks=None, input_shape=None, seed=0, action="warn", detector=None,
                 marginal_loss=None, ladder=None):
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        check_marginal(marginal_loss)
        check_watch(threshold, every)
        if n_samples < 2:
            raise ValueError(f"n_samples must be at least 2, got {n_samples!r}")
        self.model = model
        self.lr = lr
        self.optimizer = optimizer
        self.warmup = warmup
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.steps = steps
        self.grad_clip = grad_clip
        self.weight_decay = weight_decay
        self.threshold = threshold
        self.every = int(every)
        self.n_samples = n_samples
        self.rank = rank
        self.predictor = predictor
        self.blocks = blocks
        self.input_shape = input_shape
        self.seed = seed
        self.action = action
        self.detector = detector
        self.marginal_loss = marginal_loss
        self._failure = FailureWatch(detector, action, ladder)
        self.assumptions_: list[str] = []
        self._rows: list[dict] = []
        self._bundle = None
        self._seen_errors: set[str] = set()
        self._probe = None
        name = optimizer_name(optimizer)
        if name is None:
            self.assumptions_.append(f"optimizer {optimizer!r} not known to the predictor; assumed adamw")
            name = "adamw"
        self._optimizer_name = name
        if lr is None:
            self.assumptions_.append("no learning rate given: the answer is the largest safe learning rate "
                                     "(with a predictor that has no critical-LR model: the config-free estimate)")

    # ------------------------------------------------------------------ pre-flight
    def bundle(self):
        """The predictor bundle (loaded once)."""
        if self._bundle is None:
            from .serve import PredictorBundle, load_bundle

            p = self.predictor
            self._bundle = p if isinstance(p, PredictorBundle) else load_bundle(p)
        return self._bundle

    def _request(self, lr):
        from .features import infer_width

        return make_request(lrs=[] if lr is None else [float(lr)], width=infer_width(self.model),
                            optimizer=self._optimizer_name, warmup=self.warmup, batch_size=self.batch_size,
                            seq_len=self.seq_len, steps=self.steps, grad_clip=self.grad_clip,
                            weight_decay=self.weight_decay, threshold=self.threshold)

    def check(self) -> dict:
        """Profile the network at its current weights and assess it exactly as ``risk predict`` does
        (the same function: its probe seeds, predictor and wording).

        Returns
        -------
        dict
            What ``risk predict --json`` prints: ``predictions`` (one per LR: ``lr``,
            ``p_failed``, ``p_divergence``, ``risk``), ``max_safe_lr``, ``warnings``, ``recommendation``, the
            profile and the predictor (and whatever fields the served predictor adds); also stored
            as ``assessment_``.

        Raises
        ------
        featurize.CaptureError : no residual blocks could be found or the forward pass failed
        risk_model.errors.PredictorError : the predictor cannot serve this request
        """
        from .serve import Request, assess_network  # the function `risk predict` calls

        req = Request(lrs=[] if self.lr is None else [float(self.lr)], optimizer=self._optimizer_name,
                      warmup=self.warmup, batch_size=self.batch_size, seq_len=self.seq_len, steps=self.steps,
                      threshold=self.threshold,
                      grad_clip=self.grad_clip, weight_decay=self.weight_decay)
        with self._rng_kept():
            out = assess_network(self.model, bundle=self.bundle(), request=req, blocks=self.blocks,
                                 input_shape=self.input_shape, label=type(self.model).__name__).to_dict()
        self.assessment_ = out
        return out

    def is_risky(self, assessment: dict | None = None) -> bool:
        """Whether P(failed) ≥ ``threshold`` at some requested LR (default: the last check)."""
        res = assessment if assessment is not None else self.assessment_
        return max((_p_failed(p) for p in res["predictions"]), default=0.0) >= self.threshold

    def explain(self, assessment: dict | None = None) -> str:
        """The verdict of a check in words: P at the LR, what LR would be safe, warnings, advice."""
        res = assessment if assessment is not None else self.assessment_
        ps = ", ".join(("config-free" if p["lr"] is None else f"lr {p['lr']:.3g}")
                       + f": P(failed) {_p_failed(p):.3f}, P(diverged) {p['p_divergence']:.3f}"
                       for p in res["predictions"])
        verdict = "at or above" if self.is_risky(res) else "below"
        text = f"{ps} ({verdict} the threshold {self.threshold:g})" if ps else "no learning rate given"
        if res.get("max_safe_lr") is not None:
            text += f"; largest safe learning rate {res['max_safe_lr']:.3g}"
        elif self.lr is not None:
            text += "; no learning rate in the predictor's range is safe for this network"
        notes = [f"warning: {w}" for w in list(res.get("warnings", [])) + self.assumptions_]
        notes += [f"recommendation: {r}" for r in res.get("recommendation", [])]
        return text + "".join(f"\n  {n}" for n in notes)

    # ------------------------------------------------------------------ during training
    def observe(self, global_step: int, loss: float, grad_norm: float):
        """Read one step's training loss and gradient norm (before clipping) into the failure
        detector (``risk_model.detector``): is the run failing now, P(failed by the end), and why.
        Cheap (scalars only): call it every step or every few steps; the steps need not be evenly spaced.

        Needs ``steps`` (the planned steps) for P; without it only the divergence rule acts, and
        the log says so once.

        Returns
        -------
        risk_model.detector.Verdict: ``failing``, ``p_failed``, ``reason``, ``metrics()``

        Raises
        ------
        RunFailingError : ``action="stop"`` and the run has just started failing (once)
        """
        if self._failure.run is None:
            self._failure.start(self.steps, prior=preflight_prior(getattr(self, "assessment_", None)),
                                marginal_loss=self.marginal_loss, lr=self.lr)
        was = self._failure.failing
        v = self._failure.observe(global_step, loss, grad_norm)
        if v.failing and not was and self.action == "stop":
            raise RunFailingError(f"divergence-risk stopped training: {v.message()}", v)
        return v

    @property
    def verdict(self):
        """The failure detector's latest verdict (None before ``observe``)."""
        return self._failure.verdict

    def finish(self) -> None:
        """The run ended (finished or stopped); with a ``ladder``, its siblings stop counting its curve
        after its last point."""
        self._failure.finish()

    def step(self, global_step: int, lr: float | None = None) -> dict | None:
        """Profile cheaply and record a history row when ``global_step % every == 0``.

        Parameters
        ----------
        global_step : int
            Optimizer steps done so far.
        lr : float, optional
            Current learning rate; default: read from ``optimizer`` when it is an optimizer
            instance, else ``lr``.

        Returns
        -------
        dict (the recorded row, keys ``HISTORY_COLUMNS``) or None when this step is not monitored.
        Never raises for a failed profile: the row carries the error and it is logged.
        """
        if global_step % self.every:
            return None
        from .serve import assess

        lr = self._current_lr() if lr is None else lr
        row = dict.fromkeys(HISTORY_COLUMNS, math.nan)
        row.update(step=int(global_step), lr=math.nan if lr is None else float(lr), error="")
        t0 = time.perf_counter()
        try:
            prof = self._cheap_profile()
            aggs = prof.aggregates
            row.update({c: float(aggs.get(c, math.nan)) for c in _AGG_COLUMNS}, n_layers=aggs.get("n_layers"))
            if lr is None or lr > 0:  # a zero LR (start of warmup) cannot diverge: nothing to predict
                bundle = self.bundle()
                request = self._request(lr if lr is not None else self.lr)
                if getattr(bundle, "lr_predictor", None) is not None or \
                        getattr(bundle, "critical_lr", None) is not None:
                    # the same predictor as check(): init-time features of the current weights
                    # (one forward and backward pass; gradients, mode and RNG are restored)
                    from featurize import find_blocks

                    from .init_features import init_features
                    from .serve import assess_critical

                    _, mods = find_blocks(self.model, self.blocks)
                    init = init_features(self.model, blocks=mods)
                    res = assess_critical(prof, init, bundle=bundle, request=request, n_layers=len(mods))
                else:
                    res = assess(prof, bundle=bundle, request=request)
                if res.predictions:
                    row["p_divergence"] = res.predictions[0].p_divergence
                    pf = res.predictions[0].p_failed
                    row["p_failed"] = math.nan if pf is None else pf
                row["max_safe_lr"] = math.nan if res.max_safe_lr is None else res.max_safe_lr
        except Exception as e:  # noqa: BLE001 - a failed check must never stop the user's training run
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["error"] = msg
            level = logging.DEBUG if msg in self._seen_errors else logging.WARNING
            self._seen_errors.add(msg)
            logger.log(level, "divergence-risk check at step %d failed (training goes on): %s", global_step, msg)
        row["seconds"] = time.perf_counter() - t0
        self._rows.append(row)
        return row

    def _current_lr(self):
        groups = getattr(self.optimizer, "param_groups", None)
        if groups:
            return float(groups[0]["lr"])
        return self.lr

    def _cheap_profile(self):
        from featurize import make_probe, profile

        if self._probe is None:
            self._probe = _probe_on_device(self.model, make_probe, self.n_samples, self.seed, self.input_shape,
                                           self.blocks)
        kreiss_grid = (self.bundle().metadata.get("profile_settings") or {}).get("kreiss_grid") or None
        with self._rng_kept():
            return profile(self.model, self._probe, blocks=self.blocks, n_samples=self.n_samples, seed=self.seed,
                           rank=self.rank or None, kreiss_grid=kreiss_grid)

    def _rng_kept(self):
        """Fork the CPU RNG and that of the model's CUDA device, if any (featurize forks the CPU one)."""
        import torch

        param = next(self.model.parameters(), None)
        devices = [param.device] if param is not None and param.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    @property
    def history(self):
        """One row per monitored step, columns ``HISTORY_COLUMNS``."""
        import pandas as pd

        df = pd.DataFrame(self._rows, columns=HISTORY_COLUMNS)
        df = df.astype({c: float for c in HISTORY_COLUMNS if c not in ("step", "n_layers", "error")})
        return df.astype({"step": "int64", "n_layers": "Int64", "error": str})

    def metrics(self, row: dict, prefix: str = "risk/") -> dict[str, float]:
        """The finite numbers of a history row as ``{prefix + column: value}``, for loggers."""
        keys = ("p_failed", "p_divergence", "max_safe_lr", *_AGG_COLUMNS)
        return {prefix + k: float(row[k]) for k in keys
                if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}

    def preflight_metrics(self, assessment: dict | None = None, prefix: str = "risk/preflight_") -> dict[str, float]:
        """The check's numbers for loggers: P(failed) and P(diverged) at the training LR (the worst
        requested one), max_safe_lr when there is one, and the profile's M≈1 mean, ρ max, Kreiss max, update ratio."""
        res = assessment if assessment is not None else self.assessment_
        out = {}
        if res.get("predictions"):
            out[prefix + "p_failed"] = float(max(_p_failed(p) for p in res["predictions"]))
            out[prefix + "p_divergence"] = float(max(p["p_divergence"] for p in res["predictions"]))
        if res.get("max_safe_lr") is not None:
            out[prefix + "max_safe_lr"] = float(res["max_safe_lr"])
        profile = res.get("profile")
        aggs = profile.get("aggregates", {}) if isinstance(profile, dict) else {}
        for c in _AGG_COLUMNS:
            v = aggs.get(c)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[prefix + c] = float(v)
        return out
