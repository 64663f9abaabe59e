"""Divergence-risk callbacks for the Hugging Face ``transformers.Trainer`` and for Lightning, over
``risk_model.monitor.RiskMonitor``.

On train begin the network is checked as ``risk predict`` checks it (P(failed) at the training
learning rate, the largest safe one, warnings) and the result is logged through the trainer's own
loggers; with ``action="stop"`` and P(failed) ≥ ``threshold``, ``DivergenceRiskError`` is
raised before the first optimizer step, saying why and which learning rate would be safe. Every
``every`` optimizer steps the spectrum is re-profiled cheaply and logged (``risk/…`` metrics); the
rows are kept in ``callback.history`` (``monitor.HISTORY_COLUMNS``).

A callback never crashes a training run except by the deliberate stop: a model without
discoverable blocks, or a failed check, is reported once in the log and training goes on.

Neither ``transformers`` nor ``lightning`` is imported until ``RiskCallback`` or
``LightningRiskCallback`` is first used (install the ``hf`` or ``lightning`` extra).

Examples
--------
>>> trainer = Trainer(model=model, args=args, train_dataset=ds)                    # doctest: +SKIP
>>> cb = RiskCallback(action="stop", every=50).attach(trainer)  # reports via report_to  # doctest: +SKIP
>>> trainer.train()                                                                # doctest: +SKIP
>>> cb.history                                                                     # doctest: +SKIP

>>> pl.Trainer(max_steps=1000, callbacks=[LightningRiskCallback(warmup=100)]).fit(module)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math

from .detector import check_marginal
from .errors import UsageError
from .monitor import ACTIONS, DivergenceRiskError, FailureWatch, RiskMonitor, check_watch, optimizer_name, preflight_prior

logger = logging.getLogger(__name__)

__all__ = ["DivergenceRiskError", "LightningRiskCallback", "RiskCallback"]


class _RiskWatch:
    """Framework-free part of both callbacks: build the monitor, run the pre-flight check, decide,
    word the messages, and profile every ``every`` steps."""

    def __init__(self, action="warn", *, threshold=0.5, every=50, n_samples=256, predictor=None, blocks=None,
                 input_shape=None, spectral=True, detector=None, detect_every=10, marginal_loss=None, ladder=None):
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        check_watch(threshold, every)
        check_marginal(marginal_loss)
        self.marginal_loss = marginal_loss
        if int(detect_every) != detect_every or detect_every < 1:
            raise ValueError(f"detect_every must be a positive integer, got {detect_every!r}")
        self.action = action
        self.spectral = spectral
        self.detect_every = int(detect_every)
        self.failure = FailureWatch(detector, action, ladder)
        self.threshold = threshold
        self.every = int(every)
        self.n_samples = n_samples
        self.predictor = predictor
        self.blocks = blocks
        self.input_shape = input_shape
        self.monitor: RiskMonitor | None = None
        self.assessment_ = None

    @property
    def history(self):
        """The monitor's history (``monitor.HISTORY_COLUMNS``); empty before training."""
        if self.monitor is None:
            import pandas as pd

            from .monitor import HISTORY_COLUMNS

            return pd.DataFrame(columns=HISTORY_COLUMNS)
        return self.monitor.history

    def _begin(self, model, *, stop_allowed: bool, assumed: list[str], **config) -> dict | None:
        """Pre-flight: the metrics to log, or None when the model cannot be checked. Raises
        ``DivergenceRiskError`` when stopping."""
        try:
            self.monitor = RiskMonitor(model, threshold=self.threshold, every=self.every, n_samples=self.n_samples,
                                       predictor=self.predictor, blocks=self.blocks, input_shape=self.input_shape,
                                       **config)
            self.monitor.assumptions_.extend(assumed)
            res = self.monitor.check()
        except Exception as e:  # noqa: BLE001 - a check that cannot run must not stop the user's training
            self.monitor = None
            first = str(e).splitlines()[0] if str(e) else ""
            logger.warning("divergence-risk: cannot check this model (%s: %s); training goes on without risk "
                           "checks", type(e).__name__, first)
            return None
        self.assessment_ = res
        risky = self.monitor.is_risky(res)
        text = self.monitor.explain(res)
        if risky and self.action == "stop" and stop_allowed:
            raise DivergenceRiskError(f"divergence-risk stopped training before the first optimizer step: {text}", res)
        if risky:
            logger.warning("divergence-risk: HIGH RISK before training: %s", text)
        else:
            logger.info("divergence-risk pre-flight: %s", text)
        return self.monitor.preflight_metrics(res)

    @property
    def verdict(self):
        """The failure detector's latest verdict (``risk_model.detector.Verdict``; None before any)."""
        return self.failure.verdict

    def _start_failure(self, steps, lr=None) -> None:
        """Begin the failure detector, with the pre-flight P(failed) when the check ran (and, with a
        ``ladder``, join the sweep at the run's peak LR ``lr``)."""
        self.failure.start(steps, prior=preflight_prior(self.assessment_), marginal_loss=self.marginal_loss, lr=lr)

    def _observe(self, step: int, loss, grad_norm) -> tuple[dict, bool]:
        """The failure detector on one step: (metrics to log, whether to stop now)."""
        v = self.failure.observe(step, loss, grad_norm)
        if v is None:
            return {}, False
        return v.metrics(), v.failing and self.action == "stop"

    def _step(self, global_step: int, lr) -> dict | None:
        if self.monitor is None or global_step % self.every:
            return None
        row = self.monitor.step(global_step, lr=lr)
        return None if row is None else self.monitor.metrics(row)


def _peak_lr(optimizer) -> float | None:
    """The peak learning rate of an optimizer: ``initial_lr`` (set by LR schedulers) or ``lr`` of its
    first parameter group."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    lr = groups[0].get("initial_lr", groups[0].get("lr"))
    return float(lr) if isinstance(lr, (int, float)) and lr > 0 else None


def _grad_norm(params) -> float:
    """The global 2-norm of the parameters' gradients (what clipping sees before it clips)."""
    import torch

    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _current_lr(optimizer) -> float | None:
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else None


# ==================================================================== Hugging Face
_HF_TRAIN_KEYS = ("loss", "grad_norm", "learning_rate")


def _make_hf_callback():
    from transformers import TrainerCallback

    class RiskCallback(_RiskWatch, TrainerCallback):
        """Divergence risk for ``transformers.Trainer``.

        Reads the learning rate, optimizer, warmup, clipping, weight decay, batch size and steps from
        the ``TrainingArguments`` (the optimizer and peak LR from the trainer's optimizer when it has
        one). Attach it with ``RiskCallback(...).attach(trainer)``: its metrics then go through
        ``trainer.log`` to every ``report_to`` integration (MLflow, W&B, …) and into
        ``trainer.state.log_history``. Passed as ``Trainer(callbacks=[...])`` instead, it still
        checks, stops and records ``history``, but its metrics reach only the Python log (a
        callback's own ``logs`` keys are not seen by the reporting integrations, which run first).

        The failure detector (``risk_model.detector``) reads every training log of the Trainer
        (``logging_steps``): ``loss`` and ``grad_norm`` (HF logs ``grad_norm`` only with
        ``max_grad_norm > 0``; without either key it says so once and does nothing). It logs
        ``risk/p_failed``, ``risk/failing`` and ``risk/reason`` (the code of
        ``detector.REASON_CODES``) at each of them; with ``action="stop"`` a failing run is stopped
        through ``control.should_training_stop`` (the Trainer ends as it ends any run: its
        checkpoints and weights are left as they are) with one log line giving the reason.

        Parameters
        ----------
        action : {"warn", "stop"}, default "warn"
            "stop" raises ``DivergenceRiskError`` from ``on_train_begin`` (no optimizer step runs)
            when P(failed) ≥ ``threshold``, and stops a run the failure detector finds failing;
            "warn" only logs.
        threshold : float, default 0.5
        every : int, default 50
            Profile and log every ``every`` optimizer steps.
        n_samples : int, default 256
            Token states per layer of the in-training profile.
        predictor, blocks, input_shape
            As for ``RiskMonitor``.
        spectral : bool, default True
            Run the pre-flight check and the spectral watch; False leaves only the failure detector.
        detector : FailureDetector, str or Path, optional
            The failure detector; when omitted, the shipped one that reads what the run gives (the
            pre-flight P(failed) at the learning rate when the check ran, ``marginal_loss``).
        marginal_loss : float, optional
            The task's marginal loss R in nats (``risk_model.detector.marginal_loss`` of a sample of
            the training targets); the detector then also reads the loss against it.
        ladder : risk_model.ladder_watch.LadderWatch, optional
            One per LR sweep, shared by the callbacks of its runs (in one process, one run after
            another or side by side): a run is also failing once it is far behind a lower-LR sibling
            (reason ``"behind siblings"``, ``risk_model.ladder_watch``).
        detect_every : int, default 10
            Lightning only (the HF callback reads every training log).
        seq_len : int, optional
            Tokens per training sequence (the Trainer does not know it); the training corpus's
            median when omitted, and the pre-flight result says it assumed it.

        Attributes
        ----------
        monitor : RiskMonitor or None (None until train begin, or when the model cannot be checked)
        assessment_ : dict, the pre-flight result (as ``risk predict --json``)
        history : pandas.DataFrame, ``monitor.HISTORY_COLUMNS``
        """

        def __init__(self, action="warn", *, threshold=0.5, every=50, n_samples=256, predictor=None,
                     blocks=None, input_shape=None, spectral=True, detector=None, detect_every=10, seq_len=None,
                     marginal_loss=None, ladder=None):
            super().__init__(action, threshold=threshold, every=every, n_samples=n_samples, predictor=predictor,
                             blocks=blocks, input_shape=input_shape, spectral=spectral, detector=detector,
                             detect_every=detect_every, marginal_loss=marginal_loss, ladder=ladder)
            self.seq_len = seq_len
            self.trainer = None
            self._said_unattached = False

        def attach(self, trainer):
            """Register with ``trainer`` (if not yet among its callbacks) and report through its
            ``log``; returns ``self``.

            Raises
            ------
            UsageError : ``action="stop"`` and ``trainer`` has no ``control.should_training_stop``
                (it is not a ``transformers.Trainer``, so this callback cannot stop it)
            """
            if self.action == "stop" and not hasattr(getattr(trainer, "control", None), "should_training_stop"):
                raise UsageError(f"action='stop' needs a transformers.Trainer (it stops through "
                                 f"control.should_training_stop); {type(trainer).__name__} has none: "
                                 f"use action='warn', or the callback of your framework")
            self.trainer = trainer
            if self not in trainer.callback_handler.callbacks:
                trainer.add_callback(self)
            return self

        def _report(self, metrics: dict | None, step: int) -> None:
            if not metrics:
                return
            if self.trainer is not None:
                self.trainer.log(dict(metrics))
                return
            if not self._said_unattached:
                self._said_unattached = True
                logger.warning("divergence-risk: RiskCallback is not attached to the Trainer, so report_to "
                               "integrations do not receive its metrics; use RiskCallback(...).attach(trainer)")
            logger.info("divergence-risk step %d: %s", step, metrics)

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            name = optimizer_name(inner) or optimizer_name(str(getattr(args, "optim", "")))
            assumed = []
            lr = _peak_lr(inner) or getattr(args, "learning_rate", None)
            steps = state.max_steps if state.max_steps and state.max_steps > 0 else None
            warmup = args.get_warmup_steps(steps) if steps else None
            batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
            clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
            if not self.spectral:
                self._start_failure(steps, lr)
                return
            metrics = self._begin(model, stop_allowed=state.global_step == 0, assumed=assumed, lr=lr,
                                  optimizer=name or str(getattr(args, "optim", None)), warmup=warmup,
                                  batch_size=batch, seq_len=self.seq_len, steps=steps, grad_clip=clip,
                                  weight_decay=getattr(args, "weight_decay", None))
            self._start_failure(steps, lr)
            self._report(metrics, state.global_step)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if self.spectral:
                self._report(self._step(state.global_step, _current_lr(optimizer)), state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # a training-step log carries the loss, the gradient norm or the LR; ours (risk/...), the
            # evaluation's and the end-of-training summary do not
            if not logs or not any(k in logs for k in _HF_TRAIN_KEYS):
                return
            missing = [k for k in ("loss", "grad_norm") if k not in logs]
            if missing:
                self.failure.missing(missing, "the Trainer's logs (grad_norm is logged only with max_grad_norm > 0)")
                return
            metrics, stop = self._observe(state.global_step, logs["loss"], logs["grad_norm"])
            self._report(metrics, state.global_step)
            if stop:
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            self.failure.finish()

    RiskCallback.__module__ = __name__
    return RiskCallback


# ==================================================================== Lightning
def _make_lightning_callback():
    from lightning.pytorch.callbacks import Callback

    class LightningRiskCallback(_RiskWatch, Callback):
        """Divergence risk for a Lightning ``Trainer``: the behaviour of ``RiskCallback``.

        Reads the peak learning rate and the optimizer from ``trainer.optimizers[0]``, the steps
        from ``max_steps`` (else the estimated stepping batches), clipping from
        ``gradient_clip_val``; warmup and batch size, which Lightning does not expose, are
        arguments (the training corpus's medians when omitted, and the log says so). Metrics go to
        every logger of the trainer (``trainer.loggers``: MLflow, W&B, CSV, …) at the trainer's
        global step.

        The failure detector reads, every ``detect_every`` optimizer steps, the loss that
        ``training_step`` returned (``outputs["loss"]``) and the gradient norm before clipping (the
        callback computes it in ``on_before_optimizer_step`` on those steps only); with
        ``action="stop"`` a failing run is stopped through ``trainer.should_stop``, with one log
        line giving the reason. ``risk/p_failed``, ``risk/failing`` and ``risk/reason`` go to every
        logger of the trainer.

        Parameters
        ----------
        action, threshold, every, n_samples, predictor, blocks, input_shape, spectral, detector, marginal_loss, ladder
            As for ``RiskCallback``.
        detect_every : int, default 10
        warmup, batch_size : float, optional
        seq_len : int, optional
            Tokens per training sequence; the training corpus's median when omitted.
        """

        def __init__(self, action="warn", *, threshold=0.5, every=50, n_samples=256, predictor=None,
                     blocks=None, input_shape=None, warmup=None, batch_size=None, seq_len=None, spectral=True,
                     detector=None, detect_every=10, marginal_loss=None, ladder=None):
            super().__init__(action, threshold=threshold, every=every, n_samples=n_samples, predictor=predictor,
                             blocks=blocks, input_shape=input_shape, spectral=spectral, detector=detector,
                             detect_every=detect_every, marginal_loss=marginal_loss, ladder=ladder)
            self.warmup = warmup
            self.batch_size = batch_size
            self.seq_len = seq_len
            self._last_step = None
            self._grad_norm = None

        def setup(self, trainer, pl_module, stage):
            if self.action == "stop" and not hasattr(trainer, "should_stop"):
                raise UsageError(f"action='stop' needs a Lightning Trainer (it stops through trainer.should_stop); "
                                 f"{type(trainer).__name__} has none: use action='warn'")

        @staticmethod
        def _report(trainer, metrics: dict | None) -> None:
            if metrics:
                for lg in trainer.loggers:
                    lg.log_metrics(dict(metrics), step=trainer.global_step)

        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0] if trainer.optimizers else None
            assumed = []
            if self.warmup is None:
                assumed.append("warmup not given: assumed the training corpus's median")
            if self.batch_size is None:
                assumed.append("batch size not given: assumed the training corpus's median")
            steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            if steps is None:
                est = trainer.estimated_stepping_batches
                steps = int(est) if isinstance(est, (int, float)) and math.isfinite(est) else None
            clip = trainer.gradient_clip_val or None
            lr = _peak_lr(opt)
            self._last_step = trainer.global_step
            if not self.spectral:
                self._start_failure(steps, lr)
                return
            metrics = self._begin(pl_module, stop_allowed=trainer.global_step == 0, assumed=assumed,
                                  lr=lr, optimizer=opt if opt is not None else None,
                                  warmup=self.warmup, batch_size=self.batch_size, seq_len=self.seq_len, steps=steps,
                                  grad_clip=clip)
            self._start_failure(steps, lr)
            self._last_step = trainer.global_step
            self._report(trainer, metrics)

        def on_train_end(self, trainer, pl_module):
            self.failure.finish()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == self._last_step:  # gradient accumulation: no optimizer step since the last batch
                return
            self._last_step = step
            if step % self.detect_every == 0 and self._grad_norm is not None:
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                if loss is None:
                    self.failure.missing("loss", "what training_step returns (the loss, or a dict with 'loss')")
                else:
                    metrics, stop = self._observe(step, float(loss), self._grad_norm)
                    self._report(trainer, metrics)
                    if stop:
                        trainer.should_stop = True
            self._grad_norm = None
            if self.spectral:
                opt = trainer.optimizers[0] if trainer.optimizers else None
                self._report(trainer, self._step(step, _current_lr(opt)))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # before clipping; only on the steps the detector reads (this step becomes global_step + 1)
            if self.failure.run is not None and (trainer.global_step + 1) % self.detect_every == 0:
                self._grad_norm = _grad_norm(pl_module.parameters())

    LightningRiskCallback.__module__ = __name__
    return LightningRiskCallback


_FACTORIES = {"RiskCallback": _make_hf_callback, "LightningRiskCallback": _make_lightning_callback}


def __getattr__(name: str):
    if name in _FACTORIES:
        cls = _FACTORIES[name]()
        cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
