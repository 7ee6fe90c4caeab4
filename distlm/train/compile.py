"""``train.compile``: ``torch.compile`` the training forward pass, leaving the module as it was.

Only ``forward`` is replaced, by an instance attribute that wraps the class's method. Parameter
names, state dicts and checkpoint files do not change, and the hooks that distlm and DeepSpeed
register on the module (the forward clock, ZeRO's and the pipeline's bookkeeping) run eagerly
around the compiled code. (``nn.Module.compile`` would trace the hooks into the graph too.)

* pp = 1: the whole forward, embedding to loss, is one graph, so Inductor fuses across block
  boundaries and into the cross-entropy. Activation checkpointing is traced with it (the
  recomputation becomes part of the backward graph), except where it must replay the
  tensor-parallel dropout stream: that combination is refused by the config's validation.
* pp > 1: DeepSpeed's ``PipelineModule`` calls its layers one at a time, so each transformer
  block is compiled on its own. (A compiled block inside a recomputed range fails torch's
  recomputation check, so activation checkpointing is refused there.) Blocks are alike, so Dynamo reuses one graph for all of them;
  its recompile limit is raised to the number of blocks in case it cannot (a block past the
  limit would otherwise run uncompiled, with only a warning).

The first steps pay for the compilation (seconds on a small model, minutes on a large one).
"""

from __future__ import annotations

from typing import Callable

import torch

from distlm.model.transformer import Block, Transformer


def compile_for_training(model: torch.nn.Module, dropout: float, log: Callable[[str], None]) -> None:
    """Compile ``model``'s training forward in place (see the module docstring)."""
    if dropout > 0:
        # Inductor otherwise draws dropout masks from its own generator: a compiled run would
        # not drop what an eager one drops, and the tensor-parallel rule (replicated activations
        # drop the same units on every tp rank) would rest on how it seeds. With this, compiled
        # dropout draws from torch's generators exactly as eager code does.
        from torch._inductor import config as inductor  # imported only to compile: it takes seconds

        inductor.fallback_random = True
    if isinstance(model, Transformer):
        model.forward = torch.compile(model.forward)
        log("train.compile: the forward pass and loss are compiled as one graph; the first steps include "
            "the compilation")
        return
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, len(blocks) + 8)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    log(f"train.compile: each of the {len(blocks)} blocks is compiled; the first steps include "
        f"the compilation")
