"""Training FLOPs per token, for throughput and model FLOPs utilization (MFU)."""

from __future__ import annotations

from distlm.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
    """FLOPs of one forward and backward pass, per token (PaLM, Chowdhery et al. 2022, appendix B).

    ``6 * n_params``: each weight does a multiply and an add per token in the forward pass
    (2 FLOPs) and twice that in the backward pass (gradients of inputs and of weights).
    ``12 * n_layers * seq_len * d_model``: the attention matmuls QK^T and AV, which have no
    weights, 2 * 2 * seq_len * d_model forward per layer, times 3 with the backward.

    ``n_params`` is the non-embedding count (``Transformer.num_params()``): an embedding lookup
    is not a matmul. Causal masking is ignored, as in PaLM, so this counts the full QK^T.
    """
    return 6.0 * n_params + 12.0 * cfg.n_layers * seq_len * cfg.d_model


def matmul_params(cfg: ModelConfig, non_embedding_params: int) -> int:
    """Weights that take part in a matmul per token: the non-embedding ones, plus the LM head.

    ``Transformer.num_params()`` counts a tied head once, as the embedding table, and leaves it
    out of the non-embedding count; the head's matmul costs the same tied or not (nanoGPT's MFU
    counts it the same way).
    """
    return non_embedding_params + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
