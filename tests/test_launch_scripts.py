"""launch/mpirun.sh (MPICH's mpiexec), launch/hostfile.sh (DeepSpeed's launcher) and launch/local.sh, with real processes.

Each starts the launcher tests' shared 2-rank job and must reproduce the torchrun reference
curve bit for bit (tests/launchers.py), and must really have started the ranks the way it
claims: under mpiexec, distlm's rank r is the process hydra named PMI_RANK=r; under the
DeepSpeed launcher, the ranks are the processes its launch.py spawned. hostfile.sh and
local.sh also forward a preemption signal to the ranks (DeepSpeed's own processes, and torchrun
unless told, would die of SIGUSR1).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, curve, free_ports
from launchers import CONFIG, WORLD, job_overrides, launcher_env

MPIRUN = str(ROOT / "launch" / "mpirun.sh")
HOSTFILE = str(ROOT / "launch" / "hostfile.sh")
LOCAL = str(ROOT / "launch" / "local.sh")
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT = 300  # a 2-rank run takes 15-80 s here, depending on how busy the machine is


def _script_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """The shared job as the scripts take it: ``CONFIG overrides...`` (they add ``train``, as local.sh)."""
    return [CONFIG, *job_overrides(run_dir, shards, *extra)]




def _job_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants. hydra puts its proxy and every rank in a session of its own,
    so killing the launcher's process group alone would leave them running."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_job(proc: subprocess.Popen) -> None:
    for p in _job_tree(proc.pid):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start(script: str, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """The script in a session of its own; its output goes to ``log`` (a pipe nobody reads while the
    test polls could fill and stall the job)."""
    with open(log, "w") as out:
        return subprocess.Popen([script, *args], cwd=ROOT, env=env, text=True, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float, job: list[psutil.Process] = ()) -> tuple[str, list]:
    """The job's output once it ends, and which of ``job`` (processes seen while it ran) outlived it.
    Past ``timeout`` every process of it is killed and the test fails."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        proc.wait()
        raise AssertionError(f"{proc.args[0]} hung past {timeout} s:\n{log.read_text()[-4000:]}")
    finally:
        survivors = [p for p in job if _alive(p)]
        for p in survivors:  # a rank that outlived its launcher must not outlive the test
            p.kill()
        _kill_job(proc)
    return log.read_text(), survivors


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _heartbeat_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the process that trained as that rank (the watchdog's RUN_DIR/heartbeats/)."""
    beats = [json.loads(p.read_text()) for p in sorted((run_dir / "heartbeats").glob("rank-*.json"))]
    assert all(b["world_size"] == WORLD for b in beats), beats
    return {b["rank"]: b["pid"] for b in beats}


# ------------------------------------------------------------------------------------------- MPI


def _train_to_the_reference(script: str, run_dir: Path, shards: Path, env: dict, reference: list, log: Path) -> str:
    """Run the shared job through ``script``; it must end with 0 and train the reference curve. Its output."""
    proc = _start(script, _script_args(run_dir, shards), env, log)
    out, _ = _finish(proc, log, RUN_TIMEOUT)
    name = Path(script).name
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out[-6000:]}"
    assert curve(run_dir) == reference, f"{name} trained another curve than torchrun:\n{out[-6000:]}"
    return out


def _without_master(env: dict) -> dict:
    """``env`` less MASTER_ADDR/MASTER_PORT: under MPI, rank 0 then chooses and broadcasts them."""
    return {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}


def _python_recording_env(folder: Path) -> Path:
    """A PYTHON for mpirun.sh that writes the environment mpiexec gave it to folder/env.PID and then
    becomes this interpreter, keeping its pid: what the launcher told each rank, by pid."""
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\nenv > "{folder}/env.$$"\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    return shim


def _recorded_envs(folder: Path) -> dict[int, dict]:
    found = {}
    for path in folder.glob("env.*"):
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        found[int(path.suffix[1:])] = dict(pairs)
    return found


@pytest.mark.distributed
@pytest.mark.slow
def test_mpirun_trains_the_reference_curve_under_mpich(tmp_path, launch_shards, launch_reference):
    mpiexec = VENV_BIN / "mpiexec"
    assert mpiexec.exists(), f"{mpiexec} is missing: install the test dependencies (the mpich package)"
    assert "HYDRA" in subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    record = tmp_path / "ranks"
    record.mkdir()
    run_dir = tmp_path / "run"
    # No MASTER_ADDR/PORT: rank 0 picks them and tells the others over MPI (mpi4py). A stale
    # RANK/WORLD_SIZE in the launching shell must not make each rank a world of its own; hydra
    # passes all of it, like DISTLM_LAUNCH_PROBE, to every rank.
    env = _without_master(launcher_env(NP=str(WORLD), MPIEXEC=str(mpiexec), PYTHON=str(_python_recording_env(record)),
                                       DISTLM_LAUNCH_PROBE="reached", RANK="0", WORLD_SIZE="1"))
    out = _train_to_the_reference(MPIRUN, run_dir, launch_shards, env, launch_reference, tmp_path / "mpirun.log")
    ranks = _recorded_envs(record)
    assert len(ranks) == WORLD, f"mpiexec started {len(ranks)} processes, not {WORLD}: {sorted(ranks)}"
    for pid, seen in ranks.items():
        assert seen.get("PMI_SIZE") == str(WORLD) and "MPI_LOCALRANKID" in seen, (pid, seen)
        assert seen.get("DISTLM_LAUNCH_PROBE") == "reached", "the launching environment did not reach the ranks"
    by_mpi_rank = {int(seen["PMI_RANK"]): pid for pid, seen in ranks.items()}
    assert _heartbeat_pids(run_dir) == by_mpi_rank, "distlm's ranks are not the processes hydra numbered so"
    assert "started by mpich" in out, out[-3000:]


@pytest.mark.distributed
def test_mpi_ranks_waiting_for_a_rank_that_died_stop_at_the_rendezvous_deadline(tmp_path, launch_shards):
    # Rank 1 "fails before it starts" (its interpreter exits 3 at once, as a config missing on one
    # node would); hydra lets rank 0 wait in MPI for it: the deadline must end that wait.
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\n[ "$PMI_RANK" = 1 ] && exit 3\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = _without_master(launcher_env(NP=str(WORLD), MPIEXEC=str(VENV_BIN / "mpiexec"), PYTHON=str(shim)))
    log = tmp_path / "mpirun.log"
    started = time.monotonic()
    proc = _start(MPIRUN, _script_args(tmp_path / "run", launch_shards, "fault.rendezvous_timeout_s=4"), env, log)
    out, _ = _finish(proc, log, RUN_TIMEOUT)
    assert time.monotonic() - started < 60, out[-3000:]
    assert proc.returncode == 1 | 3, f"hydra ORs the ranks' codes: 1 (rank 0) | 3 (rank 1); got {proc.returncode}:\n{out}"
    assert "Timeout (0:00:04)!" in out and "master_from_mpi" in out, out[-3000:]  # where it waited


# -------------------------------------------------------------------------------- DeepSpeed launcher


def _hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# one node, two processes: DeepSpeed runs it here, without ssh\nlocalhost slots=2\n")
    return path


def _spawned_pids(out: str) -> set[int]:
    """The processes DeepSpeed's launch.py says it started ("process N spawned with command: ...")."""
    return {int(pid) for pid in re.findall(r"process (\d+) spawned with command", out)}


@pytest.mark.distributed
@pytest.mark.slow
def test_hostfile_trains_the_reference_curve_through_deepspeed(tmp_path, launch_shards, launch_reference):
    run_dir = tmp_path / "run"
    env = launcher_env(HOSTFILE=str(_hostfile(tmp_path)), MASTER_PORT=str(free_ports()))
    out = _train_to_the_reference(HOSTFILE, run_dir, launch_shards, env, launch_reference, tmp_path / "hostfile.log")
    pids = _heartbeat_pids(run_dir)
    assert sorted(pids) == list(range(WORLD))
    assert set(pids.values()) == _spawned_pids(out), f"the ranks are not launch.py's processes:\n{out[-6000:]}"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("script, launcher_code", [
    (HOSTFILE, 75),  # DeepSpeed's launcher passes the first failed rank's code on
    (LOCAL, 1),      # torchrun exits 1 whatever its workers' codes: exit.json has the real one
], ids=["hostfile", "local"])
def test_launchers_forward_sigusr1_so_the_ranks_save_and_exit_75(tmp_path, launch_shards, script, launcher_code):
    run_dir = tmp_path / "run"
    env = launcher_env(HOSTFILE=str(_hostfile(tmp_path)), MASTER_PORT=str(free_ports()), NPROC=str(WORLD))
    log = tmp_path / "launcher.log"
    # Far more steps than it will run: it must stop because of the signal.
    proc = _start(script, _script_args(run_dir, launch_shards, "train.max_steps=100000"), env, log)
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            assert proc.poll() is None, f"{script} ended ({proc.returncode}) before a step:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no step logged in {RUN_TIMEOUT} s:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        job = _job_tree(proc.pid)
        assert len(job) >= 1 + WORLD, job  # the launcher (and its helpers), the ranks
        proc.send_signal(signal.SIGUSR1)  # the scheduler's warning, to the launcher alone
    except BaseException:
        _kill_job(proc)
        raise
    out, left = _finish(proc, log, 120, job)

    assert proc.returncode == launcher_code, f"{script} exited {proc.returncode}, not {launcher_code}:\n{out[-6000:]}"
    ending = json.loads((run_dir / "exit.json").read_text())
    assert ending["code"] == 75 and "SIGUSR1" in ending["reason"], ending
    assert (run_dir / "checkpoints" / f"step-{ending['step']:08d}").is_dir(), ending
    assert not left, f"processes of the job outlived it: {left}"


# ------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("script, env, args, says", [
    (MPIRUN, {"NP": "2"}, [], "usage: NP=N"),
    (MPIRUN, {}, [CONFIG], "NP must be the number of processes"),
    (MPIRUN, {"NP": "2", "HOSTS": "a", "HOSTFILE": "b"}, [CONFIG], "HOSTS or HOSTFILE, not both"),
    (MPIRUN, {"NP": "2", "MPIEXEC": "/bin/true"}, [CONFIG], "cannot tell which MPI"),
    (HOSTFILE, {"HOSTFILE": "x"}, [], "usage: HOSTFILE=hostfile"),
    (HOSTFILE, {}, [CONFIG], "HOSTFILE must name a readable file"),
], ids=["mpirun-no-config", "mpirun-no-np", "mpirun-hosts-and-hostfile", "mpirun-unknown-mpi",
        "hostfile-no-config", "hostfile-no-hostfile"])
def test_scripts_refuse_a_bad_call_with_exit_2_and_say_why(script, env, args, says):
    unset = {"NP", "HOSTS", "HOSTFILE"} - set(env)  # whatever this shell may have set
    env = {k: v for k, v in launcher_env(**env).items() if k not in unset}
    result = subprocess.run([script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert says in result.stderr, result.stderr


def test_mpirun_refuses_a_deepspeed_style_hostfile_for_mpich(tmp_path):
    """hydra rejects `host slots=N` with a parser trace; the script says what it wants instead."""
    hosts = _hostfile(tmp_path)
    env = launcher_env(NP="2", HOSTFILE=str(hosts), MPIEXEC=str(VENV_BIN / "mpiexec"))
    result = subprocess.run([MPIRUN, CONFIG], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "wants 'host:N'" in result.stderr, result


def test_hostfile_refuses_a_hostfile_without_hosts(tmp_path):
    empty = tmp_path / "hostfile"
    empty.write_text("# nothing but a comment\n\n")
    result = subprocess.run([HOSTFILE, CONFIG], cwd=ROOT, env=launcher_env(HOSTFILE=str(empty)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "names no host" in result.stderr, result
