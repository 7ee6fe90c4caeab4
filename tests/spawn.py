"""Run a function on N real processes joined in a gloo group, with a hard timeout.

``spawn_ranks(fn, world_size, *args)`` starts ``world_size`` fresh interpreters (the ``spawn``
start method), joins them into one gloo process group over a file store, calls
``fn(rank, world_size, *args)`` in each and returns the values in rank order. A rank that
raises fails the call with that rank's traceback; a rank that hangs past ``timeout`` gets the
whole set killed. ``fn`` must be a top-level function of an importable module (a test module
is importable: the children inherit ``sys.path``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback
from typing import Any, Callable


def _child(fn: Callable, rank: int, world_size: int, store_file: str, args: tuple, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
        try:
            # Plain pickle: a tensor put on the queue as is would travel as a shared-memory handle
            # that dies with this process, which may exit before the parent reads it.
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including SystemExit, to the parent
        results.put((rank, "error", traceback.format_exc()))


def spawn_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, store_file, args, results), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        try:
            while len(out) < world_size:
                try:
                    rank, status, value = results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise AssertionError(f"ranks {missing} gave no result within {timeout} s (hung?)") from None
                if status == "error":
                    raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
                out[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [out[r] for r in range(world_size)]
