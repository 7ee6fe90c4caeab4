"""A real one-node SLURM cluster for the tests: its own munged, slurmctld and slurmd, on loopback.

Everything lives in one temporary folder (keys, sockets, state, logs) and every daemon gets a
port or socket of its own, so two test sessions on one machine, or a SLURM the machine already
runs, do not meet. The node is called ``localhost`` (address 127.0.0.1): ``scontrol show
hostnames`` then gives the job a master address that resolves to loopback on any machine.

    cluster = SlurmCluster.start()      # raises ClusterUnavailable with the reason
    job = cluster.sbatch([...], env=...)
    cluster.wait_gone(job, timeout=120)
    cluster.stop()                      # cancels jobs, stops the daemons, removes the folder

``sacct`` needs slurmdbd, which this cluster does not run: results come from the job's output
file, ``squeue`` and ``scontrol show job`` (kept for MinJobAge, 300 s, after a job ends).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional


from helpers import ROOT, free_ports, port_free, process_alive

SBIN = ("/usr/sbin", "/sbin")  # the daemons' home, often missing from a non-login PATH
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "unmunge", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
INSTALLER = ROOT / ".ci" / "install-systems.sh"
NODE = "localhost"
# A requeued job waits AuthInfo's cred_expire + 1 s before it may start again: 121 s by default,
# 6 s with the smallest value SLURM accepts (5; below that it logs "invalid" and keeps 120).
CRED_EXPIRE_S = 5
COMMAND_TIMEOUT_S = 30


class ClusterUnavailable(RuntimeError):
    """SLURM or munge cannot be installed or started here; the message says why."""


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def _first_job_id(jobs: int = 20) -> int:
    """A first job id whose jobs' ports (train.sbatch: 20000 + id % 12000) are free now.

    Job ids count from 1 on every fresh cluster, so two test sessions on one machine would
    otherwise give their first jobs the same MASTER_PORT.
    """
    rng = random.Random()
    for _ in range(100):
        first = rng.randrange(1000, 12000 - jobs)
        if all(port_free(20000 + job) for job in range(first, first + jobs)):
            return first
    raise ClusterUnavailable(f"no {jobs} consecutive free ports in 21000-31999 on 127.0.0.1 for the jobs' MASTER_PORT")


def ensure_installed() -> dict[str, str]:
    """Paths of the SLURM and munge programs, installing them with .ci/install-systems.sh if missing."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        if os.geteuid() != 0:
            raise ClusterUnavailable(f"{', '.join(missing)} not installed, and installing needs root "
                                     f"(run {INSTALLER.relative_to(ROOT)} as root)")
        try:
            result = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"{INSTALLER.relative_to(ROOT)} ran past 600 s") from None
        if result.returncode != 0:
            raise ClusterUnavailable(f"{INSTALLER.relative_to(ROOT)} failed ({result.returncode}): "
                                     f"{(result.stdout + result.stderr)[-2000:]}")
        missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
        if missing:
            raise ClusterUnavailable(f"{', '.join(missing)} still missing after {INSTALLER.relative_to(ROOT)}")
    return {name: _which(name) for name in DAEMONS + CLIENTS}


class SlurmCluster:
    def __init__(self, root: Path, programs: dict[str, str]):
        self.root = root
        self.programs = programs
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.pid_files = {"slurmd": root / "slurmd.pid", "slurmctld": root / "slurmctld.pid",
                          "munged": root / "munge" / "munged.pid"}

    # ------------------------------------------------------------------ start and stop

    @classmethod
    def start(cls, timeout: float = 60) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd in a new temporary folder; wait until the node is idle."""
        if os.geteuid() != 0:
            raise ClusterUnavailable("a SLURM cluster for the tests runs its daemons as root (SlurmUser=root); "
                                     f"this is uid {os.geteuid()}")
        programs = ensure_installed()
        # Short and private: munge's socket path must stay under 108 bytes.
        cluster = cls(Path(tempfile.mkdtemp(prefix="distlm-slurm-")), programs)
        try:
            cluster._start_munge()
            cluster._write_conf()
            deadline = time.monotonic() + timeout
            cluster._daemon("slurmctld", "-f", str(cluster.conf), "-i")
            cluster._daemon("slurmd", "-f", str(cluster.conf), "-N", NODE)
            cluster._wait_idle(deadline)
        except BaseException:
            logs = cluster.logs()
            cluster.stop()
            raise ClusterUnavailable(f"the test SLURM cluster did not start:\n{logs}") from None
        return cluster

    def _start_munge(self) -> None:
        folder = self.munge_socket.parent
        folder.mkdir()
        folder.chmod(0o711)  # munged wants others to reach the socket, and nobody else to write here
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # --force: munged otherwise refuses to run as root with a key it does not own by package.
        self._run([self.programs["munged"], "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                   f"--pid-file={self.pid_files['munged']}", f"--log-file={folder / 'munged.log'}",
                   f"--seed-file={folder / 'munged.seed'}"], what="munged")
        credential = self._run([self.programs["munge"], "-S", str(self.munge_socket)], input="ok", what="munge")
        decoded = self._run([self.programs["unmunge"], "-S", str(self.munge_socket)], input=credential,
                            what="unmunge")
        if "ok" not in decoded.splitlines()[-1:]:
            raise ClusterUnavailable(f"munge round trip failed: unmunge printed {decoded[-500:]!r}")

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir()
        cpus = max(2, os.cpu_count() or 1)  # the tests' jobs need two tasks even on a one-core machine
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py: one node on loopback, every path in {r}.
ClusterName=distlmtest
FirstJobId={_first_job_id()}
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={free_ports()}
SlurmdPort={free_ports()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged; cred_expire also sets the requeue delay (see CRED_EXPIRE_S).
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
# No cgroups: a container may not offer them, and the tests need no CPU or memory fencing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# The node's CPUs and memory as written here, whatever the machine has.
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
# Schedule a requeued job as soon as it is eligible, not at the next 60 s pass.
SchedulerParameters=sched_interval=1
KillWait=10
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, *args: str) -> None:
        # Both daemonize (return once they have forked); their pid files are how stop() finds them.
        self._run([self.programs[name], *args], what=name)

    def _wait_idle(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            state = self._run([self.programs["sinfo"], "-h", "-n", NODE, "-o", "%T"], what="sinfo",
                              check=False).strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"node {NODE} is {state or 'not listed'} in sinfo, not idle")

    def stop(self) -> None:
        """Cancel every job, stop the daemons by their pid files, remove the folder. Safe to repeat."""
        if self.pid_files["slurmctld"].is_file():
            subprocess.run([self.programs["scancel"], "--full", "--user=root"], env=self.env(),
                           capture_output=True, timeout=COMMAND_TIMEOUT_S)
            # A job's processes belong to slurmstepd, not to slurmd: they outlive a stopped slurmd.
            deadline = time.monotonic() + 20
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        # All at once: each takes about 2 s to shut down, and nothing is left for them to agree on.
        self._stop_daemons([self.pid_files[name] for name in ("slurmd", "slurmctld", "munged")])
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _stop_daemons(pid_files: list[Path], grace: float = 10) -> None:
        """SIGTERM each daemon named by a pid file, SIGKILL the ones still there after ``grace``."""
        pids = []
        for pid_file in pid_files:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):  # no pid file yet, or the daemon is gone
                continue
            pids.append(pid)
        deadline = time.monotonic() + grace
        while any(map(process_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in filter(process_alive, pids):
            os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ using it

    def env(self, base: Optional[dict] = None) -> dict:
        """``base`` (default os.environ) pointed at this cluster, without any other SLURM job's variables.

        Tests run inside a real allocation would otherwise hand its SLURM_JOB_ID and the like to
        sbatch, which would take them for its own.
        """
        base = dict(os.environ if base is None else base)
        clean = {k: v for k, v in base.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        sbin = ":".join(d for d in SBIN if d not in clean.get("PATH", "").split(":"))
        return {**clean, "SLURM_CONF": str(self.conf), "PATH": clean.get("PATH", "") + (":" + sbin if sbin else "")}

    def sbatch(self, args: list[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> str:
        """Submit; returns the job id (``sbatch --parsable``)."""
        out = self._run([self.programs["sbatch"], "--parsable", *args], env=self.env(env), cwd=cwd, what="sbatch")
        return out.strip().split(";")[0]

    def state(self, job: str) -> str:
        """The job's state in squeue (PENDING, RUNNING, ...), or "" once it has left the queue."""
        result = subprocess.run([self.programs["squeue"], "-h", "-j", job, "-o", "%T"], env=self.env(),
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        return result.stdout.strip() if result.returncode == 0 else ""  # "Invalid job id": long gone

    def jobs(self) -> list[str]:
        result = subprocess.run([self.programs["squeue"], "-h", "-o", "%i"], env=self.env(),
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        return result.stdout.split()

    def wait_gone(self, job: str, timeout: float, poll: float = 0.5) -> None:
        """Until the job has left squeue for good (a requeued job stays in it, PENDING, until it runs again)."""
        deadline = time.monotonic() + timeout
        while self.state(job):
            if time.monotonic() > deadline:
                raise AssertionError(f"SLURM job {job} still {self.state(job)} after {timeout} s:\n"
                                     f"{self.show_job(job)}\n{self.logs()}")
            time.sleep(poll)

    def job_info(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode "code:signal", Restarts, ...)."""
        text = self.show_job(job)
        info = {}
        for item in text.split():
            key, sep, value = item.partition("=")
            if sep:
                info.setdefault(key, value)
        return info

    def show_job(self, job: str) -> str:
        return self._run([self.programs["scontrol"], "-o", "show", "job", job], what="scontrol show job", check=False)

    def scancel(self, *args: str) -> None:
        self._run([self.programs["scancel"], *args], what="scancel")

    def logs(self, tail: int = 3000) -> str:
        """The end of every daemon's log, for a failure message."""
        parts = []
        for path in sorted(self.root.glob("log/*.log")) + sorted(self.root.glob("munge/*.log")):
            try:
                parts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-tail:]}")
            except OSError:
                continue
        return "\n".join(parts)

    def _run(self, cmd: list[str], what: str, input: Optional[str] = None, env: Optional[dict] = None,
             cwd: Optional[Path] = None, check: bool = True) -> str:
        try:
            result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                    env=env or self.env(), cwd=cwd)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{what} ran past {COMMAND_TIMEOUT_S} s: {' '.join(cmd)}") from None
        if check and result.returncode != 0:
            raise AssertionError(f"{what} exited {result.returncode}: {' '.join(cmd)}\n{result.stdout}{result.stderr}")
        return result.stdout
