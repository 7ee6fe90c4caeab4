"""The transformer cut into pipeline stages: a DeepSpeed ``PipelineModule`` (1F1B schedule).

The model is a flat list of layers: token embedding, positions, N blocks, final norm (+ LM
head when untied), and, with tied embeddings, the token table again as the output
projection. DeepSpeed keeps the layers of this rank's stage, sends one activation tensor
[micro_batch, seq, d_model] between neighbouring stages, and all-reduces the tied table's
gradient between the first and last stage. Only the hidden states cross a stage boundary;
everything else a block needs (rotary tables) is local.

Weights are initialised by canonical name (:mod:`distlm.model.init`), as in the one-process
:class:`~distlm.model.Transformer`, so a pipeline starts from the same model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from distlm.config import ModelConfig
from distlm.model.init import init_weights
from distlm.model.transformer import (
    Block,
    Head,
    Positions,
    lm_loss,
    recompute_function,
    rotary_for,
    tied_logits,
    token_embedding,
)
from distlm.parallel.tensor import TPGroup, TPRandom

_TIED_KEY = "embed"


class EmbeddingStage(nn.Module):
    """The token table as a pipeline layer (first stage; again on the last when tied)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.tok_emb = token_embedding(cfg, tp)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(tokens)


def _project_with_table(stage: EmbeddingStage, x: torch.Tensor) -> torch.Tensor:
    return tied_logits(x, stage.tok_emb, stage.tp)


class PipelineLoss:
    """The last stage's loss: labels are (targets, weight); see ``train.step`` for the weight."""

    def __init__(self, tp: TPGroup):
        self.tp = tp

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, weight = labels
        return lm_loss(logits, targets, self.tp) * weight


def layer_specs(cfg: ModelConfig, tp: TPGroup, rng: TPRandom | None) -> list:
    rotary = rotary_for(cfg)
    if cfg.tie_embeddings:
        first = TiedLayerSpec(_TIED_KEY, EmbeddingStage, cfg, tp, tied_weight_attr="tok_emb.weight")
    else:
        first = LayerSpec(EmbeddingStage, cfg, tp)
    specs = [first, LayerSpec(Positions, cfg, tp, rng)]
    specs += [LayerSpec(Block, cfg, tp, rotary, rng) for _ in range(cfg.n_layers)]
    specs.append(LayerSpec(Head, cfg, tp, not cfg.tie_embeddings))
    if cfg.tie_embeddings:
        specs.append(TiedLayerSpec(_TIED_KEY, EmbeddingStage, cfg, tp, forward_fn=_project_with_table,
                                   tied_weight_attr="tok_emb.weight"))
    return specs


def canonical_name(name: str, n_layers: int) -> str:
    """A pipeline parameter's name in the one-process Transformer: ``5.attn.q_proj.weight`` ->
    ``blocks.3.attn.q_proj.weight``, ``tied_modules.embed.tok_emb.weight`` -> ``tok_emb.weight``."""
    first, rest = name.split(".", 1)
    if first == "tied_modules":
        return rest.split(".", 1)[1]
    index = int(first)
    if index == 0:
        return rest
    if index == 1:
        return f"positions.{rest}"
    if index < 2 + n_layers:
        return f"blocks.{index - 2}.{rest}"
    return f"head.{rest}"


def build_pipeline(cfg: ModelConfig, topology, tp: TPGroup, seed: int, partition: str = "parameters",
                   checkpoint_activations: bool = False, rng: TPRandom | None = None) -> PipelineModule:
    """This rank's stage of the model, inside DeepSpeed's PipelineModule.

    ``partition``: ``parameters`` balances parameter counts over the stages (the embedding and
    head count as layers too); ``uniform`` gives each stage the same number of blocks.
    """
    # no_grad: DeepSpeed broadcasts the tied table into the parameter itself while building;
    # with autograd on, torch records that in-place collective and warns at every backward.
    with torch.no_grad():
        module = _pipeline_module(cfg, topology, tp, rng, partition, checkpoint_activations)
    init_weights(module, cfg, seed, functools.partial(canonical_name, n_layers=cfg.n_layers))
    return module


def _pipeline_module(cfg: ModelConfig, topology, tp: TPGroup, rng: TPRandom | None, partition: str,
                     checkpoint_activations: bool) -> PipelineModule:
    return PipelineModule(
        layers=layer_specs(cfg, tp, rng),
        topology=topology,
        loss_fn=PipelineLoss(tp),
        partition_method="type:Block" if partition == "uniform" else "parameters",
        activation_checkpoint_interval=1 if checkpoint_activations else 0,
        activation_checkpoint_func=recompute_function(rng),
        checkpointable_layers=["Block"],
    )
