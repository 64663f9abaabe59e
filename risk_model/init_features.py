"""Init-time scale features of any network: one forward and one backward pass on a probe batch.

Two groups (the ``spectral`` group is the RKSP profile, ``featurize``):

``forward``
    per residual block, the update ratio RMS(y − x) / RMS(x) of the stream through the block
    (aggregated over all blocks and over the first, middle and last third of depth), the
    residual-stream growth log10 RMS(x_out of last block) / RMS(x_in of first block), the logit
    scale (std of the output logits) and, for a language model, the initial next-token loss on the
    probe minus ln(vocab).
``gradient`` (ours)
    one backward pass of that loss: log10 of the global gradient norm and, per parameter group,
    log10 RMS(W) (the measured init scale: Adam's first update moves every entry by about lr, so
    its relative size is lr / RMS(W)), log10 ‖g‖ and log10 ‖g‖/‖W‖ (SGD's relative first update
    per unit LR). Groups by role, read off names and shapes: ``embed`` (embedding tables),
    ``out`` (residual output projections: c_proj, o_proj, down_proj, out_proj, dense_4h_to_h,
    attention.dense, fc2, w2, wo), ``gain`` (1-D: norm gains and biases), ``hidden`` (every other
    matrix).

The probe: ``batch`` sequences of uniformly random token ids of length min(context, ``seq_len``),
seeded; the loss is next-token cross-entropy on it (a task-free stand-in for the first batch). The
caller's torch RNG is left as it was and the model's weights, gradients and train/eval mode are
restored. A network without an embedding that declares ``input_shape`` (an image classifier such as
the zoo's ViT, logits (B, C)) gets standard Gaussian images of that shape, as ``featurize``'s probe
draws them, and uniformly random class targets; other networks without an embedding get NaN for
the features that need a loss.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import nn

from featurize.capture import context_length

GROUPS = ("embed", "out", "hidden", "gain")
_OUT = re.compile(r"(c_proj|o_proj|down_proj|out_proj|dense_4h_to_h|attention\.dense|fc2|\.w2|\.wo)"
                  r"(\.base|\.spline)?\.weight$")
_THIRDS = ("early", "mid", "late")


def forward_feature_names() -> list[str]:
    return (["update_ratio_mean", "update_ratio_max", "log10_update_ratio_mean"]
            + [f"update_ratio_{t}" for t in _THIRDS]
            + ["log10_stream_growth", "log10_logit_std", "init_loss_excess"])


def structure_feature_names() -> list[str]:
    """``residual_stages`` (``featurize.capture.residual_stages`` of the first block)."""
    return ["residual_stages"]


def gradient_feature_names() -> list[str]:
    out = ["log10_grad_norm", "log10_n_params"]
    for g in GROUPS:
        out += [f"log10_rms_w_{g}", f"log10_grad_{g}", f"log10_grad_rel_{g}"]
    return out


def param_group(name: str, p: torch.Tensor, embed_ids: set[int]) -> str:
    """Role of a parameter: ``embed``, ``out``, ``gain`` or ``hidden`` (module docstring)."""
    if id(p) in embed_ids:
        return "embed"
    if p.dim() <= 1:
        return "gain"
    if _OUT.search(name):
        return "out"
    return "hidden"


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 and math.isfinite(x) else float("nan")


def probe_batch(model: nn.Module, vocab: int, *, batch: int = 8, seq_len: int = 32,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe (module docstring): inputs and next-token targets, each (batch, T) with
    T = min(context, seq_len), uniformly random ids from a private seeded generator."""
    ctx = context_length(model)
    T = min(ctx, seq_len) if ctx else seq_len
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, T + 1), generator=gen)    # (B, T+1)
    return ids[:, :-1], ids[:, 1:]                                   # (B, T), (B, T)


def probe_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits (B, T, V) on the probe's targets (B, T), or of a
    classifier's logits (B, C) on class targets (B,), in float32; targets are taken modulo V (a head
    narrower than the embedding's vocabulary)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                       targets.reshape(-1) % logits.shape[-1])


def init_features(model: nn.Module, *, blocks: list[nn.Module] | None = None, batch: int = 8,
                  seq_len: int = 32, seed: int = 0) -> dict[str, float]:
    """``forward`` and ``gradient`` features of ``model`` at its current weights (module doc).

    Parameters
    ----------
    model : nn.Module mapping token ids (B, T) to logits (B, T, V) (a tensor or an object with
        ``.logits``)
    blocks : the residual blocks (``featurize.find_blocks``); discovered when omitted
    batch, seq_len, seed : the probe

    Returns
    -------
    dict of float, keys ``forward_feature_names() + gradient_feature_names()`` (NaN where the
    network gives no token-id input or no logits), plus the raw ``init_loss``, ``grad_norm`` and
    ``vocab_size`` of the probe (not features: the dead-at-init check reads them)
    """
    feats = {k: float("nan") for k in forward_feature_names() + gradient_feature_names()
             + structure_feature_names() + ["init_loss", "grad_norm", "vocab_size"]}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    feats["log10_n_params"] = _log10(float(sum(p.numel() for _, p in params)))
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    embed_ids = {id(m.weight) for m in embeds}
    groups: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    for n, p in params:
        groups[param_group(n, p, embed_ids)].append(p)
    for g, ps in groups.items():
        if ps:
            sq = sum(float(p.detach().double().pow(2).sum()) for p in ps)
            feats[f"log10_rms_w_{g}"] = _log10(math.sqrt(sq / sum(p.numel() for p in ps)))
    from featurize.capture import declared_input_shape

    image_shape = None if embeds else declared_input_shape(model)
    if not embeds and image_shape is None:
        return feats
    if blocks is None:
        from featurize.capture import find_blocks

        _, blocks = find_blocks(model)
    if embeds:
        x_in, y_out = probe_batch(model, embeds[0].num_embeddings, batch=batch, seq_len=seq_len, seed=seed)
    else:  # an image classifier (declares ``input_shape``): Gaussian images as ``make_probe`` draws them
        gen = torch.Generator().manual_seed(seed)
        x_in = torch.randn((batch, *image_shape), generator=gen)                # (B, *input_shape)
        y_out = torch.randint(0, 2**31 - 1, (batch,), generator=gen)            # (B,) classes, taken mod C

    ratios: list[float] = []
    stream: list[float] = []
    first_call: list[tuple] = []    # (args, kwargs) of the first block's first call

    def hook(module, args, kwargs, output):
        if module is blocks[0] and not first_call:
            first_call.append((args, kwargs))
        x = args[0] if args else kwargs.get("hidden_states")
        y = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape:
            xd, yd = x.detach().double(), y.detach().double()
            rx = float(xd.pow(2).mean().sqrt())
            ratios.append(float((yd - xd).pow(2).mean().sqrt()) / max(rx, 1e-30))
            if not stream:
                stream.append(rx)
            stream.append(float(yd.pow(2).mean().sqrt()))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    saved_grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in params}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            out = model(x_in)
            logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
            if logits is None or logits.dim() != (3 if embeds else 2) or logits.shape[-1] < 2:
                return feats
            loss = probe_loss(logits, y_out)
            for _, p in params:
                p.grad = None
            loss.backward()
        for h in handles:
            h.remove()
        handles = []
        if first_call:
            from featurize.capture import residual_stages

            with torch.random.fork_rng(devices=[]):
                feats["residual_stages"] = residual_stages(blocks[0], *first_call[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    r = np.asarray(ratios[: len(blocks)], dtype=float)
    if r.size:
        feats["update_ratio_mean"] = float(r.mean())
        feats["update_ratio_max"] = float(r.max())
        feats["log10_update_ratio_mean"] = _log10(float(r.mean()))
        for t, part in zip(_THIRDS, np.array_split(r, 3)):
            feats[f"update_ratio_{t}"] = float(part.mean()) if part.size else float(r.mean())
    if len(stream) >= 2:
        feats["log10_stream_growth"] = _log10(stream[len(blocks)] / stream[0]) \
            if len(stream) > len(blocks) else _log10(stream[-1] / stream[0])
    feats["log10_logit_std"] = _log10(float(logits.detach().double().std()))
    feats["init_loss_excess"] = float(loss.detach()) - math.log(logits.shape[-1])
    feats["init_loss"] = float(loss.detach())          # not features: the dead-at-init check
    feats["vocab_size"] = float(logits.shape[-1])
    total = 0.0
    for g, ps in groups.items():
        gs = [p.grad for p in ps if p.grad is not None]
        if not gs:
            continue
        gsq = sum(float(x.double().pow(2).sum()) for x in gs)
        wsq = sum(float(p.detach().double().pow(2).sum()) for p in ps if p.grad is not None)
        total += gsq
        feats[f"log10_grad_{g}"] = _log10(math.sqrt(gsq))
        feats[f"log10_grad_rel_{g}"] = _log10(math.sqrt(gsq) / max(math.sqrt(wsq), 1e-30))
    feats["log10_grad_norm"] = _log10(math.sqrt(total))
    feats["grad_norm"] = math.sqrt(total) if math.isfinite(total) else float("inf")
    for n, p in params:  # restore the caller's gradients
        p.grad = saved_grads[n]
    return feats


# ---------------------------------------------------------------------------------------------------
# curvature (ours, a candidate group): the edge-of-stability learning rate at init and a line search
# along the optimizer's first update, on the same probe (featurize.curvature has the algorithms)
# ---------------------------------------------------------------------------------------------------

#: β1 of the corpus trainers' AdamW and Lion, and SGD's heavy-ball momentum
BETA1 = 0.9
#: micro-batches of the probe whose squared gradients make Adam's v (√v̂ + ε, the preconditioner)
PRECOND_MICRO = 4


def curvature_feature_names() -> list[str]:
    return ["ln_lr_eos", "ln_lr_overshoot", "ln_lr_line_min", "line_gain"]


def curvature_features(model: nn.Module, *, optimizer: str = "adamw", eps: float = 1e-8, batch: int = 8,
                       seq_len: int = 32, seed: int = 0, iters: int = 10) -> dict[str, float]:
    """Curvature features of ``model`` at its current weights for ``optimizer``'s first update.

    - ``ln_lr_eos``: ln of the edge-of-stability LR at init. SGD (momentum μ = ``BETA1``):
      2(1 + μ)/λ_max(H); AdamW and Lion: (2 + 2β1)/((1 − β1) λ_max(P⁻¹H)) with P = √v̂ + ε, v̂ the
      mean squared gradient over ``PRECOND_MICRO`` micro-batches of the probe (Lanczos, ``iters``
      Hessian–vector products; NaN where the model has no double backward).
    - ``ln_lr_overshoot``, ``ln_lr_line_min``: ln of the line search's overshoot and minimiser η
      along u, the first update per unit LR: g/(|g| + ε) for AdamW, sign(g) for Lion, g for SGD.
    - ``line_gain``: (L(θ) − min over the line)/L(θ).

    Plus the raw ``curvature_top_eig`` (λ_max of H or P⁻¹H), and ``seconds_eos`` and
    ``seconds_line``. The probe, the RNG, the weights, gradients and train/eval mode are handled as
    in ``init_features``.
    """
    import time

    from featurize import curvature as C

    feats = {k: float("nan") for k in curvature_feature_names() + ["curvature_top_eig", "seconds_eos",
                                                                    "seconds_line"]}
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeds:
        return feats
    x_in, y_out = probe_batch(model, embeds[0].num_embeddings, batch=batch, seq_len=seq_len, seed=seed)
    opt = optimizer.lower()

    def loss_on(rows: slice) -> torch.Tensor:
        out = model(x_in[rows])
        return probe_loss(out if isinstance(out, torch.Tensor) else out.logits, y_out[rows])

    whole = slice(None)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            g = C.flat_grad(model, lambda: loss_on(whole))                            # (n,)
            if not bool(torch.isfinite(g).all()):
                return feats
            t0 = time.perf_counter()
            try:
                if opt == "sgd":
                    lam = C.hessian_top_eig(model, lambda: loss_on(whole), iters=iters, seed=seed)
                    lr_eos = 2 * (1 + BETA1) / lam if lam > 0 else math.inf
                else:
                    micro = [C.flat_grad(model, lambda i=i: loss_on(slice(i, None, PRECOND_MICRO)))
                             for i in range(min(PRECOND_MICRO, len(x_in)))]
                    lam = C.preconditioned_top_eig(model, lambda: loss_on(whole),
                                                   C.adam_preconditioner(micro, eps), iters=iters, seed=seed)
                    lr_eos = (2 + 2 * BETA1) / ((1 - BETA1) * lam) if lam > 0 else math.inf
                feats["curvature_top_eig"] = lam
                feats["ln_lr_eos"] = math.log(lr_eos) if 0 < lr_eos < math.inf else math.nan
            except RuntimeError:                       # no double backward through this model
                pass
            feats["seconds_eos"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            u = g if opt == "sgd" else (torch.sign(g) if opt == "lion" else g / (g.abs() + eps))
            ls = C.line_search(model, lambda: loss_on(whole), u)
            feats["seconds_line"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    if math.isfinite(ls.loss0):
        feats["ln_lr_overshoot"] = math.log(ls.overshoot) if math.isfinite(ls.overshoot) else math.nan
        feats["ln_lr_line_min"] = math.log(ls.argmin)
        feats["line_gain"] = (ls.loss0 - ls.loss_min) / ls.loss0 if ls.loss0 > 0 else math.nan
    return feats
