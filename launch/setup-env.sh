#!/usr/bin/env bash
# Create ./.venv with distlm and its pinned test environment (CPU torch). Safe to rerun:
# it does nothing when pyproject.toml and .ci/constraints.txt have not changed.
#
#   bash launch/setup-env.sh          # then: . .venv/bin/activate
#
# On a GPU cluster install into your own environment instead: pip install -e . (after torch
# for your CUDA, and deepspeed with --no-build-isolation so it builds against that torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTLM_VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=.ci/constraints.txt

want=$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -c1-16)
stamp="$VENV/.distlm-env"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setting up $VENV (torch CPU, deepspeed, webdataset, ...): a minute or two" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")
"${pip[@]}" setuptools wheel
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" torch numpy
# DeepSpeed ships only a source archive whose build imports torch; without build isolation it
# builds against the torch above instead of fetching another one.
"${pip[@]}" --no-build-isolation deepspeed
"${pip[@]}" --no-build-isolation -e ".[test]"
echo "$want" > "$stamp"
echo "environment ready: . $VENV/bin/activate" >&2
