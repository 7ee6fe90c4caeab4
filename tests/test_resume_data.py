"""End to end: a run killed mid-epoch and resumed on another number of processes reads exactly
the rows the uninterrupted run read.

Every logged step carries ``data_digest``, an order-free fingerprint of the global batch's rows
summed over all ranks (see ``distlm.train.data.DataDigest``). With ``log_every=1`` two runs read
the same rows at a step exactly when their digests agree there.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, distlm_command, run_distlm, source_shards, step_rows

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CONFIG = str(ROOT / "configs" / "tiny-test.yaml")
STEPS = 12
SAVE_EVERY = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # Small blocks and shards: a step's rows come from several blocks, the run stops mid-shard.
    return source_shards(tmp_path_factory.mktemp("resume-corpus"), shard_mb=0.05)


def _args(data_dir, run_dir, max_steps, workers):
    return ["train", CONFIG, f"data.path={data_dir}", f"run.dir={run_dir}", f"train.max_steps={max_steps}",
            "train.log_every=1", "train.batch_size=8", f"optim.decay_steps={STEPS}", "train.eval_every=0",
            f"train.save_every={SAVE_EVERY}", f"data.num_workers={workers}", "data.shuffle_blocks=4"]


def _digests(run_dir) -> dict[int, int]:
    return {row["step"]: row["data_digest"] for row in step_rows(run_dir)}


def _run_and_kill(args, nproc, marker: Path, log_file: Path, timeout=240.0) -> None:
    """Start a run, SIGKILL it and every process under it once ``marker`` exists (a saved checkpoint).

    Output goes to a file, not a pipe nobody reads while waiting (a full pipe would stall the
    run); the process tree is killed by walking it, since torchrun's workers may sit in a
    session of their own.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log_file, "w") as out:
        proc = subprocess.Popen(distlm_command(args, nproc), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.is_file():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before {marker} appeared:\n{log_file.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker} did not appear within {timeout} s:\n{log_file.read_text()[-4000:]}")
            time.sleep(0.05)
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        for p in [psutil.Process(proc.pid), *tree] if proc.poll() is None else tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)
        psutil.wait_procs(tree, timeout=30)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    run_distlm(_args(data_dir, run_dir, STEPS, 0), nproc=2, timeout=300)
    digests = _digests(run_dir)
    assert sorted(digests) == list(range(1, STEPS + 1))
    return digests


@pytest.mark.parametrize("before, after, workers", [(2, 1, 0), (1, 2, 2)], ids=["2-to-1", "1-to-2-workers"])
def test_killed_and_resumed_on_another_size_reads_the_same_rows(data_dir, tmp_path, uninterrupted,
                                                                 before, after, workers):
    run_dir = tmp_path / "run"
    first_ckpt = run_dir / "checkpoints" / f"step-{SAVE_EVERY:08d}" / "manifest.json"
    # Far more steps than the test waits for: the kill, not the end, stops this run.
    _run_and_kill(_args(data_dir, run_dir, 100_000, workers), before, first_ckpt, tmp_path / "killed.log")
    saved = sorted(p.parent / "distlm.json" for p in (run_dir / "checkpoints").glob("step-*/manifest.json"))
    resumed_from = json.loads(saved[-1].read_text())["state"]
    assert 0 < resumed_from["step"] < STEPS  # mid-run, and mid-epoch: 12 steps read well under one epoch
    data = resumed_from["data"]
    assert data["rows_consumed"] == resumed_from["step"] * 8 == data["sources"][0]["rows"]
    assert data["sources"][0]["epoch"] == 0

    out = run_distlm(_args(data_dir, run_dir, STEPS, workers), nproc=after, timeout=300).stdout
    assert f"resumed from {saved[-1].parent}" in out
    digests = _digests(run_dir)
    assert sorted(digests) == list(range(1, STEPS + 1))
    assert digests == uninterrupted  # before the kill (same size) and after the resume (other size)
