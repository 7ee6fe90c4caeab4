#!/usr/bin/env bash
# Train under MPI's launcher: mpiexec starts the processes, distlm finds its rank in their environment.
#
#   NP=2 launch/mpirun.sh CONFIG.yaml [key.sub=value ...]                      # this machine
#   NP=16 HOSTS=node1,node2 PPN=8 launch/mpirun.sh CONFIG.yaml ...             # two nodes
#   NP=16 HOSTFILE=hosts PPN=8 launch/mpirun.sh CONFIG.yaml ...
#
# NP: processes in all (required). HOSTS (comma-separated) or HOSTFILE: where; neither means this
# machine. PPN: processes per node. MPIEXEC (default mpiexec) and PYTHON (default python3) must
# name the same paths on every node (a shared venv); MPIEXEC_ARGS adds site flags (word-split),
# e.g. --allow-run-as-root for Open MPI in a container.
#
# Works with MPICH's hydra and with Open MPI, whose flags differ; `mpiexec --version` says which:
#   hydra:    -hosts h1,h2   -f FILE (lines `host:N`; it refuses `host slots=N`)   -ppn N
#   Open MPI: --host h1:N,h2:N   --hostfile FILE (`host slots=N`)   --map-by ppr:N:node
# Every rank learns its rank, world size and local rank from the launcher (hydra: PMI_RANK,
# PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS; Open MPI: OMPI_COMM_WORLD_*), and rank 0's address
# is broadcast over MPI with mpi4py unless MASTER_ADDR and MASTER_PORT are both set (then mpi4py
# is not needed; when it is, it must be built for this same MPI, as pip's mpi4py is for pip's
# mpich). MPI only starts the processes: the training talks over torch.distributed (NCCL on
# GPUs, gloo on CPUs), so MPI's own transport is not used and needs no tuning. Set MASTER_ADDR
# (and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME) when the nodes have several networks.
#
# Signals (measured with MPICH 5.0.2's hydra): SIGTERM, SIGINT and SIGUSR1 to mpiexec reach every
# rank (distlm saves and exits 75) and mpiexec waits for them however long the save takes;
# SIGUSR2 kills mpiexec and the ranks without a save, so ask the scheduler for USR1
# (`#SBATCH --signal=USR1@120`). A rank that exits with an error does not stop the others (they
# exit 78 when their next collective fails); one killed by a signal makes hydra kill the rest.
# hydra's exit code is the bitwise OR of the ranks' codes (78 and 3 give 79), so when ranks
# ended differently read RUN_DIR/exit.json for the real one. Open MPI (not tried here; its
# manual): SIGUSR1/SIGUSR2 reach every rank; on SIGTERM/SIGINT it sends the ranks SIGTERM and a
# few seconds later SIGKILL, too soon for a save, so use USR1 there too; a rank that exits
# non-zero ends the job.
set -euo pipefail

usage="usage: NP=N [HOSTS=h1,h2 | HOSTFILE=file] [PPN=n] $0 CONFIG.yaml [key.sub=value ...]"
if [ $# -lt 1 ]; then
  echo "$usage" >&2
  exit 2
fi
if ! [[ "${NP:-}" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NP must be the number of processes to start (got '${NP:-}')"$'\n'"$usage" >&2
  exit 2
fi
if [ -n "${HOSTS:-}" ] && [ -n "${HOSTFILE:-}" ]; then
  echo "$0: set HOSTS or HOSTFILE, not both" >&2
  exit 2
fi
if [ -n "${HOSTFILE:-}" ] && [ ! -r "$HOSTFILE" ]; then
  echo "$0: HOSTFILE=$HOSTFILE is not a readable file" >&2
  exit 2
fi
if [ -n "${PPN:-}" ] && ! [[ "$PPN" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: PPN must be a positive number of processes per node (got '$PPN')" >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
MPIEXEC=${MPIEXEC:-mpiexec}
version=$("$MPIEXEC" --version 2>&1) || {
  echo "$0: '$MPIEXEC --version' failed; install MPICH or Open MPI, or set MPIEXEC:"$'\n'"$version" >&2
  exit 2
}

args=(-n "$NP")
# RANK/WORLD_SIZE copied from this shell (a torchrun session, an earlier export) must not win
# over the MPI's own variables in distlm's launcher detection: name the launcher.
if [[ "$version" == *HYDRA* ]]; then
  export DISTLM_LAUNCHER=mpich
  if [ -n "${HOSTFILE:-}" ] && grep -q 'slots=' "$HOSTFILE"; then
    echo "$0: $HOSTFILE has 'host slots=N' lines (Open MPI's and DeepSpeed's format); MPICH's mpiexec wants 'host:N'" >&2
    exit 2
  fi
  [ -n "${HOSTS:-}" ] && args+=(-hosts "$HOSTS")
  [ -n "${HOSTFILE:-}" ] && args+=(-f "$HOSTFILE")
  [ -n "${PPN:-}" ] && args+=(-ppn "$PPN")
  # hydra's default, said explicitly: every variable of this shell reaches every rank on every
  # node (OMP_NUM_THREADS, DISTLM_*, GLOO_SOCKET_IFNAME, NCCL_*, MASTER_ADDR/PORT when set).
  args+=(-genvall)
elif [[ "$version" == *"Open MPI"* || "$version" == *OpenRTE* ]]; then
  export DISTLM_LAUNCHER=openmpi
  if [ -n "${HOSTS:-}" ]; then
    # --host h1,h2 gives each host one slot: say how many processes each may take.
    hosts=$HOSTS
    [ -n "${PPN:-}" ] && hosts="${HOSTS//,/:$PPN,}:$PPN"
    args+=(--host "$hosts")
  fi
  [ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
  [ -n "${PPN:-}" ] && args+=(--map-by "ppr:$PPN:node")
  # Open MPI pins each rank to one core by default (np <= 2) or to a socket: a trainer with
  # OMP threads and loader workers would share that core. Leave placement to the OS.
  args+=(--bind-to none)
  # Open MPI passes no environment to remote nodes unless named with -x.
  for name in $(compgen -e); do
    case $name in
      PATH|LD_LIBRARY_PATH|PYTHONPATH|PYTHONUNBUFFERED|OMP_NUM_THREADS|MASTER_ADDR|MASTER_PORT|\
      DISTLM_*|GLOO_*|NCCL_*|TORCH_*|CUDA_*|HF_*) args+=(-x "$name") ;;
    esac
  done
else
  echo "$0: cannot tell which MPI '$MPIEXEC' is (neither MPICH's hydra nor Open MPI); its --version says:"$'\n'"$version" >&2
  exit 2
fi

# shellcheck disable=SC2206  # MPIEXEC_ARGS is a list of flags on purpose
extra=(${MPIEXEC_ARGS:-})
exec "$MPIEXEC" "${args[@]}" ${extra[@]+"${extra[@]}"} "$PYTHON" -m distlm train "$@"
