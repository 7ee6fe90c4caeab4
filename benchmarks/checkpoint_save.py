"""Asynchronous checkpoint saves: time the training loop is blocked, against a synchronous save.

Runs ``distlm train`` on a ~20M-parameter model (one process, byte-level text from the Python
standard library) alternately with ``checkpoint.async_save=false`` and ``true``, ``--repeats``
times, saving every ``--save-every`` steps. A synchronous save blocks training for all of it
(serialize, write, fsync, hash, commit); an asynchronous one only for the snapshot into host
memory. Prints the median of each over all saves and the ratio blocked / synchronous.

It also prints the synchronous save's bandwidth against a plain sequential write of the same
bytes to the same disk: save MB/s is the size of the committed checkpoint folder (the sum of its
files) over the median synchronous save; plain MB/s is the median, over one measurement after
each run (synchronous and asynchronous), of writing as many bytes of random data into one file
of the same folder (large chunks, then ``os.fsync``; timed from ``open`` to after the fsync).
MB = 10^6 bytes. On a shared machine a plain write's time varies a lot from one try to the next
(the page cache's memory): each repeat prints its own.
The last line carries every figure.

    python benchmarks/checkpoint_save.py [--repeats 3] [--steps 12] [--save-every 4]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.n_layers=6", "model.d_model=512", "model.n_heads=8", "train.batch_size=4", "train.seq_len=128"]
SYNC = re.compile(r"checkpoint \S+ saved in ([\d.]+) s")
ASYNC = re.compile(r"checkpoint \S+ written in the background in ([\d.]+) s, training blocked ([\d.]+) s")
PLAIN_CHUNK = 64 << 20
MB = 1e6


def prepare(work: Path) -> Path:
    from distlm.data.prepare import prepare_corpus

    inputs = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    out = work / "shards"
    prepare_corpus(inputs, str(out), tokenizer="byte", seq_len=128, val_fraction=0, log=lambda *_: None)
    return out


def train(data: Path, run_dir: Path, steps: int, save_every: int, async_save: bool, model: list[str]) -> str:
    cmd = [sys.executable, "-m", "distlm", "train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={data}",
           f"run.dir={run_dir}", f"train.max_steps={steps}", f"train.save_every={save_every}", "train.eval_every=0",
           "train.log_every=1000", "checkpoint.keep_last=1", f"checkpoint.async_save={str(async_save).lower()}",
           "train.resume=never", *model]
    result = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def committed_bytes(run_dir: Path) -> int:
    """The size of the run's last committed checkpoint (``checkpoint.keep_last=1``: the only one)."""
    from distlm.checkpoint.select import step_folders

    folders = [p for p in step_folders(run_dir / "checkpoints") if (p / "manifest.json").is_file()]
    if not folders:
        sys.exit(f"no committed checkpoint under {run_dir / 'checkpoints'}")
    return sum(f.stat().st_size for f in folders[-1].rglob("*") if f.is_file())


def plain_write_s(folder: Path, size: int, chunk: bytes) -> float:
    """Seconds to write ``size`` bytes into a new file of ``folder`` and fsync it (the file is removed)."""
    path = folder / "plain-write.bin"
    view = memoryview(chunk)
    started = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(view))
            f.write(view[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - started
    path.unlink()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="a tiny model (for the test that the script runs)")
    args = parser.parse_args()
    model = [] if args.small else MODEL
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work)
        sync_s, blocked_s, background_s, plain_s = [], [], [], []
        saved_bytes = 0
        random_chunk = os.urandom(PLAIN_CHUNK)  # not zeros: no filesystem compresses it away
        for repeat in range(args.repeats):
            run_dir = work / f"sync{repeat}"
            out = train(data, run_dir, args.steps, args.save_every, False, model)
            saves = [float(m) for m in SYNC.findall(out)]
            sync_s += saves
            saved_bytes = committed_bytes(run_dir)
            # The same bytes, the same disk, right after the run: a plain sequential write.
            plain_s.append(plain_write_s(run_dir / "checkpoints", saved_bytes, random_chunk))
            out = train(data, work / f"async{repeat}", args.steps, args.save_every, True, model)
            for written, blocked in ASYNC.findall(out):
                background_s.append(float(written))
                blocked_s.append(float(blocked))
            plain_s.append(plain_write_s(work / f"async{repeat}" / "checkpoints", saved_bytes, random_chunk))
            print(f"repeat {repeat + 1}: sync saves {' '.join(f'{s:.3f}' for s in saves)} s "
                  f"({saved_bytes / MB:.1f} MB each, {saved_bytes / MB / statistics.median(saves):.1f} MB/s), "
                  f"plain writes {' '.join(f'{s:.3f}' for s in plain_s[-2:])} s "
                  f"({saved_bytes / MB / statistics.median(plain_s[-2:]):.1f} MB/s), "
                  f"async blocked {blocked_s[-1]:.3f} s", flush=True)
    sync, blocked = statistics.median(sync_s), statistics.median(blocked_s)
    save_mb_s = saved_bytes / MB / sync
    plain_mb_s = saved_bytes / MB / statistics.median(plain_s)
    print(f"saves: {len(sync_s)} sync, {len(blocked_s)} async; async writes took {statistics.median(background_s):.2f} s "
          f"in the background (median); checkpoint {saved_bytes} bytes; plain writes {len(plain_s)}")
    print(f"sync_save_s={sync:.6f} async_blocked_s={blocked:.6f} ratio={blocked / sync:.4f} "
          f"save_mb_s={save_mb_s:.2f} plain_write_mb_s={plain_mb_s:.2f} "
          f"bandwidth_ratio={save_mb_s / plain_mb_s:.4f}")


if __name__ == "__main__":
    main()
