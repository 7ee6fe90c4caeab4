"""Build this rank's part of the model for the layout, and seed its random streams.

The order matters and is fixed here:
1. the layout is checked against the model (everything tp cuts divides; a block per stage);
2. the process groups are built, once;
3. the model is built from tensor-parallel layers (pp = 1: the whole ``Transformer``;
   pp > 1: this rank's stage inside DeepSpeed's ``PipelineModule``), its weights a function
   of (train.seed, parameter name), so every layout starts from the same model;
4. the dropout streams are seeded: the same on every tp rank of a replica (replicated
   activations must drop the same units), different between replicas and stages, and a
   separate per-tp-rank stream for dropout on sharded activations (attention heads).
"""

from __future__ import annotations

import torch

from distlm.config import Config, ConfigError
from distlm.model import Transformer, mlp_hidden_size
from distlm.parallel.layout import Layout, LayoutError, ParallelGroups, check_model_split
from distlm.parallel.tensor import TPRandom


def check_model_fits(cfg: Config, layout: Layout) -> None:
    m = cfg.model
    try:
        check_model_split(layout, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads or m.n_heads, vocab_size=m.vocab_size,
                          n_layers=m.n_layers, mlp_hidden=mlp_hidden_size(m),
                          uniform_stages=cfg.parallel.pipeline_partition == "uniform")
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    if cfg.parallel.sequence_parallel and cfg.train.seq_len % layout.tp:
        raise ConfigError(f"parallel.sequence_parallel cuts each sequence into parallel.tp={layout.tp} chunks: "
                          f"train.seq_len={cfg.train.seq_len} must be divisible by it")


def seed_random(seed: int, groups: ParallelGroups, device: torch.device) -> TPRandom | None:
    """Seed the default generator per (replica, stage); return the tensor-parallel stream (tp > 1)."""
    c = groups.coords
    # seed + rank when there is only data parallelism, as before pipelines and tensor slices.
    torch.manual_seed(seed + c.dp_rank + 1_000_003 * c.stage)
    if groups.layout.tp == 1:
        return None
    return TPRandom(seed + 2_718_281 * (1 + c.tp_rank) + c.dp_rank + 1_000_003 * c.stage, device)


def build_model(cfg: Config, groups: ParallelGroups, rng: TPRandom | None) -> torch.nn.Module:
    tp = groups.tp(sequence_parallel=cfg.parallel.sequence_parallel)
    checkpointing = cfg.parallel.activation_checkpointing
    if groups.layout.pp == 1:
        return Transformer(cfg.model, tp=tp, seed=cfg.train.seed, rng=rng, checkpoint_activations=checkpointing)
    from distlm.model.pipeline import build_pipeline  # imports DeepSpeed's pipeline module

    return build_pipeline(cfg.model, groups.topology, tp, cfg.train.seed, cfg.parallel.pipeline_partition,
                          checkpointing, rng)


def full_model_params(cfg: Config) -> int:
    """Non-embedding parameters of the whole model (all slices and stages), without allocating it."""
    with torch.device("meta"):
        return Transformer(cfg.model, seed=0).num_params(non_embedding=True)
