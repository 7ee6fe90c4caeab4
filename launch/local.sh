#!/usr/bin/env bash
# Train on this node with several processes: torchrun in standalone mode.
#
#   launch/local.sh CONFIG.yaml [key.sub=value ...]
#   NPROC=4 launch/local.sh configs/quickstart-cpu.yaml train.max_steps=100
#
# NPROC defaults to the GPUs this process may use (torch's count, which honours
# CUDA_VISIBLE_DEVICES), or 2 on a machine without one. torchrun sets OMP_NUM_THREADS=1 per
# process unless you set it, which is right on a CPU where the processes share the cores.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: [NPROC=N] $0 CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
if [ -z "${NPROC:-}" ]; then
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  if [ "$gpus" -gt 0 ]; then NPROC=$gpus; else NPROC=2; fi
fi

# After a torchrun restart (--max-restarts) the workers would otherwise share torchrun's
# rendezvous store with the failed attempt's keys and connect to dead addresses (pytorch#135712);
# with this each attempt gets a store of its own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# torchrun forwards these to the workers (distlm saves and stops on SIGTERM/SIGUSR1/SIGUSR2);
# a signal it does not handle would kill torchrun itself and orphan the workers. It must be
# the --signals-to-handle option: torch 2.13's launcher overwrites the environment variable
# TORCHELASTIC_SIGNALS_TO_HANDLE with the option's default.
SIGNALS=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
# MAX_RESTARTS: how often torchrun restarts the job after a failure (each restart resumes from
# the last checkpoint; distlm refuses a start that would repeat a crash, exit code 80).
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" \
  --signals-to-handle "$SIGNALS" \
  -m distlm train "$@"
