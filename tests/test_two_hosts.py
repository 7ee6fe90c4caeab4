"""launch/multinode.sh across two hosts: two network namespaces on this machine, one node each.

Each namespace is a host of its own (own loopback, interfaces, ports; tests/netns.py), joined
to the other by a veth cable, 10.77.0.1 (node 0) and 10.77.0.2 (node 1). The script runs once
in each, as on a cluster: NODE_RANK 0 and 1, the rendezvous endpoint on node 0, one process per
node, so the job is the shared 2-rank job of tests/launchers.py and must reproduce the plain
torchrun reference curve bit for bit. Both nodes write one run folder (a shared filesystem).

- a clean run: both torchruns exit 0; the rendezvous placed node 0 first (LOCAL_ADDR order)
  and gave the workers node 0's address as MASTER_ADDR; gloo got each node's veth (chosen by
  distlm unless EXPLICIT_GLOO_IFNAME); torchrun was told to forward SIGUSR1 and SIGUSR2; the
  curve equals the reference.
- a restart: node 1's worker is SIGKILLed after step 6 of the first attempt; the survivor
  stops (peer lost, exit 78) or is restarted by its torchrun, both torchruns rendezvous again
  within seconds, the job resumes from the step-4 checkpoint, finishes, and the whole curve
  still equals the reference.

Every process runs inside a namespace this module created, and talks only to the other
namespace's address or its own loopback. Without root or iproute2 the tests skip, saying why;
with CI set in the environment they fail instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from distlm.fault import exit_codes
from distlm.fault.crash_loop import STARTS_FILE
from distlm.fault.inject import Fault
from helpers import ROOT, curve, system_unavailable
from launchers import CONFIG, SAVE_EVERY, STEPS, job_overrides, launcher_env
from netns import NamespaceUnavailable, two_hosts

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = ROOT / "launch" / "multinode.sh"
RDZV_PORT = 29500  # inside a namespace made for this test: nothing else can hold it
# Left to itself gloo binds the address the hostname resolves to, loopback inside a namespace,
# and the two ranks never meet. False: GLOO_SOCKET_IFNAME is unset and distlm must choose the
# veth itself (the interface holding the local address that routes to MASTER_ADDR), which the
# clean run checks. True: each node is given its veth by hand, as a user would without that.
EXPLICIT_GLOO_IFNAME = False
JOIN_TIMEOUT_S = 60      # a node that fails to come fails the test in a minute, not torch's 10
CLEAN_TIMEOUT_S = 300    # hard limits: a start costs ~10 s idle, a minute on a loaded 2-core box
RESTART_TIMEOUT_S = 420
KILL_STEP = 6            # after the step-4 checkpoint, before the step-8 one
RESUMED_FROM = (KILL_STEP // SAVE_EVERY) * SAVE_EVERY


@pytest.fixture
def hosts():
    with ExitStack() as stack:
        try:
            pair = stack.enter_context(two_hosts())
        except NamespaceUnavailable as e:
            system_unavailable(f"cannot create network namespaces: {e}")
        yield pair


def _node_env(hosts, rank: int, max_restarts: int, extra: dict) -> dict:
    host = hosts[rank]
    env = launcher_env(NNODES="2", NODE_RANK=str(rank), RDZV_ENDPOINT=f"{hosts[0].addr}:{RDZV_PORT}", NPROC="1",
                       LOCAL_ADDR=host.addr, MAX_RESTARTS=str(max_restarts), JOIN_TIMEOUT=str(JOIN_TIMEOUT_S),
                       # torchrun's own INFO lines (rendezvous results, restarts) are what the tests read
                       LOGLEVEL="INFO", **extra)
    env.pop("GLOO_SOCKET_IFNAME", None)
    if EXPLICIT_GLOO_IFNAME:
        env["GLOO_SOCKET_IFNAME"] = host.ifname
    return env


def _run_two_nodes(hosts, run_dir: Path, shards: Path, logs: Path, timeout: float, max_restarts: int = 0,
                   node_extra: tuple[dict, dict] = ({}, {})) -> list[tuple[int, str]]:
    """launch/multinode.sh in both namespaces at once; each node's (exit code, output)."""
    procs, paths = [], []
    try:
        for rank, host in enumerate(hosts):
            path = logs / f"node{rank}.log"
            with open(path, "w") as log:
                procs.append(subprocess.Popen(
                    host.wrap([str(SCRIPT), CONFIG, *job_overrides(run_dir, shards)]), cwd=ROOT,
                    env=_node_env(hosts, rank, max_restarts, node_extra[rank]), stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
            paths.append(path)
        deadline = time.monotonic() + timeout
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                tails = "\n".join(f"--- node {r} ---\n{p.read_text()[-3000:]}" for r, p in enumerate(paths))
                raise AssertionError(f"node {rank}'s launch/multinode.sh still ran after {timeout} s:\n{tails}")
    finally:
        # torchrun starts its workers in sessions of their own, so a process group does not hold
        # them: kill whatever still runs in the namespaces (nothing, when both nodes finished).
        for host in hosts:
            host.kill_all()
        for proc in procs:
            proc.wait()
    return [(proc.returncode, path.read_text()) for proc, path in zip(procs, paths)]


def _show(results) -> str:
    return "\n".join(f"--- node {r}: exit {rc} ---\n{out[-5000:]}" for r, (rc, out) in enumerate(results))


def _rendezvous(out: str) -> list[dict]:
    """torchrun's "Rendezvous complete" reports in one node's output, in order (its INFO log)."""
    rows = []
    for block in re.finditer(r"^I(\d{4} [\d:.]+) .*Rendezvous complete for workers\. Result:\n((?:.*\n){10})",
                             out, re.M):
        fields = dict(re.findall(r"\]\s+(\w+)=(.*)", block.group(2)))
        rows.append({"at": _log_time(block.group(1)), **fields})
    return rows


def _log_time(stamp: str) -> datetime:
    """torchrun's log prefix time ("MMDD HH:MM:SS.ffffff"); only differences are used."""
    return datetime.strptime(f"2000{stamp}", "%Y%m%d %H:%M:%S.%f")


def _launch_config(out: str, key: str) -> str:
    match = re.search(rf"launcher/api\.py:\d+\]\s+{key}\s*: (.*)", out)
    assert match, f"torchrun printed no launch config {key!r} (LOGLEVEL=INFO lost?)"
    return match.group(1).strip()


def test_two_hosts_train_the_reference_model(hosts, launch_shards, launch_reference, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    results = _run_two_nodes(hosts, run_dir, launch_shards, tmp_path, timeout=CLEAN_TIMEOUT_S)
    print(f"two hosts, clean run: {time.monotonic() - started:.1f} s")
    assert [rc for rc, _ in results] == [0, 0], _show(results)
    (_, out0), (_, out1) = results
    for rank, out in enumerate((out0, out1)):
        # Under c10d the order of the nodes is that of their LOCAL_ADDR (10.77.0.1 < 10.77.0.2),
        # and every worker's MASTER_ADDR is the first node's LOCAL_ADDR, not its hostname (which
        # a namespace resolves to loopback).
        (rdzv,) = _rendezvous(out)
        assert (rdzv["group_rank"], rdzv["master_addr"], rdzv["global_ranks"]) == \
            (str(rank), hosts[0].addr, f"[{rank}]"), (rank, rdzv)
        # torchrun 2.13 forwards only what --signals-to-handle lists (it overwrites the
        # TORCHELASTIC_SIGNALS_TO_HANDLE variable with it); distlm's save-and-stop needs USR1/USR2.
        assert {"SIGUSR1", "SIGUSR2"} <= set(_launch_config(out, "signals_to_handle").split(",")), rank
        assert _launch_config(out, "rdzv_backend") == "c10d"
        if not EXPLICIT_GLOO_IFNAME:
            assert f"GLOO_SOCKET_IFNAME={hosts[rank].ifname} ({hosts[rank].addr})" in out, \
                f"node {rank}: distlm did not say it chose {hosts[rank].ifname} for gloo:\n{out[-3000:]}"
    assert f"done: {STEPS} steps" in out0
    assert curve(run_dir) == launch_reference


def test_a_killed_worker_restarts_both_hosts_from_the_last_checkpoint(hosts, launch_shards, launch_reference,
                                                                      tmp_path):
    run_dir = tmp_path / "run"
    # Node 1's worker is global rank 1 (see the test above); restart=0: the first attempt only.
    kill = Fault(rank=1, step=KILL_STEP, phase="step", signal="KILL", restart=0)
    started = time.monotonic()
    results = _run_two_nodes(hosts, run_dir, launch_shards, tmp_path, timeout=RESTART_TIMEOUT_S, max_restarts=2,
                             node_extra=({}, {"DISTLM_FAULT": kill.to_env()}))
    wall = time.monotonic() - started
    assert [rc for rc, _ in results] == [0, 0], _show(results)
    (_, out0), (_, out1) = results

    # The worker in node 1 was killed, once (its restart does not meet the fault again).
    fired = re.findall(r"fault injection: rank 1 sends SIGKILL x1 at step of step (\d+) \(time ([\d.]+)\)", out1)
    assert [int(step) for step, _ in fired] == [KILL_STEP], _show(results)
    assert "fault injection" not in out0
    assert re.search(r"failed \(exitcode: -9\) local_rank: 0", out1), out1[-4000:]
    killed_at = float(fired[0][1])

    # The survivor lost its peer within seconds (gloo: the socket closes) and stopped with 78, or,
    # if its worker had not noticed yet, its torchrun restarted it on seeing node 1 waiting.
    exits = [json.loads(line) for line in (run_dir / exit_codes.EXITS_LOG).read_text().splitlines()]
    lost = [e for e in exits if e["code"] == exit_codes.PEER_LOST]
    if lost:
        assert lost[0]["rank"] == 0 and lost[0]["time"] - killed_at < 10, exits
        assert "failed (exitcode: 78)" in out0, out0[-4000:]
        survivor = f"exit 78 {lost[0]['time'] - killed_at:.2f} s after the kill"
    else:
        assert re.search(r"Detected \d+ new nodes from group_rank=0; will restart worker group", out0), out0[-4000:]
        survivor = "restarted by its torchrun (node waiting), no exit 78"

    # Both torchruns went through a second rendezvous, promptly: well under join_timeout and
    # torch's 30 s last_call_timeout, which a fixed node count never waits for.
    rounds = [_rendezvous(out) for out in (out0, out1)]
    assert [len(r) for r in rounds] == [2, 2], rounds
    assert rounds[1][1]["restart_count"] == "1"  # node 1's own failure counts against its MAX_RESTARTS
    detected = _log_time(re.search(r"^E(\d{4} [\d:.]+) .*failed \(exitcode: -9\)", out1, re.M).group(1))
    rejoined = max(r[1]["at"] for r in rounds) - detected
    rejoined += timedelta(days=1) if rejoined < timedelta(0) else timedelta(0)  # past midnight
    assert rejoined.total_seconds() < 30, rounds

    # The job resumed from the last checkpoint before the kill and finished.
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{RESUMED_FROM:08d}'} at step {RESUMED_FROM}" in out0
    assert f"done: {STEPS} steps" in out0
    starts = [json.loads(line) for line in (run_dir / STARTS_FILE).read_text().splitlines()]
    assert [s["resume_step"] for s in starts] == [0, RESUMED_FROM] and starts[-1]["ended"] == "finished", starts
    assert curve(run_dir) == launch_reference
    print(f"two hosts, restart: rank 1 killed at step {KILL_STEP}; survivor: {survivor}; both torchruns "
          f"rendezvoused again {rejoined.total_seconds():.2f} s after node 1's torchrun saw the death; "
          f"resumed from step {RESUMED_FROM}; restart counts {[s['restart'] for s in starts]} (rank 0's "
          f"starts); {wall:.1f} s in all")
