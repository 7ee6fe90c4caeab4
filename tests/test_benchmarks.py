"""The benchmark scripts keep working (a few steps, one repeat); their figures live in benchmarks/README.md."""

import re
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


def _summary(script: str, args: list[str], pattern: str) -> tuple[float, ...]:
    """Run a benchmark script; the figures its last line reports, matched by ``pattern``."""
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.search(pattern, last)
    assert match, last
    return tuple(float(group) for group in match.groups())


def test_train_throughput_prints_both_figures_and_the_ratio():
    plain, distlm, ratio = _summary("train_throughput.py", ["--steps", "10", "--warmup", "10", "--repeats", "1"],
                                    r"plain_tokens_per_s=(\d+) distlm_tokens_per_s=(\d+) ratio=([\d.]+)")
    assert plain > 0 and distlm > 0
    assert ratio == pytest.approx(distlm / plain, rel=1e-2)


def test_checkpoint_save_benchmark_prints_sync_async_and_the_ratio():
    sync, blocked, ratio = _summary("checkpoint_save.py", ["--small", "--repeats", "1", "--steps", "4", "--save-every", "2"],
                                    r"sync_save_s=([\d.]+) async_blocked_s=([\d.]+) ratio=([\d.]+)")
    assert sync > 0 and blocked > 0
    assert ratio == pytest.approx(blocked / sync, rel=1e-3, abs=1e-4)
