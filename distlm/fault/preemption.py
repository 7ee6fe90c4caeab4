"""Preemption: SIGTERM, SIGUSR1 and SIGUSR2 only raise a flag; the ranks agree at a step boundary.

A scheduler that needs the node back (SLURM preemption, ``scancel``, a spot reclaim) sends a
signal and a grace period. Doing the save inside the signal handler would run it at an
arbitrary point of a step, on one rank, while the others compute: instead the handler only
records the signal, and at the next step boundary every rank learns, with one small
all-reduce, whether any rank was signalled. Then all save the same step and exit together
with ``exit_codes.PREEMPTED`` (the lingua / Megatron ``dist_signal_handler`` pattern).

A second signal means "now": the process exits at once with ``PREEMPTED_UNSAVED``. That is
safe at any instant because a checkpoint becomes visible only by an atomic rename; a save cut
short leaves the previous one. The second signal must work even while the main thread waits
in a collective (where Python signal handlers cannot run), so the signals are read by a
small thread from ``signal.set_wakeup_fd``, which the C-level handler writes at once.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch

from distlm.fault import exit_codes

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preemption:
    """This process's preemption flag; ``install()`` in the main thread once the process group is up."""

    def __init__(self, rank: int, on_exit: Callable[[int, str], None] = lambda code, reason: None,
                 repeat_window_s: float = 5.0):
        self.rank = rank
        self.repeat_window_s = repeat_window_s  # a repeat this soon is the same preemption, delivered twice
        self.on_exit = on_exit          # records exit.json before an immediate exit
        self.signal_name: Optional[str] = None
        self.received_at: Optional[float] = None
        self._old_handlers: dict = {}
        self._old_wakeup_fd = -1
        self._reader: Optional[socket.socket] = None
        self._writer: Optional[socket.socket] = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "Preemption":
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)  # the C handler must never block on a full pipe
        for sig in SIGNALS:
            # A no-op Python handler: installing one is what makes CPython write the signal
            # number to the wakeup fd; the reader thread does the rest.
            self._old_handlers[sig] = signal.signal(sig, _ignore)
            # Restart interrupted system calls: gloo, NCCL and file writes in C++ would
            # otherwise see EINTR in the middle of a collective or a checkpoint write.
            signal.siginterrupt(sig, False)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        # A forked child (a loader worker) shares this socket: a signal it receives before it
        # sets its own policy would read here as a second signal to the trainer.
        os.register_at_fork(after_in_child=self._forked_child)
        threading.Thread(target=self._read_signals, name="distlm-preemption", daemon=True).start()
        return self

    def _forked_child(self) -> None:
        if self._reader is not None:
            signal.set_wakeup_fd(-1)

    def uninstall(self) -> None:
        if self._reader is None:
            return
        signal.set_wakeup_fd(self._old_wakeup_fd)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._writer.close()  # ends the reader thread
        self._reader = None

    def _read_signals(self) -> None:
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in SIGNALS:
                    self._received(signal.Signals(signum).name)

    def _received(self, name: str) -> None:
        if self.signal_name is None:
            self.signal_name, self.received_at = name, time.monotonic()
            _say(f"rank {self.rank}: {name} received: saving at the next step boundary (send it again "
                 f"after {self.repeat_window_s:g} s to stop at once without saving)")
            return
        if time.monotonic() - self.received_at < self.repeat_window_s:
            # SLURM signals every process of the step and torchrun forwards its own copy: the
            # same request, twice. Only a deliberate repeat means "stop now".
            return
        reason = f"a second signal ({name}) after {self.signal_name}: stopped at once, no new checkpoint"
        _say(f"rank {self.rank}: {reason}; the last committed checkpoint is intact")
        self.on_exit(exit_codes.PREEMPTED_UNSAVED, reason)
        os._exit(exit_codes.PREEMPTED_UNSAVED)

    def agreed(self, device: torch.device, group=None) -> Optional[str]:
        """At a step boundary, on every rank: None, or "SIGTERM on rank R" if any rank was signalled.

        One all-reduce (MAX) of one number per rank: ``signum * (world + 1) + world - rank`` when
        signalled, else 0, so the maximum names a signal and the lowest rank that received it.
        """
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return f"{self.signal_name} on rank {self.rank}" if self.requested else None
        world = torch.distributed.get_world_size()
        mine = int(getattr(signal, self.signal_name)) * (world + 1) + world - self.rank if self.requested else 0
        flag = torch.tensor([mine], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        value = int(flag.item())
        if value == 0:
            return None
        signum, complement = divmod(value, world + 1)
        return f"{signal.Signals(signum).name} on rank {world - complement}"


def _ignore(signum, frame) -> None:
    """The Python-level handler: nothing; the wakeup-fd reader thread handles the signal."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def save_deadline(seconds: float, on_expire: Callable[[], None]):
    """Run the block; if it takes longer than ``seconds`` (> 0), call ``on_expire`` from a timer thread.

    ``on_expire`` is expected to end the process (a preemption save must not outlive the
    scheduler's grace period: better the previous checkpoint than a SIGKILL mid-commit).
    """
    if seconds <= 0:
        yield
        return
    timer = threading.Timer(seconds, on_expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def ignore_in_worker(_worker_id: int = 0, trainer_pid: Optional[int] = None) -> None:
    """For data-loader workers: the training process decides when to stop, not its workers.

    A worker killed by the scheduler's SIGTERM (sent to every process of the job) would fail the
    loader before the save; one that inherited the training process's wakeup fd would pass the
    signal on as if it were the trainer's. So workers ignore SIGUSR1, SIGUSR2 and Ctrl-C, and
    obey SIGTERM only when their trainer sends it: DataLoader and multiprocessing stop their
    workers with it, and a worker deaf to that would hang the trainer's exit. Workers also die
    with their trainer: one outliving a killed rank keeps that rank's sockets (inherited by
    fork) open, so its peers would not see it die.
    """
    trainer_pid = trainer_pid or os.getppid()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Blocked here, in a freshly forked worker whose only thread this is (threads started
    # later inherit the mask), so only the thread below receives it and can ask who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_obey_sigterm_from, args=(trainer_pid,), name="distlm-worker-sigterm",
                     daemon=True).start()
    die_with_parent(trainer_pid)


def _obey_sigterm_from(trainer_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == trainer_pid:
            os._exit(0)  # stopped by the trainer: its DataLoader or its exit is shutting workers down


def die_with_parent(parent: Optional[int] = None) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere nothing.

    ``parent``: the pid the parent had before it started this process (read here, after the
    fork, a parent that already died would go unnoticed).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = parent or os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1
