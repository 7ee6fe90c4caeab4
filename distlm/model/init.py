"""Weight initialisation that does not depend on the layout.

Each parameter's full (unsharded) value is drawn from a generator seeded by (seed, canonical
name), then each rank keeps its slice. So a model cut over 2 tensor-parallel ranks and 2
pipeline stages starts from exactly the weights one process would have, which is what makes
"every layout computes the same model" testable, and a stage builds only its own layers.

The rule is GPT-2's: Normal(0, init_std) for matrices and tables, zero biases, unit norm gains,
and the two layers of each block that write into the residual stream (``o_proj``,
``down_proj``) scaled by 1/sqrt(2 * n_layers), since each block adds two outputs to it and its
variance would otherwise grow with depth.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
import torch.nn as nn

from distlm.config import ModelConfig
from distlm.parallel.tensor import full_shape

_RESIDUAL_OUTPUTS = ("attn.o_proj.weight", "mlp.down_proj.weight")


def seed_from_torch() -> int:
    """A seed drawn from torch's global generator, so ``torch.manual_seed`` decides the weights."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_value(name: str, shape, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full initial value of the parameter with this canonical name (float32, CPU)."""
    leaf = name.rsplit(".", 2)
    if name.endswith(".bias"):
        return torch.zeros(tuple(shape))
    if "norm" in leaf[-2] and name.endswith(".weight"):  # norm1, norm2, norm_f
        return torch.ones(tuple(shape))
    std = cfg.init_std
    if name.endswith(_RESIDUAL_OUTPUTS):
        std /= math.sqrt(2 * cfg.n_layers)
    generator = torch.Generator().manual_seed(_name_seed(seed, name))
    return torch.empty(tuple(shape)).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(module: nn.Module, cfg: ModelConfig, seed: int, canonical: Callable[[str], str]) -> None:
    """Set every parameter of ``module`` to its slice of the full initial value.

    ``canonical`` maps a parameter's name in ``module`` (a whole model or a pipeline stage) to
    its name in the one-process :class:`~distlm.model.Transformer`.
    """
    for name, p in module.named_parameters():
        full = initial_value(canonical(name), full_shape(p), cfg, seed)
        if getattr(p, "tensor_model_parallel", False):
            full = full.chunk(p.tp_size, dim=p.partition_dim)[p.tp_rank]
        p.copy_(full.to(p.dtype))
