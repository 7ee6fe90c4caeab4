"""``distlm prepare`` at scale: MB/s, peak memory and cores used on a ~1 GB JSONL corpus.

Generates (once; reused from ``--work``) a JSONL corpus of realistic text: the Python standard
library's ``.py`` files and tiny Shakespeare's paragraphs (in groups of 20), shuffled with a fixed
seed and repeated until ``--mb`` MB, one ``{"text": ...}`` record per document. Then runs

    python -m distlm prepare BIG.jsonl --out WORK/out --tokenizer byte --seq-len 2048

as a subprocess, sampling its whole process tree (main process, forkserver, workers) every 0.2 s:
peak of the summed RSS (what the acceptance criterion bounds; it counts the pages the workers
share with the forkserver once per process, so it overstates real use) and of the summed PSS
(shared pages split between the processes sharing them), and the tree's CPU seconds over wall
seconds and cores. The last line is machine-readable::

    prepare_mb_per_s=... peak_rss_mb=... cpu_cores_used=...

    python benchmarks/prepare_scale.py [--work /tmp/distlm-prepare-scale] [--mb 1000] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SAMPLE_S = 0.2


def source_documents() -> list[str]:
    """The documents the corpus repeats: stdlib sources and groups of Shakespeare paragraphs."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    if SHAKESPEARE.exists():
        paragraphs = SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")
        docs += ["\n\n".join(paragraphs[i:i + 20]) for i in range(0, len(paragraphs), 20)]
    return [d for d in docs if d.strip()]


def make_corpus(path: Path, mb: float) -> None:
    """Write ~``mb`` MB of JSONL to ``path`` (atomically: a cut-off corpus is never reused)."""
    target = int(mb * 1e6)
    docs = source_documents()
    rng = random.Random(1234)
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(docs)
            for doc in docs:
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
    os.replace(tmp, path)


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler:
    """Peak summed RSS/PSS and total CPU seconds of a process and all its descendants."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.cpu: dict[int, float] = {}  # last CPU seconds seen per pid (a process that exits keeps its last)
        self.peak_rss = self.peak_pss = 0

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                pss += _pss_kb(p.pid) * 1024
            except psutil.NoSuchProcess:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/distlm-prepare-scale", help="corpus and output folder")
    parser.add_argument("--mb", type=float, default=1000, help="corpus size in MB (default 1000)")
    parser.add_argument("--workers", type=int, default=None, help="prepare --workers (default: one per CPU)")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.mb:g}mb.jsonl"
    if not corpus.exists():
        t = time.monotonic()
        make_corpus(corpus, args.mb)
        print(f"wrote {corpus} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - t:.0f} s", flush=True)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)

    cmd = [sys.executable, "-m", "distlm", "prepare", str(corpus), "--out", str(out), "--tokenizer", "byte",
           "--seq-len", str(args.seq_len)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    print(" ".join(cmd), flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    while proc.poll() is None:
        sampler.sample()
        time.sleep(SAMPLE_S)
    wall = time.monotonic() - t0
    log = proc.stderr.read()
    print(log.strip().splitlines()[-1] if log.strip() else "(no output)")
    if proc.returncode != 0:
        sys.exit(f"prepare failed (exit {proc.returncode}):\n{log[-3000:]}")

    mb = corpus.stat().st_size / 1e6
    cores = os.cpu_count() or 1
    used = sampler.cpu_seconds / wall
    manifest = json.loads((out / "manifest.json").read_text())
    shard_mb = sum(s["bytes"] for split in manifest["splits"].values() for s in split["shards"]) / 1e6
    print(f"input {mb:.0f} MB, {manifest['source']['tokens']:,} tokens, shards {shard_mb:.0f} MB; wall {wall:.1f} s "
          f"(process start included); peak PSS {sampler.peak_pss / 2**20:.0f} MB; "
          f"CPU {sampler.cpu_seconds:.0f} s = {used:.2f} of {cores} cores ({100 * used / cores:.0f}%)")
    print(f"prepare_mb_per_s={mb / wall:.1f} peak_rss_mb={sampler.peak_rss / 2**20:.0f} cpu_cores_used={used:.2f}")


if __name__ == "__main__":
    main()
