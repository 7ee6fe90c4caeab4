"""The benchmark scripts keep working (a few steps, one repeat); their figures live in benchmarks/README.md."""

import re
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


def test_train_throughput_prints_both_figures_and_the_ratio():
    result = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--steps", "10", "--warmup", "10",
                             "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.search(r"plain_tokens_per_s=(\d+) distlm_tokens_per_s=(\d+) ratio=([\d.]+)", last)
    assert match, last
    plain, distlm, ratio = int(match[1]), int(match[2]), float(match[3])
    assert plain > 0 and distlm > 0
    assert ratio == pytest.approx(distlm / plain, rel=1e-2)


def test_checkpoint_save_benchmark_prints_sync_async_and_the_ratio():
    result = subprocess.run([sys.executable, "benchmarks/checkpoint_save.py", "--small", "--repeats", "1",
                             "--steps", "4", "--save-every", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.search(r"sync_save_s=([\d.]+) async_blocked_s=([\d.]+) ratio=([\d.]+)", last)
    assert match, last
    sync, blocked, ratio = float(match[1]), float(match[2]), float(match[3])
    assert sync > 0 and blocked > 0
    assert ratio == pytest.approx(blocked / sync, rel=1e-3, abs=1e-4)
