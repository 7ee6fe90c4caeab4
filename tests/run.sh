#!/usr/bin/env bash
# Set up the pinned environment and run the whole test suite (what CI runs).
#
#   bash tests/run.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup-env.sh
exec "${DISTLM_VENV:-.venv}/bin/python" -m pytest -ra "$@"
