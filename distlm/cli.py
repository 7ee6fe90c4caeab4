"""The ``distlm`` command: ``distlm prepare ...``, ``distlm data verify|bench DIR`` and
``distlm train CONFIG [key.sub=value ...]``.

Run directly, ``distlm train`` trains in one process. For several processes on one node::

    NPROC=2 launch/local.sh configs/quickstart-cpu.yaml train.max_steps=100

which runs ``torchrun --standalone --nproc_per_node 2 -m distlm train ...``.
"""

from __future__ import annotations

import argparse
import sys

from distlm import __version__

EXIT_CONFIG_ERROR = 2
EXIT_DATA_ERROR = 3
EXIT_CHECKPOINT_ERROR = 4


def _prepare(args: argparse.Namespace) -> int:
    from distlm.data.prepare import prepare_corpus

    kwargs = {"inputs": args.inputs, "out_dir": args.out, "tokenizer": args.tokenizer,
              "seq_len": args.seq_len, "text_field": args.text_field, "shard_mb": args.shard_mb,
              "block_rows": args.block_rows, "stride": args.stride}
    if args.val_fraction is not None:
        kwargs["val_fraction"] = args.val_fraction
    prepare_corpus(**kwargs, log=lambda message: print(message, file=sys.stderr, flush=True))
    return 0


def _train(args: argparse.Namespace) -> int:
    from distlm.config import load_config
    from distlm.train.loop import train

    train(load_config(args.config, args.overrides))
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from distlm.data.verify import verify_dataset

    problems = verify_dataset(args.dir, log=lambda message: print(message, flush=True))
    return EXIT_DATA_ERROR if problems else 0


def _data_bench(args: argparse.Namespace) -> int:
    from distlm.data.bench import bench_dataset

    bench_dataset(args.dir, split=args.split, micro_batch_size=args.micro_batch_size, seconds=args.seconds,
                  log=lambda message: print(message, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distlm", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"distlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into WebDataset token shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files, directories, .jsonl or .jsonl.zst files")
    p.add_argument("--out", required=True, help="output folder (must not hold a dataset already)")
    p.add_argument("--tokenizer", default="byte", help="byte, char, or a tokenizer.json written by prepare")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence (default 1024)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the token stream's tail held out for validation")
    p.add_argument("--stride", type=int, default=None,
                   help="training rows start every N tokens (default: seq-len); smaller values write "
                        "overlapping windows, like nanoGPT's random windows, for a small corpus")
    p.add_argument("--text-field", default="text", help="JSONL field that holds the text (default text)")
    p.add_argument("--shard-mb", type=float, default=256, help="approximate shard size in MB (default 256)")
    p.add_argument("--block-rows", type=int, default=None,
                   help="rows per tar member (default: about 1 MiB of tokens)")
    p.set_defaults(run=_prepare)

    d = sub.add_parser("data", help="inspect a prepared dataset")
    dsub = d.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("verify", help="check every shard against manifest.json (exit 3 naming bad shards)")
    v.add_argument("dir", metavar="DIR", help="a folder written by distlm prepare")
    v.set_defaults(run=_data_verify)
    b = dsub.add_parser("bench", help="tokens/s of the training loader vs bare zstd decoding of the same shards")
    b.add_argument("dir", metavar="DIR", help="a folder written by distlm prepare")
    b.add_argument("--split", default="train")
    b.add_argument("--micro-batch-size", type=int, default=8)
    b.add_argument("--seconds", type=float, default=5.0, help="time per measurement (default 5)")
    b.set_defaults(run=_data_bench)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", metavar="CONFIG.yaml")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.max_steps=100 optim.lr=3e-4 run.dir=runs/x")
    t.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distlm.checkpoint.state import CheckpointError
    from distlm.config import ConfigError
    from distlm.data.inputs import InputError
    from distlm.data.shards import ShardError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"distlm: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (InputError, ShardError, FileNotFoundError) as e:
        print(f"distlm: data error: {e}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except CheckpointError as e:
        print(f"distlm: checkpoint error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT_ERROR
    except KeyboardInterrupt:
        print("distlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
