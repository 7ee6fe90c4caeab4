"""Preflight and rendezvous failures: real ranks, each started by hand with the variables a launcher sets.

Each case is a mistake seen on real clusters: an override typed on one node only, a run folder
on a node-local disk (here: a private tmpfs mounted over it in one rank's mount namespace,
the same path and another filesystem), a read-only one, a taken port, a master nobody
listens on. Every rank must stop within seconds with exit code 6 and a message naming the
rank, the key, the folder or the address.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from distlm.fault import exit_codes
from helpers import ROOT, free_ports, source_shards
from launchers import job_overrides

CONFIG = str(ROOT / "configs" / "tiny-test.yaml")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return source_shards(tmp_path_factory.mktemp("preflight-data"))




def _start(rank: int, world: int, port: int, overrides: list[str], wrap: list[str] = (), **env) -> subprocess.Popen:
    """One rank of ``distlm train``, started as torchrun would start it (RANK, WORLD_SIZE, MASTER_*)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RANK": str(rank),
                "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env}
    command = [sys.executable, "-m", "distlm", "train", CONFIG, *overrides]
    return subprocess.Popen([*wrap, *command], cwd=ROOT, env=full_env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"a rank hung past {TIMEOUT_S} s: {proc.args}")
        results.append((proc.returncode, out))
    return results


def _two_ranks(run_dir, shards, rank1_overrides=(), rank1_wrap=()):
    port = free_ports()
    base = job_overrides(run_dir, shards, "train.max_steps=2")
    return _finish([_start(0, 2, port, base), _start(1, 2, port, [*base, *rank1_overrides], rank1_wrap)])


def _in_private_mount(folder, *options: str) -> list[str]:
    """A command prefix: run in a mount namespace of its own where ``folder`` is a fresh tmpfs."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to give one rank a filesystem of its own")
    mount = f"mount -t tmpfs {' '.join(options)} distlm-test {folder}"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount} && exec "$@"', "sh"]


@pytest.mark.distributed
def test_an_override_on_one_rank_only_stops_every_rank_naming_the_key(tmp_path, shards):
    results = _two_ranks(tmp_path / "run", shards, rank1_overrides=["optim.lr=0.5"])
    for code, out in results:
        assert code == exit_codes.LAUNCH_ERROR, out[-3000:]
        assert "config differs from rank 0's" in out and "rank 1 on" in out, out[-3000:]
    assert "optim.lr: 0.003 on rank 0, 0.5 here" in results[0][1], results[0][1][-3000:]  # rank 0 says it all
    assert "rank 0's log lists them" in results[1][1], results[1][1][-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert json.loads((tmp_path / "run" / "exit.json").read_text())["code"] == exit_codes.LAUNCH_ERROR


@pytest.mark.distributed
def test_a_run_folder_that_is_not_shared_is_found_before_the_first_step(tmp_path, shards):
    (tmp_path / "fs").mkdir()
    run_dir = tmp_path / "fs" / "run"
    results = _two_ranks(run_dir, shards, rank1_wrap=_in_private_mount(tmp_path / "fs"))
    for code, out in results:
        assert code == exit_codes.LAUNCH_ERROR, out[-3000:]
        assert f"rank 1 on {socket.gethostname()} does not see the file rank 0 wrote in {run_dir}" in out, out[-3000:]
        assert "not shared between the nodes" in out
    assert not (run_dir / "metrics.jsonl").exists()  # stopped before the run began


@pytest.mark.distributed
def test_a_read_only_run_folder_is_named(tmp_path, shards):
    (tmp_path / "ro").mkdir()
    run_dir = tmp_path / "ro" / "run"
    results = _two_ranks(run_dir, shards, rank1_wrap=_in_private_mount(tmp_path / "ro", "-o", "ro"))
    for code, out in results:
        assert code == exit_codes.LAUNCH_ERROR, out[-3000:]
        assert f"rank 1 on {socket.gethostname()} cannot write {run_dir}: Read-only file system" in out, out[-3000:]


@pytest.mark.distributed
def test_a_taken_master_port_is_named_at_once(tmp_path, shards):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        [(code, out)] = _finish([_start(0, 2, port, job_overrides(tmp_path / "run", shards))])
    assert code == exit_codes.LAUNCH_ERROR, out[-3000:]
    assert f"rank 0 cannot host the rendezvous store on port {port}: it is in use" in out, out[-3000:]
    assert "Set MASTER_PORT to a free port" in out


@pytest.mark.distributed
def test_a_master_nobody_hosts_fails_within_the_rendezvous_deadline_saying_what_was_tried(tmp_path, shards):
    port = free_ports()  # nobody listens there: rank 1 waits for a rank 0 that never comes
    overrides = job_overrides(tmp_path / "run", shards, "fault.rendezvous_timeout_s=3")
    [(code, out)] = _finish([_start(1, 2, port, overrides)])
    assert code == exit_codes.LAUNCH_ERROR, out[-3000:]
    assert f"rendezvous failed (store): rank 1 of 2 (local 1) via torchrun, meeting at 127.0.0.1:{port}" in out, out
    assert "reaches 127.0.0.1 from 127.0.0.1 (interface lo)" in out
    assert "GLOO_SOCKET_IFNAME=unset" in out and "lo 127.0.0.1" in out
    assert "set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface" in out
