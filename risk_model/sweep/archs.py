"""Every architecture class of the sweep, built from one flat argument dict at random init.

Families (a run's ``family`` names its architecture class)
    gpt, moe, kan : our zoo decoder (``zoo.TransformerLM``) with its six norm placements
    vit           : our zoo vision transformer (``zoo.VisionTransformer``): the GPT blocks with
                    bidirectional attention over 2×2 patches of 8×8 images, six norm placements;
                    the one image family (``IMAGE_FAMILIES``, not in ``FAMILIES``, the language
                    models), trained on the ``digits`` task only                   [corpus-v3]
    mamba         : a Mamba-style selective state-space LM of our own, plain torch (``MambaLM``)
    hf_gpt2       : ``transformers.GPT2LMHeadModel`` from a ``GPT2Config`` (learned positions,
                    pre-LN, GELU MLP, tied head)
    hf_llama      : ``transformers.LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU, untied head)
    hf_neox       : ``transformers.GPTNeoXForCausalLM`` (partial RoPE, parallel attention + MLP
                    residual, LayerNorm, untied head)
    hf_gptj       : ``transformers.GPTJForCausalLM`` (one LayerNorm, attention and MLP in parallel,
                    rotary on half of each head, untied head)                       [corpus-v3]
    hf_bloom      : ``transformers.BloomForCausalLM`` (ALiBi position biases, no position
                    embedding, LayerNorm after the embedding, MLP 4×, tied head)    [corpus-v3]
    hf_qwen3      : ``transformers.Qwen3ForCausalLM`` (RMSNorm on queries and keys: qk-norm,
                    RoPE, SwiGLU, grouped-query attention with 2 heads per KV head) [corpus-v3]
    hf_gemma      : ``transformers.GemmaForCausalLM`` (embeddings scaled by √d, RMSNorm with
                    (1 + w) gains, GeGLU MLP, multi-query attention, tied head)    [corpus-v3]
    hf_phi        : ``transformers.PhiForCausalLM`` (parallel attention + MLP, rotary on half
                    of each head, LayerNorm, untied head with bias)                 [corpus-v3]

Initialisation knobs, the same for every family
    init_std  : std of every weight matrix not named below (the HF ``initializer_range``)
    embed_std : std of the token (and position) embeddings; 0 → ``init_std``
    out_std   : std of every residual output projection (attention and MLP/mixer output);
                0 → the family's own rule (GPT-2: ``init_std / sqrt(2L)``, HF Llama/NeoX: ``init_std``)
Biases are zero and norm gains one. The Hugging Face models are built with no download, dropout 0.

``transformers`` is imported only when an ``hf_*`` family is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from risk_model.zoo import FAMILIES as ZOO_FAMILIES
from risk_model.zoo import IMAGE_FAMILIES
from risk_model.zoo import MODEL_ARG_NAMES as ZOO_ARG_NAMES
from risk_model.zoo import NORMS, RMSNorm, build_model as build_zoo_model

HF_FAMILIES = ("hf_gpt2", "hf_llama", "hf_neox", "hf_gptj", "hf_bloom", "hf_qwen3", "hf_gemma", "hf_phi")
FAMILIES = ZOO_FAMILIES + ("mamba",) + HF_FAMILIES   # the language-model families
# norm placements each family can take (the HF families have their own, fixed one)
FAMILY_NORMS = {
    **{f: NORMS for f in ZOO_FAMILIES + IMAGE_FAMILIES},
    "mamba": ("rmsnorm", "pre_ln", "none"),
    "hf_gpt2": ("pre_ln",),
    "hf_llama": ("rmsnorm",),
    "hf_neox": ("pre_ln",),
    "hf_gptj": ("pre_ln",),
    "hf_bloom": ("pre_ln",),
    "hf_qwen3": ("rmsnorm",),
    "hf_gemma": ("rmsnorm",),
    "hf_phi": ("pre_ln",),
}


# ----------------------------------------------------------------------------------- Mamba


@dataclass
class MambaConfig:
    """Knobs of ``MambaLM`` (``asdict`` is a checkpoint's ``model_args``)."""

    vocab_size: int = 256
    block_size: int = 64          # context length (the featurizer reads it)
    d_model: int = 64
    n_layers: int = 4
    norm: str = "rmsnorm"         # rmsnorm | pre_ln | none, placed before each mixer
    expand: int = 2               # inner width = expand × d_model
    d_state: int = 8              # SSM state size per channel
    d_conv: int = 4               # causal depthwise convolution width
    init_std: float = 0.02
    embed_std: float = 0.0
    out_std: float = 0.0


class SelectiveSSM(nn.Module):
    """Mamba's mixer (Gu & Dao 2023) with a sequential selective scan, for short CPU contexts.

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t,  y_t = C_t·h_t + D ⊙ x_t,  out = W_o (y ⊙ silu(z))
    with Δ, B, C functions of the input (the "selective" part) and A = −exp(A_log) diagonal.
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        d, di, n = cfg.d_model, cfg.expand * cfg.d_model, cfg.d_state
        self.d_inner, self.d_state = di, n
        self.dt_rank = max(1, math.ceil(d / 16))
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        B, T, _ = x.shape
        xi, z = self.in_proj(x).chunk(2, dim=-1)                              # 2 × (B, T, di)
        xi = F.silu(self.conv(xi.transpose(1, 2))[..., :T].transpose(1, 2))  # (B, T, di)
        dt, Bm, Cm = self.x_proj(xi).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))                                     # (B, T, di)
        A = -torch.exp(self.A_log)                                            # (di, n)
        dA = torch.exp(dt.unsqueeze(-1) * A)                                  # (B, T, di, n)
        dBx = dt.unsqueeze(-1) * Bm.unsqueeze(2) * xi.unsqueeze(-1)           # (B, T, di, n)
        # unbind once: indexing dA[:, t] in the loop would make every backward step zero-fill a
        # full (B, T, di, n) gradient (quadratic in T)
        dA_t, dBx_t = dA.unbind(1), dBx.unbind(1)                            # T × (B, di, n)
        h = dBx_t[0]                                                          # (B, di, n)
        hs = [h]
        for t in range(1, T):                                                 # one fused op a step
            h = torch.addcmul(dBx_t[t], dA_t[t], h)                           # (B, di, n)
            hs.append(h)
        H = torch.stack(hs, dim=1)                                            # (B, T, di, n)
        y = torch.einsum("btdn,btn->btd", H, Cm) + xi * self.D                # (B, T, di)
        return self.out_proj(y * F.silu(z))                                   # (B, T, d)


class MambaBlock(nn.Module):
    """x + mixer(norm(x))."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = {"rmsnorm": lambda: RMSNorm(cfg.d_model), "pre_ln": lambda: nn.LayerNorm(cfg.d_model),
                     "none": nn.Identity}[cfg.norm]()
        self.mixer = SelectiveSSM(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return x + self.mixer(self.norm(x))


class MambaLM(nn.Module):
    """Token embedding, ``blocks`` of selective-SSM mixers, final norm, tied head."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        if cfg.norm not in FAMILY_NORMS["mamba"]:
            raise ValueError(f"mamba norm must be one of {FAMILY_NORMS['mamba']}, got {cfg.norm!r}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model) if cfg.norm != "none" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        std, emb = cfg.init_std, cfg.embed_std or cfg.init_std
        out = cfg.out_std or cfg.init_std / math.sqrt(cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("A_log") or name.endswith(".D") or p.dim() == 1 and "norm" in name:
                continue                                   # A, D and norm gains keep their init
            if name.endswith("dt_proj.bias"):              # Δ = softplus(bias) ∈ [1e-3, 1e-1]
                dt = torch.exp(torch.rand_like(p) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                with torch.no_grad():
                    p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name == "wte.weight":
                nn.init.normal_(p, 0.0, emb)
            elif name.endswith("out_proj.weight"):
                nn.init.normal_(p, 0.0, out)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)                      # (B, T, d)
        for block in self.blocks:
            x = block(x)                       # (B, T, d)
        return self.lm_head(self.norm_f(x))   # (B, T, V)


# ----------------------------------------------------------------------------------- Hugging Face


def _hf_model(family: str, a: dict) -> nn.Module:
    """A Hugging Face causal LM of ``family`` at random init (no download), dropout 0."""
    import transformers

    d, L, H = a["d_model"], a["n_layers"], a["n_heads"]
    common = dict(vocab_size=a["vocab_size"], initializer_range=a["init_std"], bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    if family == "hf_gpt2":
        cfg = transformers.GPT2Config(n_embd=d, n_layer=L, n_head=H, n_positions=a["block_size"],
                                      n_inner=a["mlp_ratio"] * d, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, **common)
        model, out_names = transformers.GPT2LMHeadModel(cfg), ("attn.c_proj.weight", "mlp.c_proj.weight")
        emb_names, out_rule = ("wte.weight", "wpe.weight"), a["init_std"] / math.sqrt(2 * L)
    elif family == "hf_llama":
        cfg = transformers.LlamaConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                       num_key_value_heads=H, intermediate_size=a["mlp_ratio"] * d,
                                       max_position_embeddings=a["block_size"],
                                       tie_word_embeddings=False, **common)
        model, out_names = transformers.LlamaForCausalLM(cfg), ("o_proj.weight", "down_proj.weight")
        emb_names, out_rule = ("embed_tokens.weight",), a["init_std"]
    elif family == "hf_neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                         intermediate_size=a["mlp_ratio"] * d,
                                         max_position_embeddings=a["block_size"], rotary_pct=0.25,
                                         use_parallel_residual=True, hidden_dropout=0.0,
                                         attention_dropout=0.0, tie_word_embeddings=False, **common)
        model = transformers.GPTNeoXForCausalLM(cfg)
        out_names = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
        emb_names, out_rule = ("embed_in.weight",), a["init_std"]
    elif family == "hf_gptj":
        cfg = transformers.GPTJConfig(n_embd=d, n_layer=L, n_head=H, n_positions=a["block_size"],
                                      rotary_dim=max(2, (d // H) // 2 // 2 * 2), n_inner=a["mlp_ratio"] * d,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      tie_word_embeddings=False, **common)
        model, out_names = transformers.GPTJForCausalLM(cfg), ("attn.out_proj.weight", "mlp.fc_out.weight")
        emb_names, out_rule = ("wte.weight",), a["init_std"]
    elif family == "hf_bloom":
        cfg = transformers.BloomConfig(hidden_size=d, n_layer=L, n_head=H, hidden_dropout=0.0,
                                       attention_dropout=0.0, **common)
        model = transformers.BloomForCausalLM(cfg)
        out_names = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
        emb_names, out_rule = ("word_embeddings.weight",), a["init_std"]
    elif family == "hf_qwen3":
        cfg = transformers.Qwen3Config(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                       num_key_value_heads=max(1, H // 2) if H % 2 == 0 else H,
                                       head_dim=d // H, intermediate_size=a["mlp_ratio"] * d,
                                       max_position_embeddings=a["block_size"], tie_word_embeddings=False,
                                       attention_dropout=0.0, **common)
        model, out_names = transformers.Qwen3ForCausalLM(cfg), ("o_proj.weight", "down_proj.weight")
        emb_names, out_rule = ("embed_tokens.weight",), a["init_std"]
    elif family == "hf_gemma":
        cfg = transformers.GemmaConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                       num_key_value_heads=1, head_dim=d // H,
                                       intermediate_size=a["mlp_ratio"] * d,
                                       max_position_embeddings=a["block_size"], attention_dropout=0.0,
                                       **common)
        model, out_names = transformers.GemmaForCausalLM(cfg), ("o_proj.weight", "down_proj.weight")
        emb_names, out_rule = ("embed_tokens.weight",), a["init_std"]
    elif family == "hf_phi":
        cfg = transformers.PhiConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                     intermediate_size=a["mlp_ratio"] * d, partial_rotary_factor=0.5,
                                     max_position_embeddings=a["block_size"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                                     **common)
        model, out_names = transformers.PhiForCausalLM(cfg), ("self_attn.dense.weight", "mlp.fc2.weight")
        emb_names, out_rule = ("embed_tokens.weight",), a["init_std"]
    else:
        raise ValueError(f"unknown Hugging Face family {family!r}")
    emb = a["embed_std"] or a["init_std"]
    out = a["out_std"] or out_rule
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.endswith(n) for n in emb_names):
                p.normal_(0.0, emb)
            elif any(name.endswith(n) for n in out_names):
                p.normal_(0.0, out)
    return model


# ----------------------------------------------------------------------------------- dispatch

ARCH_ARG_NAMES = tuple(dict.fromkeys(
    ZOO_ARG_NAMES + tuple(f.name for f in fields(MambaConfig)) + ("family",)))


def build_network(arch: dict) -> nn.Module:
    """A freshly initialised network of ``arch["family"]`` (seed torch's RNG before calling).

    ``arch`` holds the zoo's ``TransformerConfig`` fields plus ``init_std``/``embed_std``/
    ``out_std``; keys a family does not use are ignored. The network maps token ids (B, T) to
    logits (B, T, V) (Hugging Face models return an output object with ``.logits``); an image
    family maps images (B, H, W) to class logits (B, n_classes).
    """
    family = arch.get("family", "gpt")
    if family in ZOO_FAMILIES or family in IMAGE_FAMILIES:
        return build_zoo_model({k: v for k, v in arch.items() if k in ZOO_ARG_NAMES})
    if family == "mamba":
        names = {f.name for f in fields(MambaConfig)}
        args = {k: v for k, v in arch.items() if k in names}
        args["expand"] = max(1, int(arch.get("mlp_ratio", 4)) // 2)
        return MambaLM(MambaConfig(**args))
    if family in HF_FAMILIES:
        return _hf_model(family, arch)
    raise ValueError(f"family must be one of {', '.join(FAMILIES + IMAGE_FAMILIES)}, got {family!r}")


def logits_of(output) -> torch.Tensor:
    """The logits tensor of a network's forward output (tensor or Hugging Face output object)."""
    return output if isinstance(output, torch.Tensor) else output.logits
