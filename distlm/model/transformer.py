"""A decoder-only transformer language model, configured by :class:`distlm.config.ModelConfig`.

Pre-norm blocks (``x + attn(norm(x))``, ``x + mlp(norm(x))``), a final norm and a linear LM
head, optionally tied to the token embedding. The options are the usual ones of GPT-2 and
Llama style models: LayerNorm or RMSNorm, sinusoidal, learned or rotary positions, GELU or
SwiGLU MLP, multi-head or grouped-query attention.

Tensor parallelism is a constructor argument, not a second model: given a :class:`TPGroup` of
size > 1, the ``q/k/v_proj`` and ``up/gate_proj`` linears are column-parallel (each rank holds
some heads and some MLP width), ``o_proj`` and ``down_proj`` row-parallel (their outputs summed
over the group), the token table vocabulary-parallel, and the loss is computed on each rank's
slice of the vocabulary without gathering the logits. At size 1 they are plain ``nn.Linear`` and
``nn.Embedding``. The model cuts itself into pipeline stages in :mod:`distlm.model.pipeline`.

Weights are initialised as a function of (seed, parameter name) only (:mod:`distlm.model.init`),
so every layout starts from the same model as one process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from distlm.config import ModelConfig
from distlm.model.init import init_weights, seed_from_torch
from distlm.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    TPRandom,
    VocabParallelEmbedding,
    copy_to_tp,
    enter_tp_region,
    vocab_parallel_cross_entropy,
)


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

    def __init__(self, dim: int, eps: float = 1e-5, tp: TPGroup | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.tp = tp or TPGroup.single()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * _replicated(self.weight, self.tp)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that also works on a sequence-parallel chunk (see ``_replicated``)."""

    def __init__(self, dim: int, eps: float, bias: bool, tp: TPGroup | None = None):
        super().__init__(dim, eps=eps, bias=bias)
        self.tp = tp or TPGroup.single()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else _replicated(self.bias, self.tp)
        return F.layer_norm(x, self.normalized_shape, _replicated(self.weight, self.tp), bias, self.eps)


def _replicated(param: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    # Norm gains (and learned positions) are replicated over the tp ranks. Under sequence
    # parallelism each rank uses them on its chunk of the sequence only, so its gradient covers
    # that chunk: copy_to_tp sums the gradients over the group, and every rank steps with the
    # full one.
    return copy_to_tp(param, tp) if tp.sequence_parallel else param


def sequence_dropout(dropout: nn.Dropout, x: torch.Tensor, tp: TPGroup, rng: TPRandom | None) -> torch.Tensor:
    """Dropout on the residual stream. Under sequence parallelism each tp rank holds a different
    chunk of the sequence, so it draws from its own stream; otherwise the activation is
    replicated and every tp rank must drop the same units (the default stream, seeded alike)."""
    if tp.sequence_parallel and rng is not None and dropout.training and dropout.p > 0:
        with rng.fork():
            return dropout(x)
    return dropout(x)


def make_norm(cfg: ModelConfig, tp: TPGroup | None = None) -> nn.Module:
    # Norms are replicated over tensor-parallel ranks: each sees the full hidden vector.
    if cfg.norm == "layernorm":
        return LayerNorm(cfg.d_model, cfg.norm_eps, cfg.bias, tp)
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps, tp=tp)
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


class RotaryCache:
    """The rotary tables of a model, made once per (length, device) and shared by its blocks.

    Not a buffer: they are a function of the config, and pipeline stages each need them.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._tables: dict = {}

    def tables(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            cos, sin = rope_tables(self.head_dim, self.max_seq_len, self.theta)
            self._tables[device] = (cos.to(device), sin.to(device))
        cos, sin = self._tables[device]
        return cos[:T], sin[:T]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., T, head_dim] by the angles of positions 0..T-1 (``cos``/``sin`` [T, head_dim]).

    A rotation keeps q.k a function of the rotation difference only, so attention scores see
    relative positions. Computed in float32 and cast back, for bf16 inputs.
    """
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos.float() + rotated * sin.float()).to(x.dtype)


# --------------------------------------------------------------------------- parallel pieces


def column_linear(in_features: int, out_features: int, bias: bool, tp: TPGroup) -> nn.Module:
    """A linear whose outputs split over tp ranks (each computes some heads or some MLP width).

    Its input must have passed through ``enter_tp_region`` (once for all the column linears
    that read it).
    """
    if tp.size == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return ColumnParallelLinear(in_features, out_features, bias=bias, tp=tp, input_entered=True)


def row_linear(in_features: int, out_features: int, bias: bool, tp: TPGroup) -> nn.Module:
    """A linear whose inputs split over tp ranks; the partial outputs are summed over the group."""
    if tp.size == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias=bias, tp=tp)


def token_embedding(cfg: ModelConfig, tp: TPGroup) -> nn.Module:
    if tp.size == 1:
        return nn.Embedding(cfg.vocab_size, cfg.d_model)
    return VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, tp=tp)


def tied_logits(x: torch.Tensor, embedding: nn.Module, tp: TPGroup) -> torch.Tensor:
    """The LM head that is the token table: this rank's vocabulary slice of the logits."""
    return F.linear(enter_tp_region(x, tp), embedding.weight)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not -100, in float32.

    Positions whose target is -100 (rows the loader skipped as damaged) are left out of the mean;
    a micro-batch with none left gives 0 and no gradient, not NaN. With tp > 1 each rank holds a
    slice of the vocabulary and the softmax is taken across the group without gathering it.
    """
    targets = targets.reshape(-1)
    flat = logits.reshape(-1, logits.size(-1))
    if tp.size == 1:
        total = F.cross_entropy(flat.float(), targets, ignore_index=-100, reduction="sum")
    else:
        total = vocab_parallel_cross_entropy(flat, targets, tp, ignore_index=-100).sum()
    return total / (targets != -100).sum().clamp(min=1)


# --------------------------------------------------------------------------- blocks


def attention_mask(keep: torch.Tensor, causal: bool) -> torch.Tensor:
    """SDPA's boolean mask [B, 1, T, T] (True: may attend) from the real tokens ``keep`` [B, T].

    A padded query row still sees itself, so no row of the softmax is empty (which gives NaN);
    what padding positions compute is never read.
    """
    T = keep.shape[1]
    mask = keep[:, None, None, :].expand(-1, 1, T, -1)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()
    return mask | torch.eye(T, dtype=torch.bool, device=keep.device)


class Attention(nn.Module):
    """Self-attention; grouped-query when n_kv_heads < n_heads (Ainslie et al. 2023).

    Causal for ``model.objective=clm``; bidirectional for ``mlm`` (BERT: every position sees the
    whole sequence, and the loss is taken only where the input was masked).

    Under tensor parallelism each rank holds n_heads/tp query heads and n_kv_heads/tp kv heads,
    in order, so query head h still reads kv head h // group on the rank that holds both.

    For generation, ``cache`` is this layer's slot of a KV cache (see ``Transformer.features``):
    the new tokens' keys and values are appended to it and the queries attend to all of them.
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rotary: RotaryCache | None, rng: TPRandom | None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        self.rotary = rotary
        self.rng = rng  # dropout on this rank's heads draws from the tensor-parallel stream
        self.tp = tp
        self.causal = cfg.objective == "clm"
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = column_linear(cfg.d_model, cfg.d_model, cfg.bias, tp)
        self.k_proj = column_linear(cfg.d_model, kv_dim, cfg.bias, tp)
        self.v_proj = column_linear(cfg.d_model, kv_dim, cfg.bias, tp)
        self.o_proj = row_linear(cfg.d_model, cfg.d_model, cfg.bias, tp)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """``keep``: None, or a bool mask [B, T] of the real tokens (False: padding, never attended to).

        ``cache``: None, or an object with ``start`` (tokens already cached: ``x`` holds positions
        start..start+T-1) and ``update(k, v)`` (stores them, returns the keys and values of all
        start+T positions).
        """
        x = enter_tp_region(x, self.tp)
        B, T, _ = x.shape
        start = 0 if cache is None else cache.start
        # [B, T, heads*hd] -> [B, heads, T, hd]: SDPA attends over the second-to-last dim.
        # The head count is read from the projection's output: a tensor-parallel linear
        # returns only this rank's heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary.tables(start + T, x.device)
            if start:
                cos, sin = cos[start:], sin[start:]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        gqa = {}
        if k.shape[1] != q.shape[1]:
            # Query head h reads kv head h // group: kv heads repeat in place, not tile.
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dropout = self.dropout if self.training else 0.0
        mask = None if keep is None else attention_mask(keep, self.causal)
        if start:
            mask = self._cached_mask(keep, T, start, x.device)
        # With cached keys SDPA's is_causal would align the queries with the first keys, not the last.
        is_causal = self.causal and mask is None and not start
        with self.rng.fork() if (dropout and self.rng is not None) else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=dropout, **gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return sequence_dropout(self.resid_dropout, self.o_proj(y), self.tp, self.rng)

    def _cached_mask(self, keep: torch.Tensor | None, T: int, start: int,
                     device: torch.device) -> torch.Tensor | None:
        """The mask of T new queries over start+T keys: query i is position start+i.

        None when every query may see every key: one new token (the usual decoding step) of a
        causal model, or any chunk of a bidirectional one.
        """
        if keep is not None:
            raise ValueError("a padding mask (keep) cannot be combined with a KV cache that already "
                             "holds tokens; generate from unpadded prompts")
        if not self.causal or T == 1:
            return None
        return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Shazeer 2020, Llama): silu(gate(x)) * up(x)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rng: TPRandom | None = None):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.rng = rng
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = column_linear(cfg.d_model, hidden, cfg.bias, tp)
        elif cfg.mlp == "gelu":
            self.act = nn.GELU()  # the exact erf form, not the tanh approximation
        else:
            raise ValueError(f"model.mlp must be gelu or swiglu; got {cfg.mlp!r}")
        self.up_proj = column_linear(cfg.d_model, hidden, cfg.bias, tp)
        self.down_proj = row_linear(hidden, cfg.d_model, cfg.bias, tp)
        self.dropout = nn.Dropout(cfg.dropout)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp_region(x, self.tp)
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        return sequence_dropout(self.dropout, self.down_proj(h), self.tp, self.rng)


class Block(nn.Module):
    """Pre-norm: the residual stream is never normalized, which keeps deep stacks trainable."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None, rotary: RotaryCache | None = None,
                 rng: TPRandom | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        self.norm1 = make_norm(cfg, tp)
        self.attn = Attention(cfg, tp, rotary, rng)
        self.norm2 = make_norm(cfg, tp)
        self.mlp = MLP(cfg, tp, rng)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """``cache``: this layer's slot of a KV cache when generating (see ``Attention.forward``)."""
        x = x + self.attn(self.norm1(x), keep, cache)
        x = x + self.mlp(self.norm2(x))
        return x


# --------------------------------------------------------------------------- embeddings and head


class Positions(nn.Module):
    """Adds position information to token embeddings (learned or sinusoidal), then dropout.

    With rotary positions there is nothing to add here: the blocks rotate queries and keys.
    Under sequence parallelism the embeddings arrive as this rank's chunk of the sequence, and
    the positions are those of the chunk. When generating with a KV cache, ``start`` is the
    position of the first embedding (the tokens before it are cached).
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None, rng: TPRandom | None = None):
        super().__init__()
        self.kind, self.d_model, self.max_seq_len = cfg.pos, cfg.d_model, cfg.max_seq_len
        self.tp = tp or TPGroup.single()
        self.rng = rng
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos == "sinusoidal":
            # Not persistent: it is a function of the config, so checkpoints need not carry it.
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.emb_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = x.shape[1]
        end = start + T  # one past the last position of the whole sequence
        if self.tp.sequence_parallel:
            start, end = start + self.tp.rank * T, start + T * self.tp.size
        if end > self.max_seq_len:
            raise ValueError(f"input has {end} tokens, more than model.max_seq_len={self.max_seq_len}")
        positions = torch.arange(start, start + T, device=x.device)
        if self.kind == "learned":
            x = x + F.embedding(positions, _replicated(self.pos_emb.weight, self.tp))
        elif self.kind == "sinusoidal":
            # The table has unit amplitude while embeddings start at init_std; the paper scales
            # embeddings by sqrt(d_model) (section 3.4) so positions do not drown the tokens.
            x = x * math.sqrt(self.d_model) + self.pos_table[positions].to(x.dtype)
        return sequence_dropout(self.emb_dropout, x, self.tp, self.rng)


class Head(nn.Module):
    """The final norm, and the LM head when it is not the token table (tied heads live there)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, with_projection: bool):
        super().__init__()
        self.norm_f = make_norm(cfg, tp)
        if with_projection:
            # Column-parallel over the vocabulary: each rank computes its slice of the logits.
            self.lm_head = column_linear(cfg.d_model, cfg.vocab_size, False, tp)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_f(x)
        return self.lm_head(enter_tp_region(x, self.tp)) if hasattr(self, "lm_head") else x


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


def recompute_function(rng: TPRandom | None):
    """``torch.utils.checkpoint`` set up to replay the tensor-parallel dropout stream too."""
    if rng is None:
        return functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False,
                             context_fn=rng.recompute_context)


def rotary_for(cfg: ModelConfig) -> RotaryCache | None:
    return RotaryCache(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta) if cfg.pos == "rope" else None


class Transformer(nn.Module):
    """``model(tokens, targets)`` -> mean cross-entropy (float32); ``model(tokens)`` -> logits.

    ``tp``: the tensor-parallel group (none: one rank holds everything); logits are then this
    rank's vocabulary slice. ``seed``: weights are a function of it and each parameter's name
    (None draws it from torch's global generator, so ``torch.manual_seed`` still decides).
    ``checkpoint_activations``: recompute each block in the backward pass.
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None, seed: int | None = None,
                 rng: TPRandom | None = None, checkpoint_activations: bool = False):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        self.tp = tp or TPGroup.single()
        self.checkpoint_activations = checkpoint_activations
        # The tensor-parallel stream only draws dropout masks: without dropout there is nothing
        # to replay, and plain recomputation is one torch.compile can trace (train.compile).
        self.recompute = recompute_function(rng if cfg.dropout > 0 else None)
        # These state-dict names (tok_emb, positions.pos_emb, blocks.N, head.norm_f, head.lm_head)
        # are the canonical ones that checkpoints of every layout are consolidated to.
        self.tok_emb = token_embedding(cfg, self.tp)
        self.positions = Positions(cfg, self.tp, rng)
        rotary = rotary_for(cfg)
        self.blocks = nn.ModuleList(Block(cfg, self.tp, rotary, rng) for _ in range(cfg.n_layers))
        self.head = Head(cfg, self.tp, with_projection=not cfg.tie_embeddings)
        self.reset_parameters(seed)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection: the token table when tied (Press & Wolf 2017)."""
        return self.tok_emb.weight if self.cfg.tie_embeddings else self.head.lm_head.weight

    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every weight from (seed, its canonical name); see :mod:`distlm.model.init`."""
        if self.tok_emb.weight.is_meta:  # a model built only to be counted
            return
        # The Transformer's own names are the canonical ones (pipeline stages map theirs to these).
        init_weights(self, self.cfg, seed_from_torch() if seed is None else seed, lambda name: name)

    def features(self, tokens: torch.Tensor, keep: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """The final-normed hidden states [B, T, d_model]: what the LM head (or a task head) reads.

        ``keep``: a bool mask [B, T] of the real tokens of a right-padded batch; padding is never
        attended to (None: every position is real).

        ``cache``: None (training, scoring: the whole sequence at once), or a KV cache for
        generation (:class:`distlm.tasks.generate.KVCache`): ``tokens`` then continue the
        ``cache.length`` tokens it holds, whose keys and values are reused instead of recomputed,
        and are added to it. It needs ``cache.length``, ``cache.layers[i]`` (layer i's slot, see
        ``Attention.forward``) and ``cache.advance(T)``.
        """
        if cache is None:
            x = self.positions(self.tok_emb(tokens))
            for block in self.blocks:
                if self.checkpoint_activations and self.training:
                    x = self.recompute(block, x, keep)
                else:
                    x = block(x, keep)
            return self.head.norm_f(x)
        x = self.positions(self.tok_emb(tokens), cache.length)
        for block, slot in zip(self.blocks, cache.layers, strict=True):
            x = block(x, keep, slot)
        cache.advance(tokens.shape[1])
        return self.head.norm_f(x)

    def logits_of(self, features: torch.Tensor) -> torch.Tensor:
        """The LM head on ``features`` (this rank's vocabulary slice under tensor parallelism)."""
        if self.cfg.tie_embeddings:
            return tied_logits(features, self.tok_emb, self.tp)
        return self.head.lm_head(enter_tp_region(features, self.tp))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        logits = self.logits_of(self.features(tokens, cache=cache))
        if targets is None:
            return logits
        return lm_loss(logits, targets, self.tp)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the token and position tables (Kaplan et al.).

        A tied LM head is the token table, so it is counted once, or not at all; an untied
        head is a projection like any other and is counted. Under tensor parallelism this is
        this rank's share (sharded tensors in part, replicated ones in full).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.cfg.pos == "learned":
                n -= self.positions.pos_emb.weight.numel()
        return n


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two optimizer groups: matrices with ``weight_decay``, everything else without.

    Decay pulls weights towards zero; that regularizes weight matrices but only distorts
    biases and norm gains, whose scale is their meaning. Embedding tables are matrices too and
    are decayed by default, as in GPT-2 and nanoGPT (whose published results assume it);
    ``decay_embeddings=False`` exempts them (rare tokens' rows are updated seldom, and some
    recipes keep decay from erasing them). A tied LM head is the token table and follows it.
    The test is "at least 2-D" rather than "is nn.Linear", so the tensor-parallel linears are
    still decayed.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, VocabParallelEmbedding))}
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
