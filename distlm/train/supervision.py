"""What watches a run besides the loop itself: signals, the watchdog, bad steps, crash loops, metrics.

One :class:`Supervisor` per process. The loop tells it where it is (``progress``), asks it at
each step boundary whether to stop (``preemption``), hands it each step's outcome
(``bad_step``) and lets it record how the run ended (``ended``). The policies themselves live
in ``distlm.fault``; this module only wires them to one run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from distlm.config import Config
from distlm.fault import exit_codes
from distlm.fault.bad_steps import BadStepError, StepGuard
from distlm.fault.crash_loop import CrashLoopError, StartLog, restart_count_from_env
from distlm.fault.exit_codes import record_exit
from distlm.fault.preemption import Preemption
from distlm.fault.watchdog import HangReport, Watchdog
from distlm.metrics.exporter import start_exporter
from distlm.metrics.forward_clock import ForwardClock
from distlm.metrics.targets import TargetFile, run_label
from distlm.metrics.targets import publish as publish_targets
from distlm.parallel.distributed import DistContext
from distlm.train.resources import memory_now_and_peak


class Supervisor:
    def __init__(self, cfg: Config, ctx: DistContext, run_dir: Path, log: Callable[[str], None]):
        self.cfg, self.ctx, self.run_dir, self.log = cfg, ctx, run_dir, log
        self.step = 0
        self.starts = StartLog(run_dir)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            exit_codes.forget_exit(run_dir)
        self.preemption = Preemption(ctx.rank, on_exit=self._record_exit,
                                     repeat_window_s=cfg.fault.repeat_signal_s).install()
        # Started by the loop's first progress(): building, loading and resuming can take far
        # longer than a step; until then fault.collective_timeout_s is what bounds a hang.
        self.watchdog = Watchdog(run_dir, ctx.rank, ctx.world_size, cfg.fault.hang_timeout_s,
                                 on_hang=self._on_hang)
        self.guard = StepGuard(cfg.fault.spike_factor, cfg.fault.spike_window)
        # The per-step agreement goes over gloo on the host: on GPUs an NCCL all-reduce read
        # back every step would stall the CPU until the GPU finished the step.
        self.control_group, self.control_device = None, ctx.device
        if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
            self.control_group, self.control_device = torch.distributed.new_group(backend="gloo"), torch.device("cpu")
        self.forward_clock: Optional[ForwardClock] = None
        self.targets: Optional[TargetFile] = None  # rank 0's, once written
        self.exporter = start_exporter(cfg.metrics, ctx.rank, ctx.local_rank, run_label(cfg), warn=_say_on_every_rank)
        if self.exporter is not None:
            self._describe_for_metrics()

    def _describe_for_metrics(self) -> None:
        """What the alerts compare against, and the target file Prometheus finds the ranks by."""
        exporter, ctx = self.exporter, self.ctx
        exporter.describe_run(ctx.world_size, self.cfg.train.save_every)
        exporter.restarts(restart_count_from_env())  # the launcher's count, the same on every rank
        if exporter.address is not None:
            host, port = exporter.address
            self.log(f"metrics: rank 0 serves Prometheus on http://{host}:{port}/metrics "
                     f"(rank r on metrics.port + its local rank)")
        self.targets = publish_targets(self.cfg, exporter.address, ctx.rank, ctx.world_size, self.control_group, self.log)

    # ---------------------------------------------------------------- start

    def refuse_crash_loop(self, resume_step: int, fresh_run: bool) -> None:
        """Rank 0 reads the run's start log; every rank raises if this start would repeat a crash."""
        refusal = None
        if self.ctx.is_main:
            if fresh_run:
                self.starts.path.unlink(missing_ok=True)  # train.resume=never: a new run, a new count
            try:
                self.starts.check(resume_step, self.cfg.fault.max_restarts_without_progress)
            except CrashLoopError as e:
                refusal = str(e)
            self.starts.record_start(resume_step)  # a refused start is a start too (its line says so)
        if _any_rank(refusal is not None, self.control_device, self.control_group):
            raise CrashLoopError(refusal or "rank 0 found a crash loop in RUN_DIR/starts.jsonl (its log says more)")

    def watch(self, model: torch.nn.Module, tokens_per_step: int, coords) -> None:
        """Give the metrics the run's shape: tokens per step, this rank's place in the layout, and
        its forward passes to time (the straggler signal)."""
        if self.exporter is not None:
            self.exporter.describe_rank(tokens_per_step, coords.stage, coords.dp_rank, coords.tp_rank)
            self.forward_clock = ForwardClock(model, self.ctx.device)

    def resumed(self, state) -> None:
        """Carry on from a TrainState: the bad-step history, and the totals the metrics continue."""
        self.guard.state.update(state.bad_steps or {})
        if self.exporter is not None:
            self.exporter.resumed(state.tokens_seen, state.data.get("errors"), state.checkpoint_errors)

    # ---------------------------------------------------------------- each step

    def progress(self, step: int, phase: str) -> None:
        self.step = step
        self.watchdog.progress(step, phase)
        self.watchdog.start()  # a no-op once running
        if self.exporter is not None:
            self.exporter.phase(step, phase)
            if phase == "agree" and self.forward_clock is not None:  # once per step, no GPU wait
                self.exporter.forward_seconds(self.forward_clock.take_seconds())

    def preempt_budget_left(self) -> float:
        """Seconds left of fault.preempt_save_timeout_s (0: no budget), counted from this rank's signal."""
        budget = self.cfg.fault.preempt_save_timeout_s
        if budget <= 0 or self.preemption.received_at is None:
            return budget
        return max(budget - (time.monotonic() - self.preemption.received_at), 0.001)

    def preemption_signal(self) -> Optional[str]:
        """At a step boundary, on every rank: "SIGTERM on rank R" if any rank was signalled."""
        return self.preemption.agreed(self.control_device, self.control_group)

    def bad_step(self, reason: Optional[str], step: int) -> bool:
        """Log and count a skipped update; True when the run has had too many in a row."""
        if reason is None:
            return False
        self.step = step
        guard = self.guard
        if self.exporter is not None:
            self.exporter.skipped_step(reason)
        self.log(f"step {step}: update SKIPPED on every rank ({guard.describe(reason)}); "
                 f"{guard.in_row} in a row (limit fault.max_bad_steps_in_row={self.cfg.fault.max_bad_steps_in_row}), "
                 f"{guard.skipped_total} in this run")
        return guard.in_row >= self.cfg.fault.max_bad_steps_in_row

    def too_many_bad_steps(self, step: int) -> BadStepError:
        counts = ", ".join(f"{k} {n}" for k, n in sorted(self.guard.state["skipped"].items()))
        return BadStepError(
            f"{self.guard.in_row} updates in a row were skipped up to step {step} ({counts} in this run): "
            f"the model or the data is broken. Resume from the last checkpoint with a lower optim.lr, "
            f"check the data around this step, or set fault.on_bad_steps=rollback to skip past it")

    def logged(self, row: dict) -> None:
        if self.exporter is not None:
            self.exporter.step(row)
            self.exporter.memory(*memory_now_and_peak(self.ctx.device))

    def evaluated(self, val_loss: float) -> None:
        if self.exporter is not None:
            self.exporter.evaluated(val_loss)

    def saved(self, step: int, seconds: float) -> None:
        """A checkpoint was committed, ``seconds`` after its save began."""
        if self.exporter is not None:
            self.exporter.checkpoint_saved(seconds)

    # ---------------------------------------------------------------- end

    def ended(self, code: int, reason: str, own: bool = False) -> None:
        """Record how this start ended: rank 0 for endings every rank agreed on, any rank for
        its ``own`` (an error only it saw, a lost peer). The first record of a start is the one
        exit.json keeps (see ``exit_codes.record_exit``)."""
        if self.ctx.is_main or own:
            self._record_exit(code, reason)

    def close(self) -> None:
        self.watchdog.stop()
        self.preemption.uninstall()
        if self.forward_clock is not None:
            self.forward_clock.close()
        self._forget_targets()
        if self.exporter is not None:
            self.exporter.close()

    def _record_exit(self, code: int, reason: str) -> None:
        """exit.json / exits.jsonl on this rank, and on rank 0 the ending of this start in starts.jsonl
        (also from the signal and watchdog threads, which end the process themselves)."""
        record_exit(self.run_dir, code, reason, self.ctx.rank, self.step)
        self._forget_targets()  # also the endings that leave at once (a second signal, a hang)
        if self.ctx.is_main:
            try:
                self.starts.record_end(_ENDINGS.get(code) or exit_codes.name_of(code), self.step)
            except OSError:
                pass

    def _forget_targets(self) -> None:
        """The run's processes end: Prometheus stops looking for them (see distlm.metrics.targets)."""
        targets, self.targets = self.targets, None
        if targets is not None:
            targets.remove(self.log)

    def _on_hang(self, report: HangReport) -> None:
        self._record_exit(exit_codes.HANG, report.message())


# How starts.jsonl names an ending; a preemption, saved or not, is not a crash.
_ENDINGS = {exit_codes.OK: "finished", exit_codes.PREEMPTED: "preempted", exit_codes.PREEMPTED_UNSAVED: "preempted"}


def _any_rank(flag: bool, device: torch.device, group) -> bool:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(value.item())


def _say_on_every_rank(message: str) -> None:
    rank = os.environ.get("RANK", "0")
    print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)
