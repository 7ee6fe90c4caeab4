"""The ``distlm`` command: ``distlm prepare ...``, ``distlm data verify|bench DIR``,
``distlm train CONFIG [key.sub=value ...]``, ``distlm plot RUN_DIR``, and for a trained model
``distlm generate|eval|finetune-classify CKPT ...``.

Run directly, ``distlm train`` trains in one process. For several processes on one node::

    NPROC=2 launch/local.sh configs/quickstart-cpu.yaml train.max_steps=100

which runs ``torchrun --standalone --nproc_per_node 2 -m distlm train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys

from distlm import __version__

from distlm.fault import exit_codes

# The codes under their older names, for scripts that import them.
EXIT_CONFIG_ERROR = exit_codes.CONFIG_ERROR
EXIT_DATA_ERROR = exit_codes.DATA_ERROR
EXIT_CHECKPOINT_ERROR = exit_codes.CHECKPOINT_ERROR
EXIT_EXPORT_ERROR = exit_codes.EXPORT_ERROR


def _prepare(args: argparse.Namespace) -> int:
    from distlm.data.prepare import prepare_corpus

    kwargs = {"inputs": args.inputs, "out_dir": args.out, "tokenizer": args.tokenizer,
              "seq_len": args.seq_len, "text_field": args.text_field, "shard_mb": args.shard_mb,
              "block_rows": args.block_rows, "stride": args.stride, "workers": args.workers,
              "restart": args.restart, "add_bos": args.add_bos, "batch_mb": args.batch_mb}
    if args.val_fraction is not None:
        kwargs["val_fraction"] = args.val_fraction
    prepare_corpus(**kwargs, log=lambda message: print(message, file=sys.stderr, flush=True))
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from distlm.data.tokenizer_train import train_bpe

    train_bpe(args.inputs, args.out, args.vocab_size, text_field=args.text_field,
              min_frequency=args.min_frequency, log=lambda message: print(message, file=sys.stderr, flush=True))
    return 0


def _train(args: argparse.Namespace) -> int:
    from distlm.config import load_config
    from distlm.train.loop import train

    train(load_config(args.config, args.overrides))
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from distlm.data.verify import verify_dataset

    problems = verify_dataset(args.dir, log=lambda message: print(message, flush=True), allow_pipe=args.allow_pipe)
    return EXIT_DATA_ERROR if problems else 0


def _data_bench(args: argparse.Namespace) -> int:
    from distlm.data.bench import bench_dataset

    bench_dataset(args.dir, split=args.split, micro_batch_size=args.micro_batch_size, seconds=args.seconds,
                  log=lambda message: print(message, flush=True))
    return 0


def _export(args: argparse.Namespace) -> int:
    from distlm.checkpoint.export import export_hf

    export_hf(args.checkpoint, args.out, log=lambda message: print(message, flush=True))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from distlm.metrics.plot import MatplotlibMissing, plot_run

    try:
        out, summary = plot_run(args.run_dir, args.out)
    except MatplotlibMissing as e:  # an optional dependency: say what to install, not a traceback
        print(f"distlm: {e}", file=sys.stderr)
        return exit_codes.FAILED
    print(out, flush=True)
    print(summary, flush=True)
    return 0


def _task(module: str):
    """The ``run(args)`` of ``distlm.tasks.MODULE``, imported when the command runs."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(f"distlm.tasks.{module}").run(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distlm", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"distlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into WebDataset token shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files, directories, .jsonl, .jsonl.zst, .jsonl.gz or .gz text files")
    p.add_argument("--out", required=True,
                   help="output folder (must not hold a dataset already; an interrupted prepare there is resumed)")
    p.add_argument("--tokenizer", default="byte",
                   help="byte, char (fitted on the inputs), a tokenizer.json (distlm or Hugging Face), "
                        "a sentencepiece .model, or a dataset folder")
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
    p.add_argument("--workers", type=int, default=None,
                   help="processes that tokenize and compress (default: one per CPU); the output does not depend on it")
    p.add_argument("--restart", action="store_true",
                   help="discard the partial work of an interrupted prepare in --out instead of resuming it")
    p.add_argument("--add-bos", action="store_true",
                   help="start every document with the tokenizer's BOS token (EOS always ends it)")
    p.add_argument("--batch-mb", type=float, default=8.0,
                   help="advanced: MB of input per tokenizing job (default 8); the output does not depend on it")
    p.set_defaults(run=_prepare)

    k = sub.add_parser("tokenizer", help="train tokenizers")
    ksub = k.add_subparsers(dest="tokenizer_command", required=True)
    kt = ksub.add_parser("train", help="train a byte-level BPE tokenizer.json (Hugging Face tokenizers)",
                         description="Train a byte-level BPE; special ids: <|endoftext|>=0 (EOS), <|pad|>=1, "
                                     "<|mask|>=2, <|bos|>=3. Use the output with prepare --tokenizer FILE.")
    kt.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, directories, .jsonl or .jsonl.zst files")
    kt.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary (at least 261)")
    kt.add_argument("--out", required=True, help="tokenizer.json to write")
    kt.add_argument("--text-field", default="text", help="JSONL field that holds the text (default text)")
    kt.add_argument("--min-frequency", type=int, default=2,
                    help="merge only pairs seen at least this often (default 2)")
    kt.set_defaults(run=_tokenizer_train)

    d = sub.add_parser("data", help="inspect a prepared dataset")
    dsub = d.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("verify", help="check every shard against manifest.json (exit 3 naming bad shards)")
    v.add_argument("dir", metavar="DIR", help="a folder written by distlm prepare")
    v.add_argument("--allow-pipe", action="store_true",
                   help="allow a pipe: URL for DIR (it runs a shell command); off by default")
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

    e = sub.add_parser("export", help="export a checkpoint's model for another library (Hugging Face transformers)",
                       description="Write OUT/model.safetensors and OUT/config.json that transformers' "
                                   "AutoModelForCausalLM.from_pretrained(OUT) loads: GPT-2 style models as "
                                   "GPT2LMHeadModel, Llama style as LlamaForCausalLM. Exit 5 if the model has "
                                   "no such counterpart.")
    e.add_argument("checkpoint", metavar="CKPT",
                   help="a checkpoint step folder, a checkpoints folder (its 'latest' is used) or a run folder")
    e.add_argument("--format", choices=["hf"], default="hf", help="hf: Hugging Face transformers (the default)")
    e.add_argument("out", metavar="OUT", help="folder to write the exported model into")
    e.set_defaults(run=_export)

    pl = sub.add_parser("plot", help="draw a run's loss, val loss, lr and throughput into a PNG (needs matplotlib)",
                        description="Write a PNG of RUN_DIR/metrics.jsonl: loss and val loss, learning rate, "
                                    "throughput and gradient norm against the step, and print its path and a "
                                    "summary. Only metrics.jsonl is plotted, not the metrics.N.jsonl files that "
                                    "earlier fresh starts in the same folder set aside.")
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (run.dir) that holds metrics.jsonl")
    pl.add_argument("--out", metavar="PATH", default=None, help="PNG to write (default RUN_DIR/metrics.png)")
    pl.set_defaults(run=_plot)

    from distlm.tasks import classify, eval_lm, generate

    g = sub.add_parser("generate", help="sample text from a checkpoint (temperature, top-k, top-p, KV cache)",
                       description=generate.__doc__.split("\n\n")[0])
    generate.add_arguments(g)
    g.set_defaults(run=_task("generate"))

    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on shards or a text file",
                        description=eval_lm.__doc__.split("\n\n")[0])
    eval_lm.add_arguments(ev)
    ev.set_defaults(run=_task("eval_lm"))

    fc = sub.add_parser("finetune-classify", help="fine-tune a checkpoint as a sequence classifier on JSONL "
                                                  "(text, label) and report held-out accuracy",
                        description=classify.__doc__.split("\n\n")[0])
    classify.add_arguments(fc)
    fc.set_defaults(run=_task("classify"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every way it can end has its exit code (``distlm.fault.exit_codes``)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("distlm: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except Exception as e:
        code = exit_codes.code_for(e)
        if code == exit_codes.FAILED:
            raise  # unexpected: the traceback is the message
        print(f"distlm: {exit_codes.name_of(code)}: {e}", file=sys.stderr, flush=True)
        if getattr(e, "immediate", False):
            # Peers are gone: Python's teardown would wait on their process group.
            sys.stdout.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
