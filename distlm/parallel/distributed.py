"""Start the process group and describe this process's place in it.

One :class:`DistContext` is created per process and passed to whatever needs ranks or the
device; nothing here is a module-level global. ``distlm train`` run directly (no launcher)
becomes a world of one, so the same code path serves one process and many.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from distlm.parallel import launch_env, rendezvous
from distlm.parallel.launch_env import LaunchEnvError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``cuda:local_rank`` when CUDA is wanted and present (``cuda:0`` when a process sees one GPU), else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device; use train.device=auto or cpu")
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if visible == 1:
            # One GPU per process (srun --gpus-per-task=1, a per-rank CUDA_VISIBLE_DEVICES): it is
            # this rank's. Two ranks that were given the same one are caught by the preflight.
            return torch.device("cuda", 0)
        if local_rank >= visible:
            raise LaunchEnvError(
                f"local rank {local_rank} has no GPU of its own: this node shows {visible} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"start at most {visible} processes per node")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_choice: str = "auto", timeout_s: float = 1800.0, rendezvous_timeout_s: float = 300.0,
                     placement: Optional[launch_env.Placement] = None) -> DistContext:
    """Join (or, for a single process, create) the default process group, and hand it to DeepSpeed.

    ``placement`` says who this process is and where the ranks meet (:mod:`launch_env`
    resolves it from any launcher's variables when not given). The ranks have
    ``rendezvous_timeout_s`` to meet; collectives then get ``timeout_s``.
    """
    placement = placement or launch_env.resolve()
    os.environ.update(placement.torch_env())  # DeepSpeed and torch read the torchrun spelling
    _warn_shared_store_after_restart()
    _default_group_timeouts(timedelta(seconds=timeout_s))
    device = pick_device(device_choice, placement.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rendezvous.choose_gloo_interface(placement)
    rendezvous.join(placement, "nccl" if device.type == "cuda" else "gloo",
                    rendezvous_timeout=timedelta(seconds=rendezvous_timeout_s),
                    collective_timeout=timedelta(seconds=timeout_s), device=device)
    hand_to_deepspeed(timedelta(seconds=timeout_s))
    return DistContext(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                       local_rank=placement.local_rank, device=device)


def hand_to_deepspeed(timeout: timedelta) -> None:
    """Let DeepSpeed adopt the default group that exists (its own init would run its own MPI discovery).

    On a CPU, DeepSpeed's adoption JIT-compiles a shared-memory all-reduce with the C++
    compiler (about a minute, and again whenever another environment rebuilt it in the shared
    cache) that only its inference path calls; training never does. It is switched off here.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False,
                               timeout=timeout, verbose=False)


def _default_group_timeouts(timeout: timedelta) -> None:
    """Make ``timeout`` every later group's default too (tp, pp, dp and DeepSpeed's own groups).

    torch gives each ``new_group`` without a timeout its backend's module default (30 min for
    gloo, 10 for NCCL), not the default group's: fault.collective_timeout_s would otherwise
    bind only the one group distlm creates itself.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout


def _warn_shared_store_after_restart() -> None:
    """torchrun restarts and its shared rendezvous store: the workers may read the failed attempt's
    addresses and fail to connect (pytorch#135712). launch/local.sh sets the documented switch."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        print(f"distlm: WARNING: torchrun restart {restart} with its rendezvous store shared with the workers: "
              f"connecting may fail on the previous attempt's addresses (pytorch#135712). Start torchrun with "
              f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (launch/local.sh does).",
              file=sys.stderr, flush=True)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a no-op in a world of one)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (a no-op in a world of one)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order (a list of one in a world of one)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def shutdown_distributed() -> None:
    """Leave the process group: every rank once, after its last collective.

    Left to interpreter exit, gloo's groups (a PipelineParallelGrid makes dozens) are torn down
    while other static objects already are, which now and then aborts a rank that finished
    its work ("terminate called without an active exception"), failing a run that succeeded.
    """
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()
