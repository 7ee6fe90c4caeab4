#!/usr/bin/env bash
# Train with DeepSpeed's own launcher (the `deepspeed` command) over the hosts of a hostfile.
#
#   HOSTFILE=hostfile [MASTER_ADDR=..] [MASTER_PORT=..] launch/hostfile.sh CONFIG.yaml [key.sub=value ...]
#
# The hostfile has one `host slots=N` line per node (N processes there, one per GPU; `#` starts a
# comment). What DeepSpeed 0.19 does with it (deepspeed/launcher/runner.py and launch.py):
#
# * One host: the job runs on this machine, whatever the host is called, through launch.py, with
#   no ssh (this script skips DeepSpeed's ssh check and makes 127.0.0.1 the master address). A
#   single host that is not this machine is started there with --force_multi, as below.
# * Several hosts: DeepSpeed checks `ssh HOST hostname` to the first host and runs launch.py on
#   every host through pdsh: pdsh must be installed here, passwordless ssh must reach every
#   node, and every node needs this checkout and interpreter ($PYTHON, default python3) at the
#   same paths (a shared file system). Without MASTER_ADDR it takes the first address of `ssh FIRST_HOST hostname -I`.
#   Remote shells get only PYTHON*, MLFLOW*, MV2*, UCX* (and NCCL* on GPUs) from this
#   environment, plus the KEY=VALUE lines of ~/.deepspeed_env and ./.deepspeed_env (or of the
#   file DS_ENV_FILE names); so this script writes OMP_NUM_THREADS, DISTLM_*, GLOO_*, NCCL_* and
#   TORCH_* into such a file for the run, after which those two files' lines follow (they win).
#   Values are this node's, quoted with "..." only (`$`, backticks and `"` are the remote shell's);
#   a variable whose value differs per node belongs in that node's shell startup instead.
# * launch.py sets, for every process: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
#   (default 29500), LOCAL_SIZE (processes on this node), CROSS_RANK/CROSS_SIZE (node index and
#   count) and CUDA_VISIBLE_DEVICES (that node's slots). It does not set LOCAL_WORLD_SIZE.
#   --no_local_rank stops it from passing --local_rank=N as the first argument.
# * Failures: when a process exits non-zero, launch.py sends SIGTERM to every process tree of its
#   node (loader workers included), SIGKILL after 30 s, and exits with that process's code (a
#   process killed by signal N gives 256-N, e.g. 247 for SIGKILL); the runner exits with
#   launch.py's code, but with 0 if launch.py itself was killed by a signal (it only passes on
#   codes > 0). When ranks end differently, RUN_DIR/exit.json has the first ending.
# * Signals: on one node the runner handles none (a SIGTERM kills it and leaves the job
#   running), and launch.py turns SIGTERM/SIGINT into SIGTERM to every process, SIGKILL after
#   30 s and exit 1, and dies of SIGUSR1/SIGUSR2 leaving its processes behind. So this script
#   does not exec the runner: it forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the
#   training processes themselves, which save and exit 75; launch.py passes that code on. On
#   several nodes only the runner's own SIGTERM reaches the remote nodes (pdsh runs
#   `pkill -f` of launch.py there, whose SIGTERM the ranks then get, with its 30 s limit and
#   exit 1), so every forwarded signal becomes that.
set -euo pipefail

usage="usage: HOSTFILE=hostfile [MASTER_ADDR=addr] [MASTER_PORT=port] $0 CONFIG.yaml [key.sub=value ...]"
if [ $# -lt 1 ]; then
  echo "$usage" >&2
  exit 2
fi
# Without a hostfile DeepSpeed quietly runs on this machine's GPUs (or fails on a CPU): refuse.
if [ -z "${HOSTFILE:-}" ] || [ ! -r "$HOSTFILE" ]; then
  echo "$0: HOSTFILE must name a readable file of 'host slots=N' lines (got '${HOSTFILE:-}')"$'\n'"$usage" >&2
  exit 2
fi
mapfile -t hosts < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
if [ ${#hosts[@]} -eq 0 ]; then
  echo "$0: $HOSTFILE names no host; write one 'host slots=N' line per node" >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
args=(--hostfile "$HOSTFILE" --module --no_local_rank)
[ -n "${MASTER_PORT:-}" ] && args+=(--master_port "$MASTER_PORT")
multi=0
if [ ${#hosts[@]} -eq 1 ]; then
  case " localhost 127.0.0.1 ::1 $(hostname 2>/dev/null || true) ${HOSTNAME%%.*} " in
    *" ${hosts[0]} "*) args+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}") ;;
    *) multi=1; args+=(--force_multi) ;;
  esac
else
  multi=1
fi
env_file=
if [ "$multi" = 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
  if [ -z "${DS_ENV_FILE:-}" ]; then
    env_file=$(mktemp "${TMPDIR:-/tmp}/distlm-deepspeed-env.XXXXXX")
    trap 'rm -f "$env_file"' EXIT  # the runner reads it once, at its start
    for name in $(compgen -e); do
      case $name in
        OMP_NUM_THREADS|DISTLM_*|GLOO_*|NCCL_*|TORCH_*)
          [[ "${!name}" == *$'\n'* ]] || printf '%s=%s\n' "$name" "${!name}" >>"$env_file" ;;
      esac
    done
    for f in ~/.deepspeed_env ./.deepspeed_env; do
      if [ -f "$f" ]; then cat "$f" >>"$env_file"; fi
    done
    export DS_ENV_FILE=$env_file
  fi
fi

"$PYTHON" -m deepspeed.launcher.runner "${args[@]}" distlm train "$@" &
runner=$!

# shellcheck disable=SC2329  # called by the traps below
forward() {
  local sig=$1 launch ranks
  if [ "$multi" = 1 ]; then
    kill -TERM "$runner" 2>/dev/null || true
    return
  fi
  # runner -> launch.py -> the training processes (their loader workers are theirs to stop).
  launch=$(pgrep -P "$runner" | head -n 1 || true)
  ranks=$([ -z "$launch" ] || pgrep -P "$launch" || true)
  if [ -n "$ranks" ]; then
    # shellcheck disable=SC2086  # one pid a word
    kill -"$sig" $ranks 2>/dev/null || true
  elif [ -n "$launch" ]; then
    kill -TERM "$launch" 2>/dev/null || true  # not started yet: launch.py stops what it has
  else
    kill -TERM "$runner" 2>/dev/null || true
  fi
}
for sig in TERM INT HUP USR1 USR2; do
  # shellcheck disable=SC2064  # the signal's name is fixed now
  trap "forward $sig" "$sig"
done

# wait returns early (128+n) whenever a forwarded signal arrives; go on until the runner ends.
rc=0
wait "$runner" || rc=$?
while kill -0 "$runner" 2>/dev/null; do
  rc=0
  wait "$runner" || rc=$?
done
exit "$rc"
