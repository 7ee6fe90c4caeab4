"""Training tokens/s: distlm (world size 1) against a plain PyTorch loop, back to back.

Prepares the data once (tiny Shakespeare from ../shared/data when present, else the Python
standard library's source), then alternates the loops ``--repeats`` times on the same model and
batch: the plain loop, ``distlm train`` as configured, and ``distlm train`` with
``train.compile=true`` (skip it with ``--no-compile``). Prints each one's best tokens/s, the
ratios distlm / plain, and the medians of the per-repeat ratios. All exclude start-up (and the
compilation, which happens in the first step): distlm's figure comes from metrics.jsonl's
elapsed time between the end of the warm-up and the last step.

    python benchmarks/train_throughput.py [--config configs/shakespeare-char-cpu.yaml] [--steps 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import prepare_small

ROOT = Path(__file__).resolve().parents[1]


def training_tokens(data_dir: Path, work: Path) -> Path:
    """All training rows, un-overlapped back into one token array, for the plain loop."""
    from distlm.data import TokenStream, load_manifest

    manifest = load_manifest(data_dir)
    rows = manifest.splits["train"]["rows"]
    stream = TokenStream(data_dir, "train", micro_batch_size=1, shuffle=False)
    it = iter(stream)
    pieces = [next(it)[0][0].numpy() for _ in range(rows)]
    path = work / "tokens.npy"
    np.save(path, np.concatenate(pieces))
    return path


def run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def plain(config: str, overrides: list[str], tokens: Path, steps: int, warmup: int) -> float:
    out = run([sys.executable, "benchmarks/plain_loop.py", config, *overrides, f"--tokens={tokens}",
               f"--steps={steps}", f"--warmup={warmup}"])
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def distlm(config: str, overrides: list[str], data_dir: Path, run_dir: Path, steps: int, warmup: int) -> float:
    log_every = 10
    run([sys.executable, "-m", "distlm", "train", config, *overrides, f"data.path={data_dir}",
         f"run.dir={run_dir}", f"train.max_steps={warmup + steps}", f"train.log_every={log_every}",
         "train.eval_every=0", "train.save_every=0", "train.eval_iters=1", "train.resume=never"])
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    first, last = rows[warmup], rows[warmup + steps]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shakespeare-char-cpu.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the train.compile=true runs")
    parser.add_argument("overrides", nargs="*", help="config overrides for all loops")
    args = parser.parse_args()
    if args.warmup % 10:
        sys.exit("--warmup must be a multiple of 10 (distlm logs every 10 steps)")
    if args.steps % 10:
        sys.exit("--steps must be a multiple of 10")

    from distlm.config import load_config

    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = prepare_small(work, cfg.train.seq_len or 64, val_fraction=0.1)
        tokens = training_tokens(data_dir, work)
        from distlm.data import load_manifest

        manifest = load_manifest(data_dir)
        # Both loops build the same model: pin the sizes distlm would read from the manifest.
        overrides = [*args.overrides, f"model.vocab_size={manifest.vocab_size}",
                     f"train.seq_len={cfg.train.seq_len or manifest.seq_len}"]
        plain_tps, distlm_tps, compiled_tps = [], [], []
        for i in range(args.repeats):
            plain_tps.append(plain(args.config, overrides, tokens, args.steps, args.warmup))
            distlm_tps.append(distlm(args.config, overrides, data_dir, work / f"run{i}", args.steps, args.warmup))
            line = f"repeat {i + 1}: plain {plain_tps[-1]:,.0f} tok/s, distlm {distlm_tps[-1]:,.0f} tok/s"
            if not args.no_compile:
                compiled_tps.append(distlm(args.config, [*overrides, "train.compile=true"], data_dir,
                                           work / f"compiled{i}", args.steps, args.warmup))
                line += f", distlm compiled {compiled_tps[-1]:,.0f} tok/s"
            print(line, flush=True)
    # This machine's speed drifts by tens of percent from minute to minute (a shared host), so
    # one pair proves little. The best of several repeats is each loop's least disturbed run
    # (timeit's rule); the median of the paired ratios, each from back-to-back runs, is the
    # cross-check. Both are printed; `ratio` is best / best.
    p, d = max(plain_tps), max(distlm_tps)
    summary = (f"config={args.config} steps={args.steps} repeats={args.repeats} plain_tokens_per_s={p:.0f} "
               f"distlm_tokens_per_s={d:.0f} ratio={d / p:.3f} median_paired_ratio={_paired(distlm_tps, plain_tps):.3f}")
    if compiled_tps:
        c = max(compiled_tps)
        summary += (f" compiled_tokens_per_s={c:.0f} compiled_ratio={c / p:.3f} "
                    f"compiled_median_paired_ratio={_paired(compiled_tps, plain_tps):.3f}")
    print(summary)


def _paired(own: list[float], baseline: list[float]) -> float:
    return statistics.median(o / b for o, b in zip(own, baseline))

if __name__ == "__main__":
    main()
