"""A decoder-only transformer language model, configured by :class:`distlm.config.ModelConfig`.

Pre-norm blocks (``x + attn(norm(x))``, ``x + mlp(norm(x))``), a final norm and a linear LM
head, optionally tied to the token embedding. The options are the usual ones of GPT-2 and
Llama style models: LayerNorm or RMSNorm, sinusoidal, learned or rotary positions, GELU or
SwiGLU MLP, multi-head or grouped-query attention.

This module is plain torch: no process groups, no DeepSpeed. Tensor parallelism swaps the
``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``up_proj``/``gate_proj``/``down_proj``
linears for parallel ones, so those names are part of the interface.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from distlm.config import ModelConfig


def _sdpa_has_gqa() -> bool:
    # enable_gqa arrived in torch 2.5; the package allows torch>=2.4.
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: read its docstring
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


_SDPA_GQA = _sdpa_has_gqa()


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """The MLP width: ``cfg.d_ff``, or the default for the MLP kind.

    SwiGLU has three matrices instead of two, so its default width is 2/3 of 4*d_model to keep
    the parameter count of a GELU MLP, rounded up to a multiple of 64 (8 for small models, where
    rounding to 64 would add a large fraction) so the matmuls tile well on GPUs.
    """
    if cfg.d_ff is not None:
        return cfg.d_ff
    if cfg.mlp == "gelu":
        return 4 * cfg.d_model
    multiple = 64 if cfg.d_model >= 512 else 8
    hidden = int(8 * cfg.d_model / 3)
    return multiple * math.ceil(hidden / multiple)


# --------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no mean subtraction, no bias.

    The mean of squares is taken in float32: in bf16 it loses precision over wide rows.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    raise ValueError(f"model.norm must be layernorm or rmsnorm; got {cfg.norm!r}")


# --------------------------------------------------------------------------- positions


def sinusoidal_table(max_seq_len: int, d_model: int) -> torch.Tensor:
    """The fixed encoding of Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_seq_len, d_model)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])  # an odd d_model has one cos fewer
    return table


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, [max_seq_len, head_dim], in the rotate-half layout.

    Pair (i, i + head_dim/2) of a head rotates by angle p * theta^(-2i/head_dim) at position p
    (Su et al. 2021, in the GPT-NeoX/Llama arrangement of the pairs).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., T, head_dim] by the angles of positions 0..T-1 (``cos``/``sin`` [T, head_dim]).

    A rotation keeps q.k a function of the rotation difference only, so attention scores see
    relative positions. Computed in float32 and cast back, for bf16 inputs.
    """
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos.float() + rotated * sin.float()).to(x.dtype)


# --------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Causal self-attention; grouped-query when n_kv_heads < n_heads (Ainslie et al. 2023)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, heads*hd] -> [B, heads, T, hd]: SDPA attends over the second-to-last dim.
        # The head count is read from the projection's output, so a tensor-parallel linear
        # that returns only this rank's heads works unchanged.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = {}
        if k.shape[1] != q.shape[1]:
            # Query head h reads kv head h // group: kv heads repeat in place, not tile.
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, **gqa
        )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Shazeer 2020, Llama): silu(gate(x)) * up(x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        elif cfg.mlp == "gelu":
            self.act = nn.GELU()  # the exact erf form, not the tanh approximation
        else:
            raise ValueError(f"model.mlp must be gelu or swiglu; got {cfg.mlp!r}")
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    """Pre-norm: the residual stream is never normalized, which keeps deep stacks trainable."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        x = x + self.mlp(self.norm2(x))
        return x


# --------------------------------------------------------------------------- model


def _check(cfg: ModelConfig) -> None:
    for key in ("vocab_size", "max_seq_len"):
        value = getattr(cfg, key)
        if value is None:
            raise ValueError(
                f"model.{key} is None: set it in the config, or resolve it from the data manifest "
                f"before building the model"
            )
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key} must be a positive integer; got {value!r}")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}")
    kv = cfg.n_kv_heads or cfg.n_heads
    if not (1 <= kv <= cfg.n_heads and cfg.n_heads % kv == 0):
        raise ValueError(f"model.n_heads={cfg.n_heads} must be a multiple of model.n_kv_heads={kv}")
    if cfg.pos not in ("sinusoidal", "learned", "rope"):
        raise ValueError(f"model.pos must be sinusoidal, learned or rope; got {cfg.pos!r}")
    if cfg.pos == "rope" and (cfg.d_model // cfg.n_heads) % 2:
        raise ValueError(f"model.pos=rope needs an even head size; d_model/n_heads = {cfg.d_model // cfg.n_heads}")


class Transformer(nn.Module):
    """``model(tokens, targets)`` -> mean cross-entropy (float32); ``model(tokens)`` -> logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos == "sinusoidal":
            # Not persistent: it is a function of the config, so checkpoints need not carry it.
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        else:
            cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One tensor serves as input table and output projection (Press & Wolf 2017).
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms; residual outputs scaled down.

        Each block adds two outputs to the residual stream, so its variance grows with depth;
        GPT-2 scales the init of the layers that write into it by 1/sqrt(2 * n_layers).
        """
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        scaled = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=scaled)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=scaled)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        B, T = tokens.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"input has {T} tokens, more than model.max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(tokens)
        rope = None
        if self.cfg.pos == "learned":
            x = x + self.pos_emb(torch.arange(T, device=tokens.device))
        elif self.cfg.pos == "sinusoidal":
            # The table has unit amplitude while embeddings start at init_std; the paper scales
            # embeddings by sqrt(d_model) (section 3.4) so positions do not drown the tokens.
            x = x * math.sqrt(self.cfg.d_model) + self.pos_table[:T].to(x.dtype)
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits
        # float32 for the softmax over a large vocabulary, whatever the model's dtype.
        # Positions whose target is -100 (rows the loader skipped as damaged) are left out of
        # the mean; a micro-batch with none left gives 0 and no gradient, not NaN.
        targets = targets.reshape(-1)
        total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets, ignore_index=-100,
                                reduction="sum")
        return total / (targets != -100).sum().clamp(min=1)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the token and position tables (Kaplan et al.).

        A tied LM head is the token table, so it is counted once, or not at all; an untied
        head is a projection like any other and is counted.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.cfg.pos == "learned":
                n -= self.pos_emb.weight.numel()
        return n


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two optimizer groups: matrices with ``weight_decay``, everything else without.

    Decay pulls weights towards zero; that regularizes weight matrices but only distorts
    biases and norm gains, whose scale is their meaning. Embedding tables are matrices too and
    are decayed by default, as in GPT-2 and nanoGPT (whose published results assume it);
    ``decay_embeddings=False`` exempts them (rare tokens' rows are updated seldom, and some
    recipes keep decay from erasing them). A tied LM head is the token table and follows it.
    The test is "at least 2-D" rather than "is nn.Linear", so linears that tensor parallelism
    swaps in are still decayed.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # each shared tensor once
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
