"""The fault policies on their own: exit codes and their records, crash-loop counting, and the
preemption flag with real signals (including a second signal while the main thread waits in a
gloo collective that never completes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from distlm.cli import main
from distlm.fault import exit_codes
from distlm.fault.crash_loop import CrashLoopError, StartLog
from helpers import ROOT


def test_the_readme_lists_every_exit_code_as_the_code_does():
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", (ROOT / "README.md").read_text(), re.M)
    assert [(int(c), n.strip(), m.strip(), r.strip()) for c, n, m, r in rows] == exit_codes.TABLE
    codes = [c for c, _, _, _ in exit_codes.TABLE]
    assert len(set(codes)) == len(codes)


def test_cli_exit_codes_follow_the_error_kind(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == exit_codes.CONFIG_ERROR
    assert "config error" in capsys.readouterr().err
    assert exit_codes.code_for(CrashLoopError("x")) == exit_codes.CRASH_LOOP
    assert exit_codes.code_for(exit_codes.PeerLost("x")) == exit_codes.PEER_LOST
    assert exit_codes.code_for(ValueError("x")) == exit_codes.FAILED


def test_exit_json_keeps_the_first_ending_and_exits_jsonl_all(tmp_path):
    exit_codes.record_exit(tmp_path, exit_codes.PREEMPTED_UNSAVED, "second signal", rank=0, step=4)
    exit_codes.record_exit(tmp_path, exit_codes.PEER_LOST, "lost rank 0", rank=1, step=4)
    assert json.loads((tmp_path / exit_codes.EXIT_FILE).read_text())["code"] == exit_codes.PREEMPTED_UNSAVED
    lines = [json.loads(line) for line in (tmp_path / exit_codes.EXITS_LOG).read_text().splitlines()]
    assert [(r["code"], r["rank"]) for r in lines] == [(76, 0), (78, 1)]
    assert not list(tmp_path.glob("*.tmp"))
    exit_codes.forget_exit(tmp_path)
    exit_codes.record_exit(tmp_path, exit_codes.OK, "finished", rank=0, step=9)
    assert json.loads((tmp_path / exit_codes.EXIT_FILE).read_text())["code"] == exit_codes.OK


def test_a_crash_loop_is_counted_from_failed_starts_at_one_checkpoint(tmp_path):
    starts = StartLog(tmp_path)
    starts.record_start(0)
    starts.record_end("peer lost", 3)     # from scratch, died at 3 after saving 2
    for _ in range(2):
        starts.check(2, limit=3)
        starts.record_start(2)            # died again before saving anything newer
    with pytest.raises(CrashLoopError, match=r"last 2 starts .* resumed from step 2"):
        starts.check(2, limit=2)
    starts.check(2, limit=3)              # a third try is still allowed at limit 3
    starts.check(4, limit=1)              # a newer checkpoint is progress
    starts.record_start(2)
    starts.record_end("preempted", 2)     # a preempted start is not a crash: the count restarts
    starts.check(2, limit=1)
    starts.check(2, limit=0)              # 0: off
    (tmp_path / "starts.jsonl").write_text((tmp_path / "starts.jsonl").read_text() + '{"torn')
    assert len(starts.starts()) == 4      # a line torn by a crash is skipped


_BLOCKED_RANK = textwrap.dedent("""
    import sys, time, torch, torch.distributed as dist
    from datetime import timedelta
    from distlm.fault.preemption import Preemption
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    if rank == 1:
        time.sleep(120)  # never joins the collective below
    flag = Preemption(rank, repeat_window_s=1.5).install()
    print("waiting", flush=True)
    dist.all_reduce(torch.ones(1))  # blocks in C++: Python signal handlers cannot run here
    print("never", flush=True)
""")


def test_a_second_signal_exits_at_once_even_inside_a_blocked_collective(tmp_path):
    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKED_RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), store], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    try:
        assert procs[0].stdout.readline().strip() == "waiting"
        time.sleep(0.5)  # inside all_reduce by now
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(0.3)
        procs[0].send_signal(signal.SIGTERM)  # within the repeat window: the same request delivered twice
        time.sleep(0.5)
        assert procs[0].poll() is None   # the first signal only raised the flag, its repeat did nothing
        time.sleep(1.0)                  # past the window: the next one means "now"
        sent = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        code = procs[0].wait(timeout=10)
        took = time.monotonic() - sent
        err = procs[0].stderr.read()
        assert code == exit_codes.PREEMPTED_UNSAVED, err
        assert "SIGTERM received: saving at the next step boundary" in err
        assert "a second signal (SIGTERM) after SIGTERM: stopped at once" in err
        assert took < 5, took
    finally:
        for p in procs:
            p.kill()
            p.wait()


_LOADER_UNDER_FIRE = textwrap.dedent("""
    import os, subprocess, sys, time
    from types import SimpleNamespace
    from torch.utils.data import IterableDataset
    from distlm.data.stream import make_loader

    class Numbers(IterableDataset):
        def __iter__(self):
            for i in range(10_000):
                time.sleep(0.01)
                yield SimpleNamespace(i=i, errors=None)  # what make_loader hands on: a batch with .errors

    batches = iter(make_loader(Numbers(), num_workers=1))
    first = next(batches)
    worker = int(open(f"/proc/self/task/{os.getpid()}/children").read().split()[0])  # the loader worker
    for sig in ("TERM", "USR1", "USR2", "INT"):   # from another process, as a scheduler would
        subprocess.run(["kill", f"-{sig}", str(worker)], check=True)
    time.sleep(0.5)
    assert [next(batches).i for _ in range(3)] == [1, 2, 3]
    print("worker alive", flush=True)
    # Exiting with the loader still open: multiprocessing stops the daemonic worker with the
    # trainer's own SIGTERM, which the worker must obey, or this exit would hang.
""")


def _run_script(tmp_path, source: str) -> subprocess.CompletedProcess:
    """``source`` as a trainer process of its own (signals and forks stay out of pytest's)."""
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)


def test_loader_workers_ignore_the_schedulers_signals_but_not_their_trainers(tmp_path):
    out = _run_script(tmp_path, _LOADER_UNDER_FIRE)
    assert out.returncode == 0 and "worker alive" in out.stdout, out.stderr[-2000:]


_SIGTERM_WHILE_WORKERS_START = textwrap.dedent("""
    import os, signal, time
    from types import SimpleNamespace
    from torch.utils.data import IterableDataset
    from distlm.data.stream import make_loader

    class Numbers(IterableDataset):
        def __iter__(self):
            for i in range(100):
                yield SimpleNamespace(i=i, errors=None)

    # The worst moment: a SIGTERM reaches each worker the instant it is forked, before torch's
    # worker setup and distlm's worker_init_fn run (sent by the worker itself: not its trainer).
    os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))
    batches = iter(make_loader(Numbers(), num_workers=2))
    assert sorted(next(batches).i for _ in range(6)) == [0, 0, 1, 1, 2, 2]  # each worker yields them all
    print("workers alive", flush=True)
""")


def test_a_sigterm_while_the_workers_start_does_not_kill_them(tmp_path):
    out = _run_script(tmp_path, _SIGTERM_WHILE_WORKERS_START)
    assert out.returncode == 0 and "workers alive" in out.stdout, out.stderr[-2000:]


def test_every_process_group_takes_the_configured_timeout():
    """fault.collective_timeout_s reaches groups created later too (DeepSpeed's, tp/pp/dp)."""
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        from distlm.parallel.distributed import init_distributed
        init_distributed("cpu", timeout_s=123)
        later = dist.new_group([0])
        print(later._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "123.0"
