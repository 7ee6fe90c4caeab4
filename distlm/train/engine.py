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
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # Our optimizer is torch's AdamW, which ZeRO handles correctly but does not list.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # distlm prints its own log line; keep DeepSpeed's per-step prints out of the logs.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, cfg.deepspeed)


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
    # device, so it applies there too. On the CPU the foreach path is torch's default.
    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups, **kwargs)


def build_engine(model: torch.nn.Module, param_groups: list[dict], cfg: Config, layout: BatchLayout,
                 device: torch.device):
    """Return the DeepSpeed engine (model, optimizer, accumulation and clipping in one object)."""
    import deepspeed

    optimizer = build_optimizer(param_groups, cfg, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, layout))
    return engine


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def global_grad_norm(engine) -> float:
    """The gradient norm before clipping, after the last optimizer step.

    ZeRO and the mixed-precision optimizers record it; plain fp32 data parallel (stage 0) does
    not, so the loop asks :func:`fp32_grad_norm` before stepping instead.
    """
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def fp32_grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
