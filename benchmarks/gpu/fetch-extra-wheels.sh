#!/usr/bin/env bash
# Wheels that distlm and DeepSpeed import at run time but ../shared/gpu/fetch-wheels.sh does not
# gather (DeepSpeed's own requirements, and PyYAML for distlm's configs), into ./.whl next to
# the others. The GPU image may hold some of them already; installing them into /tmp/site is
# harmless then (same or newer versions, first on PYTHONPATH). Run from the repo root, after
# ../shared/gpu/fetch-wheels.sh. Versions are the ones in this repo's .venv, where the dry run
# is tested.
set -euo pipefail
DEST=${1:-.whl}
mkdir -p "$DEST"
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp"
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLAT="$PLAT --platform $p"
done
python3 -m pip download -q --no-deps $PLAT -d "$DEST" \
  PyYAML==6.0.4 psutil==7.2.2 msgpack==1.2.4 einops==0.8.2 tqdm==4.70.1 packaging==26.4 py-cpuinfo==9.0.0
ls -1 "$DEST"
du -sh "$DEST"
