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
    plain, distlm, ratio = _summary("train_throughput.py", ["--steps", "10", "--warmup", "10", "--repeats", "1", "--no-compile"],
                                    r"plain_tokens_per_s=(\d+) distlm_tokens_per_s=(\d+) ratio=([\d.]+)")
    assert plain > 0 and distlm > 0
    assert ratio == pytest.approx(distlm / plain, rel=1e-2)


def test_checkpoint_save_benchmark_prints_sync_async_and_the_ratio():
    sync, blocked, ratio, save_mb_s, plain_mb_s, bandwidth_ratio = _summary(
        "checkpoint_save.py", ["--small", "--repeats", "1", "--steps", "4", "--save-every", "2"],
        r"sync_save_s=([\d.]+) async_blocked_s=([\d.]+) ratio=([\d.]+) "
        r"save_mb_s=([\d.]+) plain_write_mb_s=([\d.]+) bandwidth_ratio=([\d.]+)")
    assert sync > 0 and blocked > 0
    assert ratio == pytest.approx(blocked / sync, rel=1e-3, abs=1e-4)
    assert save_mb_s > 0 and plain_mb_s > 0 and bandwidth_ratio > 0
    # Each figure is rounded on its own (MB/s to 2 decimals, the ratio to 4).
    assert bandwidth_ratio == pytest.approx(save_mb_s / plain_mb_s, rel=1e-2, abs=1e-4)


def test_exporter_overhead_times_each_part_of_the_exporters_work():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from exporter_overhead import exporter_seconds_per_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    parts = exporter_seconds_per_step(step_s=0.1, scrape_every_s=15, iterations=500)
    assert set(parts) == {"phases", "logged", "forward_hooks", "scrape"}
    # Real timings, far below a millisecond per step on any machine that trains (the hooks' cost
    # is a difference of two timings and may round to 0).
    assert all(0 <= seconds < 1e-3 for seconds in parts.values()), parts
    assert parts["phases"] > 0 and parts["scrape"] > 0


def test_loader_benchmark_prints_both_rates_and_their_ratio():
    loader, bare, ratio = _summary("loader_throughput.py", ["--mb", "5", "--seq-len", "256", "--seconds", "1",
                                                            "--repeats", "1"],
                                   r"loader_tokens_per_s=(\d+) zstd_tokens_per_s=(\d+) ratio=([\d.]+)")
    assert loader > 0 and bare > 0
    # One repeat: the ratio is that run's, loader / zstd (decoding is part of both, so not above ~1).
    assert ratio == pytest.approx(loader / bare, rel=1e-2) and ratio < 1.5
