"""Where a training step's time goes: forward, backward, optimizer, communication, data wait, other.

Builds the real pieces in each process the way ``distlm/train/loop.py`` (``train`` and
``_train``) does - config (``validate``, ``resolve_from_data``), ``init_distributed``,
``Layout``/``ParallelGroups``, ``seed_random``, ``build_model``, ``build_engine`` with a
``StepGuard`` attached, ``train_stream`` + ``make_loader`` on shards prepared once - and then
runs the micro-batch loop of ``distlm/train/step.py`` (``train_step``, plain engine) with a clock
around each phase. Per step:

* data wait: the step's ``next(loader)`` calls and the copies to the device;
* forward: ``engine(tokens, targets)``;
* backward: ``engine.backward(loss)``;
* optimizer: ``engine.step()`` (DeepSpeed's clipping, the update, zeroing the gradients);
* communication: the time spent inside torch.distributed collectives during the step, whichever
  phase issued them (DeepSpeed's gradient reduction in backward, ZeRO's all-gather of the
  updated weights in the step, tensor-parallel all-reduces in forward and backward);
* other: the rest of the step's wall time (learning-rate setting, the guard, the loss stack).

Forward, backward and optimizer are reported without the communication inside them, and what
each contained is listed as "of which communication". The figures are medians over ``--steps``
steps after ``--warmup``; ``sum_ratio`` is the sum of the median parts over the median step wall
time, a check that the split accounts for the whole step (it is 1 for any single step, since
"other" is the remainder; medians make it only approximately 1). Rank 0 prints its own figures
and, with more than one rank, the largest of each over all ranks. The last line is
``step_ms=... forward_ms=... backward_ms=... optimizer_ms=... comm_ms=... data_ms=... other_ms=... sum_ratio=...``
(rank 0's medians). On a shared machine the other processes' time slices land in one phase of
one step and another of the next: each part's median leaves them out, the median step does not,
so ``sum_ratio`` falls below 1 by about the share of the step lost to them (steps of a few ms
suffer most; a bigger model or more steps steadies it). With several ranks, a collective's time
includes waiting for the slowest rank to arrive: communication there is "time blocked in
collectives", transfer and skew together.

Collectives are timed by wrapping the Python functions of torch.distributed (the public and
``distributed_c10d`` names, aliases imported by name in DeepSpeed and distlm modules, and the two
DeepSpeed keeps on its comm backend object: the sites ``distlm.parallel.comms.CommsCounter``
patches), restored when the steps are done; only the outermost call of nested collectives
counts. An asynchronous collective (``async_op=True``) counts only its launch: its wait falls in
the phase that waits (none of the paths with pp = 1 and ZeRO 0-2 uses one; ZeRO 3 does, and the
script says how many it saw). On CUDA the device is synchronized between phases and around every
collective, so kernels are charged to the phase that queued them; that removes any overlap of
communication with compute, so GPU figures are a no-overlap split.

Only pp = 1: the pipeline engine runs the whole 1F1B schedule inside ``train_batch``, where its
forward, backward, sends and step cannot be told apart from outside (out of scope here).
Also left out, as not part of the step itself: the loop's per-step preemption agreement (one
small all-reduce), logging, the gradient-norm read of logged steps, checkpoints and evaluation.

    python benchmarks/step_split.py [--config configs/shakespeare-char-cpu.yaml] [--steps 50] [--warmup 10]
        [--nproc N [--tp T]] [--timeout 600] [OVERRIDES ...]

With ``--nproc N`` the script starts itself under torchrun (gloo on the CPU, NCCL on GPUs) with N
processes: dp = N / tp. The default config is tiny Shakespeare's char-level recipe on
../shared/data/tinyshakespeare.txt; without that file, the same small model on the Python
standard library's .py files (byte level).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from harness import prepare_small, run_group

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "backward", "optimizer")
PARTS = ("forward", "backward", "optimizer", "comm", "data", "other")
LABELS = {"forward": "forward (excl. comm)", "backward": "backward (excl. comm)",
          "optimizer": "optimizer (excl. comm)", "comm": "communication", "data": "data wait",
          "other": "other"}
# Point-to-point ops only run between pipeline stages (pp > 1, out of scope); torch compares
# isend/irecv by identity in P2POp, so they are left alone.
_P2P = frozenset({"send", "recv", "isend", "irecv", "batch_isend_irecv"})
# Names torch's own code compares by identity inside distributed_c10d (as in parallel.comms).
_IDENTITY_SENSITIVE = frozenset({"all_reduce", "all_gather_single", "reduce_scatter_single", "isend", "irecv"})
_SCAN_PREFIXES = ("deepspeed", "distlm")


# ---------------------------------------------------------------------------- launching


def launch(args: argparse.Namespace, data: Path) -> None:
    """Start this script under torchrun with ``--nproc`` processes; print their output, the summary last."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(Path(__file__).resolve()), "--config", args.config, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--tp", str(args.tp), "--data", str(data), *args.overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = run_group(cmd, env, args.timeout, f"torchrun with {args.nproc} processes (--timeout)")
    lines = out.rstrip("\n").splitlines()
    summary = [line for line in lines if line.startswith("step_ms=")]
    for line in lines:
        if not line.startswith("step_ms="):
            print(line)
    if len(summary) != 1:
        sys.exit(f"expected one summary line from rank 0, got {len(summary)}")
    print(summary[0])


# ---------------------------------------------------------------------------- timing


def device_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CommClock:
    """Seconds spent inside torch.distributed collectives while started (outermost calls only)."""

    def __init__(self, device):
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self.async_calls = 0
        self._tls = threading.local()
        self._patched: list = []  # (owner, attribute, original, wrapper)

    def _wrap(self, name: str, orig):
        clock = self

        @functools.wraps(orig)
        def timed(*args, **kwargs):
            tls = clock._tls
            if getattr(tls, "depth", 0):
                return orig(*args, **kwargs)
            tls.depth = 1
            try:
                device_sync(clock.device)
                start = time.perf_counter()
                result = orig(*args, **kwargs)
                device_sync(clock.device)
                clock.seconds += time.perf_counter() - start
                clock.calls += 1
                if kwargs.get("async_op") or (result is not None and hasattr(result, "wait")):
                    clock.async_calls += 1
                return result
            finally:
                tls.depth = 0

        return timed

    def start(self) -> None:
        import torch.distributed as dist
        from distlm.parallel.comms import OPS

        c10d = dist.distributed_c10d
        wrappers: dict[int, object] = {}  # id(original) -> its one wrapper
        by_id: dict[int, str] = {}
        names = [n for n in OPS if n not in _P2P]
        for name in names:
            for mod in (c10d, dist):
                fn = getattr(mod, name, None)
                if callable(fn):
                    by_id.setdefault(id(fn), name)

        def patch(owner, attr, value) -> None:
            name = by_id.get(id(value))
            if name is None:
                return
            w = wrappers.get(id(value))
            if w is None:
                w = wrappers[id(value)] = self._wrap(name, value)
            setattr(owner, attr, w)
            self._patched.append((owner, attr, value, w))

        for name in names:
            if hasattr(dist, name):
                patch(dist, name, getattr(dist, name))
            if name not in _IDENTITY_SENSITIVE and hasattr(c10d, name):
                patch(c10d, name, getattr(c10d, name))
        targets = [mod for modname, mod in list(sys.modules.items())
                   if mod is not None and modname.startswith(_SCAN_PREFIXES)]
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        cdb = getattr(ds_comm, "cdb", None) if ds_comm is not None else None
        if cdb is not None and hasattr(cdb, "__dict__"):
            targets.append(cdb)  # all_gather_function / reduce_scatter_function: instance attributes
        for owner in targets:
            try:
                items = list(vars(owner).items())
            except TypeError:
                continue
            for attr, value in items:
                if callable(value) and id(value) in by_id:
                    patch(owner, attr, value)

    def stop(self) -> None:
        for owner, attr, orig, w in reversed(self._patched):
            if getattr(owner, attr, None) is w:
                setattr(owner, attr, orig)
        self._patched.clear()


class StepClock:
    """Per phase of one step: wall seconds and the collective seconds inside them."""

    def __init__(self, comm: CommClock, device):
        self.comm, self.device = comm, device
        self.wall = {p: 0.0 for p in PHASES}
        self.comm_in = {p: 0.0 for p in PHASES}

    @contextlib.contextmanager
    def phase(self, name: str):
        comm0, t0 = self.comm.seconds, time.perf_counter()
        try:
            yield
        finally:
            device_sync(self.device)
            self.wall[name] += time.perf_counter() - t0
            self.comm_in[name] += self.comm.seconds - comm0


# ---------------------------------------------------------------------------- the steps


def worker(args: argparse.Namespace) -> None:
    import torch

    from distlm.config import load_config
    from distlm.data import make_loader
    from distlm.fault.bad_steps import StepGuard
    from distlm.model import parameter_groups
    from distlm.parallel.distributed import all_gather_objects, shutdown_distributed
    from distlm.parallel.layout import ParallelGroups
    from distlm.train.data import ResumePlan, align_skipped_rows, train_stream
    from distlm.train.engine import build_engine, set_learning_rate
    from distlm.train.loop import start_process
    from distlm.train.parallelize import build_model, seed_random
    from distlm.train.schedule import learning_rate
    from distlm.train.step import valid_token_weights

    # As loop.train: DeepSpeed 0.19.8 calls collectives that torch 2.13 renamed.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single", category=FutureWarning)
    overrides = [*args.overrides, f"data.path={args.data}", f"parallel.tp={args.tp}"]
    cfg = load_config(args.config, overrides)
    if cfg.parallel.pp != 1:
        sys.exit("step_split times the plain engine only (parallel.pp=1): the pipeline engine runs its whole "
                 "schedule inside train_batch")
    if cfg.model.vocab_size is None and args.tp > 1:  # tensor parallelism cuts the vocabulary
        from distlm.data import load_manifest

        cfg.model.vocab_size = -(-load_manifest(args.data).vocab_size // args.tp) * args.tp
    cfg, batch, _, layout, ctx, _ = start_process(cfg)  # as distlm train starts
    say = print if ctx.is_main else (lambda *_a, **_k: None)
    groups = ParallelGroups(layout, ctx.rank)
    rng = seed_random(cfg.train.seed, groups, ctx.device)
    model = build_model(cfg, groups, rng)
    if cfg.train.compile:  # as loop._train
        from distlm.train.compile import compile_for_training

        compile_for_training(model, cfg.model.dropout, say)
    guard = StepGuard(cfg.fault.spike_factor, cfg.fault.spike_window)  # as the Supervisor builds it
    engine = build_engine(model, parameter_groups(model, cfg.optim.weight_decay, cfg.optim.decay_embeddings),
                          cfg, batch, ctx.device, groups.mpu, guard=guard)
    stream = train_stream(cfg, batch, groups.coords.dp_rank, 0, ResumePlan(), contiguous=ctx.device.type == "cuda")
    batches = iter(make_loader(stream, cfg.data.num_workers, pin_memory=ctx.device.type == "cuda"))
    device = ctx.device
    say(f"config={args.config} | {layout.describe()} | ZeRO {cfg.parallel.zero_stage} | {cfg.train.precision} on "
        f"{device.type} | dp {batch.dp} x micro-batch {batch.micro_batch_size} x accumulation {batch.grad_accum} "
        f"= {batch.global_batch} sequences of {cfg.train.seq_len} | torch threads {torch.get_num_threads()} | "
        f"{args.steps} steps after {args.warmup}", flush=True)

    comm = CommClock(device)
    rows = []  # per measured step: wall, per-phase wall and comm, comm outside the phases
    comm.start()
    try:
        for step in range(args.warmup + args.steps):
            clock = StepClock(comm, device)
            device_sync(device)
            comm_at_start, started = comm.seconds, time.perf_counter()
            # ---- as loop._train and step.train_step (plain engine), phase by phase
            set_learning_rate(engine, learning_rate(step, cfg.optim, cfg.train.max_steps))
            with clock.phase("data"):
                micro_batches = [next(batches) for _ in range(batch.grad_accum)]
                if cfg.data.on_error == "skip" and groups.replica_group is not None:
                    micro_batches = align_skipped_rows(micro_batches, groups.replica_group, device)
                on_device = [(tokens.to(device, non_blocking=True), targets.to(device, non_blocking=True))
                             for tokens, targets, *_ in micro_batches]
            weights = valid_token_weights(micro_batches)
            guard.begin_step()
            losses = []
            for i, ((tokens, targets), weight) in enumerate(zip(on_device, weights)):
                with clock.phase("forward"):
                    mb_loss = engine(tokens, targets)
                with clock.phase("backward"):
                    engine.backward(mb_loss * weight if weight != 1.0 else mb_loss)
                losses.append(mb_loss.detach() * weight)
                if i == len(on_device) - 1:
                    step_loss = torch.stack(losses).float().mean()
                    guard.local_loss = lambda: step_loss
                with clock.phase("optimizer"):
                    engine.step()
            torch.stack(losses).float().mean()
            guard.end_step()
            device_sync(device)
            wall = time.perf_counter() - started
            if step >= args.warmup:
                rows.append((wall, dict(clock.wall), dict(clock.comm_in), comm.seconds - comm_at_start))
    finally:
        comm.stop()

    medians, comm_in = split(rows)
    everyone = all_gather_objects(medians)
    if ctx.is_main:
        report(medians, comm_in, everyone, comm)
    shutdown_distributed()


def split(rows: list) -> tuple[dict, dict]:
    """Medians (ms) of each exclusive part, the step and the coverage; and of the comm inside each phase."""
    per_step = {part: [] for part in (*PARTS, "step", "timed")}
    comm_in = {p: [] for p in PHASES}
    for wall, phase_wall, phase_comm, comm_total in rows:
        parts = {p: phase_wall[p] - phase_comm[p] for p in PHASES}
        parts["comm"] = comm_total
        parts["other"] = wall - sum(parts.values())
        for part, seconds in parts.items():
            per_step[part].append(1e3 * seconds)
        per_step["step"].append(1e3 * wall)
        per_step["timed"].append(1 - parts["other"] / wall)  # share of the step inside a timed phase
        for p in PHASES:
            comm_in[p].append(1e3 * phase_comm[p])
    medians = {k: statistics.median(v) for k, v in per_step.items()}
    medians["sum_ratio"] = sum(medians[p] for p in PARTS) / medians["step"]
    return medians, {p: statistics.median(v) for p, v in comm_in.items()}


def report(medians: dict, comm_in: dict, everyone: list, comm: CommClock) -> None:
    many = len(everyone) > 1
    step = medians["step"]
    print(f"{'part (median over steps)':<26} {'ms/step':>9} {'% of step':>10}"
          + (f" {'max over ranks ms':>18}" if many else ""))
    for part in (*PARTS, "step"):
        label = LABELS.get(part, "step (wall)")
        line = f"{label:<26} {medians[part]:9.3f} {100 * medians[part] / step:9.1f}%"
        if many:
            line += f" {max(m[part] for m in everyone):18.3f}"
        print(line)
    print("of which communication (ms/step, median): "
          + ", ".join(f"{p} {comm_in[p]:.3f}" for p in ("forward", "backward", "optimizer", "data")))
    print(f"collective calls timed: {comm.calls} ({comm.async_calls} asynchronous: their wait is not in comm)"
          f" | share of the step inside a timed phase: {medians['timed']:.3f}")
    print(f"sum of the parts / step wall time: {medians['sum_ratio']:.3f}"
          + (f" (max over ranks of the step: {max(m['step'] for m in everyone):.3f} ms)" if many else ""))
    print(f"step_ms={step:.3f} " + " ".join(f"{p}_ms={medians[p]:.3f}" for p in PARTS)
          + f" sum_ratio={medians['sum_ratio']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shakespeare-char-cpu.yaml")
    parser.add_argument("--steps", type=int, default=50, help="measured steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps run first and not measured")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun, one host); dp = nproc / tp")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (parallel.tp)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the torchrun job may take (--nproc > 1)")
    parser.add_argument("--data", help="prepared shards to read (default: prepared here, once)")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        sys.exit("--steps must be at least 1 and --warmup at least 0")
    under_launcher = "LOCAL_RANK" in os.environ
    if under_launcher and not args.data:
        sys.exit("started by a launcher without --data: use --nproc, which prepares the data once and starts torchrun")
    if under_launcher or (args.nproc == 1 and args.data):
        worker(args)
        return
    from distlm.config import load_config

    seq_len = load_config(args.config, args.overrides).train.seq_len or 64
    with tempfile.TemporaryDirectory() as tmp:
        args.data = str(prepare_small(Path(tmp), seq_len, stdlib_files=200))
        if args.nproc == 1:
            worker(args)
        else:
            launch(args, Path(args.data))


if __name__ == "__main__":
    main()
