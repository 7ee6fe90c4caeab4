"""Megatron-style tensor-parallel layers, the collectives under them, and dropout RNG for them.

A :class:`TPGroup` names the ranks that share one layer's weights. It is passed to every layer
and collective; nothing here keeps a group at module level. At ``size == 1`` every collective
returns its input unchanged and the layers compute exactly what ``nn.Linear`` / ``nn.Embedding``
would, so one model code path serves tp=1 (even with no process group at all) and tp>1.

The usual pairing in a transformer block (Megatron's): a :class:`ColumnParallelLinear` splits
the output features (attention heads, MLP hidden units), the elementwise work between runs on
the shard, and a :class:`RowParallelLinear` consumes the shard and sums the partial outputs.
That costs one all-reduce forward and one backward per pair.

With ``sequence_parallel`` the activations between pairs (norms, residuals, dropout) are split
along the sequence (dim 1) instead of replicated: the column layer all-gathers the sequence
first and the row layer reduce-scatters instead of all-reducing; same traffic, 1/tp the
activation memory outside the pairs.

Sharded parameters carry ``tensor_model_parallel = True``, ``partition_dim``,
``partition_stride = 1`` and ``tp_size``: DeepSpeed's gradient-norm code counts
``tensor_model_parallel`` parameters on every tp rank and the others on tp rank 0 only, and
checkpoint tools can recover the full shape (:func:`full_shape`) without a group.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# torch 2.13 renamed these two and warns on the old names; older torch has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class TPGroup:
    """One tensor-parallel group as seen from this process: its group, size and our rank in it."""

    group: Optional[dist.ProcessGroup]  # None when size == 1
    size: int
    rank: int
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad tensor-parallel group: rank {self.rank} of size {self.size}")
        if self.size > 1 and self.group is None:
            # group=None would silently mean the whole world in torch.distributed calls.
            raise ValueError(f"a tensor-parallel group of size {self.size} needs its process group")

    @classmethod
    def single(cls) -> "TPGroup":
        """No tensor parallelism: size 1, rank 0, no group, no communication."""
        return cls(group=None, size=1, rank=0)


def _divide(n: int, what: str, tp: TPGroup) -> int:
    if n % tp.size:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {tp.size}")
    return n // tp.size


def shard(full: torch.Tensor, dim: int, tp: TPGroup) -> torch.Tensor:
    """This rank's contiguous chunk of ``full`` along ``dim`` (a copy), e.g. to initialise a shard."""
    n = _divide(full.shape[dim], f"size of dim {dim}", tp)
    return full.narrow(dim, tp.rank * n, n).clone(memory_format=torch.contiguous_format)


def full_shape(param: torch.Tensor) -> torch.Size:
    """The unsharded shape of a parameter, from the attributes the layers here set on it."""
    if not getattr(param, "tensor_model_parallel", False):
        return param.shape
    shape = list(param.shape)
    shape[param.partition_dim] *= param.tp_size
    return torch.Size(shape)


def _mark_sharded(param: nn.Parameter, dim: int, tp: TPGroup) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    param.tp_size = tp.size
    param.tp_rank = tp.rank


# ---------------------------------------------------------------------------------------------
# Raw collectives (no autograd). Results are fresh tensors: the in-place collectives never write
# into a tensor someone else holds (an activation saved for backward, a gradient an add node
# hands to two branches).


def _all_reduce(x: torch.Tensor, tp: TPGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, op=op, group=tp.group)
    return x


def _all_gather(x: torch.Tensor, tp: TPGroup, dim: int) -> torch.Tensor:
    # The flat collectives concatenate along dim 0, so gather with `dim` moved to the front.
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] * tp.size, *front.shape[1:]))
    _all_gather_single(out, front, group=tp.group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, tp: TPGroup, dim: int) -> torch.Tensor:
    n = _divide(x.shape[dim], f"size of dim {dim}", tp)
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((n, *front.shape[1:]))
    _reduce_scatter_single(out, front, group=tp.group)
    return out.movedim(0, dim).contiguous()


def _split(x: torch.Tensor, tp: TPGroup, dim: int) -> torch.Tensor:
    n = _divide(x.shape[dim], f"size of dim {dim}", tp)
    return x.narrow(dim, tp.rank * n, n).contiguous()


# ---------------------------------------------------------------------------------------------
# Autograd-aware collectives: each forward collective is paired with its adjoint in backward.


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _split(x, tp, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.tp, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _all_gather(x, tp, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.tp, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _reduce_scatter(x, tp, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.tp, ctx.dim), None, None


class _GatherFromTPLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_gather(x, tp, x.dim() - 1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.tp, grad.dim() - 1), None


def copy_to_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward. Enters a tensor-parallel region."""
    return x if tp.size == 1 else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward. Leaves a tensor-parallel region."""
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp)


def scatter_to_sequence(x: torch.Tensor, tp: TPGroup, dim: int = 1) -> torch.Tensor:
    """Keep this rank's chunk of ``dim`` forward; all-gather the gradient along ``dim`` backward."""
    return x if tp.size == 1 else _ScatterToSequence.apply(x, tp, dim % x.dim())


def gather_from_sequence(x: torch.Tensor, tp: TPGroup, dim: int = 1) -> torch.Tensor:
    """All-gather along ``dim`` forward; reduce-scatter the gradient backward.

    The backward sums over ranks, which is right when the gathered tensor feeds tensor-parallel
    work (each rank's gradient is a partial sum), as in :class:`ColumnParallelLinear`.
    """
    return x if tp.size == 1 else _GatherFromSequence.apply(x, tp, dim % x.dim())


def reduce_scatter_to_sequence(x: torch.Tensor, tp: TPGroup, dim: int = 1) -> torch.Tensor:
    """Reduce-scatter (sum) along ``dim`` forward; all-gather the gradient along ``dim`` backward."""
    return x if tp.size == 1 else _ReduceScatterToSequence.apply(x, tp, dim % x.dim())


def gather_from_tp_last_dim(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """All-gather along the last dim forward (e.g. full logits for generation); own chunk backward."""
    return x if tp.size == 1 else _GatherFromTPLastDim.apply(x, tp)


# ---------------------------------------------------------------------------------------------
# Layers. Parameters are allocated uninitialised: the model owns initialisation and copies
# slices of one full tensor in with `shard`, so tp=1 and tp>1 start from the same weights.


def enter_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The input of column-parallel layers: the full activation on every rank.

    Forward: identity (or with SP, the all-gather of the sequence chunks). Backward: each rank's
    input gradient is a partial sum over its output features; the all-reduce (with SP, the
    reduce-scatter) completes it.
    """
    return gather_from_sequence(x, tp) if tp.sequence_parallel else copy_to_tp(x, tp)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's rows (output features) split: returns this rank's output features.

    ``x`` is the full input, or with ``tp.sequence_parallel`` this rank's chunk of dim 1, which
    is all-gathered first. weight ``[out/tp, in]``, bias ``[out/tp]``.

    ``input_entered=True``: the caller already passed ``x`` through :func:`enter_tp_region`,
    because several column-parallel layers read the same input (q, k and v; SwiGLU's gate and
    up). Entering once means one all-reduce of the input gradient (or one all-gather with SP)
    for all of them, instead of one each.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, *,
                 input_entered: bool = False, device=None, dtype=None):
        super().__init__()
        self.tp = tp
        self.input_entered = input_entered
        self.in_features, self.out_features = in_features, out_features
        local_out = _divide(out_features, "out_features", tp)
        self.weight = nn.Parameter(torch.empty(local_out, in_features, device=device, dtype=dtype))
        _mark_sharded(self.weight, 0, tp)
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out, device=device, dtype=dtype))
            _mark_sharded(self.bias, 0, tp)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each rank's input gradient is a partial sum over its output features: the all-reduce
        # (or, with SP, the reduce-scatter) in backward completes it.
        if not self.input_entered:
            x = enter_tp_region(x, self.tp)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (/{self.tp.size}), "
                f"bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's columns (input features) split; ``x`` holds this rank's input features.

    The partial outputs are all-reduced, or with ``tp.sequence_parallel`` reduce-scattered along
    dim 1. weight ``[out, in/tp]``; the bias ``[out]`` is replicated and added after the
    reduction (added before, it would be counted tp times).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, *,
                 device=None, dtype=None):
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, _divide(in_features, "in_features", tp),
                                               device=device, dtype=dtype))
        _mark_sharded(self.weight, 1, tp)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.tp.sequence_parallel:
            y = reduce_from_tp(y, self.tp)
            return y if self.bias is None else y + self.bias
        y = reduce_scatter_to_sequence(y, self.tp)
        if self.bias is None:
            return y
        # With SP each rank adds the bias to its own sequence chunk only, so its bias gradient
        # covers that chunk; copy_to_tp sums the chunks so every rank holds the full gradient.
        return y + copy_to_tp(self.bias, self.tp)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (/{self.tp.size}), out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split: weight ``[V/tp, D]`` holds rows ``[rank*V/tp, (rank+1)*V/tp)``.

    Ids outside this rank's rows look up zeros; the partial outputs are all-reduced (or with
    ``tp.sequence_parallel`` reduce-scattered along dim 1), so every id is found exactly once.
    ``.weight`` is the shard a tied LM head multiplies by.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup, *, device=None, dtype=None):
        super().__init__()
        self.tp = tp
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _divide(num_embeddings, "num_embeddings", tp)
        self.vocab_start, self.vocab_end = tp.rank * local, (tp.rank + 1) * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        _mark_sharded(self.weight, 0, tp)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            out = F.embedding(ids, self.weight)
        else:
            local = ids - self.vocab_start
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.tp)
        return reduce_from_tp(out, self.tp)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} (/{self.tp.size}), {self.embedding_dim}"


# ---------------------------------------------------------------------------------------------
# Cross-entropy over vocabulary-sharded logits.


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp, ignore_index):
        compute = torch.promote_types(logits.dtype, torch.float32)
        part = logits.shape[-1]
        start = tp.rank * part
        keep = targets != ignore_index
        own = keep & (targets >= start) & (targets < start + part)
        local = (targets - start).masked_fill(~own, 0)

        # Shift by the global row max so exp() cannot overflow, whatever the logits' magnitude.
        row_max = logits.max(dim=-1).values.to(compute)
        if tp.size > 1:
            row_max = _all_reduce(row_max, tp, dist.ReduceOp.MAX)
        shifted = logits.to(compute) - row_max.unsqueeze(-1)  # a fresh tensor: reused in place below

        # Exactly one rank holds each target's logit; the others contribute 0 to the sum.
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~own, 0.0)
        probs = shifted.exp_()
        sum_exp = probs.sum(dim=-1)
        if tp.size > 1:
            target_logit = _all_reduce(target_logit, tp)
            sum_exp = _all_reduce(sum_exp, tp)
        loss = (sum_exp.log() - target_logit).masked_fill(~keep, 0.0)

        probs.div_(sum_exp.unsqueeze(-1))  # this rank's slice of the softmax
        ctx.save_for_backward(probs, local, own, keep)
        ctx.logits_dtype = logits.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:  # the saved softmax is turned into the gradient in place, to save memory
            raise RuntimeError("vocab_parallel_cross_entropy does not support a second backward "
                               "(retain_graph=True)")
        ctx.used = True
        probs, local, own, keep = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target); the one-hot entry lives on one rank only.
        grad = probs.view(-1, probs.shape[-1])
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local.reshape(-1)] -= own.reshape(-1).to(grad.dtype)
        grad.mul_((grad_loss.reshape(-1).to(grad.dtype) * keep.reshape(-1)).unsqueeze(-1))
        return grad.view(probs.shape).to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: TPGroup,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-position cross-entropy from this rank's vocabulary slice of the logits, never gathering them.

    ``logits [..., V/tp]`` (columns ``[rank*V/tp, (rank+1)*V/tp)``), ``targets [...]`` global ids.
    Returns the loss ``[...]`` in float32 (float64 for float64 logits), 0 where
    ``targets == ignore_index``; equal on every tp rank. Three small all-reduces over ``[...]``:
    max, sum of exp, target logit.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree "
                         "on the leading dims")
    return _VocabParallelCrossEntropy.apply(logits, targets, tp, ignore_index)


# ---------------------------------------------------------------------------------------------
# Dropout RNG.


class TPRandom:
    """A second RNG stream for dropout on tensor-parallel (sharded) activations.

    Dropout on replicated activations must draw the same mask on every tp rank, so the default
    generator is seeded the same across a tp group. Dropout on sharded activations (attention
    heads, or anything under sequence parallelism) needs different masks per rank: run it inside
    :meth:`fork`, which swaps the default generator's state (CPU, or the CUDA device's) for this
    object's and back, so the default stream is untouched. ``seed`` should differ per tp rank.

    Activation recomputation must replay the same masks: pass :meth:`recompute_context` as
    ``torch.utils.checkpoint``'s ``context_fn``; it saves this stream's state when a region runs
    forward and restores it while the region is recomputed (torch does the same for the
    default stream).
    """

    def __init__(self, seed: int, device: torch.device):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"TPRandom supports cpu and cuda devices, not {self.device}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self._state = gen.get_state()
        self._forked = False

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self._cuda_index())
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self._cuda_index())
        else:
            torch.set_rng_state(state)

    def _cuda_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    @contextmanager
    def fork(self):
        """Run the body with this object's RNG state as the default one; restore the default after."""
        if self._forked:
            raise RuntimeError("TPRandom.fork() is already active; it does not nest")
        saved = self._get()
        self._set(self._state)
        self._forked = True
        try:
            yield
        finally:
            self._state = self._get()
            self._set(saved)
            self._forked = False

    def recompute_context(self):
        """``(forward, recompute)`` contexts for ``torch.utils.checkpoint(..., context_fn=...)``."""
        saved = {}

        @contextmanager
        def forward():
            saved["state"] = self._state.clone()
            yield

        @contextmanager
        def recompute():
            current = self._state
            self._state = saved["state"].clone()
            try:
                yield
            finally:
                self._state = current
        return forward(), recompute()

    def state_dict(self) -> dict:
        return {"state": self._state.clone()}

    def load_state_dict(self, d: dict) -> None:
        self._state = d["state"].clone()
