#!/usr/bin/env bash
# The GPU benchmark: bash benchmarks/gpu/run.sh [--dry] [bench.py options]; see README.md.
#
# Installs nothing unless it must: when .whl/ exists (carried to the GPU machine) and deepspeed
# is not importable, the wheels are installed the way ../shared/gpu/README.md says (no index, no
# dependencies, into /tmp/site, first on PYTHONPATH). Results go to $OUT (else a temp folder).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
has_deepspeed() { "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)'; }
if [ -d .whl ] && ! has_deepspeed; then
  echo "run.sh: deepspeed is not importable: installing the wheels in .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "run.sh: installing .whl/*.whl failed"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" benchmarks/gpu/bench.py "$@"
