"""What the Prometheus exporter adds to step time at the CPU recipe (the Quickstart's 2-rank run).

Two measurements, both printed:

1. Direct (the figure the target is held to): the exporter's work per optimizer step, timed in
   this process — the phase calls every step makes, the per-log-interval recording spread over
   its steps, the forward-pass hooks, and the rendering of one scrape every ``--scrape-every`` seconds spread over the
   steps in between — divided by the step time of the same recipe measured in (2).
2. End to end (the cross-check): the recipe trained with metrics off and on, alternately,
   ``--repeats`` times, a scraper fetching every rank's endpoint each second in the "on" runs
   (15 times the shipped scrape rate); median step time of each. On a 2-core shared machine
   run-to-run noise is a few percent, larger than the effect, so this shows only that nothing
   big is hidden.

    python benchmarks/exporter_overhead.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart-cpu.yaml"
LOG_EVERY = 10


def prepare(work: Path) -> Path:
    """The Quickstart's data: the standard library's top-level modules, byte-level, 128 tokens a row."""
    from distlm.data.prepare import prepare_corpus

    stdlib = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = work / "shards"
    prepare_corpus(stdlib, str(out), tokenizer="byte", seq_len=128, val_fraction=0.02, log=lambda *_: None)
    return out


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    sys.exit("no two consecutive free ports on 127.0.0.1")


class Scraper(threading.Thread):
    """GET every endpoint once a second, as a (busy) Prometheus would."""

    def __init__(self, urls: list[str]):
        super().__init__(daemon=True)
        self.urls, self.stop, self.scrapes = urls, threading.Event(), 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        response.read()
                    self.scrapes += 1
                except OSError:
                    pass  # not serving yet (start-up) or already closed


def train(data: Path, run_dir: Path, steps: int, metrics_port: int | None) -> tuple[float, int]:
    """Median ms per step over the logged intervals after the first; scrapes made."""
    overrides = [f"data.path={data}", f"run.dir={run_dir}", f"train.max_steps={steps}",
                 f"train.log_every={LOG_EVERY}", "train.eval_every=0", "train.save_every=0", "train.resume=never"]
    scraper = None
    if metrics_port is not None:
        overrides += ["metrics.enabled=true", f"metrics.port={metrics_port}",
                      f"metrics.targets_dir={run_dir.parent / 'targets'}"]  # not the repository's
        scraper = Scraper([f"http://127.0.0.1:{metrics_port + r}/metrics" for r in range(2)])
        scraper.start()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "distlm", "train", CONFIG, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        result = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, timeout=1800, env=env)
    finally:
        if scraper is not None:
            scraper.stop.set()
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return statistics.median(r["ms_per_step"] for r in rows[1:]), scraper.scrapes if scraper else 0


def exporter_seconds_per_step(step_s: float, scrape_every_s: float, iterations: int = 20000) -> dict:
    """The exporter's own cost per optimizer step, in seconds, by part."""
    from prometheus_client import generate_latest

    from distlm.metrics.exporter import Exporter

    exporter = Exporter(rank=0, run="bench")
    exporter.describe_run(world_size=2, checkpoint_every_steps=100)
    row = {"step": 1, "loss": 3.2, "lr": 1e-3, "grad_norm": 0.8, "mfu": 0.01, "tokens": 0,
           "checkpoint_errors": 0, "data_errors": {}}

    began = time.perf_counter()
    for step in range(iterations):
        exporter.phase(step, "agree")
        exporter.phase(step, "data")
        exporter.phase(step, "step")
    phases = (time.perf_counter() - began) / iterations

    began = time.perf_counter()
    for step in range(iterations):
        row["step"], row["tokens"] = step, step * 4096
        exporter.step(row)
        exporter.memory(2**30, 2**31)
        exporter.forward_seconds(0.01)
    logged = (time.perf_counter() - began) / iterations / LOG_EVERY

    forward = forward_hook_seconds(iterations)  # one micro-batch a step in the CPU recipe

    renders = max(iterations // 20, 100)
    began = time.perf_counter()
    for _ in range(renders):
        generate_latest(exporter.registry)
    scrape = (time.perf_counter() - began) / renders * step_s / scrape_every_s
    return {"phases": phases, "logged": logged, "forward_hooks": forward, "scrape": scrape}


def forward_hook_seconds(iterations: int) -> float:
    """What ForwardClock's two hooks add to one forward call (CPU: a perf_counter pair)."""
    import torch

    from distlm.metrics.forward_clock import ForwardClock

    module, x = torch.nn.Identity(), torch.ones(1)

    def calls() -> float:
        began = time.perf_counter()
        for _ in range(iterations):
            module(x)
        return time.perf_counter() - began

    bare = min(calls() for _ in range(3))
    clock = ForwardClock(module, torch.device("cpu"))
    hooked = min(calls() for _ in range(3))
    clock.close()
    return max(hooked - bare, 0.0) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scrape-every", type=float, default=15.0, help="the shipped scrape interval, seconds")
    args = parser.parse_args()

    off, on, scrapes = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work)
        for i in range(args.repeats):
            off.append(train(data, work / f"off{i}", args.steps, None)[0])
            ms, n = train(data, work / f"on{i}", args.steps, free_port_pair())
            on.append(ms)
            scrapes += n
            print(f"repeat {i + 1}: metrics off {off[-1]:.1f} ms/step, on (scraped every 1 s) {on[-1]:.1f} ms/step",
                  flush=True)
    step_s = statistics.median(off) / 1000
    parts = exporter_seconds_per_step(step_s, args.scrape_every)
    cost = sum(parts.values())
    detail = " ".join(f"{name}_us={seconds * 1e6:.2f}" for name, seconds in parts.items())
    print(f"per step: {detail}; {scrapes} scrapes answered in the 'on' runs")
    print(f"step_ms_off={statistics.median(off):.1f} step_ms_on={statistics.median(on):.1f} "
          f"end_to_end_ratio={statistics.median(on) / statistics.median(off):.4f} "
          f"exporter_us_per_step={cost * 1e6:.1f} direct_ratio={1 + cost / step_s:.5f}")


if __name__ == "__main__":
    main()
