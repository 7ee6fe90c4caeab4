"""The metrics endpoint of a real training run (matrix row 21): 127.0.0.1 by default, a real
scrape while it trains, and a taken port that warns while training goes on."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, distlm_command, free_ports, run_distlm, source_shards, step_rows

pytestmark = [pytest.mark.distributed]

CONFIG = str(ROOT / "configs" / "tiny-test.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return source_shards(tmp_path_factory.mktemp("listeners-corpus"), shard_mb=0.05)




def _listening(port: int) -> list[str]:
    """Local addresses of sockets listening on ``port`` (hex, as /proc/net/tcp{,6} writes them)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local)
    return found


def _args(data_dir, run_dir, port, steps):
    return ["train", CONFIG, f"data.path={data_dir}", f"run.dir={run_dir}", f"train.max_steps={steps}",
            "train.log_every=1", "train.eval_every=0", "metrics.enabled=true", f"metrics.port={port}",
            f"metrics.targets_dir={Path(run_dir).parent / 'targets'}"]  # not the repository's monitoring/targets


def test_a_running_job_serves_its_metrics_on_loopback(data_dir, tmp_path):
    port = free_ports()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(distlm_command(_args(data_dir, tmp_path / "run", port, 400)), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    body = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.5)
                continue
            if 'distlm_step{' in text and 'distlm_loss{' in text:
                body, listening = text, _listening(port)  # while the run still serves
                break
            time.sleep(0.5)
    finally:
        proc.kill()
        out = proc.communicate()[0]
    assert body is not None, out[-3000:]
    assert f"serves Prometheus on http://127.0.0.1:{port}/metrics" in out
    assert 'rank="0"' in body and 'run="run"' in body
    assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1 only, on IPv4 and not on IPv6


def test_a_taken_metrics_port_warns_and_training_goes_on(data_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_distlm(_args(data_dir, tmp_path / "taken", port, 3), timeout=240)
    assert f"cannot serve Prometheus metrics on 127.0.0.1:{port}" in result.stdout
    assert "Training goes on" in result.stdout
    assert [r["step"] for r in step_rows(tmp_path / "taken")] == [1, 2, 3]
