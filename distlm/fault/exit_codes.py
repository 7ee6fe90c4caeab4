"""Process exit codes of ``distlm train``: one per way a run can end, so launchers can decide.

A SLURM script or a supervisor reads the code (or ``RUN_DIR/exit.json``, which also survives
torchrun: torchrun itself exits 1 whatever its workers' codes were) and decides whether a
requeue makes sense. The README's table is generated from ``TABLE``; keep them together.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


OK = 0
FAILED = 1                 # an unexpected error: Python's own code for an uncaught exception
CONFIG_ERROR = 2
DATA_ERROR = 3
CHECKPOINT_ERROR = 4
EXPORT_ERROR = 5
LAUNCH_ERROR = 6            # the ranks could not form the job: launcher variables, rendezvous, preflight
PREEMPTED = 75             # EX_TEMPFAIL: a signal asked the run to stop; it saved and stopped
PREEMPTED_UNSAVED = 76     # a second signal, or the save ran past its budget: the previous checkpoint stands
HANG = 77                  # the watchdog saw no step progress for fault.hang_timeout_s
PEER_LOST = 78             # a collective failed: another rank died or the network broke
BAD_STEPS = 79             # fault.max_bad_steps_in_row bad steps in a row (NaN/Inf or loss spikes)
CRASH_LOOP = 80            # fault.max_restarts_without_progress restarts resumed from the same step
INTERRUPTED = 130          # Ctrl-C

# (code, name, meaning, requeue?) in the order the README lists them.
TABLE = [
    (OK, "finished", "reached train.max_steps; the last checkpoint is the final one", "no"),
    (FAILED, "error", "an unexpected error; the traceback is in the log", "after a look"),
    (CONFIG_ERROR, "config error", "the config or an override is wrong; the message names the key", "no"),
    (DATA_ERROR, "data error", "the data is missing or damaged past data.max_error_rate", "no"),
    (CHECKPOINT_ERROR, "checkpoint error", "no usable checkpoint to resume from, or a save failed "
                                           "(checkpoint.on_error=stop)", "no"),
    (EXPORT_ERROR, "export error", "`distlm export` cannot map the model", "no"),
    (LAUNCH_ERROR, "launch error", "the ranks could not form the job: the launcher's variables, the rendezvous "
                                   "(the message names the address and interfaces tried) or a preflight check "
                                   "(config, code version, shared run folder) failed", "no"),
    (PREEMPTED, "preempted, saved", "SIGTERM/SIGUSR1/SIGUSR2: every rank stopped at a step boundary "
                                    "after a checkpoint", "yes"),
    (PREEMPTED_UNSAVED, "preempted, not saved", "a second signal (fault.repeat_signal_s after the first), "
                                                "or the save failed or ran past fault.preempt_save_timeout_s; "
                                                "the previous checkpoint is intact", "yes"),
    (HANG, "hang", "no step progress for fault.hang_timeout_s; the log names the stuck rank and "
                   "RUN_DIR/hangs/ holds every thread's stack (a main thread stuck holding the GIL "
                   "is caught later by a C-level backstop that exits 1)", "yes"),
    (PEER_LOST, "peer lost", "a collective failed: another rank died or the network broke", "yes"),
    (BAD_STEPS, "too many bad steps", "fault.max_bad_steps_in_row updates in a row skipped for NaN/Inf "
                                      "or a loss spike", "no"),
    (CRASH_LOOP, "crash loop", "fault.max_restarts_without_progress starts in a row resumed from the "
                               "same step and failed: this one is refused; do not requeue", "no"),
    (INTERRUPTED, "interrupted", "Ctrl-C", "no"),
]

EXIT_FILE = "exit.json"
EXITS_LOG = "exits.jsonl"  # every recorded ending, oldest first (exit.json is only the last)


def name_of(code: int) -> str:
    return next((name for c, name, _, _ in TABLE if c == code), "error")


def record_exit(run_dir: str | os.PathLike, code: int, reason: str, rank: int, step: int | None) -> None:
    """Record an ending: appended to ``RUN_DIR/exits.jsonl``, and ``RUN_DIR/exit.json`` if it is the first.

    The first ending of a start is its root cause (a rank stopped by a second signal, then its
    peer losing it: the signal is the answer), so exit.json is created once and never
    replaced; the loop removes it when a new start begins. Best effort: the run is ending
    anyway, and a full disk must not hide the real exit code.
    """
    record = {"code": code, "name": name_of(code),
              "reason": reason, "rank": rank, "step": step, "host": socket.gethostname(),
              "time": time.time()}
    folder = Path(run_dir)
    try:
        with open(folder / EXITS_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        tmp = folder / f"{EXIT_FILE}.{socket.gethostname()}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        try:
            os.link(tmp, folder / EXIT_FILE)  # atomic, and fails if another ending came first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except OSError:
        pass


def forget_exit(run_dir: str | os.PathLike) -> None:
    """A new start: the previous start's exit.json is history (exits.jsonl keeps it)."""
    try:
        (Path(run_dir) / EXIT_FILE).unlink()
    except OSError:
        pass


class RunEnded(Exception):
    """A way for the run to end that has its own exit code; ``distlm.cli`` maps it.

    ``immediate``: leave with ``os._exit`` after the message, without Python's teardown, which
    would wait on a process group whose peers are gone.
    """

    code = FAILED
    immediate = False


class Preempted(RunEnded):
    code = PREEMPTED


class PreemptedUnsaved(RunEnded):
    """The preemption save failed (a peer died, the disk filled): the previous checkpoint stands."""

    code = PREEMPTED_UNSAVED
    immediate = True


class PeerLost(RunEnded):
    code = PEER_LOST
    immediate = True


def peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another rank or the network did (not a bug here).

    gloo raises a plain RuntimeError ("Connection closed by peer", "Connection reset by peer",
    a timeout); NCCL and the c10d store raise torch.distributed's DistError family.
    """
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in (
        "Connection closed by peer", "Connection reset by peer", "gloo/transport", "Timed out waiting",
        "NCCL communicator was aborted", "Socket Timeout", "Broken pipe"))


def code_for(error: BaseException) -> int:
    """The exit code of an exception that ends ``distlm`` (FAILED for anything unexpected)."""
    from distlm.checkpoint.errors import CheckpointError
    from distlm.checkpoint.export import ExportError
    from distlm.config import ConfigError
    from distlm.data.inputs import InputError
    from distlm.data.shards import ShardError
    from distlm.parallel.launch_env import LaunchError

    if isinstance(error, RunEnded):
        return error.code
    for kinds, code in (((ExportError,), EXPORT_ERROR), ((ConfigError,), CONFIG_ERROR), ((LaunchError,), LAUNCH_ERROR),
                        ((InputError, ShardError, FileNotFoundError), DATA_ERROR),
                        ((CheckpointError,), CHECKPOINT_ERROR), ((KeyboardInterrupt,), INTERRUPTED)):
        if isinstance(error, kinds):
            return code
    return FAILED
