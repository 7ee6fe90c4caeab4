"""Seconds one rank spends in the model's forward passes: the signal that finds a straggler.

In synchronous data-parallel training every rank's step takes the same wall time, because the
fast ranks wait for the slow one inside the gradient all-reduce; step time cannot say which rank
is slow. The forward pass holds no collective under data parallelism (ZeRO 0-2), so its time is
the rank's own. (Tensor parallelism and ZeRO-3 put collectives in the forward pass too; ranks
of one tensor-parallel group then look alike, but replicas still differ.)

Hooks on the top module time each forward call: ``perf_counter`` on the CPU; on a GPU, where the
host only queues kernels, a pair of CUDA events, read once they have completed so that reading
never waits for the GPU.
"""

from __future__ import annotations

import time
from collections import deque

import torch

# Unfinished CUDA event pairs kept at most: only a GPU that many forward passes behind the host
# would drop the oldest (the host blocks long before that on any real model).
MAX_PENDING = 4096


class ForwardClock:
    def __init__(self, module: torch.nn.Module, device: torch.device):
        self._cuda = device.type == "cuda"
        self._began = None  # perf_counter value or CUDA event of the forward call in progress
        self._pending: deque = deque(maxlen=MAX_PENDING)
        self._seconds = 0.0
        self._hooks = [module.register_forward_pre_hook(self._before),
                       module.register_forward_hook(self._after)]

    def take_seconds(self) -> float:
        """Forward seconds measured since the last call (on a GPU: of the passes already finished)."""
        self._collect_finished()
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def _collect_finished(self) -> None:
        # query() asks whether the GPU got there; it never waits for it.
        while self._pending and self._pending[0][1].query():
            began, ended = self._pending.popleft()
            self._seconds += began.elapsed_time(ended) / 1000.0

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _before(self, module, args) -> None:
        self._began = self._cuda_event() if self._cuda else time.perf_counter()

    def _after(self, module, args, output) -> None:
        if self._began is None:
            return
        if self._cuda:
            self._collect_finished()  # keeps the queue short however rarely take_seconds() is called
            self._pending.append((self._began, self._cuda_event()))
        else:
            self._seconds += time.perf_counter() - self._began
        self._began = None

    @staticmethod
    def _cuda_event():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
