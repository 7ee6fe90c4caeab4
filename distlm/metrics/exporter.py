"""Prometheus metrics: one HTTP endpoint per rank, its own registry.

Listener rules (reliability matrix row 21): the endpoint binds ``metrics.bind`` exactly
(127.0.0.1 unless the user sets it), rank r serves on ``metrics.port + local_rank``, and a port
that cannot be bound warns and leaves training running with an exporter that records but serves
nothing, so the training loop never branches on whether metrics are being served.

Every series carries the constant labels ``run``, ``rank`` and ``node``; labels stay bounded,
so no step number is ever a label.

What is recorded when:
- at every phase change of the loop (``phase``): the heartbeat, the data-loader wait and
  whether this rank is waiting for a batch right now, one step-duration observation and the
  step's tokens; a handful of clock reads and lock operations, so it costs microseconds (the
  supervisor adds the step's forward-pass seconds);
- at every logged step (``step``): loss, lr, grad norm, MFU, tokens trained, data errors,
  memory and failed checkpoint saves;
- at evaluations and committed checkpoints: the val loss, the save duration and time.
The names and what each is for are listed in monitoring/README.md.
"""

from __future__ import annotations

import errno
import math
import socket
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

import distlm
from distlm.config import MetricsConfig
from distlm.data.shards import ERROR_KINDS

CONSTANT_LABELS = ("run", "rank", "node")

# Steps range from tens of milliseconds (small models, tests) to around a minute (large models
# with much gradient accumulation); buckets cover that span so straggler panels keep resolution.
STEP_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                         7.5, 10.0, 15.0, 20.0, 30.0, 60.0, float("inf"))

SKIP_REASONS = ("nonfinite", "spike")


def start_exporter(cfg: MetricsConfig, rank: int, local_rank: int, run: str,
                   warn: Callable[[str], None]) -> "Exporter | None":
    """None when cfg.enabled is false. Serves on (cfg.bind, cfg.port + local_rank) from its own
    CollectorRegistry (never the global one). A port that is taken (or any OSError on bind) calls
    warn(...) with a message naming rank, host:port, the OS error and what to do (metrics.port=... or
    stop the other process), and returns an Exporter that records but serves nothing (so callers
    never branch on None except for 'disabled')."""
    if not cfg.enabled:
        return None
    exporter = Exporter(rank=rank, run=run)
    port = cfg.port + local_rank
    try:
        # Pass cfg.bind through untouched: prometheus_client's own default is 0.0.0.0, and the
        # point of the setting is that the user, not the library, decides the exposure.
        server, thread = start_http_server(port, addr=cfg.bind, registry=exporter.registry)
    except (OSError, OverflowError) as err:  # OverflowError: port + local_rank beyond 65535
        warn(_bind_failure_message(rank, cfg.bind, port, err))
        return exporter
    exporter._serve_with(server, thread)
    return exporter


class Exporter:
    """The metrics of one rank; serves them over HTTP when its port could be bound."""

    def __init__(self, rank: int, run: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.address: tuple[str, int] | None = None
        self._server = None
        self._thread = None
        self._constant = {"run": run, "rank": str(rank), "node": socket.gethostname()}
        # The last running totals seen, per counter key, so counters advance by differences.
        self._last_totals: dict[str, float] = {}
        # The loop's current phase and when it began (perf_counter), and when this step's data
        # wait began: a step's duration runs from there to the end of its "step" phase.
        self._phase: str | None = None
        self._phase_started = 0.0
        self._step_started: float | None = None
        self._tokens_per_step = 0
        self._define_series()
        self._publish_build_info()
        self._start_timestamp.set(time.time())

    def describe_run(self, world_size: int, checkpoint_every_steps: int) -> None:
        """What the alerts compare against: how many ranks should report, whether saves are due."""
        self._world_size.set(world_size)
        self._checkpoint_every_steps.set(checkpoint_every_steps)

    def describe_rank(self, tokens_per_step: int, stage: int, dp_rank: int, tp_rank: int) -> None:
        """Tokens each step adds to distlm_tokens_total, and where this rank sits in the layout
        (pipeline stages do different work: the straggler rule compares ranks of one stage)."""
        self._tokens_per_step = tokens_per_step
        self._layout_info.labels(stage=str(stage), dp_rank=str(dp_rank), tp_rank=str(tp_rank)).set(1)

    # ------------------------------------------------------------------ recording

    def step(self, row: dict) -> None:
        """Record one logged row of the training loop (see distlm.metrics.logger)."""
        self._set_if_present(self._loss, row.get("loss"))
        self._set_if_present(self._learning_rate, row.get("lr"))
        self._set_if_present(self._grad_norm, row.get("grad_norm"))
        self._set_if_present(self._mfu_ratio, row.get("mfu"))
        self._set_if_present(self._tokens_trained, row.get("tokens"))
        if row.get("checkpoint_errors") is not None:
            self._advance_counter(self._checkpoint_save_failures, "checkpoint_errors", row["checkpoint_errors"])
        for kind, count in (row.get("data_errors") or {}).items():
            self._advance_counter(self._data_counter(kind), f"data_errors/{kind}", count)
        self.heartbeat(row["step"])

    def resumed(self, tokens: float, data_errors: dict | None, checkpoint_errors: int) -> None:
        """The totals a resumed run starts from. The counters count this process's events from
        here on: a restart must not read as all of the run's data errors in one scrape."""
        self._tokens_trained.set(tokens)
        self._last_totals["checkpoint_errors"] = checkpoint_errors
        for kind, count in (data_errors or {}).items():
            self._last_totals[f"data_errors/{kind}"] = count

    def phase(self, step: int, phase: str) -> None:
        """The loop entered ``phase`` ("agree", "data", "step", "save", "eval", ...) of ``step``.

        "data" is the wait for the step's batches and "step" the forward, backward and update:
        their sum is one observation of the step duration (saves and evaluations stay out of it,
        as they do out of the logged throughput). While in "data", the waiting-since gauge holds
        the wall time the wait began, so a loader that never delivers is visible while it hangs.
        """
        now = time.perf_counter()
        if self._phase == "data":
            self._dataloader_wait.inc(now - self._phase_started)
            self._dataloader_waiting_since.set(0)
        elif self._phase == "step" and self._step_started is not None:
            self._step_duration.observe(now - self._step_started)
            self._tokens.inc(self._tokens_per_step)  # every step, so rate() has no sawtooth
            self._step_started = None
        if phase == "data":
            self._dataloader_waiting_since.set(time.time())
            self._step_started = now
        elif phase == "agree":  # once per step, at its boundary
            self.heartbeat(step)
        self._phase, self._phase_started = phase, now

    def heartbeat(self, step: int) -> None:
        """Proof of life for the 'training stalled' alert: ``step`` optimizer steps are done."""
        self._last_step_timestamp.set(time.time())
        self._step.set(step)

    def evaluated(self, val_loss: float) -> None:
        self._val_loss.set(val_loss)

    def memory(self, allocated: float, max_allocated: float) -> None:
        self._memory_allocated.set(allocated)
        self._memory_max_allocated.set(max_allocated)

    def forward_seconds(self, seconds: float) -> None:
        """Add time spent in forward passes (see distlm.metrics.forward_clock)."""
        if seconds > 0:
            self._forward_seconds.inc(seconds)

    def skipped_step(self, reason: str) -> None:
        self._skipped_steps.labels(reason=reason).inc()

    def checkpoint_saved(self, seconds: float) -> None:
        self._checkpoint_save_duration.set(seconds)
        self._checkpoint_last_success.set(time.time())

    def restarts(self, count: int) -> None:
        self._advance_counter(self._restarts, "restarts", count)

    # ------------------------------------------------------------------ serving

    def close(self) -> None:
        """Stop serving and free the port; recording keeps working (into nothing that is served)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.address = None

    def _serve_with(self, server, thread) -> None:
        self._server, self._thread = server, thread
        host, port = server.server_address[:2]  # IPv6 addresses are 4-tuples
        self.address = (host, port)

    # ------------------------------------------------------------------ internals

    def _define_series(self) -> None:
        self._world_size = self._gauge("distlm_world_size", "Ranks in this run (how many should report).")
        self._layout_info = _BoundLabels(
            Gauge("distlm_layout_info", "This rank's place in the layout: pipeline stage, replica, tensor slice.",
                  CONSTANT_LABELS + ("stage", "dp_rank", "tp_rank"), registry=self.registry), self._constant)
        self._start_timestamp = self._gauge(
            "distlm_start_timestamp_seconds", "Unix time this process started (ages count from it before a first step or save).")
        self._loss = self._gauge("distlm_loss", "Training loss of the last logged step.")
        self._val_loss = self._gauge("distlm_val_loss", "Validation loss of the last evaluation.")
        self._learning_rate = self._gauge("distlm_learning_rate", "Learning rate of the last logged step.")
        self._grad_norm = self._gauge("distlm_grad_norm", "Gradient norm (before clipping) of the last logged step.")
        self._mfu_ratio = self._gauge("distlm_mfu_ratio", "Model FLOPs utilisation, 0..1.")
        self._step = self._gauge("distlm_step", "The optimizer step last reached.")
        self._last_step_timestamp = self._gauge(
            "distlm_last_step_timestamp_seconds", "Unix time of the last completed step (heartbeat).")
        self._memory_allocated = self._gauge(
            "distlm_memory_allocated_bytes",
            "Memory in use at the last logged step: CUDA memory allocated by tensors, or the process's resident set on the CPU.")
        self._memory_max_allocated = self._gauge(
            "distlm_memory_max_allocated_bytes", "The peak of distlm_memory_allocated_bytes since the process started.")
        self._dataloader_waiting_since = self._gauge(
            "distlm_dataloader_waiting_since_timestamp_seconds",
            "Unix time this rank began waiting for its next batch; 0 while it is not waiting.")
        self._checkpoint_every_steps = self._gauge(
            "distlm_checkpoint_every_steps", "train.save_every: steps between checkpoints (0: only at the end).")
        self._checkpoint_save_duration = self._gauge(
            "distlm_checkpoint_save_duration_seconds",
            "From the start of the last committed checkpoint save to its commit (asynchronous saves: "
            "until the step boundary that found the background write done).")
        self._checkpoint_last_success = self._gauge(
            "distlm_checkpoint_last_success_timestamp_seconds", "Unix time of the last successful checkpoint save.")
        self._tokens = self._counter(
            "distlm_tokens_total",
            "Training tokens the whole run processed since this process started (the same on every rank): "
            "rate() is the run's tokens/s.")
        self._tokens_trained = self._gauge(
            "distlm_tokens_trained", "Training tokens up to the current step, over all restarts of the run.")
        self._restarts = self._counter("distlm_restarts_total", "Times this run was restarted.")
        self._dataloader_wait = self._counter(
            "distlm_dataloader_wait_seconds_total", "Seconds this rank waited for training batches.")
        self._forward_seconds = self._counter(
            "distlm_forward_seconds_total",
            "Seconds this rank spent in forward passes; with data parallelism they hold no collective, "
            "so a slow rank shows here while every rank's step time is the same.")
        self._checkpoint_save_failures = self._counter(
            "distlm_checkpoint_save_failures_total", "Checkpoint saves that failed (checkpoint.on_error=continue).")
        self._data_errors = self._counter(
            "distlm_data_errors_total", "Damaged data the run's loaders met, by kind (events).", ("kind",))
        self._rows_skipped = self._counter(
            "distlm_data_rows_skipped_total", "Training rows left out because their data was damaged (data.on_error=skip).")
        self._skipped_steps = self._counter(
            "distlm_skipped_steps_total", "Optimizer steps skipped, by reason.", ("reason",))
        # Present at zero from the start, so increase() sees the first one and panels show a 0.
        for reason in SKIP_REASONS:
            self._skipped_steps.labels(reason=reason)
        for kind in ERROR_KINDS:
            self._data_errors.labels(kind=kind)
        self._step_duration = Histogram(
            "distlm_step_duration_seconds",
            "Wall time of one optimizer step: waiting for its data plus forward, backward and update.",
            CONSTANT_LABELS, registry=self.registry, buckets=STEP_DURATION_BUCKETS,
        ).labels(**self._constant)

    def _publish_build_info(self) -> None:
        build_info = Gauge("distlm_build_info", "The distlm build serving these metrics.",
                           CONSTANT_LABELS + ("version", "git_sha"), registry=self.registry)
        build_info.labels(**self._constant, version=distlm.__version__, git_sha=_git_sha()).set(1)

    def _data_counter(self, kind: str):
        # The loader's totals hold the damaged-data events by kind, and the rows they cost.
        return self._rows_skipped if kind == "rows_skipped" else self._data_errors.labels(kind=str(kind))

    def _gauge(self, name: str, documentation: str):
        return Gauge(name, documentation, CONSTANT_LABELS, registry=self.registry).labels(**self._constant)

    def _counter(self, name: str, documentation: str, extra_labels: tuple[str, ...] = ()):
        """A counter with the constant labels bound; with extra labels, a parent still to label."""
        counter = Counter(name, documentation, CONSTANT_LABELS + extra_labels, registry=self.registry)
        if extra_labels:
            return _BoundLabels(counter, self._constant)
        return counter.labels(**self._constant)

    def _advance_counter(self, counter, key: str, running_total: float) -> None:
        """Make a counter follow a running total by incrementing the difference.

        A Prometheus counter must never decrease within one process (a drop reads as a process
        restart and rate() would count the whole value again), so a lower total only moves the
        baseline: the counter stays where it is, and later totals add what they add above the new
        baseline. That happens when a run rolls back in-process (reload of an older checkpoint).
        Counting the re-done work again is deliberate, as for distlm_tokens_total (counted per
        step): a high-water mark would show nothing happening while the work is repeated.
        """
        if not is_finite_number(running_total):
            return
        increase = running_total - self._last_totals.get(key, 0)
        if increase > 0:
            counter.inc(increase)
        self._last_totals[key] = running_total

    @staticmethod
    def _set_if_present(gauge, value) -> None:
        # NaN stays (a NaN loss is exactly what the dashboard must show); None means "not measured".
        if value is not None:
            gauge.set(value)


class _BoundLabels:
    """A labelled metric with the constant labels already filled in: .labels(kind=...) adds the rest."""

    def __init__(self, metric, constant: dict[str, str]):
        self._metric = metric
        self._constant = constant

    def labels(self, **extra: str):
        return self._metric.labels(**self._constant, **extra)


def is_finite_number(value) -> bool:
    """A real int or float that is neither NaN nor infinite (bools and None are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bind_failure_message(rank: int, host: str, port: int, err: BaseException) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if getattr(err, "errno", None) == errno.EADDRINUSE:
        problem = f"port {port} is taken (already in use by another process)"
    else:
        problem = "the address cannot be bound"
    return (f"metrics: rank {rank} cannot serve Prometheus metrics on {where}: {problem} ({err}). "
            f"Training goes on without this endpoint. Set metrics.port=... to a free base port "
            f"(rank r uses port + local_rank) or stop the other process.")


@lru_cache(maxsize=1)
def _git_sha() -> str:
    """The short commit of the source tree distlm runs from; 'unknown' for installs without git."""
    package_parent = Path(distlm.__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package_parent,
                              capture_output=True, text=True, timeout=2, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"
