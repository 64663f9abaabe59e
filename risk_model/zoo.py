"""Model zoo for the sweep: a GPT-2-style decoder with a norm switch, plus MoE and KAN variants,
and a small vision transformer.

One readable file in the manner of nanoGPT's ``model.py``. Every family keeps its residual blocks
in ``model.blocks`` (an ``nn.ModuleList``), and every block maps the residual stream (B, T, d) to
(B, T, d), so the featurizer finds and hooks them.

Families (``TransformerConfig.family``)
    gpt : causal self-attention + GELU MLP
    moe : causal self-attention + a mixture of ``n_experts`` GELU MLPs with top-``top_k`` routing
    kan : causal self-attention + a KAN-style MLP (learnable per-input univariate functions on a
          Gaussian radial basis, as in FastKAN) in place of the GELU MLP
    vit : an image classifier (``VisionTransformer``, ``IMAGE_FAMILIES``): single-channel
          ``image_size``² images (B, H, W) cut into ``patch_size``² patches (row-major, 16 tokens
          for 8×8 images and 2×2 patches), a linear patch embedding plus a learned position
          embedding, the GPT blocks with *bidirectional* self-attention, the final norm, a mean
          over the tokens and a linear head over ``n_classes``: logits (B, n_classes). It has no
          ``nn.Embedding``; it declares ``input_shape`` = (image_size, image_size), which the
          featurizer's probe uses. ``vocab_size`` and ``block_size`` do not apply.

Norm placements (``TransformerConfig.norm``), with f a sublayer (attention or MLP) and s the
``residual_scale``:
    pre_ln   x + s·f(LN(x))                           final LN before the head
    post_ln  LN(x + s·f(x))
    rmsnorm  x + s·f(RMS(x))                          final RMSNorm before the head
    deepnorm LN(α·x + s·f(x)), α = (2L)^¼, branch weights initialised ×β = (8L)^-¼ (DeepNet)
    subln    x + s·f_out(LN(f_in(LN(x))))             extra LN inside each sublayer (Magneto)
    none     x + s·f(x)                               no normalisation anywhere

Checkpoints are plain dicts ``{"model_args": {...}, "state_dict": {...}}`` that load with
``torch.load(path, weights_only=True)``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("pre_ln", "post_ln", "rmsnorm", "deepnorm", "subln", "none")
FAMILIES = ("gpt", "moe", "kan")    # language models: token ids (B, T) -> logits (B, T, V)
IMAGE_FAMILIES = ("vit",)           # image classifiers: images (B, H, W) -> logits (B, n_classes)


@dataclass
class TransformerConfig:
    """Every knob of a zoo model; ``asdict(config)`` is the checkpoint's ``model_args``."""

    family: str = "gpt"
    norm: str = "pre_ln"
    vocab_size: int = 256
    block_size: int = 64         # context length (the featurizer reads this)
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    init_scale: float = 1.0      # multiplier on every init std (base std ``init_std``)
    init_std: float = 0.02       # base std of weight matrices (GPT-2: 0.02)
    embed_std: float = 0.0       # std of token/position embeddings; 0 → init_std × init_scale
    out_std: float = 0.0         # std of residual output projections; 0 → GPT-2 rule (÷ √(2L))
    residual_scale: float = 1.0  # multiplier s on every residual branch output
    n_experts: int = 4           # moe only
    top_k: int = 2               # moe only
    kan_grid: int = 6            # kan only: Gaussian basis functions per input
    image_size: int = 8          # vit only: images are image_size × image_size, one channel
    patch_size: int = 2          # vit only: square patches; (image_size / patch_size)² tokens
    n_classes: int = 10          # vit only: classifier outputs

    def __post_init__(self) -> None:
        if self.family not in FAMILIES + IMAGE_FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES + IMAGE_FAMILIES}, got {self.family!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "mlp_ratio",
                     "n_experts", "top_k", "kan_grid", "image_size", "patch_size", "n_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide image_size={self.image_size}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        for name in ("init_scale", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("embed_std", "out_std"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0: the default rule), got {getattr(self, name)!r}")


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def make_norm(kind: str, d: int) -> nn.Module:
    """``"ln"`` → LayerNorm, ``"rmsnorm"`` → RMSNorm, ``"none"`` → Identity."""
    if kind not in ("ln", "rmsnorm", "none"):
        raise ValueError(f"norm layer kind must be ln, rmsnorm or none, got {kind!r}")
    if kind == "none":
        return nn.Identity()
    return RMSNorm(d) if kind == "rmsnorm" else nn.LayerNorm(d)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, causal for the language families, bidirectional for ``vit``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.causal = cfg.family not in IMAGE_FAMILIES
        self.c_attn = nn.Linear(d, 3 * d)
        self.inner_norm = make_norm("ln", d) if cfg.norm == "subln" else nn.Identity()
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                             # 3 × (B, T, C)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)   # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)   # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)   # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                     # (B, T, C)
        return self.c_proj(self.inner_norm(y))                               # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        self.c_fc = nn.Linear(d, h)
        self.inner_norm = make_norm("ln", h) if cfg.norm == "subln" else nn.Identity()
        self.c_proj = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x))                 # (B, T, 4d)
        return self.c_proj(self.inner_norm(h))   # (B, T, d)


class MoE(nn.Module):
    """Top-k routed mixture of GELU MLPs (Shazeer et al. 2017): each token goes to its k
    highest-scoring experts, weighted by the softmax of those k router logits."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)                                   # (N, d)
        top, idx = self.router(flat).topk(self.top_k, dim=-1)        # (N, k), (N, k)
        gates = top.softmax(-1)                                      # (N, k)
        out = torch.zeros_like(flat)                                 # (N, d)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)            # tokens routed to e
            if tok.numel():
                y = expert(flat[tok]) * gates[tok, slot].unsqueeze(-1)  # (n_e, d)
                out = out.index_add(0, tok, y)
        return out.view(B, T, C)                                     # (B, T, d)


class KANLayer(nn.Module):
    """y = W_s · vec(φ(x)) + W_b · silu(x), φ_g(x) = exp(-((x - c_g)/h)²) on a fixed grid."""

    def __init__(self, d_in: int, d_out: int, grid: int):
        super().__init__()
        self.register_buffer("centers", torch.linspace(-2.0, 2.0, grid), persistent=False)
        self.inv_h = (grid - 1) / 4.0
        self.spline = nn.Linear(d_in * grid, d_out, bias=False)
        self.base = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = torch.exp(-((x.unsqueeze(-1) - self.centers) * self.inv_h) ** 2)  # (B, T, d_in, G)
        return self.spline(phi.flatten(-2)) + self.base(F.silu(x))              # (B, T, d_out)


class KANMLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.d_model * max(1, cfg.mlp_ratio // 2)  # basis expansion costs ×G
        self.c_fc = KANLayer(d, h, cfg.kan_grid)
        self.inner_norm = make_norm("ln", h) if cfg.norm == "subln" else nn.Identity()
        self.c_proj = KANLayer(h, d, cfg.kan_grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.inner_norm(self.c_fc(x)))  # (B, T, d)


class Block(nn.Module):
    """One residual block: attention sublayer then feed-forward sublayer, norm placed per config."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.norm = cfg.norm
        self.s = cfg.residual_scale
        self.alpha = (2.0 * cfg.n_layers) ** 0.25 if cfg.norm == "deepnorm" else 1.0
        kind = "rmsnorm" if cfg.norm == "rmsnorm" else ("none" if cfg.norm == "none" else "ln")
        self.ln_1 = make_norm(kind, d)
        self.ln_2 = make_norm(kind, d)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = {"gpt": MLP, "moe": MoE, "kan": KANMLP, "vit": MLP}[cfg.family](cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        if self.norm in ("post_ln", "deepnorm"):
            x = self.ln_1(self.alpha * x + self.s * self.attn(x))   # (B, T, d)
            return self.ln_2(self.alpha * x + self.s * self.ffn(x))  # (B, T, d)
        x = x + self.s * self.attn(self.ln_1(x))                     # (B, T, d)
        return x + self.s * self.ffn(self.ln_2(x))                   # (B, T, d)


def _final_norm(cfg: TransformerConfig) -> nn.Module:
    """The norm before the head: for the pre-norm placements only (post-norm blocks end with one)."""
    final = cfg.norm in ("pre_ln", "rmsnorm", "subln")
    return make_norm("rmsnorm" if cfg.norm == "rmsnorm" else "ln", cfg.d_model) if final else nn.Identity()


_EMBEDDINGS = ("wte.weight", "wpe.weight", "patch_embed.weight", "pos_embed")


def _init_weights(model: nn.Module, cfg: TransformerConfig) -> None:
    """GPT-2 initialisation, with the config's std knobs (module doc of ``risk_model.sweep.archs``)."""
    std = cfg.init_std * cfg.init_scale
    beta = (8.0 * cfg.n_layers) ** -0.25 if cfg.norm == "deepnorm" else 1.0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() == 1:  # norm gains
            nn.init.ones_(p)
        elif name in _EMBEDDINGS:
            nn.init.normal_(p, 0.0, cfg.embed_std or std)
        elif name.endswith("c_proj.weight") or name.endswith("c_proj.spline.weight") \
                or name.endswith("c_proj.base.weight"):
            # GPT-2: residual output projections scaled by 1/sqrt(2L); DeepNet: also ×β
            nn.init.normal_(p, 0.0, cfg.out_std or std * beta / math.sqrt(2 * cfg.n_layers))
        elif cfg.norm == "deepnorm" and ("c_fc" in name or "c_attn" in name):
            nn.init.normal_(p, 0.0, std * beta)
        else:
            nn.init.normal_(p, 0.0, std)


class TransformerLM(nn.Module):
    """Decoder-only LM: token + position embedding, ``blocks``, final norm, tied head."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = _final_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        self._init_weights()

    def _init_weights(self) -> None:
        _init_weights(self, self.config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, d)
        for block in self.blocks:
            x = block(x)                   # (B, T, d)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


class VisionTransformer(nn.Module):
    """ViT for single-channel square images: patch embedding + learned positions, ``blocks``
    (bidirectional attention), final norm, mean over tokens, linear head (module doc: ``vit``)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.family not in IMAGE_FAMILIES:
            raise ValueError(f"VisionTransformer needs an image family {IMAGE_FAMILIES}, got {cfg.family!r}")
        self.config = cfg
        p = cfg.patch_size
        self.n_patches = (cfg.image_size // p) ** 2
        self.patch_embed = nn.Linear(p * p, cfg.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_patches, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = _final_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        _init_weights(self, cfg)

    @property
    def input_shape(self) -> tuple[int, int]:
        """The per-example input shape (H, W), without the batch axis."""
        return (self.config.image_size, self.config.image_size)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) images -> (B, N, p²) flattened patches, row-major over the patch grid."""
        if images.dim() != 3 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (B, {self.input_shape[0]}, {self.input_shape[1]}), "
                             f"got {tuple(images.shape)}")
        B, H, W = images.shape
        p = self.config.patch_size
        x = images.reshape(B, H // p, p, W // p, p)                # (B, H/p, p, W/p, p)
        return x.permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)     # (B, N, p²)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, H, W) -> (B, n_classes)
        x = self.patch_embed(self.patches(images.float())) + self.pos_embed  # (B, N, d)
        for block in self.blocks:
            x = block(x)                                                     # (B, N, d)
        return self.head(self.ln_f(x).mean(dim=1))                           # (B, C)


MODEL_ARG_NAMES = tuple(f.name for f in fields(TransformerConfig))


def build_model(model_args: dict) -> TransformerLM | VisionTransformer:
    """A freshly initialised zoo model from ``model_args`` (the fields of ``TransformerConfig``):
    a ``VisionTransformer`` for the image families, else a ``TransformerLM``.

    Unknown keys raise ``ValueError`` naming them; missing keys take the dataclass defaults.
    """
    unknown = sorted(set(model_args) - set(MODEL_ARG_NAMES))
    if unknown:
        raise ValueError(f"unknown model_args: {', '.join(unknown)}")
    cfg = TransformerConfig(**model_args)
    return VisionTransformer(cfg) if cfg.family in IMAGE_FAMILIES else TransformerLM(cfg)


def save_checkpoint(model: TransformerLM | VisionTransformer, path: str | Path) -> Path:
    """Write ``{"model_args", "state_dict"}``; loads back with ``torch.load(weights_only=True)``."""
    path = Path(path)
    torch.save({"model_args": asdict(model.config), "state_dict": model.state_dict()}, path)
    return path


def load_checkpoint(path: str | Path) -> TransformerLM | VisionTransformer:
    """Rebuild a zoo model from ``save_checkpoint``'s file (safe: ``weights_only=True``)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a zoo checkpoint (need keys model_args and state_dict)")
    model = build_model(dict(ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model
