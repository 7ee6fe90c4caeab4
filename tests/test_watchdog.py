"""The hang watchdog: a frozen rank and a rank that skipped a collective, on real gloo ranks;
the classification of heartbeats; a disabled watchdog; a heartbeat folder that cannot be written.

Matrix rows 14 (a frozen rank) and 15 (a rank out of step). The rank processes are started
here with ``subprocess`` (not ``spawn.py``) so the test controls their signals and sees their
exit codes; every one is killed in ``finally``.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distlm.fault import exit_codes
from distlm.fault.watchdog import HANG_DIR, THREAD_NAME, Watchdog, hang_path, heartbeat_path
from helpers import ROOT

pytestmark = [pytest.mark.distributed]

TIMEOUT_S = 3.0
SLACK_S = 5.0        # the brief: the hang is reported within timeout + 5 s of the last progress
WAIT_S = 60.0        # hard limit on a rank process (imports on a busy 2-core machine included)

# One rank of a 2-rank gloo job. Each step: phase "agree" (an all-reduce on a second group, as
# DeepSpeed has several) then phase "step" (the gradient all-reduce, default group). At step 3,
# rank 1 freezes itself (SIGSTOP) or skips the gradient all-reduce.
RANK_SCRIPT = r'''
import datetime, os, signal, sys, time
import torch, torch.distributed as dist
from distlm.fault.watchdog import Watchdog

rank, store, run_dir, scenario = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
# Longer than the test: the watchdog, not gloo, must end it.
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=120))
agree_group = dist.new_group([0, 1])
dog = Watchdog(run_dir, rank, 2, timeout_s=float(sys.argv[5])).start()

def progress(step, phase):
    dog.progress(step, phase)
    print(f"progress step={step} phase={phase} wall={time.time():.3f}", flush=True)

for step in range(1, 7):
    progress(step, "agree")
    dist.all_reduce(torch.ones(1), group=agree_group)
    progress(step, "step")
    if rank == 1 and step == 3 and scenario == "freeze":
        os.kill(os.getpid(), signal.SIGSTOP)
    if rank == 1 and step == 3 and scenario == "skip":
        continue
    dist.all_reduce(torch.ones(8))
print("finished", flush=True)
'''


def _start_ranks(tmp_path: Path, scenario: str) -> tuple[list[subprocess.Popen], list[Path], Path]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs, logs = [], []
    for rank in range(2):
        log = tmp_path / f"rank{rank}.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store"),
                                           str(run_dir), scenario, str(TIMEOUT_S)],
                                          cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs, run_dir


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # SIGKILL also ends a SIGSTOPped process
        proc.wait()


def _wait_exit(proc: subprocess.Popen, log: Path) -> float:
    """Wait for ``proc`` to exit; return the wall time it did."""
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit within {WAIT_S} s:\n{log.read_text()[-3000:]}") from None
    return time.time()


def _last_progress_wall(out: str) -> float:
    return float(re.findall(r"progress step=\d+ phase=\w+ wall=([\d.]+)", out)[-1])


def _detected_after_s(out: str) -> float:
    return float(re.search(r"no step progress for ([\d.]+) s", out).group(1))


def _timing(out: str, exited_wall: float) -> str:
    return f"detected after {_detected_after_s(out):.1f} s, exited {exited_wall - _last_progress_wall(out):.1f} s"


def test_a_frozen_rank_is_named_while_the_others_wait_in_gloo(tmp_path):
    procs, logs, run_dir = _start_ranks(tmp_path, "freeze")
    try:
        exited = _wait_exit(procs[0], logs[0])
        out = logs[0].read_text()
        assert procs[0].returncode == exit_codes.HANG, out[-3000:]
        print(f"frozen rank: rank 0 {_timing(out, exited)} after its last progress")
        assert exited - _last_progress_wall(out) <= TIMEOUT_S + SLACK_S, out[-3000:]
        assert "progress step=3 phase=step" in out and "progress step=4" not in out
        assert "[watchdog rank 0] rank 0: no step progress" in out
        assert re.search(r"stuck: rank 1 \(frozen: no heartbeat for [\d.]+ s", out), out[-3000:]
        assert "out of step" not in out.split("stuck:")[1].split(".")[0]
        # The thread dumped the main thread's stack, waiting inside gloo's all-reduce.
        dump = hang_path(run_dir, 0).read_text()
        assert "all_reduce" in dump and "Current thread" in dump, dump
        assert procs[1].poll() is None  # still stopped, never beat again: the test ends it
    finally:
        _kill_all(procs)


def _wait_first_exit(procs: list[subprocess.Popen], logs: list[Path]) -> tuple[int, float]:
    """The rank that exits first, and the wall time it did."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for rank, proc in enumerate(procs):
            if proc.poll() is not None:
                return rank, time.time()
        time.sleep(0.02)
    tails = "\n".join(log.read_text()[-2000:] for log in logs)
    raise AssertionError(f"no rank exited within {WAIT_S} s:\n{tails}")


def test_a_rank_that_skipped_a_collective_is_named_out_of_step(tmp_path):
    # Both ranks wait, in different collectives on different groups, so both watchdogs fire at
    # about the same time; the first to exit closes its gloo connections, and the other may see
    # "Connection closed by peer" raised in its all-reduce before its own watchdog fires.
    procs, logs, run_dir = _start_ranks(tmp_path, "skip")
    try:
        first, first_exited = _wait_first_exit(procs, logs)
        second = 1 - first
        exited = {first: first_exited, second: _wait_exit(procs[second], logs[second])}
        for rank in (first, second):
            out = logs[rank].read_text()
            if rank == second and procs[rank].returncode != exit_codes.HANG:
                assert re.search(r"Connection (closed|reset) by peer", out), out[-3000:]
                print(f"skipped collective: rank {rank} lost its peer before its watchdog fired")
                continue
            assert procs[rank].returncode == exit_codes.HANG, out[-3000:]
            print(f"skipped collective: rank {rank} {_timing(out, exited[rank])} after its last progress")
            assert exited[rank] - _last_progress_wall(out) <= TIMEOUT_S + SLACK_S, out[-3000:]
            assert re.search(r"stuck: rank 1 \(out of step: at step 4, phase 'agree', ahead", out), out[-3000:]
            assert "frozen:" not in out
            assert "all_reduce" in hang_path(run_dir, rank).read_text()
    finally:
        _kill_all(procs)


# -- classification from heartbeat files written here -------------------------------------------------


def _beat(run_dir: Path, rank: int, step: int, phase: str, beat_age: float = 0.0, progress_age: float = 5.0):
    now = time.time()
    path = heartbeat_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": rank, "world_size": 9, "host": "node7", "pid": 4242 + rank,
                                "step": step, "phase": phase, "progress_wall": now - progress_age,
                                "beat_wall": now - beat_age}))


def _stalled(run_dir: Path, rank: int, world_size: int, step: int, phase: str) -> Watchdog:
    """A watchdog (never started: no thread, no exit) that made its last progress just now and
    whose timeout has already passed."""
    dog = Watchdog(run_dir, rank, world_size, timeout_s=0.01, stream=io.StringIO())
    dog.progress(step, phase)
    time.sleep(0.02)
    return dog


def test_no_report_before_the_timeout(tmp_path):
    dog = Watchdog(tmp_path, 0, 2, timeout_s=60)
    dog.progress(1, "step")
    assert dog.check_now() is None


def test_frozen_missing_and_out_of_step_ranks_are_told_apart(tmp_path):
    dog = _stalled(tmp_path, 0, 6, 6, "step")
    _beat(tmp_path, 1, 6, "step", beat_age=30)   # stopped beating: frozen
    _beat(tmp_path, 3, 6, "step")                 # with rank 0: the majority
    _beat(tmp_path, 4, 7, "step")                 # ahead of the majority
    heartbeat_path(tmp_path, 5).write_text('{"rank": 5, "st')  # torn or foreign: as good as missing
    report = dog.check_now()                      # rank 2 wrote nothing
    assert (report.frozen, report.missing, report.out_of_step) == ([1], [2, 5], [4])
    assert report.suspects() == [1, 2, 4, 5]
    assert (report.rank, report.step, report.phase) == (0, 6, "step") and report.stalled_s > 0.01
    assert len(report.lines) == 6 and "node7" in report.lines[1] and "frozen" in report.lines[1]
    message = report.message()
    assert message.startswith("rank 0: no step progress for")
    assert "rank 1 (frozen: no heartbeat for 30" in message and "pid 4243" in message
    assert "rank 2 (missing" in message
    assert "rank 4 (out of step: at step 7, phase 'step', most ranks are at step 6, phase 'step')" in message
    assert "last checkpoint" in message and "fault.hang_timeout_s" in message and "rank-00000.txt" in message


def test_the_detecting_rank_names_itself_when_it_is_the_odd_one(tmp_path):
    dog = _stalled(tmp_path, 0, 3, 6, "agree")
    _beat(tmp_path, 1, 7, "step")
    _beat(tmp_path, 2, 7, "step")
    report = dog.check_now()
    assert report.suspects() == report.out_of_step == [0]
    assert "out of step (this rank)" in report.lines[0]


def test_all_ranks_at_one_place_name_nobody(tmp_path):
    dog = _stalled(tmp_path, 0, 2, 6, "step")
    _beat(tmp_path, 1, 6, "step")
    report = dog.check_now()
    assert report.suspects() == [] and "no other rank looks stuck" in report.message()


@pytest.mark.parametrize("own, peer, expected", [
    ((6, "agree"), (7, "step"), [1]),     # the peer went a step ahead: it skipped a collective
    ((7, "step"), (6, "agree"), [0]),     # the same pair seen from the other side: the same answer
    ((6, "agree"), (6, "step"), [1]),     # same step: the peer moved on after this rank stalled
])
def test_two_ranks_without_a_majority_name_the_one_ahead(tmp_path, own, peer, expected):
    dog = _stalled(tmp_path, 0, 2, *own)
    _beat(tmp_path, 1, *peer, progress_age=0.001 if expected == [1] else 30)
    assert dog.check_now().out_of_step == expected


def test_an_ambiguous_split_names_every_rank_elsewhere(tmp_path):
    # Two against two at one step, their progress interleaved: no side moved on after the other.
    dog = _stalled(tmp_path, 0, 4, 6, "a")
    _beat(tmp_path, 1, 6, "a", progress_age=5)
    _beat(tmp_path, 2, 6, "b", progress_age=0)
    _beat(tmp_path, 3, 6, "b", progress_age=10)
    report = dog.check_now()
    assert report.out_of_step == [2, 3] and "ambiguous" in report.message()


@pytest.mark.parametrize("timeout_s", [0, -1])
def test_a_zero_timeout_disables_everything(tmp_path, timeout_s):
    run_dir = tmp_path / "run"
    dog = Watchdog(run_dir, 0, 2, timeout_s=timeout_s)
    assert dog.start() is dog
    dog.progress(1, "step")
    time.sleep(0.05)
    assert dog.check_now() is None
    assert THREAD_NAME not in [t.name for t in threading.enumerate()]
    dog.stop()
    assert not run_dir.exists()


# -- a heartbeat folder that cannot be written ----------------------------------------------------------


def _unwritable_run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "heartbeats").write_text("a file where the folder should be")
    return run_dir


def test_disk_errors_do_not_kill_the_thread_and_the_stall_is_still_seen(tmp_path):
    run_dir = _unwritable_run_dir(tmp_path)
    log = io.StringIO()
    dog = Watchdog(run_dir, 0, 2, timeout_s=3, beat_every_s=0.05, stream=log).start()
    try:
        time.sleep(0.5)  # ~10 failed beats
        assert THREAD_NAME in [t.name for t in threading.enumerate()]
    finally:
        dog.stop()
    assert log.getvalue().count("cannot write the heartbeat") == 1  # said once, retried quietly
    assert not (run_dir / HANG_DIR / "rank-00000.txt").exists()      # nothing dumped: no empty file left
    time.sleep(max(0.0, 3.1 - 0.5))
    report = dog.check_now()
    assert report is not None and report.missing == [1]
    assert "could not write its heartbeat" in report.message() and "File exists" in report.message()


def test_disk_errors_do_not_stop_the_hang_exit(tmp_path):
    run_dir = _unwritable_run_dir(tmp_path)
    code = (f"import time; from distlm.fault.watchdog import Watchdog\n"
            f"Watchdog({str(run_dir)!r}, 0, 2, timeout_s=1, beat_every_s=0.1).start().progress(5, 'step')\n"
            f"time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=WAIT_S)
    finally:
        _kill_all([proc])
    assert proc.returncode == exit_codes.HANG, out
    assert "cannot write the heartbeat" in out and "rank 1 (missing" in out
    assert 'File "<string>", line 3' in hang_path(run_dir, 0).read_text()  # the main thread, in its sleep
