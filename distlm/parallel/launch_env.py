"""Which rank am I, how many are we, and where do we meet: one answer for every launcher.

distlm is started by torchrun (or anything that sets its variables: the DeepSpeed launcher,
``torch.distributed.launch``), by ``mpiexec`` (Open MPI, MPICH/Hydra, Intel MPI), by ``srun``
directly (one task per rank), or by hand as a single process. Each tells a process its place
in its own variables; :func:`resolve` reads them in this order and the first that is complete
wins:

1. torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
   Checked first because torchrun inside a SLURM allocation, or under mpiexec, sets its own
   variables on top of the scheduler's, and it is torchrun that started this process.
2. Open MPI: ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK`` / ``_LOCAL_SIZE``.
3. MPICH / Hydra / Intel MPI (PMI): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``,
   ``MPI_LOCALNRANKS``.
4. SLURM, a task of an ``srun`` step: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
   ``SLURM_LOCALID``. Only inside a step: the batch script itself also carries ``SLURM_PROCID=0``
   and the job's task count, and a process started there without ``srun`` is one process.
5. mpi4py, when ``DISTLM_LAUNCHER=mpi4py`` asks for it (an MPI that sets none of the above):
   ranks from ``MPI.COMM_WORLD``, local ranks from its shared-memory split.
6. Nothing: a world of one on loopback.

``DISTLM_LAUNCHER`` (torchrun, openmpi, mpich, slurm, mpi4py, single) skips the guessing.

The meeting point is ``MASTER_ADDR:MASTER_PORT`` when set. Otherwise: under SLURM the first
host of the step's node list and port 20000 + job id mod 12000 (every task computes the same
one without talking); under MPI, rank 0's address and a free port broadcast through mpi4py.

Everything here reads a mapping and returns a value, so each launcher's environment is a
unit test; only :func:`master_from_mpi` and :func:`slurm_first_host` reach outside.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

LAUNCHERS = ("torchrun", "openmpi", "mpich", "slurm", "mpi4py", "single")
SLURM_PORT_BASE = 20000  # job ports: 20000 + job id mod 12000, below Linux's ephemeral range (32768+)
SLURM_PORT_SPAN = 12000


class LaunchError(RuntimeError):
    """The ranks cannot form the job: bad launcher variables, a failed rendezvous, a preflight check."""


class LaunchEnvError(LaunchError):
    """The launcher's variables are contradictory or incomplete; the message says which and what to do."""


@dataclass(frozen=True)
class Ranks:
    """Who this process is, as its launcher says."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: Optional[int]


@dataclass(frozen=True)
class Placement(Ranks):
    """This process's place in the job, and where the job's processes meet."""

    master_addr: str
    master_port: int

    def torch_env(self) -> dict[str, str]:
        """The variables torch's ``env://`` rendezvous, DeepSpeed and distlm read, for this placement."""
        env = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
               "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}
        if self.local_world_size is not None:
            env["LOCAL_WORLD_SIZE"] = str(self.local_world_size)
        return env

    def describe(self) -> str:
        return (f"rank {self.rank} of {self.world_size} (local {self.local_rank}) via {self.launcher}, "
                f"meeting at {self.master_addr}:{self.master_port}")


# (launcher, rank, world size, local rank, local world size): the variable names each one sets.
_VARIABLES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),
}


def detect(environ: Mapping[str, str]) -> str:
    """Which launcher started this process (see the module docstring for the order)."""
    forced = environ.get("DISTLM_LAUNCHER", "").strip().lower()
    if forced:
        if forced not in LAUNCHERS:
            raise LaunchEnvError(f"DISTLM_LAUNCHER={forced!r} is not one of {', '.join(LAUNCHERS)}; "
                                 f"unset it to let distlm detect the launcher")
        return forced
    for launcher, (rank, size, _, _) in _VARIABLES.items():
        if rank in environ and size in environ:
            return launcher
    return "single"


def ranks(environ: Mapping[str, str] = os.environ,
          mpi4py_ranks: Optional[Callable[[], tuple[int, int, int, int]]] = None) -> Ranks:
    """Who this process is, without yet asking where the ranks meet."""
    launcher = detect(environ)
    if launcher == "single":
        return Ranks("single", 0, 1, 0, 1)
    if launcher == "mpi4py":
        return Ranks(launcher, *(mpi4py_ranks or _mpi4py_ranks)())
    return Ranks(launcher, *_ranks_from(environ, launcher))


def resolve(environ: Mapping[str, str] = os.environ,
            mpi_master: Optional[Callable[[Optional[str]], tuple[str, int]]] = None,
            slurm_host: Optional[Callable[[str], str]] = None,
            mpi4py_ranks: Optional[Callable[[], tuple[int, int, int, int]]] = None,
            free_port: Optional[Callable[[], int]] = None, mpi_timeout_s: float = 300.0) -> Placement:
    """This process's :class:`Placement`, from ``environ``.

    The callables reach outside (mpi4py, ``scontrol``, a socket); tests pass their own.
    ``mpi_timeout_s`` bounds the wait for the other MPI ranks (fault.rendezvous_timeout_s).
    """
    me = ranks(environ, mpi4py_ranks)
    if me.launcher == "single":
        return Placement("single", 0, 1, 0, 1, "127.0.0.1", (free_port or _free_port)())
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if me.launcher == "torchrun" and not (addr and port):
        raise LaunchEnvError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: start through "
                             "torchrun (launch/local.sh, launch/multinode.sh), or set both")
    if not (addr and port):
        if me.launcher == "slurm":
            addr = addr or (slurm_host or slurm_first_host)(_slurm_nodelist(environ))
            port = port or str(slurm_job_port(environ))
        else:  # an MPI launcher: rank 0 tells everyone
            mpi_addr, mpi_port = (mpi_master or functools.partial(master_from_mpi, timeout_s=mpi_timeout_s))(addr)
            addr, port = addr or mpi_addr, port or str(mpi_port)
    return Placement(**vars(me), master_addr=addr, master_port=_port(port, "MASTER_PORT"))


def _ranks_from(environ: Mapping[str, str], launcher: str) -> tuple[int, int, int, Optional[int]]:
    rank_var, size_var, local_var, local_size_var = _VARIABLES[launcher]
    if launcher == "slurm" and size_var not in environ:
        size_var = "SLURM_NTASKS"  # forced with DISTLM_LAUNCHER=slurm outside a step
    missing = [v for v in (rank_var, size_var) if v not in environ]
    if missing:
        raise LaunchEnvError(f"launcher {launcher}: {' and '.join(missing)} not set; "
                             f"start the job through {launcher} or set DISTLM_LAUNCHER to the launcher you used")
    rank, world = _int(environ, rank_var), _int(environ, size_var)
    local_rank = _int(environ, local_var) if local_var in environ else _local_rank_fallback(environ, rank, world)
    local_world = _int(environ, local_size_var) if local_size_var and local_size_var in environ else None
    if launcher == "torchrun" and local_world is None and "LOCAL_SIZE" in environ:
        local_world = _int(environ, "LOCAL_SIZE")  # the DeepSpeed launcher's spelling
    if launcher == "slurm":
        local_world = _slurm_tasks_on_this_node(environ)
    if not 0 <= rank < world:
        raise LaunchEnvError(f"launcher {launcher}: {rank_var}={rank} is outside 0..{world - 1} "
                             f"({size_var}={world})")
    if local_world is not None and not 0 <= local_rank < local_world:
        raise LaunchEnvError(f"launcher {launcher}: local rank {local_rank} is outside 0..{local_world - 1}")
    return rank, world, local_rank, local_world


def _local_rank_fallback(environ: Mapping[str, str], rank: int, world: int) -> int:
    """No local rank in the launcher's own variables: take another launcher's spelling if one is set,
    else refuse (guessing could put two ranks on one GPU)."""
    if world == 1:
        return 0
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if name in environ:
            return _int(environ, name)
    raise LaunchEnvError(f"rank {rank} of {world}: the launcher did not say this process's rank on its node; "
                         f"set LOCAL_RANK (or use DISTLM_LAUNCHER=mpi4py to ask MPI)")


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> Optional[int]:
    """SLURM_STEP_TASKS_PER_NODE reads like "2(x3),1"; this node's entry is SLURM_NODEID's."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node = environ.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    try:
        counts = slurm_task_counts(spec)
    except ValueError as e:
        raise LaunchEnvError(str(e)) from None
    index = int(node)
    return counts[index] if index < len(counts) else None


def slurm_task_counts(spec: str) -> list[int]:
    """SLURM's tasks per node, "2(x3),1" -> [2, 2, 2, 1] (SLURM_TASKS_PER_NODE's form)."""
    counts: list[int] = []
    try:
        for part in spec.split(","):
            count, _, repeat = part.strip().partition("(x")
            counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    except ValueError:
        raise ValueError(f"tasks per node {spec!r} is not SLURM's form N or N(xK),M (SLURM_TASKS_PER_NODE)") from None
    return counts


def _slurm_nodelist(environ: Mapping[str, str]) -> str:
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchEnvError("SLURM task without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: set MASTER_ADDR "
                             "(launch/slurm/train.sbatch does)")
    return nodelist


def slurm_job_port(environ: Mapping[str, str]) -> int:
    """One port per job, the same on every task: two jobs sharing a node do not collide."""
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job:
        raise LaunchEnvError("SLURM task without SLURM_JOB_ID: set MASTER_PORT")
    return SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("node[01-04]" and the like), as ``scontrol`` expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchEnvError(f"could not expand the SLURM node list {nodelist!r} with scontrol ({e}); "
                             f"set MASTER_ADDR to the first node's address") from e
    if not out:
        raise LaunchEnvError(f"scontrol expanded the SLURM node list {nodelist!r} to nothing; set MASTER_ADDR")
    return out[0]


def master_from_mpi(preset_addr: Optional[str] = None, timeout_s: float = 300.0) -> tuple[str, int]:
    """Rank 0's address (unless ``preset_addr``: MASTER_ADDR alone was set) and a port free there,
    broadcast to every rank through mpi4py.

    A job whose ranks all share rank 0's host meets on loopback; otherwise on rank 0's host
    name, which must not resolve to a loopback address on rank 0 (Debian's /etc/hosts maps the
    host name to 127.0.1.1): then MASTER_ADDR must say which address the others can reach.
    MPI is finalised right after: distlm talks over torch.distributed, and an initialised MPI
    would make the launcher kill every rank when one leaves through ``os._exit`` (a hang, a
    lost peer) without MPI_Finalize, and dislikes the loader's forked workers.
    """
    # A rank that died before this (its config missing on one node, say) never joins MPI's
    # start-up or the collectives below, and MPI launchers let the others wait forever. MPI's
    # start-up holds the GIL while it waits, so only faulthandler's C thread can end the wait:
    # it prints where every thread is (master_from_mpi, importing mpi4py) and exits 1.
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    from mpi4py import MPI  # imported only under MPI: it initialises MPI on import (a collective)

    comm = MPI.COMM_WORLD
    host = socket.gethostname()
    hosts = comm.allgather(host)
    answer = None
    if comm.Get_rank() == 0:
        if preset_addr:
            answer = (preset_addr, _free_port("0.0.0.0"))
        elif all(h == host for h in hosts):
            answer = ("127.0.0.1", _free_port("127.0.0.1"))
        elif is_loopback(_resolve_host(host)):
            answer = ("", 0)
        else:
            answer = (host, _free_port("0.0.0.0"))
    addr, port = comm.bcast(answer, root=0)
    faulthandler.cancel_dump_traceback_later()
    MPI.Finalize()
    if not addr:
        raise LaunchEnvError(f"the job spans {len(set(hosts))} hosts but rank 0's host name {hosts[0]!r} resolves "
                             f"to a loopback address there; set MASTER_ADDR to rank 0's address on the network "
                             f"the nodes share (and MASTER_PORT to a free port)")
    return addr, port


def _mpi4py_ranks() -> tuple[int, int, int, int]:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    return world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size()


def _resolve_host(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return ""


def is_loopback(address: str) -> bool:
    """An address (or the name ``localhost``) that only this host can reach."""
    return address.startswith("127.") or address in ("::1", "localhost")


def _free_port(bind: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((bind, 0))
        return s.getsockname()[1]


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchEnvError(f"{name}={environ[name]!r} is not an integer") from None


def _port(value: str, name: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise LaunchEnvError(f"{name}={port} is outside 1..65535")
    return port
