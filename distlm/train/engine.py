"""Wrap the model in a DeepSpeed engine: ZeRO stage, precision, accumulation, clipping, AdamW.

distlm builds the optimizer itself (AdamW, weight decay on matrices only) and hands it to
DeepSpeed, so the same code runs where DeepSpeed's fused CUDA/CPU Adam ops are not built.
The learning rate is set by the loop each step from a pure function of the step
(``schedule.learning_rate``), so no scheduler state has to be checkpointed.
"""

from __future__ import annotations

import copy
import inspect

import torch

from distlm.config import BatchLayout, Config


def deepspeed_config(cfg: Config, layout: BatchLayout) -> dict:
    """The DeepSpeed JSON config that distlm's typed config implies, with ``cfg.deepspeed`` on top."""
    ds = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": 0.0 if distlm_clips(cfg) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # Our optimizer is torch's AdamW, which ZeRO handles correctly but does not list.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # bf16 has 8 bits of mantissa: summing micro-batches or ranks in it loses small
        # gradients, and DeepSpeed otherwise accumulates in the model's dtype. It accepts fp32
        # accumulation with ZeRO only; bf16 with ZeRO 0 accumulates in bf16 (prefer ZeRO 1+).
        **({"data_types": {"grad_accum_dtype": "fp32"}}
           if cfg.train.precision == "bf16" and cfg.parallel.zero_stage >= 1 else {}),
        # distlm prints its own log line; keep DeepSpeed's per-step prints out of the logs.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, cfg.deepspeed)


def distlm_clips(cfg: Config) -> bool:
    """Whether the step clips gradients itself instead of DeepSpeed.

    For plain fp32 data parallel (ZeRO 0) DeepSpeed clips with a per-tensor Python loop and
    keeps no norm; torch's ``clip_grad_norm_`` is a foreach kernel and returns the norm, which
    the log line wants anyway. ZeRO and mixed precision clip their own partitions and record
    the norm, so DeepSpeed keeps that job there.
    """
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
                 device: torch.device):
    """Return the DeepSpeed engine (model, optimizer, accumulation and clipping in one object)."""
    import deepspeed

    optimizer = build_optimizer(param_groups, cfg, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, layout))
    if layout.dp == 1 and cfg.parallel.zero_stage == 0:
        # Nothing to average in a world of one, but DeepSpeed would still flatten, all-reduce
        # and copy back every gradient each step (about 5% of a small model's step time).
        engine.enable_backward_allreduce = False
    return engine


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def global_grad_norm(engine) -> float:
    """The gradient norm before clipping that ZeRO and the mixed-precision optimizers record."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the full (already averaged) gradients to ``max_norm`` (0: no clipping); return the norm."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
