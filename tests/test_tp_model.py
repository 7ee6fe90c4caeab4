"""The tensor-parallel model on real gloo ranks: dropout streams and recomputation."""

from __future__ import annotations

import pytest
import torch

from distlm.config import ModelConfig
from spawn import spawn_ranks

pytestmark = pytest.mark.distributed


def _loss_and_grads(rank, world_size, recompute: bool, sequence_parallel: bool):
    import torch.distributed as dist

    from distlm.model import Transformer
    from distlm.parallel.tensor import TPGroup, TPRandom

    cfg = ModelConfig(vocab_size=64, max_seq_len=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                      pos="learned", dropout=0.2)
    tp = TPGroup(group=dist.group.WORLD, size=world_size, rank=rank, sequence_parallel=sequence_parallel)
    rng = TPRandom(1000 + rank, torch.device("cpu"))
    model = Transformer(cfg, tp=tp, seed=7, rng=rng, checkpoint_activations=recompute).train()
    torch.manual_seed(3)  # the replicated stream: the same on both ranks
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(tokens, tokens.roll(-1, dims=1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), grads


def _run(rank, world_size):
    out = {}
    for sp in (False, True):
        plain = _loss_and_grads(rank, world_size, recompute=False, sequence_parallel=sp)
        again = _loss_and_grads(rank, world_size, recompute=True, sequence_parallel=sp)
        out[sp] = (plain, again)
    return out


def test_recomputation_replays_every_dropout_stream():
    ranks = spawn_ranks(_run, 2)
    for sp in (False, True):
        for (plain_loss, plain_grads), (again_loss, again_grads) in (r[sp] for r in ranks):
            # the same masks in the recomputed forward, or the gradients would differ
            assert again_loss == pytest.approx(plain_loss, rel=1e-6)
            for name, grad in plain_grads.items():
                torch.testing.assert_close(again_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        # both ranks compute the same loss (the replicated parts drew the same masks) ...
        assert ranks[0][sp][0][0] == pytest.approx(ranks[1][sp][0][0], rel=1e-6)


def _dropout_masks(rank, world_size):
    import torch.distributed as dist

    from distlm.model.transformer import sequence_dropout
    from distlm.parallel.tensor import TPGroup, TPRandom

    torch.manual_seed(3)
    rng = TPRandom(1000 + rank, torch.device("cpu"))
    drop = torch.nn.Dropout(0.5).train()
    x = torch.ones(4, 8, 16)
    replicated = sequence_dropout(drop, x, TPGroup(dist.group.WORLD, world_size, rank, False), rng)
    chunked = sequence_dropout(drop, x, TPGroup(dist.group.WORLD, world_size, rank, True), rng)
    return replicated.eq(0), chunked.eq(0)


def test_dropout_masks_are_shared_on_replicated_activations_and_not_on_sequence_chunks():
    (rep0, chunk0), (rep1, chunk1) = spawn_ranks(_dropout_masks, 2)
    assert torch.equal(rep0, rep1)          # every tp rank drops the same units of a replicated tensor
    assert not torch.equal(chunk0, chunk1)  # each rank's chunk of the sequence draws its own mask
