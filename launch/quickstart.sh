#!/usr/bin/env bash
# The Quickstart's main job, from a fresh clone: set up the environment, prepare a corpus that
# every Python carries (its standard library's source), and train a small model with 2
# processes on the CPU. Rerunning continues from the last checkpoint in runs/quickstart.
#
#   bash launch/quickstart.sh [key.sub=value ...]     # e.g. train.max_steps=600
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup-env.sh
# shellcheck disable=SC1091
. "${DISTLM_VENV:-.venv}/bin/activate"

DATA=data/python-stdlib
if [ ! -f "$DATA/manifest.json" ]; then
  stdlib=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  # The top-level modules only: a few MB of real code, no site-packages, no test suite.
  distlm prepare "$stdlib"/*.py --out "$DATA" --tokenizer byte --seq-len 128 --val-fraction 0.02
fi
NPROC=${NPROC:-2} bash launch/local.sh configs/quickstart-cpu.yaml "$@"
