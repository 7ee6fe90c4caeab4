"""Saving checkpoints: every rank writes its files, the ranks agree, one rank commits.

One save, on every rank::

    DeepSpeed's files, distlm-rankR.pt (RNG), model/optimizer files by canonical name,
    distlm.json (rank 0: step, data position, counters, config)
        -> step-N.tmp/ through a FileWriter (fsync'd, hashed)           [maybe in the background]
    ranks agree: all written? any error?                                 [a tiny all-reduce]
        -> rank 0 commits (manifest, rename, latest; distlm.checkpoint.commit), applies retention

With ``checkpoint.async_save`` the state is copied into host memory during the step
(the snapshot: the state of exactly that step) and written by a background thread while
training goes on. At most one save is in flight: the next one, and the end of the run, wait
for it. The loop calls :meth:`Saver.poll` every step; once every rank's writer is done the
commit happens there, on the training thread, so no collective ever runs in the background.

A failed write (a full disk) on any rank fails the save on all of them: the temporary folder
is removed, the previous checkpoint stays as it was, ``errors`` counts it, and
``checkpoint.on_error`` says whether the run stops (``stop``) or goes on (``continue``).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from distlm.checkpoint import manifest as manifest_file
from distlm.checkpoint.commit import TMP_SUFFIX, commit
from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.files import FileWriter, HostBuffers, snapshot
from distlm.checkpoint.retention import steps_to_delete
from distlm.checkpoint.select import delete_checkpoint, step_folders, step_of, tag_for
from distlm.parallel.distributed import DistContext, all_gather_objects, all_reduce_sum, barrier

STATE_FILE = "distlm.json"


def rank_file(rank: int) -> str:
    return f"distlm-rank{rank:05d}.pt"


@dataclass
class SaveOptions:
    async_save: bool = False
    on_error: str = "stop"        # or "continue"
    keep_last: int = 0
    keep_every: int = 0


@dataclass
class _InFlight:
    step: int
    tmp: Path
    writer: FileWriter
    config: dict
    pending: list = field(default_factory=list)   # (path, snapshot or bytes, copied into buffers?) to write
    buffers: Optional[HostBuffers] = None         # where a written snapshot's tensors go back
    blocked_s: float = 0.0                        # async: time the training thread spent on this save
    started: float = field(default_factory=time.perf_counter)
    thread: Optional[threading.Thread] = None

    def write_pending(self) -> None:
        try:
            while self.pending:
                path, data, pooled = self.pending.pop(0)  # drop each snapshot as soon as it is on disk
                self.writer.write_object(path, data)
                if pooled:
                    self.buffers.give_back(data)      # the next save's snapshot copies into them
            self.writer.finish()
        except BaseException as e:  # anything lost here would otherwise commit an incomplete folder
            self.writer.error = self.writer.error or f"background write: {type(e).__name__}: {e}"

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Saver:
    """Owns the checkpoint folder's writes for one run (see the module docstring)."""

    def __init__(self, engine, ckpt_dir: Path, ctx: DistContext, options: SaveOptions, layout: dict,
                 shard_payloads: Callable[[], dict], rng_payload: Callable[[], dict],
                 log: Callable[[str], None] = print, errors: int = 0, protect: Optional[int] = None) -> None:
        self.engine, self.ckpt_dir, self.ctx, self.options, self.layout = engine, Path(ckpt_dir), ctx, options, layout
        self.shard_payloads, self.rng_payload, self.log = shard_payloads, rng_payload, log
        self.errors = errors          # failed saves over the whole run (kept in the train state)
        self.protect = protect        # the step resumed from: retention never deletes it
        from distlm.checkpoint.ds_engine import RoutedCheckpointEngine  # imports DeepSpeed: only once a run starts

        self.io = RoutedCheckpointEngine()
        engine.checkpoint_engine = self.io   # every DeepSpeed file now goes through distlm (ds_engine)
        # DeepSpeed copies its zero_to_fp32.py into the checkpoint folder from rank 0 alone, outside
        # the checkpoint engine: a full disk there would raise on one rank inside its collectives.
        # distlm's layout-free files (consolidate, export) do that job.
        engine._copy_recovery_script = lambda *args, **kwargs: None
        self._flight: Optional[_InFlight] = None
        self._host_buffers = HostBuffers()  # async saves: the snapshot's memory, reused save after save
        # Called on every rank with (step, seconds from the start of the save to its commit) once
        # a save is committed: failed and still-writing saves never count as checkpoints.
        self.on_committed: Optional[Callable[[int, float], None]] = None

    def resumed(self, state) -> None:
        """The run continues from ``state``'s checkpoint: keep it, and keep counting failures."""
        self.errors = state.checkpoint_errors
        self.protect = state.step

    # ------------------------------------------------------------------ save

    def save(self, state, config: dict) -> None:
        """Save ``state`` (a TrainState) with the engine's current weights; a collective call."""
        if self._flight is not None and self._flight.running():
            self.log(f"checkpoint of step {state.step}: waiting for the save of step {self._flight.step} "
                     f"to finish writing (one save in flight at most)")
        self.wait()
        started = time.perf_counter()
        tmp = self.ckpt_dir / (tag_for(state.step) + TMP_SUFFIX)
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)   # an earlier try of this step that never committed
        barrier()
        flight = _InFlight(state.step, tmp, FileWriter(tmp, state.step), config)
        if self.options.async_save:
            def keep(path: Path, obj, fresh: bool = False) -> None:  # a host copy now; the rest in the background
                # Fresh objects are new every save: pooling them would grow the pool save after save.
                flight.pending.append((path, obj, False) if fresh else (path, snapshot(obj, self._host_buffers), True))
            flight.buffers = self._host_buffers
        else:
            def keep(path: Path, obj, fresh: bool = False) -> None:  # streamed: one file's bytes in memory at a time
                flight.writer.write_object(path, obj)
        self.io.sink = keep
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp.name, save_latest=False)
        finally:
            self.io.sink = None
        # Both are new host tensors already, made for this save: no second copy needed.
        keep(tmp / rank_file(self.ctx.rank), self.rng_payload(), fresh=True)
        for name, payload in self.shard_payloads().items():
            keep(tmp / name, payload, fresh=True)
        if self.ctx.is_main:
            state.checkpoint_errors = self.errors
            record = {"format": manifest_file.FORMAT, "step": state.step, "state": asdict(state),
                      "world_size": self.ctx.world_size, "saved_at": time.time(), "config": config}
            keep(tmp / STATE_FILE, json.dumps(record, indent=1).encode(), fresh=True)
        self._flight = flight
        if self.options.async_save:
            flight.thread = threading.Thread(target=flight.write_pending, name=f"save-{state.step}", daemon=True)
            flight.thread.start()
            flight.blocked_s = time.perf_counter() - started
        else:
            flight.writer.finish()
            self.wait()

    # ------------------------------------------------------------------ agree and commit

    def poll(self) -> None:
        """Commit the in-flight save if every rank has written its part (a collective; cheap)."""
        if self._flight is not None:
            self._settle(block=False)

    def wait(self) -> None:
        """Wait for the in-flight save and commit it (or count its failure)."""
        if self._flight is not None:
            self._settle(block=True)

    def _settle(self, block: bool) -> None:
        flight = self._flight
        if block and flight.thread is not None:
            flight.thread.join()
        not_done, failed = all_reduce_sum(torch.tensor([float(flight.running()), float(flight.writer.error is not None)],
                                                       device=self.ctx.device)).tolist()
        if not_done:
            return
        self._flight = None
        parts = all_gather_objects((flight.writer.records, flight.writer.error))
        if failed:
            self._failed(flight, [(rank, error) for rank, (_, error) in enumerate(parts) if error])
            return
        # Rank 0 alone commits; whether that worked (a full disk may refuse the manifest too) is
        # shared, so every rank applies the same policy.
        commit_error = all_gather_objects(self._commit(flight, parts) if self.ctx.is_main else None)[0]
        if commit_error is not None:
            self._failed(flight, [(0, commit_error)])
            return
        took = time.perf_counter() - flight.started
        if flight.thread is None:
            barrier()  # a synchronous save returns once the step is committed, on every rank
        if self.on_committed is not None:
            try:
                self.on_committed(flight.step, took)
            except Exception as e:  # noqa: BLE001 - a listener must not break the save's collectives
                self.log(f"WARNING: after committing step {flight.step}: {type(e).__name__}: {e}")

    def _commit(self, flight: _InFlight, parts: list) -> Optional[str]:
        """Rank 0: check every rank's part is there, commit, apply retention; an error message or None."""
        records = {}
        for part, _ in parts:
            records.update(part)
        expected = [STATE_FILE] + [rank_file(rank) for rank in range(len(parts))]
        missing = [name for name in expected if name not in records]
        if missing:
            return f"committing {flight.tmp}: {', '.join(missing)} were not written"
        try:
            final = commit(flight.tmp, manifest_file.build(flight.step, records, self.layout, flight.config))
        except OSError as e:
            if flight.tmp.exists():
                return f"committing {flight.tmp}: {e}"
            # Renamed: the step is committed; only ``latest`` (a hint the loader double-checks) is stale.
            final = flight.tmp.with_name(flight.tmp.name[: -len(TMP_SUFFIX)])
            self.log(f"WARNING: {final} is committed but 'latest' could not be updated ({e}); a resume still "
                     f"finds it")
        took = time.perf_counter() - flight.started
        how = (f"written in the background in {took:.2f} s, training blocked {flight.blocked_s:.3f} s"
               if flight.thread is not None else f"saved in {took:.3f} s")
        try:
            removed = self._apply_retention(flight.step)
        except OSError as e:
            removed = []
            self.log(f"WARNING: removing old checkpoints failed ({e}); they stay on disk")
        self.log(f"checkpoint {final} {how}" + (f"; removed {', '.join(removed)}" if removed else ""))
        return None

    def _failed(self, flight: _InFlight, errors: list[tuple[int, str]]) -> None:
        self.errors += 1
        if self.ctx.is_main:
            shutil.rmtree(flight.tmp, ignore_errors=True)
        barrier()
        what = "; ".join(f"rank {rank}: {error}" for rank, error in errors)
        message = (f"checkpoint of step {flight.step} FAILED ({what}); the previous checkpoint is intact; "
                   f"{self.errors} failed save(s) in this run")
        if self.options.on_error == "stop":
            raise CheckpointError(f"{message}. checkpoint.on_error=stop: stopping. Free space in {self.ckpt_dir} "
                                  f"and restart (the run resumes from the previous checkpoint)")
        self.log(f"ERROR: {message}; checkpoint.on_error=continue: training goes on")

    def _apply_retention(self, saved: int) -> list[str]:
        # Only steps up to this one count: a higher step is from a line of the run that was
        # abandoned (resumed from an older checkpoint), and this run's next saves replace it.
        folders = {step_of(p): p for p in step_folders(self.ckpt_dir) if step_of(p) <= saved}
        protect = [saved] + ([self.protect] if self.protect is not None else [])
        doomed = steps_to_delete(folders, self.options.keep_last, self.options.keep_every, protect)
        for step in doomed:
            delete_checkpoint(folders[step])
        return [folders[s].name for s in doomed]

    def close(self) -> None:
        self.wait()
