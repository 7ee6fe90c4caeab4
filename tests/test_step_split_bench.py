"""benchmarks/collective_bytes.py and benchmarks/step_split.py run and report sane figures (tiny settings)."""

import math
import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


def _last_line(script: str, args: list[str], timeout: float) -> str:
    """Run a benchmark script in its own process group (killed whole at ``timeout``); its last line."""
    proc = subprocess.Popen([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and any torchrun ranks it started
        out, err = proc.communicate()
        pytest.fail(f"{script} ran past {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out.strip().splitlines()[-1]


def test_collective_bytes_of_a_two_rank_layout_are_the_minimum():
    last = _last_line("collective_bytes.py", ["--layouts", "tp2-pp1-dp1", "--steps", "2", "--timeout", "120"],
                      timeout=180)
    match = re.fullmatch(r"layouts=(\d+) worst_ratio=(\S+)", last)
    assert match, last
    layouts, worst = int(match[1]), float(match[2])
    assert layouts == 1
    # The project moves exactly the minimum for this layout; a little slack for the 1 kB rounding.
    assert math.isfinite(worst) and 1.0 <= worst <= 1.1, last


def test_step_split_parts_add_up_to_the_step():
    # The default small model (steps of ~50-150 ms): on a shared machine a step of a few ms is
    # either untouched or interrupted whole, and the medians of its parts then undercount it.
    # One thread: two would spin waiting for each other whenever the other cores are busy.
    last = _last_line("step_split.py", ["--steps", "30", "--warmup", "5", "train.threads=1"], timeout=120)
    figures = {k: float(v) for k, v in re.findall(r"(\w+)_ms=([\d.]+)", last)}
    parts = ("forward", "backward", "optimizer", "comm", "data", "other")
    assert set(figures) == {"step", *parts}, last
    assert all(figures[p] >= 0 for p in parts), last
    assert figures["forward"] > 0 and figures["backward"] > 0, last
    # Medians of the parts against the median step: the split accounts for the whole step.
    assert sum(figures[p] for p in parts) == pytest.approx(figures["step"], rel=0.1), last
    assert float(re.search(r"sum_ratio=([\d.]+)", last)[1]) == pytest.approx(1.0, abs=0.1), last
