"""launch/slurm/train.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.py), no mocks.

- The shared 2-rank job submitted with sbatch trains the reference model bit for bit.
- A preemption (``scancel --signal=USR1 --batch``, what ``--signal=B:USR1@120`` sends before
  the time limit) reaches every rank through the batch shell and srun; the ranks save and exit
  75, the script requeues the job, and the requeued run resumes and finishes the same curve.
- A code whose requeue column is "no" ends the job with that code, without a requeue.
- The run's Prometheus target file, written by rank 0 once the ranks serve, gone while the
  preempted job waits in the queue and when it ends; the script's requeue codes against
  exit_codes.TABLE, without a cluster.

Skipped with the reason when SLURM or munge cannot be installed or started here (not root, no
apt); with CI=true set, that is a failure instead: CI must run these.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from distlm.config import load_config
from distlm.fault import exit_codes
from distlm.metrics.targets import targets_file
from helpers import ROOT, curve, free_ports, read_metrics, system_unavailable
from launchers import CONFIG, STEPS, WORLD, job_overrides, launcher_env
from slurm_cluster import ClusterUnavailable, SlurmCluster

SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
# Hard limits for hangs, not pacing: one start of the 2-rank job takes ~15 s on an idle 2-core
# machine but over 60 s when other jobs share its cores (deepspeed's import alone).
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster():
    try:
        started = SlurmCluster.start()
    except ClusterUnavailable as e:
        system_unavailable(f"no SLURM cluster for the tests: {e}")
    try:
        yield started
    finally:
        started.stop()


def _submit(cluster: SlurmCluster, workdir: Path, run_dir: Path, shards: Path, *extra: str, env: dict = None) -> str:
    """The shared job through train.sbatch: one node, two tasks, submitted from ``workdir``."""
    return cluster.sbatch(["-N1", f"--ntasks-per-node={WORLD}", str(SBATCH), CONFIG,
                           *job_overrides(run_dir, shards, *extra)],
                          env=launcher_env(**(env or {})), cwd=workdir)


def _output(workdir: Path, job: str) -> str:
    """The job's log: the script's default --output, distlm-%j.out in the submit folder."""
    path = workdir / f"distlm-{job}.out"
    return path.read_text(errors="replace") if path.is_file() else f"(no {path})"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps_logged(run_dir: Path) -> int:
    """The highest step in RUN_DIR/metrics.jsonl so far (a line being written is skipped)."""
    best = 0
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            best = max(best, row["step"])
    return best




@pytest.mark.distributed
@pytest.mark.slow
def test_sbatch_trains_the_reference_model(cluster, launch_shards, launch_reference, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, run_dir, launch_shards)
    cluster.wait_gone(job, JOB_TIMEOUT_S)
    out, info = _output(tmp_path, job), cluster.job_info(job)

    assert (info.get("JobState"), info.get("ExitCode"), info.get("Restarts")) == ("COMPLETED", "0:0", "0"), \
        f"job {job}: {cluster.show_job(job)}\n{out[-4000:]}"
    ending = json.loads((run_dir / exit_codes.EXIT_FILE).read_text())
    assert ending["code"] == exit_codes.OK, ending
    # Two ranks formed one group through srun alone (no torchrun): the same model, bit for bit.
    assert curve(run_dir) == launch_reference, out[-4000:]
    assert f"{WORLD} ranks), meeting at localhost:" in out, out[-4000:]
    # metrics.enabled is false in the shared job: no target file.
    assert "listed for Prometheus" not in out


@pytest.mark.distributed
@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes_the_same_curve(cluster, launch_shards, launch_reference, tmp_path):
    run_dir, targets_dir = tmp_path / "run", tmp_path / "targets"
    port = free_ports(2)
    # Rank 0 pauses 0.2 s after every step of every start (a DELAY fault: a sleep, the numbers
    # are untouched), so the 12 steps take seconds and the signal lands mid-run.
    slow = f"rank=0,step=1,phase=step,signal=DELAY,repeat={STEPS}"
    job = _submit(cluster, tmp_path, run_dir, launch_shards, "metrics.enabled=true", f"metrics.port={port}",
                  env={"DISTLM_FAULT": slow, "DISTLM_TARGETS_DIR": str(targets_dir)})
    target_file = targets_file(load_config(CONFIG, job_overrides(run_dir, launch_shards, "metrics.enabled=true")),
                               {"DISTLM_TARGETS_DIR": str(targets_dir)})
    assert target_file.name.startswith("run-")  # the run label: run.dir's name

    deadline = time.monotonic() + 2 * JOB_TIMEOUT_S  # two starts
    while _steps_logged(run_dir) < 2:
        assert cluster.state(job) and time.monotonic() < deadline, \
            f"job {job} never reached step 2:\n{cluster.show_job(job)}\n{_output(tmp_path, job)[-4000:]}"
        time.sleep(0.1)
    # The target file names live endpoints: every rank serves there, with the same run label.
    # The default metrics.bind=127.0.0.1: the endpoints answer on loopback only.
    groups = json.loads(target_file.read_text())
    node = socket.gethostname()
    assert groups == [{"targets": [f"127.0.0.1:{port + rank}"],
                       "labels": {"job": "distlm", "run": "run", "rank": str(rank), "node": node, "slurm_job_id": job}}
                      for rank in range(WORLD)], groups
    for target in groups[0]["targets"]:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
            assert 'run="run"' in response.read().decode(), target

    signalled_at = _steps_logged(run_dir)
    cluster.scancel("--signal=USR1", "--batch", job)

    # Between the runs the job waits (PENDING, the requeue delay) and its target file stays.
    file_while_pending = None  # whether the target file was there, first seen PENDING after the requeue
    while state := cluster.state(job):
        assert time.monotonic() < deadline, \
            f"job {job} still {state}:\n{cluster.show_job(job)}\n{_output(tmp_path, job)[-4000:]}"
        if state == "PENDING" and file_while_pending is None and cluster.job_info(job).get("Restarts") == "1":
            file_while_pending = target_file.is_file()
        time.sleep(0.25)
    out, info = _output(tmp_path, job), cluster.job_info(job)
    assert (info.get("JobState"), info.get("ExitCode"), info.get("Restarts")) == ("COMPLETED", "0:0", "1"), \
        f"job {job}: {cluster.show_job(job)}\n{out[-4000:]}"

    # The first run stopped at a step boundary after the signal, every rank with 75, then the
    # requeued run finished: exits.jsonl has the 75s, then the 0s.
    codes = [row["code"] for row in _jsonl(run_dir / exit_codes.EXITS_LOG)]
    first, last = codes[:codes.index(exit_codes.OK)], codes[codes.index(exit_codes.OK):]
    assert first and set(first) == {exit_codes.PREEMPTED} and set(last) == {exit_codes.OK}, codes
    stop_step = next(row["step"] for row in _jsonl(run_dir / exit_codes.EXITS_LOG))
    assert signalled_at <= stop_step < STEPS, (signalled_at, stop_step)
    assert (run_dir / "checkpoints" / f"step-{stop_step:08d}" / "manifest.json").is_file()

    # Two starts: the second is SLURM's restart 1 (SLURM_RESTART_COUNT) and resumed at the stop step.
    starts = _jsonl(run_dir / "starts.jsonl")
    assert [(s["restart"], s["resume_step"], s.get("ended")) for s in starts] == \
        [(0, 0, "preempted"), (1, stop_step, "finished")], starts

    # --open-mode=append: one output file holds both runs, the signal's path through the script too.
    assert out.count(f"distlm: job {job} start ") == 2, out[-6000:]
    assert "batch shell got SIGUSR1" in out and f"ranks exited {exit_codes.PREEMPTED}: requeueing" in out, out[-6000:]
    assert f"job {job} start 2 " in out and f"job {job} ended with code 0" in out, out[-6000:]

    # Resuming changed nothing: every step of the run equals the reference, each logged once.
    assert curve(run_dir) == launch_reference
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))

    assert file_while_pending is not None, "the requeued job was never seen PENDING (its ~6 s requeue delay)"
    # Preempted ranks exit cleanly: nothing to scrape while the job waits, so nothing reads as missing.
    assert not file_while_pending, "the target file stayed while the requeued job waited to run again"
    assert not target_file.exists(), "the job ended for good but its target file is still there"


@pytest.mark.distributed
@pytest.mark.slow
def test_a_config_error_ends_the_job_with_its_code_and_no_requeue(cluster, launch_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, run_dir, launch_shards, "train.max_steps=twelve")
    cluster.wait_gone(job, JOB_TIMEOUT_S)
    out, info = _output(tmp_path, job), cluster.job_info(job)
    # Exit 2 ("config error", requeue: no) is the job's own exit code; SLURM did not run it again.
    assert (info.get("JobState"), info.get("ExitCode"), info.get("Restarts")) == ("FAILED", "2:0", "0"), \
        f"job {job}: {cluster.show_job(job)}\n{out[-4000:]}"
    assert "train.max_steps must be an integer" in out and "requeueing" not in out, out[-4000:]
    assert f"job {job} ended with code {exit_codes.CONFIG_ERROR}" in out, out[-4000:]


# ---------------------------------------------------------------------- no cluster needed


def test_script_requeues_exactly_the_codes_the_table_marks_yes():
    text = SBATCH.read_text()
    found = re.findall(r'^REQUEUE_CODES="([\d ]+)"$', text, re.MULTILINE)
    assert len(found) == 1, f"{SBATCH}: expected one REQUEUE_CODES=\"...\" line, found {found}"
    script_codes = sorted(int(c) for c in found[0].split())
    table_codes = sorted(code for code, _, _, requeue in exit_codes.TABLE if requeue == "yes")
    assert script_codes == table_codes, (f"{SBATCH}: REQUEUE_CODES {script_codes} != the codes "
                                         f"distlm/fault/exit_codes.py TABLE marks requeue=yes {table_codes}")
    # ... and the decision reads that list, on srun's exit code.
    assert 'case " $REQUEUE_CODES " in' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
