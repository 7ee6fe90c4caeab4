"""distlm on one GPU: a bf16-vs-fp32 correctness check, then training throughput and MFU of
distlm's variants against a plain PyTorch loop, printed as one table. Run it through run.sh.

    bash benchmarks/gpu/run.sh                 # the H200 run (about 7 minutes; README.md)
    bash benchmarks/gpu/run.sh --dry           # the same code paths on the CPU, tiny sizes (~2 min)
    bash benchmarks/gpu/run.sh --only throughput --sizes 1b --variants distlm+ckpt,distlm+ckpt+compile

1. Correctness: a small llama-style model trained 8 steps by ``distlm train`` in fp32 and in
   bf16 (and bf16 with ``train.compile``; ``--check``), same seed and data, every step logged.
   Any step whose loss differs from fp32's by more than ``--tol`` (relative) fails the run
   (exit 2) before any throughput is measured.
2. Throughput: llama-style models (rope, swiglu, rmsnorm, no bias, untied head, vocab 32000) at
   seq 2048 on synthetic random tokens in distlm's shard format; bf16, ZeRO 1 on one GPU
   (fp32 master weights, fused AdamW). distlm with activation checkpointing off/on x
   ``train.compile`` off/on, and ``benchmarks/plain_loop.py`` (autocast bf16, fp32 weights, fused
   AdamW). Same micro-batch everywhere, no accumulation; the warm-up steps (where compilation
   happens) are excluded; tokens/s from metrics.jsonl as in benchmarks/train_throughput.py.
   MFU = flops_per_token x tokens/s / peak (``distlm.model.flops``, PaLM's count).

Everything goes under ``--out`` (default ``$OUT``, else a new temp folder): ``env.json``,
``results.jsonl`` (one line appended as each measurement finishes, so a run killed part-way
keeps what it finished), ``logs/`` (each subprocess's output), ``runs/`` (each distlm run's
config and metrics.jsonl) and ``table.md``. Data, checkpoints and compile caches stay in
``--work`` (a temp folder, removed at the end), never in ``--out``.

Every subprocess has a hard timeout; a variant that fails or times out is recorded with the
last lines of its output and the next one runs. A variant whose estimated time no longer fits
in ``--budget`` is skipped (status ``skipped``); rerun it with ``--sizes``/``--variants``.
SIGTERM or Ctrl-C stops the running variant and still prints the table of what finished.
The last line is ``key=value`` pairs for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from importlib import metadata, util
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

H200_BF16_PEAK = 989e12  # dense bf16, datasheet (../shared/gpu/README.md)
DRY_PEAK = 1e12  # nominal: a dry run's MFU is a figure against this round number, not a device's


# --------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Size:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    seq_len: int
    vocab: int
    micro: int  # sequences per step, no accumulation
    warmup: int  # excluded steps (compilation happens here)
    steps: int  # timed steps
    log_every: int  # distlm and the plain loop sync the host every log_every steps
    lr: float = 3e-4

    @property
    def total(self) -> int:
        return self.warmup + self.steps


# The H200 sizes. 1b: 18 x 2048, swiglu width 5504 -> 911M in the blocks + a 65.5M untied head =
# 977M non-embedding (printed at start), 1.04B with the token table; 6.77 GFLOP/token at seq 2048.
# 125m: 12 x 768 -> 85M + 24.6M head = 110M non-embedding, 134M in all; 0.88 GFLOP/token.
# Micro-batch 8 x 2048 = 16k tokens a step for both: 1b at 45% MFU (65k tok/s) is 0.25 s a step,
# ~40 GB of activations without checkpointing + 20 bytes/parameter of weights, gradients and
# ZeRO-1 fp32 state: far under the H200's 141 GB, so one micro-batch fits every variant.
GPU_SIZES = {
    "1b": Size("1b", n_layers=18, d_model=2048, n_heads=16, seq_len=2048, vocab=32000, micro=8,
               warmup=10, steps=20, log_every=10),
    "125m": Size("125m", n_layers=12, d_model=768, n_heads=12, seq_len=2048, vocab=32000, micro=8,
                 warmup=10, steps=30, log_every=10),
}
GPU_CHECK = Size("check", n_layers=4, d_model=512, n_heads=8, seq_len=512, vocab=32000, micro=8,
                 warmup=0, steps=8, log_every=1, lr=3e-4)
DRY_SIZES = {
    "tiny": Size("tiny", n_layers=2, d_model=64, n_heads=4, seq_len=64, vocab=512, micro=4,
                 warmup=2, steps=4, log_every=2),
}
DRY_CHECK = Size("check", n_layers=2, d_model=64, n_heads=4, seq_len=64, vocab=512, micro=4,
                 warmup=0, steps=8, log_every=1, lr=3e-3)


@dataclass(frozen=True)
class Variant:
    name: str
    loop: str  # "distlm" or "plain"
    ckpt: bool = False
    compile: bool = False


VARIANTS = {v.name: v for v in (
    Variant("distlm", "distlm"),
    Variant("distlm+ckpt", "distlm", ckpt=True),
    Variant("distlm+compile", "distlm", compile=True),
    Variant("distlm+ckpt+compile", "distlm", ckpt=True, compile=True),
    Variant("plain", "plain"),
    Variant("plain+compile", "plain", compile=True),
)}

# The order of the H200 run, most important first: what the budget cuts is the end of it.
# Seconds each on the H200 (estimates: start-up = python + torch + DeepSpeed imports, NCCL init,
# building the weights on the CPU, ZeRO-1 partitions; then warm-up + timed steps; Inductor's
# compilation of the forward and backward on 16 cores for the compiled ones), and the hard
# timeout is hard_timeout(estimate): 2.5x, at most 90 s over, at least 60 s:
#   1b   distlm+compile        ~120 s  (30 start + 90 compile of one 18-block graph + 30 x 0.22 s)
#   1b   plain                 ~ 30 s  (20 start + 30 x 0.3 s)
#   1b   distlm                ~ 40 s  (30 start + 30 x 0.25 s at 45% MFU = 65k tok/s)
#   125m plain                 ~ 15 s
#   125m distlm                ~ 20 s  (15 start + 40 x 0.04 s)
#   125m distlm+compile        ~ 55 s
#   125m distlm+ckpt           ~ 22 s
#   125m distlm+ckpt+compile   ~ 50 s  (one block graph, reused by all 12)
#   1b   distlm+ckpt           ~ 45 s  (recompute: 30 x 0.33 s)
#   1b   distlm+ckpt+compile   ~ 85 s
#   125m plain+compile         ~ 50 s
#   1b   plain+compile         ~110 s
# With the correctness check (~50 s, its three runs side by side) and writing the data (~5 s),
# the first eight (~410 s) fit the default --budget of 420 s; the last four (1b with activation
# checkpointing, the compiled plain loops) are for a second call (README.md).
GPU_ORDER = [
    ("1b", "plain", 30), ("1b", "distlm", 40), ("1b", "distlm+compile", 120),
    ("125m", "plain", 15), ("125m", "distlm", 20), ("125m", "distlm+compile", 55),
    ("125m", "distlm+ckpt", 22), ("125m", "distlm+ckpt+compile", 50),
    ("1b", "distlm+ckpt", 45), ("1b", "distlm+ckpt+compile", 85),
    ("125m", "plain+compile", 50), ("1b", "plain+compile", 110),
]
GPU_CHECK_ESTIMATE = 50
# On this project's shared 2-core CPU machine: ~20 s a run (imports dominate); compiling costs
# ~25 s more for one block (distlm+ckpt+compile) but 50-110 s for the whole forward and loss
# (distlm+compile, plain+compile). So the dry run's default compiles one variant only, the
# cheapest; the other two run with --variants (the code path in this script is the same).
DRY_ORDER = [("tiny", v, 120 if v in ("distlm+compile", "plain+compile") else 45 if "compile" in v else 25)
             for v in ("distlm", "plain", "distlm+ckpt", "distlm+ckpt+compile", "distlm+compile", "plain+compile")]
DRY_DEFAULT_VARIANTS = ["distlm", "plain", "distlm+ckpt", "distlm+ckpt+compile"]
DRY_CHECK_ESTIMATE = 60
ESTIMATE_FACTOR = 2.5
MAX_OVER_ESTIMATE = 90
MIN_TIMEOUT = 60


def hard_timeout(estimate: float) -> float:
    """A variant stuck in compilation must not eat the budget: the first one (1b distlm+compile,
    ~120 s) gets 210 s, a 20 s one 60 s."""
    return max(MIN_TIMEOUT, min(ESTIMATE_FACTOR * estimate, estimate + MAX_OVER_ESTIMATE))


# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.39%). The loss is an fp32 mean over
# micro x seq tokens of cross-entropies of bf16 logits: rounding errors mostly average out, so
# step 1 differs from fp32 by far less than 0.39% (2e-5 measured). Over the next steps the two
# trajectories drift apart as updates computed from bf16 gradients differ. Measured on the CPU
# with the GPU check's model (4 x 512, vocab 32000; seq 128 there): at lr 3e-4 the loss falls
# 10.46 -> 5.64 in 8 steps and bf16 stays within 0.17% of fp32 at every step; at lr 1e-3 the
# loss spikes (gradient norms 40-50) and the two drift 6% apart by step 8, chaos rather than a
# fault, so the check runs at 3e-4 (3e-3 for the dry run's tiny model: 0.06% apart, 22% fall).
# 2% (5 roundoffs, 10x the drift measured) leaves room for the GPU's other kernels and for
# Inductor's reordered reductions, and stays far below what a real fault does: an update lost,
# applied twice or computed from wrong gradients changes this fast-falling loss by tens of
# percent within 8 steps (--min-drop warns when the loss moved too little to show that).
DEFAULT_TOL = 0.02
DEFAULT_MIN_DROP = 0.10  # the fp32 loss should fall by 10% over the check, or it sees little (a warning)


# --------------------------------------------------------------------------- output


class Out:
    """Everything written for the caller: logs, results.jsonl, the table; flushed as it goes."""

    def __init__(self, path: Path):
        self.path = path
        (path / "logs").mkdir(parents=True, exist_ok=True)
        (path / "runs").mkdir(parents=True, exist_ok=True)
        self.results = path / "results.jsonl"

    def record(self, row: dict) -> None:
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def say(message: str = "") -> None:
    print(message, flush=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------- subprocesses


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`) or Ctrl-C: stop now, keep what finished, print the table."""


_children: set[int] = set()


def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Proc:
    """A subprocess in its own process group, output to a log file, with a hard timeout."""

    name: str
    cmd: list[str]
    log: Path
    timeout: float
    stop_when: Optional[Callable[[], bool]] = None  # True: done, kill it (distlm's final checkpoint save)
    cache: Optional[Path] = None  # this process's own Inductor and Triton caches
    env: dict = field(default_factory=dict)
    started: float = 0.0
    status: str = "running"
    rc: Optional[int] = None

    def start(self) -> "Proc":
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update({"PYTHONUNBUFFERED": "1", **self.env})
        if self.cache is not None:
            # A process killed while compiling (its timeout) can leave a half-written kernel in a
            # shared cache, which the next process with the same kernel then fails to load
            # ("file too short"): every process compiles into a folder of its own.
            env["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache / "inductor")
            env["TRITON_CACHE_DIR"] = str(self.cache / "triton")
        self._file = open(self.log, "w")
        self._file.write("$ " + " ".join(self.cmd) + "\n")
        self._file.flush()
        self.started = time.monotonic()
        self._popen = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._file, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        _children.add(self._popen.pid)
        return self

    def poll(self) -> bool:
        """True once finished (exited, stopped when done, or killed at the timeout)."""
        if self.status != "running":
            return True
        rc = self._popen.poll()
        if rc is not None:
            self._finish("ok" if rc == 0 else f"failed (exit {rc})", rc)
        elif self.stop_when is not None and self.stop_when():
            self._finish("ok", 0)
        elif time.monotonic() - self.started > self.timeout:
            self._finish(f"timeout ({self.timeout:.0f} s)", None)
        return self.status != "running"

    def kill(self, status: str) -> None:
        if self.status == "running":
            self._finish(status, None)

    def _finish(self, status: str, rc: Optional[int]) -> None:
        _kill_group(self._popen.pid)  # its loader workers and compile workers too
        try:
            self._popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _children.discard(self._popen.pid)
        self.status, self.rc = status, rc
        self.seconds = time.monotonic() - self.started
        self._file.close()


def run_all(procs: list[Proc]) -> list[Proc]:
    for p in procs:
        p.start()
    try:
        while not all(p.poll() for p in procs):
            time.sleep(0.25)
    except BaseException:
        for p in procs:
            p.kill("interrupted")
        raise
    return procs


# --------------------------------------------------------------------------- configs and data


def model_overrides(size: Size) -> dict:
    return {"n_layers": size.n_layers, "d_model": size.d_model, "n_heads": size.n_heads,
            "vocab_size": size.vocab, "max_seq_len": size.seq_len, "pos": "rope", "mlp": "swiglu",
            "norm": "rmsnorm", "bias": False, "tie_embeddings": False, "dropout": 0.0}


def write_config(path: Path, size: Size, device: str, precision: str, data: Path, peak: float,
                 lr: float = 3e-4, warmup_steps: Optional[int] = None) -> Path:
    """The YAML both loops read; run.dir, data.path and the variant's switches come as overrides."""
    import yaml

    cfg = {
        "run": {"dir": str(path.parent / "unused-run")},
        # One loader process on the GPU, as a real run has; none in the dry run, whose CPU time
        # goes to imports (a worker imports torch again, ~5 s there).
        "data": {"path": str(data), "num_workers": 1 if device == "cuda" else 0},
        "model": model_overrides(size),
        "parallel": {"zero_stage": 1, "activation_checkpointing": False},
        "train": {"max_steps": size.total, "batch_size": size.micro, "micro_batch_size": size.micro,
                  "seq_len": size.seq_len, "precision": precision, "device": device, "seed": 1337,
                  "log_every": size.log_every, "eval_every": 0, "save_every": 0, "resume": "never",
                  "peak_flops": peak, "compile": False},
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": size.warmup if warmup_steps is None else warmup_steps},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def model_flops(size: Size) -> tuple[int, float]:
    """(non-embedding parameters from Transformer.num_params() on the meta device, FLOPs per token)."""
    import torch

    from distlm.config import ModelConfig
    from distlm.model import Transformer
    from distlm.model.flops import flops_per_token, matmul_params

    cfg = ModelConfig(**model_overrides(size))
    with torch.device("meta"):
        n = Transformer(cfg, seed=0).num_params()
    return n, flops_per_token(cfg, size.seq_len, matmul_params(cfg, n))


def metrics_rows(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if "loss" in row:
                rows[row["step"]] = row
    return rows


def reached(run_dir: Path, step: int) -> Callable[[], bool]:
    """distlm logs its last step and then saves a checkpoint it cannot be told to skip (14 GB at
    1b): the benchmark stops it as soon as the last step's metrics row is on disk."""
    path = run_dir / "metrics.jsonl"

    def check() -> bool:
        if not path.exists():
            return False
        return step in metrics_rows(run_dir)
    return check


def keep_run_files(run_dir: Path, dest: Path) -> None:
    """Copy the small files of a run into --out, then delete the run (its checkpoints are large)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "config.yaml"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, dest / name)
    shutil.rmtree(run_dir, ignore_errors=True)


def distlm_cmd(py: str, config: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    return [py, "-m", "distlm", "train", str(config), f"run.dir={run_dir}", *overrides]


# --------------------------------------------------------------------------- environment


def environment(dry: bool) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   device_memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    else:
        env["device"] = "cpu"
    for package in ("deepspeed", "triton", "numpy", "pydantic", "webdataset", "zstandard"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    env["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--short"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout
        env["uncommitted_files"] = len(dirty.splitlines())
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    env["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    env["dry"] = dry
    return env


# What `distlm train` and DeepSpeed import; checked before any run (a missing wheel costs seconds
# here instead of a failed run per variant).
NEEDED_MODULES = ("yaml", "numpy", "zstandard", "webdataset", "deepspeed", "pydantic", "hjson", "psutil",
                  "msgpack", "einops", "tqdm", "packaging")


def missing_modules() -> list[str]:
    missing = [m for m in NEEDED_MODULES if util.find_spec(m) is None]
    if not missing:  # present is not enough: a wheel built against other versions fails on import
        probe = subprocess.run([sys.executable, "-c", "import deepspeed, distlm.train.loop"], capture_output=True,
                               text=True, timeout=300)
        if probe.returncode != 0:
            missing.append("(import of deepspeed and distlm.train.loop failed: "
                           + (probe.stderr.strip().splitlines() or ["?"])[-1] + ")")
    return missing


# --------------------------------------------------------------------------- correctness


def correctness(args, out: Out, work: Path, check: Size, device: str) -> dict:
    """fp32 vs each of ``args.check`` (bf16, bf16+compile, fp32+compile), side by side; per-step losses."""
    from synthdata import write_random_dataset

    data = write_random_dataset(work / "data-check", vocab_size=check.vocab, seq_len=check.seq_len,
                                rows=max(4 * check.micro * check.total, 64), seed=1, learnable=True)
    runs = {"fp32": ("fp32", False)}
    for name in args.check:
        precision, _, compiled = name.partition("+")
        runs[name] = (precision, compiled == "compile")
    procs = []
    t0 = time.monotonic()
    for name, (precision, compiled) in runs.items():
        config = write_config(out.path / "configs" / f"check-{name}.yaml", check, device, precision, data,
                              peak=args.peak, lr=check.lr, warmup_steps=2)
        run_dir = work / "runs" / f"check-{name}"
        command = distlm_cmd(args.python, config, run_dir, [f"train.compile={str(compiled).lower()}"])
        procs.append(Proc(f"check-{name}", command,
                          out.path / "logs" / f"check-{name}.log", timeout=args.check_timeout,
                          stop_when=reached(run_dir, check.total), cache=work / "cache" / f"check-{name}"))
    say(f"correctness: {check.n_layers} layers x d_model {check.d_model}, seq {check.seq_len}, vocab {check.vocab}, "
        f"micro-batch {check.micro}, {check.total} steps; fp32 vs {', '.join(args.check)} (side by side)")
    try:
        run_all(procs)
    finally:
        losses = {}
        for p in procs:
            name = p.name.removeprefix("check-")
            run_dir = work / "runs" / p.name
            rows = metrics_rows(run_dir)
            losses[name] = [rows[s]["loss"] if s in rows else None for s in range(1, check.total + 1)]
            keep_run_files(run_dir, out.path / "runs" / p.name)
    result = {"kind": "correctness", "tol": args.tol, "min_drop": args.min_drop, "losses": losses,
              "seconds": round(time.monotonic() - t0, 1), "runs": {p.name: p.status for p in procs}}
    # Only the eager runs decide whether anything is measured: a compiled run that fails (the
    # first torch.compile on the lent machine: Triton, gcc, Python.h) costs the compiled rows,
    # which are then skipped, not the whole run.
    problems, compile_problems = [], []
    for p in procs:
        name = p.name.removeprefix("check-")
        if p.status != "ok" or None in losses[name]:
            (compile_problems if "compile" in name else problems).append(
                f"{p.name}: {p.status}, {sum(x is not None for x in losses[name])}/{check.total} steps logged\n"
                f"{tail(p.log)}")
    ref = losses["fp32"]
    worst = {}
    if not problems:
        for name in args.check:
            if None in losses[name]:
                continue  # already a compile problem
            diffs = [abs(a - b) / abs(b) if a is not None and b is not None and math.isfinite(a) else math.inf
                     for a, b in zip(losses[name], ref)]
            step = max(range(len(diffs)), key=lambda i: diffs[i])
            worst[name] = {"max_rel_diff": diffs[step], "at_step": step + 1}
            if diffs[step] > args.tol:
                (compile_problems if "compile" in name else problems).append(f"{name}: step {step + 1} loss {losses[name][step]:.5f} vs fp32 {ref[step]:.5f}: "
                                f"relative difference {diffs[step]:.2e} > tolerance {args.tol:g}")
        drop = 1 - ref[-1] / ref[0]
        result["fp32_drop"] = drop
        # A warning, not a failure: a flat loss says the check was weak, not that bf16 is wrong,
        # and must not cost the lent GPU's throughput runs.
        result["weak"] = drop < args.min_drop
    result["worst"] = worst
    result["status"] = "ok" if not problems else "failed"
    result["problems"] = problems
    result["compile_problems"] = compile_problems
    out.record(result)
    say("  step  " + "  ".join(f"{name:>14}" for name in losses))
    for s in range(check.total):
        say(f"  {s + 1:4d}  " + "  ".join(f"{losses[n][s]:14.6f}" if losses[n][s] is not None else f"{'-':>14}"
                                         for n in losses))
    for name, w in worst.items():
        say(f"  {name} vs fp32: max relative difference {w['max_rel_diff']:.2e} at step {w['at_step']} "
            f"(tolerance {args.tol:g})")
    if "fp32_drop" in result:
        say(f"  fp32 loss fell {100 * result['fp32_drop']:.1f}% over the check" +
            (f": WARNING, under {100 * args.min_drop:.0f}%, too little for the check to tell a broken update "
             f"from a working one" if result["weak"] else f" (at least {100 * args.min_drop:.0f}% wanted: it can "
             f"tell a broken update from a working one)"))
    for problem in problems:
        say(f"CORRECTNESS FAILED: {problem}")
    for problem in compile_problems:
        say(f"COMPILED CHECK FAILED (the compiled variants are skipped): {problem}")
    say(f"correctness: {result['status']} ({result['seconds']:.0f} s)")
    return result


# --------------------------------------------------------------------------- throughput


def throughput(args, out: Out, work: Path, size: Size, variant: Variant, data: Path, config: Path,
               flops: float, timeout: float) -> dict:
    name = f"{size.name}-{variant.name}"
    log = out.path / "logs" / f"{name}.log"
    row = {"kind": "throughput", "size": size.name, "variant": variant.name, "micro_batch": size.micro,
           "seq_len": size.seq_len, "warmup": size.warmup, "steps": size.steps, "flops_per_token": flops,
           "peak_flops": args.peak, "peak_is_nominal": args.dry, "timeout_s": round(timeout)}
    if variant.loop == "distlm":
        run_dir = work / "runs" / name
        overrides = [f"parallel.activation_checkpointing={str(variant.ckpt).lower()}",
                     f"train.compile={str(variant.compile).lower()}"]
        proc = Proc(name, distlm_cmd(args.python, config, run_dir, overrides), log, timeout,
                    stop_when=reached(run_dir, size.total), cache=work / "cache" / name)
        try:
            run_all([proc])
        finally:
            rows = metrics_rows(run_dir)
            keep_run_files(run_dir, out.path / "runs" / name)
        if proc.status == "ok" and size.warmup in rows and size.total in rows:
            first, last = rows[size.warmup], rows[size.total]
            row["tokens_per_s"] = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
            row["mem_bytes"] = max(r.get("mem_bytes") or 0 for r in rows.values()) or None
            row["final_loss"] = last["loss"]
            row["distlm_mfu"] = last.get("mfu")  # distlm's own figure for the last interval
        elif proc.status == "ok":
            proc.status = f"failed (metrics rows {sorted(rows)})"
    else:
        cmd = [args.python, "benchmarks/plain_loop.py", str(config), "--tokens", str(data / "tokens.npy"),
               "--steps", str(size.steps), "--warmup", str(size.warmup), "--log-every", str(size.log_every),
               "--device", args.device, "--precision", args.precision] + (["--compile"] if variant.compile else [])
        proc = Proc(name, cmd, log, timeout, cache=work / "cache" / name)
        run_all([proc])
        if proc.status == "ok":
            try:
                result = _last_json(log.read_text())
                row["tokens_per_s"] = result["tokens_per_s"]
                row["mem_bytes"] = result.get("mem_bytes")
                row["final_loss"] = result.get("final_loss")
            except (ValueError, KeyError, IndexError):
                proc.status = "failed (no JSON result)"
    row["status"] = proc.status
    row["wall_s"] = round(proc.seconds, 1)
    if "tokens_per_s" in row:
        row["mfu"] = flops * row["tokens_per_s"] / args.peak
        if not (row.get("final_loss") is not None and math.isfinite(row["final_loss"])):
            row["status"] = "failed (loss not finite)"
    if row["status"] != "ok":
        row["error_tail"] = tail(log)
    out.record(row)
    if row["status"] == "ok":
        mem = f", peak {row['mem_bytes'] / 2**30:.1f} GiB" if row.get("mem_bytes") else ""
        say(f"  {name}: {row['tokens_per_s']:,.0f} tok/s, MFU {100 * row['mfu']:.1f}%{mem}, "
            f"final loss {row['final_loss']:.3f} ({row['wall_s']:.0f} s)")
    else:
        say(f"  {name}: {row['status']} after {row['wall_s']:.0f} s; last lines of {log.name}:")
        for line in row["error_tail"].splitlines():
            say(f"    | {line}")
    return row


# --------------------------------------------------------------------------- the table


def table(rows: list[dict], args) -> list[str]:
    plain = {r["size"]: r["tokens_per_s"] for r in rows if r["variant"] == "plain" and r.get("tokens_per_s")}
    lines = ["| size | variant | tokens/s | MFU % | vs plain | peak GiB | status |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = r.get("tokens_per_s")
        ratio = f"{tps / plain[r['size']]:.3f}" if tps and r["size"] in plain else "-"
        mem = f"{r['mem_bytes'] / 2**30:.2f}" if r.get("mem_bytes") else "-"
        figures = f"{tps:.0f} | {100 * r['mfu']:.2f} | {ratio} | {mem}" if tps else "- | - | - | -"
        lines.append(f"| {r['size']} | {r['variant']} | {figures} | {r['status']} |")
    return lines


def summary(check: Optional[dict], rows: list[dict], args, started: float) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"].startswith(("skipped", "interrupted"))]  # not run
    parts = [f"correctness={check['status'] if check else 'not-run'}", f"rows={len(rows)}", f"ok={len(ok)}",
             f"failed={len(rows) - len(ok) - len(skipped)}", f"skipped={len(skipped)}"]
    for size in dict.fromkeys(r["size"] for r in rows):
        # The best distlm variant, and the plain loop, of each size (MFU in percent of --peak).
        mine = [r for r in ok if r["size"] == size and r["variant"].startswith("distlm")]
        best = max(mine, key=lambda r: r["mfu"], default=None)
        plain = next((r for r in ok if r["size"] == size and r["variant"] == "plain"), None)
        parts.append(f"best_mfu_pct_{size}=" + (f"{100 * best['mfu']:.2f}" if best else "-"))
        parts.append(f"best_variant_{size}=" + (best["variant"] if best else "-"))
        parts.append(f"plain_mfu_pct_{size}=" + (f"{100 * plain['mfu']:.2f}" if plain else "-"))
    parts += [f"peak_flops={args.peak:g}", f"nominal_peak={int(args.dry)}", f"dry={int(args.dry)}",
              f"wall_s={time.monotonic() - started:.0f}"]
    return " ".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true",
                        help="the same code paths on the CPU: tiny sizes, a nominal peak, a few steps")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else a temp folder)")
    parser.add_argument("--work", type=Path, default=None, help="data and runs (default a temp folder, removed)")
    parser.add_argument("--only", default="correctness,throughput",
                        help="comma list of: correctness, throughput (default both)")
    parser.add_argument("--sizes", default=None, help="comma list (default: 1b,125m; dry: tiny)")
    parser.add_argument("--variants", default=None,
                        help=f"comma list of {', '.join(VARIANTS)} "
                             f"(default all; dry: {','.join(DRY_DEFAULT_VARIANTS)})")
    parser.add_argument("--check", default=None,
                        help="what the fp32 run is compared with: comma list of bf16, bf16+compile, fp32+compile "
                             "(dry default: bf16)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="largest relative loss difference per step")
    parser.add_argument("--min-drop", type=float, default=DEFAULT_MIN_DROP,
                        help="warn when the fp32 check loss falls by less than this fraction (a weak check)")
    parser.add_argument("--peak", type=float, default=None,
                        help=f"peak FLOP/s for MFU (default {H200_BF16_PEAK:g}, H200 dense bf16; "
                             f"dry: {DRY_PEAK:g} nominal)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 420; dry 900): a variant whose estimate no "
                             "longer fits is skipped, and none runs past it")
    parser.add_argument("--warmup", type=int, default=None, help="override every size's warm-up steps")
    parser.add_argument("--steps", type=int, default=None, help="override every size's timed steps")
    parser.add_argument("--micro-batch", type=int, default=None, help="override every size's micro-batch")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the subprocesses")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    if not args.only <= {"correctness", "throughput"}:
        parser.error("--only takes correctness and/or throughput")
    args.device = "cpu" if args.dry else "cuda"
    args.precision = "bf16"
    args.peak = args.peak or (DRY_PEAK if args.dry else H200_BF16_PEAK)
    args.budget = args.budget or (900.0 if args.dry else 420.0)
    args.check = [c for c in (args.check or ("bf16" if args.dry else "bf16,bf16+compile")).split(",") if c]
    for c in args.check:
        if c not in ("bf16", "bf16+compile", "fp32+compile"):
            parser.error(f"--check: unknown {c!r}")
    sizes = DRY_SIZES if args.dry else GPU_SIZES
    args.sizes = args.sizes.split(",") if args.sizes else list(sizes)
    for s in args.sizes:
        if s not in sizes:
            parser.error(f"--sizes: unknown {s!r}; {'dry' if args.dry else 'GPU'} sizes are {', '.join(sizes)}")
    default_variants = DRY_DEFAULT_VARIANTS if args.dry else list(VARIANTS)
    args.variants = args.variants.split(",") if args.variants else default_variants
    for v in args.variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    if (args.warmup is not None and args.warmup < 1) or (args.steps is not None and args.steps < 1):
        parser.error("--warmup and --steps must be at least 1 (the timing starts at the warm-up's last logged step)")
    args.check_timeout = hard_timeout(DRY_CHECK_ESTIMATE if args.dry else GPU_CHECK_ESTIMATE)
    return args


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    out = Out(out_dir if out_dir else Path(tempfile.mkdtemp(prefix="distlm-gpu-bench-")))
    env = environment(args.dry)
    (out.path / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    say("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    missing = missing_modules()
    if missing:
        say(f"MISSING MODULES: {', '.join(missing)}: install their wheels (README.md: fetch-extra-wheels.sh)")
        say(f"correctness=not-run rows=0 missing={','.join(missing)}")
        return 3
    if not args.dry and not env["cuda_available"]:
        say("no CUDA device: this is the GPU benchmark; use --dry for the CPU dry run")
        say("correctness=not-run rows=0 no_cuda=1")
        return 3
    work = args.work or Path(tempfile.mkdtemp(prefix="distlm-gpu-work-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"results in {out.path} (results.jsonl grows as each measurement finishes); work folder {work}")

    sizes = {s: DRY_SIZES[s] if args.dry else GPU_SIZES[s] for s in args.sizes}
    sizes = {k: replace(s, **{f: v for f, v in (("warmup", args.warmup), ("steps", args.steps),
                                                ("micro", args.micro_batch)) if v is not None})
             for k, s in sizes.items()}
    # Both loops log (a host sync) every log_every steps; the first and last timed steps must be logged ones.
    sizes = {k: s if not (s.warmup % s.log_every or s.steps % s.log_every)
             else replace(s, log_every=math.gcd(s.warmup, s.steps) or s.steps) for k, s in sizes.items()}
    order = [(s, v, est) for s, v, est in (DRY_ORDER if args.dry else GPU_ORDER)
             if s in sizes and v in args.variants]
    check_result, rows, interrupted = None, [], False
    deadline = started + args.budget
    try:
        if "correctness" in args.only:
            check_result = correctness(args, out, work, DRY_CHECK if args.dry else GPU_CHECK, args.device)
            if check_result["status"] != "ok":
                say(summary(check_result, rows, args, started))
                return 2
            if check_result["compile_problems"]:
                for s, v, _ in [entry for entry in order if VARIANTS[entry[1]].compile]:
                    row = {"kind": "throughput", "size": s, "variant": v, "status": "skipped (compiled check failed)"}
                    out.record(row)
                    rows.append(row)
                order = [entry for entry in order if not VARIANTS[entry[1]].compile]
        if "throughput" in args.only:
            from synthdata import write_random_dataset

            data, configs, flops = {}, {}, {}
            for name, size in sizes.items():
                rows_needed = max(2 * size.micro * size.total, 64)
                data[name] = write_random_dataset(work / f"data-{name}", vocab_size=size.vocab, seq_len=size.seq_len,
                                                  rows=rows_needed, seed=2)
                configs[name] = write_config(out.path / "configs" / f"{name}.yaml", size, args.device, args.precision,
                                             data[name], peak=args.peak, lr=size.lr)
                n, flops[name] = model_flops(size)
                say(f"size {name}: {size.n_layers} layers x d_model {size.d_model}, {size.n_heads} heads, seq "
                    f"{size.seq_len}, vocab {size.vocab}: {n:,} non-embedding parameters (Transformer.num_params() "
                    f"on the meta device), {flops[name] / 1e9:.3f} GFLOP/token; micro-batch {size.micro}, "
                    f"warm-up {size.warmup} + {size.steps} timed steps")
            peak_note = ("NOMINAL peak for the dry run, not a device figure" if args.dry
                         else "dense bf16 peak" + (" (H200 datasheet)" if args.peak == H200_BF16_PEAK else ""))
            say(f"throughput: bf16, ZeRO 1, one {args.device} device; MFU against {args.peak:g} FLOP/s ({peak_note})")
            for i, (size_name, variant_name, estimate) in enumerate(order):
                left = deadline - time.monotonic()
                if left < estimate:
                    for s, v, _ in order[i:]:
                        row = {"kind": "throughput", "size": s, "variant": v,
                               "status": f"skipped (budget: {max(left, 0):.0f} s left)"}
                        out.record(row)
                        rows.append(row)
                    say(f"  budget: {max(left, 0):.0f} s left of {args.budget:.0f}; skipped the last {len(order) - i} "
                        f"variants (rerun them with --only throughput --sizes/--variants)")
                    break
                timeout = min(hard_timeout(estimate), left)
                rows.append(throughput(args, out, work, sizes[size_name], VARIANTS[variant_name], data[size_name],
                                       configs[size_name], flops[size_name], timeout))
    except Interrupted as e:
        say(f"interrupted ({e}): the table holds what finished")
        interrupted = True
        done = {(r["size"], r["variant"]) for r in rows}
        for s, v, _ in order:
            if (s, v) not in done:
                row = {"kind": "throughput", "size": s, "variant": v, "status": "interrupted"}
                out.record(row)
                rows.append(row)
    finally:
        for pid in list(_children):
            _kill_group(pid)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    lines = table(rows, args)
    note = (f"MFU % against a NOMINAL peak of {args.peak:g} FLOP/s (dry run on the CPU: not a device figure)"
            if args.dry else f"MFU % against {args.peak:g} FLOP/s; vs plain = tokens/s / the plain loop's of that size")
    (out.path / "table.md").write_text("\n".join([note, "", *lines]) + "\n")
    say()
    say(note)
    for line in lines:
        say(line)
    line = summary(check_result, rows, args, started)
    say(line)
    if check_result is not None and check_result["status"] != "ok":
        return 2
    return 124 if interrupted else 0


def _last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (stderr shares the log: warnings may follow it)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("no JSON line")


if __name__ == "__main__":
    sys.exit(main())
