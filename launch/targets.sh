# Sourced by the launch scripts: write this node's Prometheus file_sd target file and remove it
# when the launcher ends, so a finished job does not leave targets that read as ranks missing.
#
#   write_node_targets NAME NPROC CONFIG.yaml [key.sub=value ...]
#
# The file is ${DISTLM_TARGETS_DIR:-monitoring/targets}/NAME.json (relative to the working
# directory, like the run folder). It lists this host's ranks, HOST:metrics.port + local rank,
# read from the same config and overrides as the training; nothing is written when
# metrics.enabled is false. Monitoring is not worth a job: a failure only warns.
#
# The launchers `exec` into the trainer (so signals reach it directly), which leaves no shell
# to clean up afterwards; a small watcher, detached from the job's output and deaf to the stop
# signals the job's process group gets (Ctrl-C, a scheduler's SIGTERM), waits for this process
# id to end and removes the file then.
write_node_targets() {
  local name=$1 nproc=$2
  shift 2
  local file="${DISTLM_TARGETS_DIR:-monitoring/targets}/$name.json"
  if ! "$PYTHON" -m distlm.metrics.targets --quiet --out "$file" --job-id "$name" --id-label launch_id \
       --hosts "${TARGET_HOST:-$(hostname)}" --tasks-per-node "$nproc" "$@"; then
    echo "$0: WARNING: no Prometheus target file for this job (see above); training goes on" >&2
    return 0
  fi
  [ -f "$file" ] || return 0
  local launcher=$$
  ( trap '' INT TERM HUP QUIT USR1 USR2
    while kill -0 "$launcher" 2>/dev/null; do sleep 2; done
    rm -f "$file" ) </dev/null >/dev/null 2>&1 &
}
