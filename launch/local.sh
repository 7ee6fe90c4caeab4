#!/usr/bin/env bash
# Train on this node with several processes: torchrun in standalone mode.
#
#   launch/local.sh CONFIG.yaml [key.sub=value ...]
#   NPROC=4 launch/local.sh configs/quickstart-cpu.yaml train.max_steps=100
#
# NPROC defaults to the number of GPUs on the node, or 2 on a machine without one.
# torchrun sets OMP_NUM_THREADS=1 per process unless you set it, which is right on a CPU
# where the processes already share the cores.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: [NPROC=N] $0 CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi

if [ -z "${NPROC:-}" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
  fi
  if [ "$gpus" -gt 0 ]; then NPROC=$gpus; else NPROC=2; fi
fi

PYTHON=${PYTHON:-python3}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m distlm train "$@"
