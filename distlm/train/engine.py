"""Wrap the model in a DeepSpeed engine: ZeRO stage, precision, accumulation, clipping, AdamW.

distlm builds the optimizer itself (AdamW, weight decay on matrices only) and hands it to
DeepSpeed, so the same code runs where DeepSpeed's fused CUDA/CPU Adam ops are not built.
The learning rate is set by the loop each step from a pure function of the step
(``schedule.learning_rate``), so no scheduler state has to be checkpointed.
"""

from __future__ import annotations

import copy
import functools
import inspect

from typing import Optional

import torch

from distlm.config import BatchLayout, Config
from distlm.fault.bad_steps import StepGuard


def deepspeed_config(cfg: Config, layout: BatchLayout) -> dict:
    """The DeepSpeed JSON config that distlm's typed config implies, with ``cfg.deepspeed`` on top."""
    ds = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip if not plain_fp32(cfg) else (cfg.optim.grad_clip or _MEASURE_ONLY),
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            # ZeRO 1/2 otherwise all-reduce every gradient and keep their slice: 1.5x the bytes
            # of reducing each slice to its owner (benchmarks/README.md, communication).
            **({"use_multi_rank_bucket_allreduce": False} if cfg.parallel.zero_stage in (1, 2) else {}),
            # overlap_comm: reduce each full gradient bucket on a side stream while the backward
            # pass goes on (on a GPU; on the CPU the same code runs in order). It double-buffers
            # the bucket: 2 x reduce_bucket_size elements of device memory (set
            # deepspeed.zero_optimization.reduce_bucket_size to trade memory for fewer calls).
            # The pipeline engine cannot overlap (DeepSpeed turns it off with a warning per rank),
            # and bf16 with ZeRO 1 runs DeepSpeed's BF16_Optimizer, which reduces after the
            # backward pass whatever this says; use ZeRO 2 to overlap in bf16.
            **({"overlap_comm": True} if cfg.parallel.zero_stage in (1, 2) and cfg.parallel.pp == 1 else {}),
        },
        # Our optimizer is torch's AdamW, which ZeRO handles correctly but does not list.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # bf16 has 8 bits of mantissa: summing micro-batches or ranks in it loses small
        # gradients, and DeepSpeed otherwise accumulates in the model's dtype. It accepts fp32
        # accumulation with ZeRO only; bf16 with ZeRO 0 accumulates in bf16 (prefer ZeRO 1+).
        **({"data_types": {"grad_accum_dtype": "fp32"}}
           if cfg.train.precision == "bf16" and cfg.parallel.zero_stage >= 1 else {}),
        # Between pipeline stages DeepSpeed sends each tp rank's 1/tp of the (replicated)
        # activation and re-gathers it on the receiving stage. Sequence-parallel activations are
        # already split over tp: sent as they are.
        **({"pipeline": {"pipe_partitioned": not cfg.parallel.sequence_parallel,
                         "grad_partitioned": not cfg.parallel.sequence_parallel}} if cfg.parallel.pp > 1 else {}),
        # distlm prints its own log line; keep DeepSpeed's per-step prints out of the logs.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, cfg.deepspeed)


# DeepSpeed calls engine.clip_fp32_gradients() only when its gradient_clipping is above 0; with
# optim.grad_clip=0 distlm still wants the norm for the log line, so DeepSpeed is given this
# placeholder and distlm's hook clips with the configured value (0: measure only).
_MEASURE_ONLY = 1.0


def plain_fp32(cfg: Config) -> bool:
    """fp32 without ZeRO: the one path where DeepSpeed leaves clipping to clip_fp32_gradients."""
    return cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_optimizer(param_groups: list[dict], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    # The fused kernel is the fastest AdamW on CUDA; ZeRO 1-3 keep fp32 master partitions on the
    # device, so it applies there too. On the CPU torch defaults to a per-tensor Python loop;
    # the foreach kernels do the same arithmetic in a few calls.
    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups, **kwargs)


def build_engine(model: torch.nn.Module, param_groups: list[dict], cfg: Config, layout: BatchLayout,
                 device: torch.device, mpu=None, guard: Optional[StepGuard] = None):
    """Return the DeepSpeed engine (model, optimizer, accumulation and clipping in one object).

    ``mpu``: the parallel groups when tp > 1 (a PipelineModule brings its own). ``guard``
    vetoes bad updates from inside the optimizer's step (``distlm.fault.bad_steps``).
    """
    import deepspeed

    optimizer = build_optimizer(param_groups, cfg, device)
    if guard is not None:
        guard.attach(optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                           config=deepspeed_config(cfg, layout))
    if layout.dp == 1 and cfg.parallel.zero_stage == 0:
        # Nothing to average without data parallelism, but DeepSpeed would still flatten,
        # all-reduce and copy back every gradient each step (about 5% of a small model's step).
        engine.enable_backward_allreduce = False
    if layout.dp == 1 and plain_fp32(cfg) and cfg.parallel.pp > 1:
        engine.pipeline_enable_backward_allreduce = False  # the pipeline engine's own switch
    if plain_fp32(cfg):
        # Plain fp32 is the one path where DeepSpeed clips with a per-tensor loop and keeps no
        # norm. It calls engine.clip_fp32_gradients() at the step; ours is a foreach kernel
        # that also records the norm for the log line, counting tensor-parallel slices and
        # pipeline stages once each.
        engine.clip_fp32_gradients = functools.partial(_clip_and_record, engine, cfg.optim.grad_clip)
    if guard is not None:
        _feed_guard(guard, engine, plain_fp32(cfg))
    return engine


def _feed_guard(guard: StepGuard, engine, check_norm: bool) -> None:
    """Tell the guard where this engine keeps the step's loss and, where DeepSpeed checks no
    NaN itself (plain fp32), the gradient norm the clipping hook recorded."""
    if hasattr(engine, "train_batch"):  # the pipeline engine: the last stage holds the loss
        guard.local_loss = lambda: _pipeline_loss(engine)
    if check_norm:
        guard.grad_norm = lambda: engine._global_grad_norm


def _pipeline_loss(engine) -> Optional[torch.Tensor]:
    """This step's mean loss on the pipeline's last stage (None on the others), before the update."""
    if not engine.is_last_stage() or engine.total_loss is None:
        return None
    return engine.total_loss / engine.gradient_accumulation_steps()


def _clip_and_record(engine, max_norm: float) -> None:
    engine._global_grad_norm = clip_gradients(engine.module, max_norm, engine.mpu)


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def global_grad_norm(engine) -> float:
    """The gradient norm before clipping that ZeRO and the mixed-precision optimizers record."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, max_norm: float, mpu=None) -> torch.Tensor:
    """Clip the (already averaged) gradients to global norm ``max_norm`` (0: no clipping); return the norm.

    The norm is over the whole model: a tensor-parallel slice counts on every rank that holds
    one, a replicated tensor on tp rank 0 only, a pipeline-replicated (tied) copy not at all,
    and the squares are summed over the model-parallel group (``mpu``; None: one rank).
    """
    grads = []
    tp_rank = mpu.get_tensor_model_parallel_rank() if mpu is not None else 0
    for p in model.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            grads.append(p.grad)
    squares = torch.stack([n.float() ** 2 for n in torch._foreach_norm(grads)]).sum() if grads else None
    if squares is None:
        squares = torch.zeros((), device=next(model.parameters()).device)
    if mpu is not None and mpu.get_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(squares, group=mpu.get_model_parallel_group())
    norm = squares.sqrt()
    if max_norm > 0:
        all_grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(all_grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(all_grads[0].dtype))
    return norm
