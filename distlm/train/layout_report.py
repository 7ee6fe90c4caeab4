"""What the layout costs, printed at start-up: memory per rank and bytes moved per step.

* Memory: before the first step, the estimate for this rank's parameters, ZeRO stage and
  precision (``parallel.memory``); after it (when Adam's state exists), what the process
  really holds, with the ratio. Rank 0 prints its own figures and the range over all ranks.
* Communication: every collective of one step (the second: the first carries one-off
  set-up traffic, shapes sent between stages, tied weights broadcast) is counted by a wrapper
  around torch.distributed (``parallel.comms``), summed over ranks, grouped into tensor-,
  data- and pipeline-parallel traffic and compared with what the layout must move at least.

Both are collective calls on the steps they run, so every rank goes through them.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from distlm.config import BatchLayout, Config
from distlm.parallel.comms import CommsCounter, merge_snapshots, minimum_bytes, report_lines
from distlm.parallel.distributed import all_gather_objects
from distlm.parallel.layout import ParallelGroups
from distlm.parallel.memory import estimate_memory, measure_memory, memory_lines

COUNTED_STEP = 1  # 0-based: the second step
ZERO3_PERSISTENCE = 100_000  # DeepSpeed's default stage3_param_persistence_threshold


class LayoutReport:
    def __init__(self, cfg: Config, groups: ParallelGroups, batch: BatchLayout, model: torch.nn.Module,
                 log: Callable[[str], None]):
        self.cfg, self.groups, self.batch, self.log = cfg, groups, batch, log
        # Counting replaces torch.distributed's collectives for one step; compiled code that calls
        # them (the tensor-parallel layers) would see new functions and recompile, this time with
        # a graph break at every collective. Such runs are not counted.
        self.counts_comms = not (cfg.train.compile and groups.layout.tp > 1)
        if not self.counts_comms:
            log("comms per step: not counted under train.compile with tp > 1 (counting would recompile the graph)")
        params = list(model.parameters())  # before ZeRO-3 partitions them
        self.rank_params = sum(p.numel() for p in params)
        threshold = cfg.deepspeed.get("zero_optimization", {}).get("stage3_param_persistence_threshold",
                                                                    ZERO3_PERSISTENCE)
        persistent = sum(p.numel() for p in params if p.numel() < threshold) if cfg.parallel.zero_stage == 3 else 0
        self.estimate = estimate_memory(self.rank_params, batch.dp, self._effective_stage(), cfg.train.precision,
                                        persistent_params=persistent)
        c = groups.coords
        counts = all_gather_objects((c.stage, c.tp_rank, self.rank_params, persistent))
        by_stage = {s: (n, k) for s, t, n, k in counts if t == 0}  # every replica holds the same counts
        self.stage_params = [by_stage[stage][0] for stage in range(groups.layout.pp)]
        self.stage_persistent = [by_stage[stage][1] for stage in range(groups.layout.pp)]
        log(f"parameters held per rank by stage: {self.stage_params} (before ZeRO); estimated weights + optimizer "
            f"{self.estimate.params_and_optimizer / 2**20:.2f} MiB on this rank")
        pp = groups.layout.pp
        if pp > 1:
            # 1F1B leaves each stage idle for pp - 1 micro-batch slots of the step's m + pp - 1.
            bubble = (pp - 1) / (batch.grad_accum + pp - 1)
            log(f"{'WARNING: ' if batch.grad_accum < 4 * pp else ''}pipeline of {pp} stages over "
                f"{batch.grad_accum} micro-batches per step: idle {bubble:.0%} of each step"
                + (f"; lower train.micro_batch_size for more micro-batches (4 x {pp} or more keeps it "
                   f"under {(pp - 1) / (5 * pp - 1):.0%})" if batch.grad_accum < 4 * pp else ""))

    def _effective_stage(self) -> int:
        # DeepSpeed's pipeline engine runs bf16 without ZeRO through its BF16_Optimizer, which
        # partitions the fp32 master weights and reduces gradients in fp32 like ZeRO 1.
        c = self.cfg
        if c.parallel.pp > 1 and c.train.precision == "bf16" and c.parallel.zero_stage == 0:
            return 1
        return c.parallel.zero_stage

    @contextlib.contextmanager
    def around_step(self, step: int, engine):
        """Wrap step ``step`` (0-based) of training."""
        counter = CommsCounter(classify=self.groups.category) if step == COUNTED_STEP and self.counts_comms else None
        with counter if counter is not None else contextlib.nullcontext():
            yield
        if step == 0:
            self._report_memory(engine)
        if counter is not None:
            self._report_comms(counter.snapshot())

    def _report_memory(self, engine) -> None:
        got = measure_memory(engine)
        ratios = all_gather_objects(got.params_and_optimizer / max(self.estimate.params_and_optimizer, 1))
        for line in memory_lines(self.estimate, got):
            self.log(line)
        self.log(f"  measured/estimated weights+optimizer over all {len(ratios)} ranks: "
                 f"{min(ratios):.3f} .. {max(ratios):.3f}")

    def _report_comms(self, snapshot: dict) -> None:
        total = merge_snapshots(all_gather_objects(snapshot))
        m, layout = self.cfg.model, self.groups.layout
        precision_bytes = 4 if self.cfg.train.precision == "fp32" else 2
        # bf16 under ZeRO accumulates and reduces gradients in fp32 (engine.deepspeed_config).
        stage = self._effective_stage()
        grad_bytes = 4 if self.cfg.train.precision == "fp32" or stage >= 1 else 2
        minimum = minimum_bytes(
            tp=layout.tp, pp=layout.pp, dp=layout.dp, zero_stage=stage,
            n_layers=m.n_layers, d_model=m.d_model, vocab_size=m.vocab_size,
            micro_batch=self.batch.micro_batch_size, seq_len=self.cfg.train.seq_len,
            grad_accum=self.batch.grad_accum, stage_params=self.stage_params,
            activation_bytes=precision_bytes, grad_bytes=grad_bytes, param_bytes=precision_bytes,
            tied_embeddings=m.tie_embeddings, activation_checkpointing=self.cfg.parallel.activation_checkpointing,
            sequence_parallel=self.cfg.parallel.sequence_parallel and layout.tp > 1,
            pipe_partitioned=not self.cfg.parallel.sequence_parallel, persistent_params=self.stage_persistent)
        self.last_comms = (total, minimum)
        for line in report_lines(total, minimum, steps=1):
            self.log(line)
