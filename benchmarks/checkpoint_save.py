"""Asynchronous checkpoint saves: time the training loop is blocked, against a synchronous save.

Runs ``distlm train`` on a ~20M-parameter model (one process, byte-level text from the Python
standard library) alternately with ``checkpoint.async_save=false`` and ``true``, ``--repeats``
times, saving every ``--save-every`` steps. A synchronous save blocks training for all of it
(serialize, write, fsync, hash, commit); an asynchronous one only for the snapshot into host
memory. Prints the median of each over all saves and the ratio blocked / synchronous.

    python benchmarks/checkpoint_save.py [--repeats 3] [--steps 12] [--save-every 4]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.n_layers=6", "model.d_model=512", "model.n_heads=8", "train.batch_size=4", "train.seq_len=128"]
SYNC = re.compile(r"checkpoint \S+ saved in ([\d.]+) s")
ASYNC = re.compile(r"checkpoint \S+ written in the background in ([\d.]+) s, training blocked ([\d.]+) s")


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
        sync_s, blocked_s, background_s = [], [], []
        for repeat in range(args.repeats):
            out = train(data, work / f"sync{repeat}", args.steps, args.save_every, False, model)
            sync_s += [float(m) for m in SYNC.findall(out)]
            out = train(data, work / f"async{repeat}", args.steps, args.save_every, True, model)
            for written, blocked in ASYNC.findall(out):
                background_s.append(float(written))
                blocked_s.append(float(blocked))
            print(f"repeat {repeat + 1}: sync saves {sync_s[-1]:.3f} s, async blocked {blocked_s[-1]:.3f} s", flush=True)
    sync, blocked = statistics.median(sync_s), statistics.median(blocked_s)
    print(f"saves: {len(sync_s)} sync, {len(blocked_s)} async; async writes took {statistics.median(background_s):.2f} s "
          f"in the background (median)")
    print(f"sync_save_s={sync:.6f} async_blocked_s={blocked:.6f} ratio={blocked / sync:.4f}")


if __name__ == "__main__":
    main()
