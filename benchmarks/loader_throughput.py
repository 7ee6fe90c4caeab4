"""Loader tokens/s: the training read path against bare zstd decoding of the same shards.

Prepares a corpus once (the Python standard library's ``.py`` files, repeated until about
``--mb`` MB, byte tokenizer, rows of ``--seq-len``), then runs ``distlm data bench`` on it
(:func:`distlm.data.bench.bench_dataset`): the two sides alternate in half-second slices for
``--seconds`` each, so a machine whose speed drifts slows both alike. Baseline: zstd decoding
alone, blocks already in memory; own figure: ``TokenStream`` as training reads it (tar
iteration, decompression, the shuffled gather, the int64 micro-batch). The ratio cannot exceed
about 1: decoding is part of both.

    python benchmarks/loader_throughput.py [--mb 100] [--seq-len 2048] [--seconds 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import tempfile
from pathlib import Path


def write_corpus(path: Path, megabytes: float) -> int:
    """Concatenate the standard library's sources (in name order) until ``megabytes``; return the bytes."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for source in sources:
                text = source.read_text(encoding="utf-8", errors="replace")
                out.write(text)
                written += len(text.encode("utf-8"))
                if written >= target:
                    break
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0, help="per side, per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from distlm.data.bench import bench_dataset
    from distlm.data.prepare import prepare_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = write_corpus(corpus, args.mb)
        prepare_corpus([str(corpus)], str(Path(tmp) / "shards"), tokenizer="byte", seq_len=args.seq_len,
                       val_fraction=0, log=lambda *_: None)
        print(f"corpus: {size / 1e6:.1f} MB of Python sources, byte tokenizer, seq_len {args.seq_len}", flush=True)
        results = []
        for repeat in range(args.repeats):
            result = bench_dataset(Path(tmp) / "shards", micro_batch_size=args.micro_batch_size,
                                   seconds=args.seconds, log=lambda line: print(f"  {line}", flush=True))
            results.append(result)
            print(f"repeat {repeat + 1}: loader {result['loader_tokens_per_s'] / 1e6:.0f}M tok/s, "
                  f"zstd {result['zstd_tokens_per_s'] / 1e6:.0f}M tok/s, ratio {result['ratio']:.3f}", flush=True)
    # Each repeat is already a paired measurement; the median of their ratios is the figure.
    best = statistics.median(r["ratio"] for r in results)
    loader = statistics.median(r["loader_tokens_per_s"] for r in results)
    bare = statistics.median(r["zstd_tokens_per_s"] for r in results)
    print(f"loader_tokens_per_s={loader:.0f} zstd_tokens_per_s={bare:.0f} ratio={best:.3f} repeats={args.repeats}")


if __name__ == "__main__":
    main()
