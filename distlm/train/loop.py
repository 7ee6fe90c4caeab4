"""The training loop: build, resume, then for each step: batch -> step -> log -> eval -> save.

Everything with a job of its own (the engine, the data stream, checkpoints, the log) lives in
its own module; this page only says in which order they are called.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from distlm.checkpoint.state import TrainState, saved_record
from distlm.config import Config, ConfigError, data_sources, save_config, to_dict, validate
from distlm.data import load_manifest, make_loader
from distlm.data.masking import model_vocab_for_mlm
from distlm.data.shards import ShardError
from distlm.checkpoint.select import step_of
from distlm.fault import exit_codes, inject
from distlm.fault.exit_codes import PeerLost, RunEnded, peer_failure
from distlm.metrics.logger import RunLog
from distlm.metrics.mfu import device_peak_flops, mfu
from distlm.model import flops_per_token, matmul_params, parameter_groups
from distlm.parallel import launch_env
from distlm.parallel.distributed import all_reduce_mean, init_distributed, shutdown_distributed
from distlm.parallel.layout import Layout, ParallelGroups, ranks_per_node_from_env
from distlm.train.engine import build_engine, set_learning_rate
from distlm.train.compile import compile_for_training
from distlm.train.checkpointing import choose_resume, initialise_from, make_saver, resume
from distlm.train.data import DataCounters, DataDigest, align_skipped_rows, data_state, resume_plan, train_stream
from distlm.train.evaluate import evaluate
from distlm.train.layout_report import LayoutReport
from distlm.train.parallelize import (
    build_model,
    check_model_fits,
    full_model_params,
    seed_random,
)
from distlm.train.resources import memory_bytes
from distlm.train.schedule import learning_rate
from distlm.train.step import train_step
from distlm.train.preflight import PreflightError, preflight
from distlm.train.recovery import roll_back, stop_for_preemption
from distlm.train.supervision import Supervisor


def resolve_from_data(cfg: Config) -> tuple[Config, bool]:
    """Fill the sizes that default to the prepared data's; return (config, has a val split)."""
    manifests = []
    for src in data_sources(cfg.data):
        try:
            manifests.append((src, load_manifest(src.path, allow_pipe=cfg.data.allow_pipe)))
        except (FileNotFoundError, ValueError, ShardError) as e:
            raise ConfigError(f"data source {src.label} ({src.path}): {e}") from None
    vocab = max(m.vocab_size for _, m in manifests)
    if cfg.model.objective == "mlm":  # the mask id may be one the tokenizer lacks: an extra row
        vocab = max(model_vocab_for_mlm(m.tokenizer, m.vocab_size) for _, m in manifests)
    shortest = min(manifests, key=lambda sm: sm[1].seq_len)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's "
                          f"tokenizer ({vocab} ids in the manifest of {manifests[0][0].path}"
                          + (", with the added mask id" if cfg.model.objective == "mlm" else "") + ")")
    if cfg.train.seq_len is None:
        cfg.train.seq_len = shortest[1].seq_len
    elif cfg.train.seq_len > shortest[1].seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} is longer than the rows in {shortest[0].path} "
                          f"(seq_len {shortest[1].seq_len}); prepare the data with --seq-len {cfg.train.seq_len}")
    if cfg.model.max_seq_len is None:
        cfg.model.max_seq_len = cfg.train.seq_len
    elif cfg.model.max_seq_len < cfg.train.seq_len:
        raise ConfigError(f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the training "
                          f"sequences (train.seq_len={cfg.train.seq_len})")
    for src, m in manifests:
        if "train" not in m.splits:
            raise ConfigError(f"data source {src.label} ({src.path}) has no train split")
    return cfg, all("val" in m.splits for _, m in manifests)


def start_process(cfg: Config):
    """A run's first steps on every rank: who this process is, the config checked against the
    world and filled from the data, the layout, and the process group.

    Returns ``(cfg, batch layout, has a val split, layout, DistContext, placement)``.
    """
    # Who this process is, from whichever launcher started it.
    placement = launch_env.resolve(mpi_timeout_s=cfg.fault.rendezvous_timeout_s)
    os.environ.update(placement.torch_env())  # one spelling (torchrun's) for everything that reads it
    batch = validate(cfg, placement.world_size)  # before any process group starts
    cfg, has_val = resolve_from_data(cfg)
    layout = Layout.for_world(cfg.parallel.tp, cfg.parallel.pp, placement.world_size, ranks_per_node_from_env())
    check_model_fits(cfg, layout)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ctx = init_distributed(cfg.train.device, timeout_s=cfg.fault.collective_timeout_s,
                           rendezvous_timeout_s=cfg.fault.rendezvous_timeout_s, placement=placement)
    return cfg, batch, has_val, layout, ctx, placement


def train(cfg: Config) -> dict:
    """Train until ``train.max_steps``; return the last logged metrics (rank 0) for callers.

    Ends by returning (finished), or by raising: a ``distlm.fault.exit_codes.RunEnded`` for
    the ends that have their own exit code (preempted, hang, peer lost, bad steps, crash loop).
    """
    # DeepSpeed 0.19.8 calls collectives that torch 2.13 renamed (reduce_scatter_tensor, ...):
    # one warning per call would bury the log line.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single", category=FutureWarning)
    cfg, batch, has_val, layout, ctx, placement = start_process(cfg)
    run_dir = Path(cfg.run.dir)
    # Same config and code on every rank, a shared and writable run folder: or stop now (exit 6).
    try:
        checked = preflight(cfg, ctx, [run_dir, Path(cfg.checkpoint.dir or run_dir / "checkpoints")], placement.launcher)
    except PreflightError as e:  # every rank raises it together: leave the group cleanly, say why
        exit_codes.record_exit(run_dir, exit_codes.LAUNCH_ERROR, str(e), ctx.rank, None)
        torch.distributed.destroy_process_group()
        raise
    log = RunLog(run_dir, cfg.train.max_steps, enabled=ctx.is_main)
    log.info(checked)
    supervisor = Supervisor(cfg, ctx, run_dir, log.info)  # signals, watchdog, metrics endpoint
    try:
        last = _train(cfg, batch, has_val, layout, ctx, log, supervisor)
    except RunEnded as e:  # every rank agreed to end this way (or, if immediate, cannot wait for the others)
        supervisor.ended(e.code, str(e), own=e.immediate)
        if not e.immediate:
            shutdown_distributed()
        raise
    except Exception as e:
        if ctx.world_size > 1 and peer_failure(e):
            lost = PeerLost(f"rank {ctx.rank}: a collective failed at step {supervisor.step} ({type(e).__name__}: {e}). "
                            f"Another rank died or the network failed (its log says which); restart the job "
                            f"to resume from the last checkpoint")
            supervisor.ended(lost.code, str(lost), own=True)
            raise lost from e
        supervisor.ended(exit_codes.code_for(e), f"{type(e).__name__}: {e}", own=True)
        raise
    finally:
        supervisor.close()
    supervisor.ended(exit_codes.OK, "finished")
    shutdown_distributed()
    return last


def _train(cfg: Config, batch, has_val: bool, layout: Layout, ctx, log: RunLog, supervisor: Supervisor) -> dict:
    groups = ParallelGroups(layout, ctx.rank)
    run_dir = Path(cfg.run.dir)
    ckpt_dir = Path(cfg.checkpoint.dir or run_dir / "checkpoints")

    resume_from = choose_resume(cfg, ckpt_dir, ctx, log.info)  # verified against its manifest
    # Before building and loading anything: a start that crashes there every time loops too.
    supervisor.refuse_crash_loop(_step_of(resume_from), fresh_run=cfg.train.resume == "never")

    rng = seed_random(cfg.train.seed, groups, ctx.device)
    model = build_model(cfg, groups, rng)
    if cfg.train.compile:
        compile_for_training(model, cfg.model.dropout, log.info)
    n_params = full_model_params(cfg)
    report = LayoutReport(cfg, groups, batch, model, log.info)  # before ZeRO-3 partitions the weights
    guard = supervisor.guard  # vetoes NaN/Inf and spiking updates from inside the optimizer step
    engine = build_engine(model, parameter_groups(model, cfg.optim.weight_decay, cfg.optim.decay_embeddings),
                          cfg, batch, ctx.device, groups.mpu, guard=guard)
    if cfg.train.init_from and resume_from is None:  # fine-tuning: pretrained weights, all else fresh
        initialise_from(cfg.train.init_from, engine, model, cfg, groups, ctx, log.info)
    elif cfg.train.init_from:
        log.info(f"train.init_from={cfg.train.init_from} is not read: the run resumes from its own {resume_from}")
    # Every rank of a model replica (its tp ranks and stages) reads the replica's rows; one of
    # them counts them for the digest and the damaged-row totals.
    counts_data = groups.coords.tp_rank == 0 and groups.coords.stage == 0
    saver = make_saver(engine, model, cfg, groups, ctx, ckpt_dir, rng, log.info)
    saver.on_committed = supervisor.saved  # the metrics' checkpoint age counts committed saves only

    state = TrainState()
    if resume_from is not None:
        state = resume(resume_from, engine, model, cfg, groups, ctx, saver, rng, log.info)
        dropped = log.truncate_after(state.step)
        log.info(f"resumed from {resume_from} at step {state.step}"
                 + (f" ({dropped} metrics rows after it dropped)" if dropped else ""))
    else:
        kept = log.start_fresh()
        if kept:
            log.info(f"no checkpoint to resume from: the previous metrics.jsonl is kept as {kept}")
    supervisor.resumed(state)
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
    if not has_val:
        log.info("the data has no validation split: evaluation is skipped (prepare with --val-fraction > 0 "
                 "to get one; with data.sources every source needs one)")

    tokens_per_step = batch.global_batch * cfg.train.seq_len
    supervisor.watch(model, tokens_per_step, groups.coords)  # the metrics' per-step view of this rank
    flops = flops_per_token(cfg.model, cfg.train.seq_len, matmul_params(cfg.model, n_params))
    peak = cfg.train.peak_flops or device_peak_flops(ctx.device, cfg.train.precision)
    log.info(f"model {n_params / 1e6:.2f}M non-embedding parameters, {flops / 1e6:.1f} MFLOP/token | "
             f"dp {batch.dp} x micro-batch {batch.micro_batch_size} x accumulation "
             f"{batch.grad_accum} = {batch.global_batch} sequences of {cfg.train.seq_len} | "
             f"{layout.describe()} | ZeRO {cfg.parallel.zero_stage} | {cfg.train.precision} on {ctx.device.type}")

    stream = train_stream(cfg, batch, groups.coords.dp_rank, state.rows_consumed,
                          resume_plan(cfg, state.data, state.rows_consumed, log.info),
                          contiguous=ctx.device.type == "cuda")
    data_errors = DataCounters(state.data.get("errors"), log.info, counts_rows=counts_data)
    digest = DataDigest(cfg.train.seq_len)
    batches = iter(make_loader(stream, cfg.data.num_workers, pin_memory=ctx.device.type == "cuda"))

    last = {}
    interval = _Interval()
    started = time.perf_counter() - state.elapsed_s
    first_step = state.step
    saved_step = state.step  # the newest committed (or committing) checkpoint's step
    while state.step < cfg.train.max_steps:
        supervisor.progress(state.step, "agree")
        if not inject.skips("agree", state.step):  # fault tests make one rank skip this collective
            signalled = supervisor.preemption_signal()  # one small all-reduce: any rank signalled?
            if signalled:
                state.elapsed_s = time.perf_counter() - started
                stop_for_preemption(signalled, state, saver, saved_step, cfg, supervisor, log.info,
                                    refresh_data=lambda: data_state(stream, state.rows_consumed,
                                                                    data_errors.global_totals(ctx.device)))
        step = state.step
        lr = learning_rate(step, cfg.optim, cfg.train.max_steps)
        set_learning_rate(engine, lr)
        final = step + 1 == cfg.train.max_steps
        logging_now = final or (step + 1) % cfg.train.log_every == 0
        saving_now = final or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0)
        evaluating_now = has_val and (final or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0))

        supervisor.progress(step, "data")
        inject.hit("fetch", step + 1)
        wait_start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(batch.grad_accum)]
        if cfg.data.on_error == "skip" and groups.replica_group is not None:
            micro_batches = align_skipped_rows(micro_batches, groups.replica_group, ctx.device)
        interval.data_s += time.perf_counter() - wait_start
        for micro in micro_batches:
            data_errors.add(micro.errors)
            if counts_data:
                digest.add(micro.targets)
        supervisor.progress(step, "step")
        with report.around_step(step - first_step, engine):  # memory after the first, bytes of the second
            result = train_step(engine, micro_batches, ctx.device, want_grad_norm=logging_now, guard=guard,
                                inject_step=step + 1)
        saver.poll()  # commits a background save once every rank has written its part

        state.step += 1
        state.rows_consumed += batch.global_batch
        state.tokens_seen += tokens_per_step
        state.bad_steps = guard.state
        interval.steps += 1
        inject.hit("step", state.step)  # fault-injection tests stop a rank here (a no-op otherwise)
        if supervisor.bad_step(result.skipped, state.step):
            if not roll_back(cfg, state, ckpt_dir, engine, model, groups, ctx, saver, rng, supervisor, log.info):
                raise supervisor.too_many_bad_steps(state.step)
            saved_step = state.step
            continue

        if logging_now or saving_now:
            # One host sync, on the steps that need it: never log or save a diverged model.
            loss = all_reduce_mean(result.loss).item()
            if not math.isfinite(loss) and result.skipped is None:
                raise FloatingPointError(f"loss is {loss} at step {state.step}: not saving. Lower optim.lr, "
                                         f"check the data, or resume from the last checkpoint")
            # The loader's position and the damaged-data counts of all ranks (a collective).
            state.data = data_state(stream, state.rows_consumed, data_errors.global_totals(ctx.device))
        if logging_now:
            seconds = interval.seconds()
            tokens_per_s = interval.steps * tokens_per_step / seconds
            last = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": result.grad_norm,
                    "tokens_per_s": tokens_per_s, "elapsed_s": time.perf_counter() - started,
                    "ms_per_step": 1000 * seconds / interval.steps,
                    "mfu": mfu(flops, tokens_per_s, ctx.world_size, peak),
                    "data_wait": interval.data_s / seconds, "tokens": state.tokens_seen,
                    "mem_bytes": memory_bytes(ctx.device),
                    "source_rows": {src["name"]: src["rows"] for src in state.data["sources"]},
                    "source_tokens": {src["name"]: src["tokens"] for src in state.data["sources"]},
                    "data_errors": state.data["errors"], "checkpoint_errors": saver.errors,
                    "skipped_steps": dict(guard.state["skipped"]),
                    "data_digest": digest.global_value(ctx.device)}
            log.step(last)
            supervisor.logged(last)
            interval = _Interval()
        if saving_now:  # before evaluating: a failing evaluation must not cost the checkpoint
            supervisor.progress(state.step, "save")
            state.elapsed_s = time.perf_counter() - started
            errors = saver.errors
            saver.save(state, to_dict(cfg))
            if saver.errors == errors:  # checkpoint.on_error=continue counts a failed save instead
                saved_step = state.step
            digest.restart()  # a run resumed from here starts its first interval here too
        if evaluating_now:
            supervisor.progress(state.step, "eval")
            val_loss, n = evaluate(engine, cfg, batch, ctx, groups, data_errors=data_errors)
            log.eval({"step": state.step, "val_loss": val_loss, "val_batches": n,
                      "elapsed_s": time.perf_counter() - started})
            supervisor.evaluated(val_loss)
            last["val_loss"] = val_loss
        if saving_now or evaluating_now:
            interval = _Interval()  # keep their time out of the next throughput figure

    supervisor.progress(state.step, "save")
    saver.close()  # an asynchronous save still in flight is finished and committed
    log.info(f"done: {state.step} steps, {state.tokens_seen / 1e6:.2f}M tokens in "
             f"{time.perf_counter() - started:.0f} s; run folder {run_dir}")
    return last


def _step_of(checkpoint: Optional[Path]) -> int:
    """The step a checkpoint folder holds (0: none); a folder not named step-N is read for it."""
    if checkpoint is None:
        return 0
    try:
        return step_of(checkpoint)
    except AttributeError:  # not a step-N name: ask its record
        return int(saved_record(checkpoint).get("step", 0))


class _Interval:
    """Wall time and data-wait time since the last log line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.data_s = 0.0

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)
