"""Train one zoo model on one synthetic task and label the run (DESIGN §7).

Labels
    diverged : at some step the task loss > 50, or the gradient norm (before any clipping) > 500,
        or either is non-finite. ``diverge_step`` is that step (1-based; the optimizer has taken
        ``diverge_step - 1`` steps), ``diverge_reason`` one of ``nonfinite``, ``loss``,
        ``grad_norm``. Training stops there.
    dead_at_init : diverged at step 1, i.e. the loss or gradient norm of the *initial* weights is
        already over the limits (no update has happened: the learning rate cannot matter).
        ``init_loss`` is that first loss, ``init_loss_ratio`` its ratio to ln(vocab size)
        (ln 10 for the digits classes).
    collapsed : the run did not diverge but ended untrained: its final loss (mean task loss over
        the last 10 steps) is at least 95% of the task's ``marginal_loss``, the cross-entropy of
        the best context-free predictor (ln(V−4) for synthetic LM, ln(V/2) for associative
        recall, the entropy of the training labels for digits). **(ours)**

Baselines (paper Table 2)
    grad_norm_step1 (= grad_norm_init: the gradient norm at the initial weights, before any
    update), grad_norm_step100 (NaN if the run stopped earlier), grad_norm_var_1_100
    (population variance over the steps 1–100 that ran), loss_spikes_1_500: steps t ≤ 500 whose loss
    exceeds 1.5 × the median of the previous (up to) 20 losses, counted once at least 5 previous
    losses exist; a non-finite loss is a spike **(ours)**.

Recipe (corpus-v3 fields of ``RunConfig``)
    lr at step t (1-based): ``lr · min(1, t / warmup)`` during warmup, then constant, or with
    ``schedule = "cosine"`` ``lr · (0.1 + 0.9 · ½(1 + cos(π (t − W) / (steps − W))))`` for t > W
    (W = warmup): it reaches 10% of lr at the last step. AdamW β = (0.9, ``beta2``), ε = ``eps``;
    SGD momentum ``momentum``; Lion β = (0.9, 0.99). ``accum`` > 1 splits each batch of
    ``batch_size`` into that many micro-batches whose gradients are summed (each loss ÷ accum).

Held-out evaluation and horizons (corpus-v3)
    With ``eval_batches`` > 0, ``final_eval_loss`` is the mean task loss over the task's fixed
    held-out batches (``Task.eval_set``), in eval mode without gradients, after the last update
    (a diverged run: at the weights where it stopped). ``horizons`` (e.g. "300,1000", constant
    schedule only) evaluates after those many updates as well, and ``horizon_rows`` turns one run
    into one row per horizon that equals the row of a separate run of that many steps (same seed,
    same data order, same held-out set): its curves truncated there, its divergence if it came by
    then. ``update_rms_ratio``: RMS over all parameters of the last update divided by the RMS of
    the weights before it (NaN for a run that diverged by then). ``loss_curve_10`` and
    ``grad_norm_curve_10``: the loss and gradient norm at steps 1, 11, 21, … (float32).

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

from .spec import RunConfig, config_id, horizon_steps, run_id
from .archs import build_network, logits_of
from .tasks import make_task

from ..labels import GRAD_LIMIT, LOSS_LIMIT, divergence_reason  # noqa: F401 - the label's limits, re-exported
from ..labels import unstable
COLLAPSE_FRACTION = 0.95
CURVE_POINTS = 50
CURVE_EVERY = 10
COSINE_FLOOR = 0.1
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


def make_optimizer(name: str, params, lr: float, weight_decay: float, beta2: float = 0.95,
                   eps: float = 1e-8, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``adamw`` (β = 0.9, ``beta2``; ``eps``), ``lion`` (β = 0.9, 0.99) or ``sgd`` (``momentum``)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), eps=eps, weight_decay=weight_decay,
                                 foreach=True)
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
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
    eval_losses: dict | None = None    # {updates: held-out loss} at the horizons and the end
    update_rms: dict | None = None     # {updates: RMS(last update) / RMS(weights)}
    stop_eval_loss: float = math.nan   # held-out loss where a diverged run stopped


def lr_at(cfg: RunConfig, step: int) -> float:
    """The learning rate of 1-based ``step`` (module doc: warmup, then constant or cosine)."""
    lr = cfg.lr * min(1.0, step / cfg.warmup) if cfg.warmup > 0 else cfg.lr
    if cfg.schedule == "cosine" and step > cfg.warmup:
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        lr = cfg.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * frac)))
    return lr


@torch.no_grad()
def evaluate(model, task, batches, device: str = "cpu") -> float:
    """Mean task loss over held-out ``batches`` in eval mode (restores train mode)."""
    model.eval()
    tot = 0.0
    for x, y in batches:
        tot += float(task.loss(logits_of(model(x.to(device))), y.to(device)))
    model.train()
    return tot / len(batches)


def train(model, cfg: RunConfig, task, device: str = "cpu") -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps on ``task`` (linear warmup, then constant
    or cosine LR), stopping at the first step that meets the divergence rule of the module
    docstring. Step 1's loss and gradient norm are those of the initial weights. With
    ``cfg.eval_batches``, the held-out loss is taken at the horizons and the end."""
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.beta2,
                         cfg.eps, cfg.momentum)
    points = set(horizon_steps(cfg.horizons)) | {cfg.steps}
    held = task.eval_set(cfg.eval_batches) if cfg.eval_batches > 0 else None
    evals: dict[int, float] = {}
    urms: dict[int, float] = {}
    stop_eval = math.nan
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
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = task.batch()
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        if cfg.accum == 1:
            loss = task.loss(logits_of(model(x)), y)
            total = loss + kss.penalty() if kss is not None else loss
            total.backward()
        else:   # micro-batches of batch_size / accum; the recorded loss is their mean
            loss = 0.0
            for xm, ym in zip(x.chunk(cfg.accum), y.chunk(cfg.accum)):
                part = task.loss(logits_of(model(xm)), ym) / cfg.accum
                (part + kss.penalty() / cfg.accum if kss is not None else part).backward()
                loss = loss + part.detach()
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
            if held is not None:
                stop_eval = evaluate(model, task, held, device)
            break
        if step in points:
            before = [p.detach().clone() for p in params]
        opt.step()
        if step in points:
            with torch.no_grad():
                du = sum(float((p - b).pow(2).sum()) for p, b in zip(params, before))
                w2 = sum(float(b.pow(2).sum()) for b in before)
                n = sum(b.numel() for b in before)
            urms[step] = math.sqrt(du / n) / math.sqrt(w2 / n) if w2 > 0 else math.nan
            if held is not None:
                evals[step] = evaluate(model, task, held, device)
    if kss is not None:
        kss.remove()
    return TrainResult(np.asarray(losses), np.asarray(gnorms), diverge_step, diverge_reason,
                       eval_losses=evals, update_rms=urms, stop_eval_loss=stop_eval)


def truncate(res: TrainResult, steps: int) -> TrainResult:
    """The result a separate run of ``steps`` steps would have had (same seed and data): the
    first ``steps`` steps, diverged only if it diverged by then."""
    if res.diverge_step > 0 and res.diverge_step <= steps:
        return res
    return TrainResult(res.losses[:steps], res.grad_norms[:steps], -1, "", res.eval_losses,
                       res.update_rms, math.nan)


def v3_labels(res: TrainResult, steps: int) -> dict:
    """The corpus-v3 per-run fields of ``res`` read at ``steps`` updates (module doc); the
    per-model ``failed`` comes after the ladder (``risk_model.labels.ladder_summary``)."""
    r = truncate(res, steps)
    diverged = r.diverge_step > 0
    ev = r.stop_eval_loss if diverged else (r.eval_losses or {}).get(steps, math.nan)
    return dict(
        final_train_loss=float(np.mean(r.losses[-10:])), final_eval_loss=float(ev),
        update_rms_ratio=math.nan if diverged else float((r.update_rms or {}).get(steps, math.nan)),
        loss_curve_10=r.losses[::CURVE_EVERY].astype(np.float32).tolist(),
        grad_norm_curve_10=r.grad_norms[::CURVE_EVERY].astype(np.float32).tolist(),
        unstable=unstable(r.losses[::CURVE_EVERY], diverged),
    )


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
                     batch_size=cfg.batch_size, n_eval=cfg.eval_batches * cfg.batch_size)


def horizon_rows(res: TrainResult, cfg: RunConfig, task) -> list[tuple[RunConfig, dict]]:
    """One ``(config, labels)`` per horizon of ``cfg`` and its end, shortest first: the config
    is that of a separate run of that many steps (``horizons`` empty), the labels are
    ``run_labels`` and ``v3_labels`` read there, plus ``horizon_of`` (the steps actually run)."""
    from dataclasses import replace

    out = []
    for h in horizon_steps(cfg.horizons) + [cfg.steps]:
        c = replace(cfg, steps=h, horizons="")
        lab = {**run_labels(truncate(res, h), task), **v3_labels(res, h), "horizon_of": cfg.steps}
        out.append((c, lab))
    return out


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
