"""Collective bytes per step against the layout's theoretical minimum, from real `distlm train` runs.

For each layout this runs ``distlm train`` under torchrun (gloo on the CPU, tp x pp x dp
processes) for ``--steps`` steps of a small model (configs/tiny-test.yaml made 4 layers x 64
wide; global batch 8 in micro-batches of 2, so dp 2 accumulates 2 and pp 2 pipelines 4) on tiny
Shakespeare (char level) from ../shared/data, or the Python standard library's .py files (byte
level) when it is absent. The run measures the bytes itself: its layout report
(distlm/train/layout_report.py) counts every collective of step 2 (``COUNTED_STEP``; step 1
carries one-off set-up traffic) with ``parallel.comms.CommsCounter``, sums the wire bytes over
all ranks and logs them per kind of group next to ``minimum_bytes`` of the layout
(``comms.report_lines``), e.g.

      tp     measured        1.323  minimum        1.323  ratio 1.00x
        all_reduce                    30.0 calls/step  payload      1.323  wire      1.323 MB/step

This script reads those lines from the run's output and prints, per layout and kind of group
(dp / tp / pp), measured and minimum wire bytes per step and their ratio: the baseline is the
theoretical minimum, our figure the measured bytes, ratio = measured / minimum (recomputed from
the two MB figures, which the run prints to 1 kB; the run's own two-decimal ratio is shown
too). The last line is ``layouts=N worst_ratio=X.XXX``: the largest ratio over all layouts and
kinds. Kinds without a minimum ("local": groups of one rank, "other") are listed, not ranked.

    python benchmarks/collective_bytes.py [--layouts tp1-pp1-dp2-zero1,tp2-pp1-dp1,...] [--steps 3] [--timeout 300]

A layout is ``tpN-ppN-dpN-zeroN`` with any part left out meaning 1 (zero: 1, as the parity tests
use; pp > 1 allows ZeRO 0 or 1 only). The default set takes about 1.5-2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from harness import prepare_small, run_group

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAYOUTS = "tp1-pp1-dp2-zero1,tp2-pp1-dp1-zero1,tp1-pp2-dp1-zero1,tp2-pp2-dp1-zero1,tp2-pp1-dp2-zero2"
SEQ_LEN = 64
MODEL = ["model.n_layers=4", "model.d_model=64", "model.n_heads=4", "train.batch_size=8",
         "train.micro_batch_size=2", f"train.seq_len={SEQ_LEN}"]
# One kind of group per line of comms.report_lines (minimum and ratio are "-" where there is none).
KIND_LINE = re.compile(r"^\s+(\w+)\s+measured\s+([\d.]+)\s+minimum\s+(\S+)\s+ratio\s+(\S+)\s*$")
OP_LINE = re.compile(r"^\s{4}(\w+)\s+([\d.]+) calls/step\s+payload\s+[\d.]+\s+wire\s+([\d.]+) MB/step\s*$")
HEADER = "comms per step over"


def parse_layout(text: str) -> dict:
    sizes = {"tp": 1, "pp": 1, "dp": 1, "zero": 1}
    for part in text.strip().lower().split("-"):
        match = re.fullmatch(r"(tp|pp|dp|zero)(\d+)", part)
        if not match:
            raise argparse.ArgumentTypeError(f"layout {text!r}: {part!r} is not tpN, ppN, dpN or zeroN")
        sizes[match[1]] = int(match[2])
    if min(sizes["tp"], sizes["pp"], sizes["dp"]) < 1 or sizes["zero"] not in (0, 1, 2, 3):
        raise argparse.ArgumentTypeError(f"layout {text!r}: sizes must be >= 1 and zero 0-3")
    if sizes["pp"] > 1 and sizes["zero"] > 1:
        raise argparse.ArgumentTypeError(f"layout {text!r}: pipelines run ZeRO 0 or 1 only")
    return sizes


def name_of(sizes: dict) -> str:
    return f"tp{sizes['tp']}-pp{sizes['pp']}-dp{sizes['dp']}-zero{sizes['zero']}"


def nproc(sizes: dict) -> int:
    return sizes["tp"] * sizes["pp"] * sizes["dp"]


def prepare(work: Path) -> tuple[Path, int]:
    """Shards of tiny Shakespeare (or the stdlib's source), and their tokenizer's size."""
    from distlm.data import load_manifest

    out = prepare_small(work, SEQ_LEN, stdlib_files=100)
    return out, load_manifest(out).vocab_size


def train(sizes: dict, data: Path, vocab: int, run_dir: Path, steps: int, timeout: float,
          extra: list[str]) -> str:
    """One ``distlm train`` under torchrun; its whole output. The process group dies at ``timeout``."""
    tp, pp = sizes["tp"], sizes["pp"]
    vocab = -(-vocab // tp) * tp  # tensor parallelism cuts the vocabulary: round it up to divide
    args = ["train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={data}", f"run.dir={run_dir}",
            f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
            "train.resume=never", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.zero_stage={sizes['zero']}",
            f"model.vocab_size={vocab}", *MODEL, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc(sizes)}",
           "-m", "distlm", *args]
    # As tests/helpers.run_distlm: one thread per rank, and torchrun's store not shared (pytorch#135712).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return run_group(cmd, env, timeout, f"{name_of(sizes)}: distlm train")


def parse_report(out: str) -> dict:
    """``{kind: {"measured": MB, "minimum": MB or None, "logged_ratio": str, "ops": {op: (calls, wire MB)}}}``
    from the communication block that the run logs once (rank 0)."""
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(HEADER)]
    if len(starts) != 1:
        raise ValueError(f"expected one '{HEADER} ...' block in the run's output, found {len(starts)}")
    kinds: dict = {}
    current = None
    for line in lines[starts[0] + 1:]:
        kind, op = KIND_LINE.match(line), OP_LINE.match(line)
        if kind:
            name, measured, minimum, ratio = kind.groups()
            current = kinds[name] = {"measured": float(measured),
                                     "minimum": float(minimum) if minimum != "-" else None,
                                     "logged_ratio": ratio, "ops": {}}
            if name == "total":
                break
        elif op and current is not None:
            current["ops"][op[1]] = (float(op[2]), float(op[3]))
        # anything else: another rank's line printed into the block; the block ends at "total"
    if "total" not in kinds:
        raise ValueError("the communication block has no 'total' line")
    return kinds


def ratio(measured: float, minimum: float | None) -> float | None:
    if minimum is None:
        return None
    if minimum == 0:
        return 1.0 if measured == 0 else math.inf
    return measured / minimum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                        help=f"comma-separated tpN-ppN-dpN-zeroN (default {DEFAULT_LAYOUTS})")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (>= 2: step 2 is counted)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds each run may take before it is killed")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    if args.steps < 2:
        sys.exit("--steps must be at least 2: the run counts the bytes of its second step")
    layouts = [parse_layout(text) for text in args.layouts.split(",") if text.strip()]

    worst = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, vocab = prepare(work)
        print(f"{'layout':<20} {'kind':<6} {'measured MB':>12} {'minimum MB':>12} {'ratio':>7} {'(logged)':>9}  "
              f"calls and wire MB per step, by op")
        for sizes in layouts:
            name = name_of(sizes)
            started = time.perf_counter()
            out = train(sizes, data, vocab, work / name, args.steps, args.timeout, args.overrides)
            try:
                kinds = parse_report(out)
            except ValueError as e:
                sys.exit(f"{name}: {e}\n{out[-4000:]}")
            expected = {k for k in ("tp", "pp", "dp") if sizes[k] > 1}
            missing = expected - kinds.keys()
            if missing:
                sys.exit(f"{name}: no {', '.join(sorted(missing))} traffic in the report\n{out[-4000:]}")
            for kind, v in kinds.items():
                r = ratio(v["measured"], v["minimum"])
                if r is not None and kind in ("tp", "pp", "dp"):
                    worst = r if worst is None else max(worst, r)
                minimum = f"{v['minimum']:.3f}" if v["minimum"] is not None else "-"
                shown = f"{r:.3f}" if r is not None else "-"
                if kind == "total":
                    detail = f"({nproc(sizes)} ranks, {time.perf_counter() - started:.0f} s)"
                else:
                    detail = ", ".join(f"{op} {calls:g}x {wire:.3f}" for op, (calls, wire) in v["ops"].items())
                print(f"{name:<20} {kind:<6} {v['measured']:12.3f} {minimum:>12} {shown:>7} {v['logged_ratio']:>9}  "
                      f"{detail}", flush=True)
    print(f"layouts={len(layouts)} worst_ratio={worst if worst is not None else float('nan'):.3f}")


if __name__ == "__main__":
    main()
