"""Train one zoo model on one synthetic task and label the run (DESIGN §7).

Labels
    diverged : at some step the task loss > 50, or the gradient norm (before any clipping) > 500,
        or either is non-finite. ``diverge_step`` is that step (1-based; the optimizer has taken
        ``diverge_step - 1`` steps), ``diverge_reason`` one of ``nonfinite``, ``loss``,
        ``grad_norm``. Training stops there.
    dead_at_init : diverged at step 1, i.e. the loss or gradient norm of the *initial* weights is
        already over the limits (no update has happened: the learning rate cannot matter).
        ``init_loss`` is that first loss, ``init_loss_ratio`` its ratio to ln(vocab size).
    collapsed : the run did not diverge but ended untrained: its final loss (mean task loss over
        the last 10 steps) is at least 95% of the task's ``marginal_loss``, the cross-entropy of
        the best context-free predictor (ln(V−4) for synthetic LM, ln(V/2) for associative
        recall). **(ours)**

Baselines (paper Table 2)
    grad_norm_step1 (= grad_norm_init: the gradient norm at the initial weights, before any
    update), grad_norm_step100 (NaN if the run stopped earlier), grad_norm_var_1_100
    (population variance over the steps 1–100 that ran), loss_spikes_1_500: steps t ≤ 500 whose loss
    exceeds 1.5 × the median of the previous (up to) 20 losses, counted once at least 5 previous
    losses exist; a non-finite loss is a spike **(ours)**.

The init profile (``featurize.profile``) is taken before the first optimizer step.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from .spec import RunConfig, config_id, run_id
from .archs import build_network, logits_of
from .tasks import make_task

from ..labels import GRAD_LIMIT, LOSS_LIMIT, divergence_reason  # noqa: F401 - the label's limits, re-exported
COLLAPSE_FRACTION = 0.95
CURVE_POINTS = 50
SPIKE_FACTOR, SPIKE_WINDOW, SPIKE_MIN_HISTORY = 1.5, 20, 5


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((m * b1 + p.grad * (1 - b1)).sign_(), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return None


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` (β = 0.9, 0.95), ``lion`` (β = 0.9, 0.99) or ``sgd`` (momentum 0.9)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                 foreach=True)
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay,
                               foreach=True)
    raise ValueError(f"optimizer must be adamw, lion or sgd, got {name!r}")


def count_spikes(losses: np.ndarray, upto: int = 500) -> int:
    """Loss spikes among the first ``upto`` steps (rule in the module docstring)."""
    n = 0
    for t in range(min(upto, len(losses))):
        hist = losses[max(0, t - SPIKE_WINDOW):t]
        if len(hist) < SPIKE_MIN_HISTORY:
            continue
        if not math.isfinite(losses[t]) or losses[t] > SPIKE_FACTOR * np.median(hist):
            n += 1
    return n


def downsample(values: np.ndarray, points: int = CURVE_POINTS) -> list[float]:
    """``points`` values at evenly spaced steps, first and last included (all if fewer)."""
    if len(values) <= points:
        return [float(v) for v in values]
    idx = np.unique(np.linspace(0, len(values) - 1, points).round().astype(int))
    return [float(values[i]) for i in idx]


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("divergence-risk")
    except PackageNotFoundError:
        pkg = "unknown"
    return f"divergence-risk {pkg}; torch {torch.__version__}; numpy {np.__version__}; " \
           f"python {platform.python_version()}"


def init_profile(model, cfg: RunConfig) -> tuple[dict, pd.DataFrame | None, str]:
    """(aggregates, layers table, error message) of the model at its current weights."""
    import featurize

    try:
        # a coarser Kreiss grid than the default keeps the sweep fast; a grid search can only
        # under-estimate the sup, and the refinement that follows recovers it on most layers
        prof = featurize.profile(model, n_samples=cfg.profile_samples, seed=cfg.seed, rank=cfg.profile_rank,
                                 kreiss_grid=cfg.kreiss_grid or None)
    except (featurize.CaptureError, np.linalg.LinAlgError, ValueError) as e:
        nan_aggs = {f"{c}_{s}": math.nan for c in featurize.AGGREGATED
                    for s in ("mean", "max", "min", "std")}
        return {**nan_aggs, "n_degenerate": -1}, None, f"{type(e).__name__}: {e}"[:300]
    aggs = {k: float(v) for k, v in prof.aggregates.items() if k != "n_layers"}
    aggs["n_degenerate"] = int(prof.aggregates["n_degenerate"])
    return aggs, prof.layers, ""


@dataclass
class TrainResult:
    """What one training run did: per-step losses and gradient norms, and the divergence label."""

    losses: np.ndarray          # (steps_run,) task loss at each step, before that step's update
    grad_norms: np.ndarray      # (steps_run,) global gradient norm before clipping
    diverge_step: int           # 1-based step of divergence; -1 if none
    diverge_reason: str         # "", "nonfinite", "loss" or "grad_norm"


def train(model, cfg: RunConfig, task) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps on ``task`` (linear warmup, then constant
    LR), stopping at the first step that meets the divergence rule of the module docstring.
    Step 1's loss and gradient norm are those of the initial weights."""
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    kss = None
    if cfg.kss_alpha > 0:
        from featurize.shaping import KoopmanSpectralShaping

        kss = KoopmanSpectralShaping(model, alpha=cfg.kss_alpha, every=cfg.kss_every,
                                     seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    gnorms: list[float] = []
    diverge_step, diverge_reason = -1, ""
    model.train()
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * min(1.0, step / cfg.warmup) if cfg.warmup > 0 else cfg.lr
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = task.batch()
        loss = task.loss(logits_of(model(x)), y)
        total = loss + kss.penalty() if kss is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            gn = float(torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])))
        lv = float(loss.detach())
        losses.append(lv)
        gnorms.append(gn)
        reason = divergence_reason(lv, gn)
        if reason is not None:
            diverge_step, diverge_reason = step, reason
        if diverge_step > 0:
            break
        opt.step()
    if kss is not None:
        kss.remove()
    return TrainResult(np.asarray(losses), np.asarray(gnorms), diverge_step, diverge_reason)


def run_labels(res: TrainResult, task) -> dict:
    """Labels and baseline statistics of one run (module docstring)."""
    L, G = res.losses, res.grad_norms
    diverged = res.diverge_step > 0
    final_loss = float(np.mean(L[-10:]))
    return dict(
        diverged=diverged, diverge_step=int(res.diverge_step), diverge_reason=res.diverge_reason,
        dead_at_init=res.diverge_step == 1,
        collapsed=bool(not diverged and final_loss >= COLLAPSE_FRACTION * task.marginal_loss),
        init_loss=float(L[0]), init_loss_ratio=float(L[0] / task.uniform_loss),
        final_loss=final_loss, marginal_loss=task.marginal_loss, steps_run=len(L),
        grad_norm_init=float(G[0]), grad_norm_step1=float(G[0]),
        grad_norm_step100=float(G[99]) if len(G) >= 100 else math.nan,
        grad_norm_var_1_100=float(np.var(G[:100])),
        loss_spikes_1_500=count_spikes(L, 500),
        loss_curve=downsample(L), grad_norm_curve=downsample(G),
    )


def make_run_task(cfg: RunConfig):
    return make_task(cfg.task, seed=cfg.seed, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size,
                     batch_size=cfg.batch_size)


def train_run(cfg: RunConfig) -> tuple[dict, pd.DataFrame]:
    """Profile at init, train, label. Returns ``(row, layers)``: one corpus row and the per-layer
    profile table (``run_id``, ``layer`` and ``featurize.PROFILE_COLUMNS``; empty when the
    profile failed, with the reason in ``row["profile_error"]``)."""
    import featurize

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model_args())
    task = make_run_task(cfg)

    tp = time.perf_counter()
    aggs, layers, profile_error = init_profile(model, cfg)
    profile_seconds = time.perf_counter() - tp

    res = train(model, cfg, task)
    rid = run_id(cfg)
    row = dict(
        run_id=rid, config_id=config_id(cfg), **asdict(cfg), **run_labels(res, task),
        n_params=sum(p.numel() for p in model.parameters()),
        **aggs, profile_error=profile_error, profile_seconds=profile_seconds,
        seconds=time.perf_counter() - t0, versions=versions(),
    )
    if layers is None:
        layers = pd.DataFrame(columns=featurize.PROFILE_COLUMNS)
    layers = layers.copy()
    layers.insert(0, "run_id", rid)
    return row, layers
