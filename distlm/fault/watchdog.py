"""Heartbeat watchdog: notice that this rank's steps stopped, name the rank that stuck the job, exit.

A rank of a multi-process run that freezes (SIGSTOP, a dead host) or takes a different path
(skips a collective) leaves every other rank waiting in a collective until the process group's
timeout, which must be long enough for the slowest legitimate collective. The watchdog ends
that sooner and says why: the training loop calls ``progress(step, phase)`` at every step
boundary and phase change (cheap: no I/O, no lock), and a daemon thread

* writes ``RUN_DIR/heartbeats/rank-NNNNN.json`` every ``beat_every_s`` (this rank's last step,
  phase and when it got there, and when the thread last beat), so the other ranks can see it;
* once this rank has made no progress for ``timeout_s``, reads every rank's heartbeat, names
  the ranks that look responsible (``HangReport``), dumps every thread's stack to the log and
  to ``RUN_DIR/hangs/rank-NNNNN.txt`` and exits with ``exit_codes.HANG`` so the launcher
  restarts the job from the last checkpoint.

The thread does all the file I/O, so a main thread blocked in a collective (which releases the
GIL) still beats, while a SIGSTOPped or dead process stops beating: that is how the others tell
"frozen" from "waiting". A main thread stuck in C code that holds the GIL stops the Python
thread too; for that case ``faulthandler``'s C watchdog is armed as a backstop (see
``_arm_backstop``). One process holds one Watchdog at a time: the backstop is process-wide.
"""

from __future__ import annotations

import faulthandler
import io
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TextIO

from distlm.fault import exit_codes

HEARTBEAT_DIR = "heartbeats"   # RUN_DIR/heartbeats/rank-00000.json ...
HANG_DIR = "hangs"             # RUN_DIR/hangs/rank-00000.txt : stack dumps

# A peer's heartbeat older than this many beats (and FROZEN_MIN_S) means its process is not
# running: three missed beats absorb a slow disk or a busy host without calling it frozen.
FROZEN_AFTER_BEATS = 3
FROZEN_MIN_S = 2.0
# faulthandler's backstop fires this long after the Python thread should have: only when that
# thread could not run. Re-arming it costs ~70 us (it restarts a C thread), too much for every
# progress() call, so it is re-armed at most once per BACKSTOP_REARM_EVERY_S.
BACKSTOP_MIN_EXTRA_S = 30.0
BACKSTOP_REARM_EVERY_S = 1.0

THREAD_NAME = "distlm-watchdog"


def heartbeat_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank:05d}.json"


def hang_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / HANG_DIR / f"rank-{rank:05d}.txt"


def default_beat_every_s(timeout_s: float) -> float:
    """A tenth of the timeout, so a stall is seen at most 10% late; 0.2-5 s keeps the disk quiet."""
    return min(5.0, max(0.2, timeout_s / 10))


def _position(record: dict) -> tuple[int, str]:
    return record["step"], record["phase"]


def _where(position: tuple[int, str]) -> str:
    if position[0] < 0:  # the state start() stamps; a rank that froze within its first beat shows it
        return "before the first step"
    return f"step {position[0]}, phase {position[1]!r}"


@dataclass
class HangReport:
    rank: int                 # the rank that detected it (this process)
    stalled_s: float          # seconds since this rank's last progress
    step: int
    phase: str                # this rank's last progress
    frozen: list[int]         # ranks whose heartbeat thread stopped writing
    out_of_step: list[int]    # ranks alive but at another (step, phase) than the one they should be at
    missing: list[int]        # ranks with no readable heartbeat file
    lines: list[str]          # one line per rank: rank, host, pid, step, phase, ages, verdict
    reasons: dict[int, str] = field(default_factory=dict)  # why each suspect is named
    notes: list[str] = field(default_factory=list)         # this rank's own troubles (heartbeat not written)
    hang_file: str = ""
    exit_code: int = exit_codes.HANG

    def suspects(self) -> list[int]:
        return sorted(set(self.frozen) | set(self.out_of_step) | set(self.missing))

    def message(self) -> str:
        head = (f"rank {self.rank}: no step progress for {self.stalled_s:.1f} s "
                f"({_where((self.step, self.phase))})")
        suspects = self.suspects()
        if suspects:
            named = ", ".join(f"rank {r} ({self.reasons.get(r, 'suspect')})" for r in suspects)
            blame = f"; stuck: {named}."
        else:
            blame = ("; no other rank looks stuck: every heartbeat is fresh and at the same step and phase, "
                     "so all ranks wait together (a collective that never completes, a deadlock, a stalled "
                     "disk); compare their stacks.")
        notes = "".join(f" Note: {note}." for note in self.notes)
        stacks = f"; every thread's stack is in {self.hang_file}" if self.hang_file else ""
        advice = (f" The job exits (code {self.exit_code}) so the launcher restarts it from the last checkpoint"
                  f"{stacks}. If steps, saves or evaluations are legitimately this slow, raise "
                  f"fault.hang_timeout_s.")
        return head + blame + notes + advice


@dataclass
class _Verdict:
    frozen: list[int] = field(default_factory=list)
    out_of_step: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)


def _classify(records: dict[int, Optional[dict]], own_rank: int, now_wall: float, frozen_after_s: float,
             own_start_wall: float = 0.0) -> _Verdict:
    """Sort the ranks into frozen, missing, out of step (and fine), from their heartbeat records.

    ``records[r]`` is rank r's heartbeat (None: no readable file); ``own_rank``'s is this
    process's own, always fresh. Ages use this reader's clock (hosts are NTP-synchronised;
    ``frozen_after_s`` is seconds, far above their skew).
    """
    verdict = _Verdict()
    alive: dict[int, dict] = {}
    for rank, record in sorted(records.items()):
        if record is None:
            verdict.missing.append(rank)
            verdict.reasons[rank] = "missing: no readable heartbeat file"
        elif now_wall - record["beat_wall"] > frozen_after_s:
            verdict.frozen.append(rank)
            verdict.reasons[rank] = _frozen_reason(record, now_wall, own_start_wall)
        else:
            alive[rank] = record
    verdict.out_of_step, why = _out_of_step(alive, own_rank)
    for rank in verdict.out_of_step:
        verdict.reasons[rank] = f"out of step: at {_where(_position(alive[rank]))}, {why}"
    return verdict


def _frozen_reason(record: dict, now_wall: float, own_start_wall: float) -> str:
    reason = (f"frozen: no heartbeat for {now_wall - record['beat_wall']:.1f} s, host {record.get('host', '?')} "
              f"pid {record.get('pid', '?')}, last at {_where(_position(record))}")
    if record["beat_wall"] < own_start_wall:
        reason += "; that heartbeat predates this rank's start: an earlier run's, or it froze before"
    return reason


def _out_of_step(alive: dict[int, dict], own_rank: int) -> tuple[list[int], str]:
    """The live ranks at a (step, phase) other than the one the job is stuck at, and why.

    Ranks of an SPMD job wait in a collective together, so when all is well they report one
    position. The rule:

    1. A position held by more live ranks than any other is where the job is stuck; every
       live rank elsewhere is out of step (this rank too, if it is the odd one).
    2. No such majority (2 ranks, or an even split): the ranks *ahead* are named, because a
       rank can only get ahead of a collective the others wait in by skipping it. Ahead means
       at the highest step; if those ranks differ in phase, only the ones that made their
       last progress after every other rank at that step had stopped (they moved on while
       the others were stalled). A rank behind, stuck in local work (data loading) while the
       others wait in the step's collective, looks the same and is misnamed: only a
       majority can tell those apart.
    3. Still ambiguous (progress interleaved): every live rank not at this rank's position.
       Each rank then names the others; the ranks' logs together show the split.
    """
    positions = {rank: _position(record) for rank, record in alive.items()}
    ranked = Counter(positions.values()).most_common()
    if len(ranked) <= 1:
        return [], ""
    (top, top_count), (_, next_count) = ranked[0], ranked[1]
    if top_count > next_count:
        return sorted(r for r, p in positions.items() if p != top), f"most ranks are at {_where(top)}"
    ahead = _ranks_ahead(alive)
    if ahead:
        return ahead, "ahead of the other ranks: it went past a collective they are waiting in"
    own = positions[own_rank]
    return (sorted(r for r, p in positions.items() if p != own),
            f"while rank {own_rank} is at {_where(own)} (no majority; which side is stuck is ambiguous)")


def _ranks_ahead(alive: dict[int, dict]) -> list[int]:
    """Rule 2 of ``_out_of_step``: the ranks that moved on past the others, or [] if unclear."""
    top_step = max(record["step"] for record in alive.values())
    leaders = {rank: record for rank, record in alive.items() if record["step"] == top_step}
    by_phase: dict[str, list[int]] = {}
    for rank, record in leaders.items():
        by_phase.setdefault(record["phase"], []).append(rank)
    if len(by_phase) == 1:
        return sorted(leaders) if len(leaders) < len(alive) else []
    walls = {rank: record["progress_wall"] for rank, record in leaders.items()}
    latest = max(by_phase.values(), key=lambda ranks: min(walls[r] for r in ranks))
    others_last = max(wall for rank, wall in walls.items() if rank not in latest)
    return sorted(latest) if min(walls[r] for r in latest) > others_last else []


def _read_heartbeat(path: Path) -> Optional[dict]:
    """A peer's heartbeat, or None if absent or not a heartbeat (a torn or foreign file)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    expected = {"step": int, "phase": str, "beat_wall": (int, float), "progress_wall": (int, float)}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in expected.items()):
        return None
    return record


def _table_line(rank: int, record: Optional[dict], verdict: str, now_wall: float) -> str:
    if record is None:
        return f"rank {rank:>5}  {'(no heartbeat file)':<40}  {verdict}"
    return (f"rank {rank:>5}  host {str(record.get('host', '?')):<16} pid {record.get('pid', '?'):>7}  "
            f"step {record['step']:>8}  phase {record['phase']!r:<12}  "
            f"progress {now_wall - record['progress_wall']:7.1f} s ago  "
            f"heartbeat {now_wall - record['beat_wall']:7.1f} s ago  {verdict}")


def _verdict_word(rank: int, own_rank: int, verdict: _Verdict) -> str:
    for word, ranks in (("frozen", verdict.frozen), ("missing", verdict.missing),
                        ("out of step", verdict.out_of_step)):
        if rank in ranks:
            return word + (" (this rank)" if rank == own_rank else "")
    return "this rank (stalled)" if rank == own_rank else "alive"


def _dump_stacks(out: TextIO) -> None:
    """Every thread's Python stack to ``out``; faulthandler needs a real file descriptor."""
    out.flush()
    try:
        faulthandler.dump_traceback(out, all_threads=True)
        return
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass  # an in-memory stream (tests): format the frames in Python instead
    for ident, frame in sys._current_frames().items():
        out.write(f"Thread 0x{ident:x}:\n{''.join(traceback.format_stack(frame))}\n")
    out.flush()


class Watchdog:
    """One per rank: ``start()``, ``progress(step, phase)`` at every step boundary and phase
    change, ``stop()`` at the end. ``timeout_s <= 0`` disables it (every call a no-op);
    ``on_hang(report)`` runs just before the exit (e.g. to record ``exit.json``)."""

    def __init__(self, run_dir, rank: int, world_size: int, timeout_s: float,
                 exit_code: int = exit_codes.HANG,
                 on_hang: Callable[[HangReport], None] | None = None,
                 beat_every_s: float | None = None,
                 stream=sys.stderr):
        if not 0 <= rank < world_size:
            raise ValueError(f"watchdog: rank {rank} is not in 0..{world_size - 1}")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.enabled = self.timeout_s > 0
        self.exit_code = exit_code
        self.on_hang = on_hang
        self.beat_every_s = default_beat_every_s(self.timeout_s) if beat_every_s is None else float(beat_every_s)
        if self.beat_every_s <= 0:
            raise ValueError(f"watchdog: beat_every_s must be positive, not {beat_every_s}")
        self.frozen_after_s = max(FROZEN_AFTER_BEATS * self.beat_every_s, FROZEN_MIN_S)
        self.stream = stream
        self.host = socket.gethostname()
        self.pid = os.getpid()
        # One tuple, replaced whole by progress(): the thread reads a consistent snapshot without a lock.
        self._last = (-1, "start", time.monotonic(), time.time())
        self._start_wall = time.time()
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._beat_error: Optional[OSError] = None
        self._backstop_file = None
        self._backstop_armed_at: Optional[float] = None

    # -- main thread ---------------------------------------------------------------------------

    def start(self) -> "Watchdog":
        if not self.enabled or self._thread is not None:
            return self
        self._start_wall = time.time()
        self._stopping.clear()
        self._open_backstop_file()
        step, phase, _, _ = self._last
        self.progress(step, phase)  # the clock starts now, not at construction
        self._arm_backstop(time.monotonic())
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()
        return self

    def progress(self, step: int, phase: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self._last = (step, phase, now, time.time())
        armed_at = self._backstop_armed_at
        if armed_at is not None and now - armed_at >= BACKSTOP_REARM_EVERY_S:
            self._arm_backstop(now)

    def stop(self) -> None:
        """Stop the thread and the backstop; heartbeats and hang dumps stay for the post-mortem."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout=self.beat_every_s + 10)  # a beat stuck on a dead disk must not hang the exit
        self._thread = None
        self._disarm_backstop()

    def check_now(self) -> HangReport | None:
        """What the thread does each tick, minus the exit: the report if this rank is stalled."""
        if not self.enabled:
            return None
        step, phase, progress_mono, progress_wall = self._last
        stalled_s = time.monotonic() - progress_mono
        if stalled_s <= self.timeout_s:
            return None
        now_wall = time.time()
        records = {rank: self._own_record(now_wall) if rank == self.rank
                   else _read_heartbeat(heartbeat_path(self.run_dir, rank))
                   for rank in range(self.world_size)}
        verdict = _classify(records, self.rank, now_wall, self.frozen_after_s, self._start_wall)
        lines = [_table_line(rank, records[rank], _verdict_word(rank, self.rank, verdict), now_wall)
                 for rank in range(self.world_size)]
        return HangReport(rank=self.rank, stalled_s=stalled_s, step=step, phase=phase,
                          frozen=verdict.frozen, out_of_step=verdict.out_of_step, missing=verdict.missing,
                          lines=lines, reasons=verdict.reasons, notes=self._notes(),
                          hang_file=str(hang_path(self.run_dir, self.rank)), exit_code=self.exit_code)

    # -- the backstop: faulthandler's C thread, for a main thread that holds the GIL --------------

    def _open_backstop_file(self) -> None:
        """Opened once, here, because the C thread cannot open files when it fires.

        Appended to: a previous run's dump stays next to this one's.
        """
        path = hang_path(self.run_dir, self.rank)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._backstop_file = open(path, "a")
        except OSError as error:
            self._say(f"cannot open {path} ({error}); a hang that blocks Python is dumped to stderr")
            self._backstop_file = sys.__stderr__

    def _arm_backstop(self, now: float) -> None:
        """If nothing re-arms it for timeout + max(30 s, timeout), dump every stack and exit.

        That only happens when this Python thread could not run (it would have exited at
        ``timeout_s``): a main thread holding the GIL in C code, or this thread stuck writing to a
        dead disk. faulthandler exits with code 1, not ``exit_code``: its exit cannot be chosen.
        """
        if self._backstop_file is None:
            return
        delay = self.timeout_s + max(BACKSTOP_MIN_EXTRA_S, self.timeout_s)
        try:
            faulthandler.dump_traceback_later(delay, exit=True, file=self._backstop_file)
        except (ValueError, OSError, RuntimeError):
            return  # no usable descriptor: the Python thread is the only watchdog then
        self._backstop_armed_at = now

    def _disarm_backstop(self) -> None:
        self._backstop_armed_at = None
        faulthandler.cancel_dump_traceback_later()
        backstop, self._backstop_file = self._backstop_file, None
        if backstop is None or backstop is sys.__stderr__:
            return
        backstop.close()
        try:  # an empty dump file is no evidence, only clutter in RUN_DIR/hangs
            if os.path.getsize(backstop.name) == 0:
                os.unlink(backstop.name)
        except OSError:
            pass

    # -- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._beat()
            report = self.check_now()
            if report is not None:
                self._exit_for_hang(report)
            if self._stopping.wait(self.beat_every_s):
                return

    def _own_record(self, now_wall: float) -> dict:
        step, phase, _, progress_wall = self._last
        return {"rank": self.rank, "world_size": self.world_size, "host": self.host, "pid": self.pid,
                "step": step, "phase": phase, "progress_wall": progress_wall, "beat_wall": now_wall}

    def _beat(self) -> None:
        """Write the heartbeat; a disk error is remembered and retried next beat, never fatal."""
        try:
            self._write_heartbeat(self._own_record(time.time()))
        except OSError as error:
            if self._beat_error is None:
                self._say(f"cannot write the heartbeat ({error}); retrying every {self.beat_every_s:g} s, "
                          f"other ranks see this one as frozen or missing meanwhile")
            self._beat_error = error
            return
        if self._beat_error is not None:
            self._say("heartbeat written again")
            self._beat_error = None

    def _write_heartbeat(self, record: dict) -> None:
        """Atomic (a reader sees a whole file), not durable: no fsync, which could block the thread
        for seconds on a shared file system; a beat lost in a crash only makes the rank look older.
        The temporary name is per process, so a stray process of the same rank cannot tear it."""
        path = heartbeat_path(self.run_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{self.host}.{self.pid}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _notes(self) -> list[str]:
        error = self._beat_error
        return [] if error is None else [f"this rank could not write its heartbeat ({error})"]

    def _exit_for_hang(self, report: HangReport) -> None:
        """Log the report, dump every stack (log and hang file), call on_hang, exit. Never returns."""
        faulthandler.cancel_dump_traceback_later()  # this exit and its code, not the backstop's
        prefix = f"[watchdog rank {self.rank}]"
        self._write_out(f"{prefix} {report.message()}\n" + "".join(f"{prefix}   {line}\n" for line in report.lines)
                        + f"{prefix} stacks of every thread:\n")
        try:
            _dump_stacks(self.stream)
        except Exception:  # a closed stream must not stop the exit
            pass
        self._write_hang_file(report)
        if self.on_hang is not None:
            try:
                self.on_hang(report)
            except BaseException:  # the callback is best effort; the exit is not
                self._write_out(f"{prefix} on_hang failed:\n{traceback.format_exc()}")
        for out in (sys.stdout, sys.stderr):
            try:
                out.flush()
            except Exception:
                pass
        os._exit(self.exit_code)

    def _write_hang_file(self, report: HangReport) -> None:
        path = hang_path(self.run_dir, self.rank)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as out:
                out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} watchdog, rank {self.rank} "
                          f"(host {self.host}, pid {self.pid})\n{report.message()}\n")
                out.write("".join(f"  {line}\n" for line in report.lines))
                _dump_stacks(out)
        except OSError as error:
            self._write_out(f"[watchdog rank {self.rank}] cannot write {path}: {error}\n")

    def _say(self, text: str) -> None:
        self._write_out(f"[watchdog rank {self.rank}] {text}\n")

    def _write_out(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # the log going away must not kill the watchdog
            pass
