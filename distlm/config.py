"""Typed configuration: dataclasses, YAML files and ``key.sub=value`` overrides.

A run is described by one :class:`Config`. It is read from a YAML file, overridden from the
command line (``train.max_steps=100 optim.lr=3e-4``), validated, and saved next to the run
as ``config.yaml``. Everything that can be wrong with a config is found here, before any
process group starts, and the error names the key and the allowed values.

This module knows nothing of torch.distributed: the data-parallel size it validates against
is passed in by the caller (see :mod:`distlm.parallel.launch_env`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from distlm.data.blend import Source
from distlm.fsutil import atomic_write_text
from distlm.parallel.layout import Layout, LayoutError, ranks_per_node_from_env


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or contradicts another key."""


@dataclass
class ModelConfig:
    """The transformer. ``vocab_size`` and ``max_seq_len`` default to the data's manifest."""

    vocab_size: Optional[int] = None
    """Rows of the embedding table; None takes the tokenizer's size from the data manifest."""
    max_seq_len: Optional[int] = None
    """Longest sequence the model accepts; None takes the data's seq_len."""
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    d_ff: Optional[int] = None
    """Hidden width of the MLP; None means 4*d_model for gelu and 8/3*d_model (rounded) for swiglu."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    pos: Literal["sinusoidal", "learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    """Std of the normal init; output projections of each block are scaled by 1/sqrt(2*n_layers)."""
    objective: Literal["clm", "mlm"] = "clm"
    """clm: causal language modelling (GPT). mlm: masked language modelling (BERT): bidirectional
    attention, mask_prob of the tokens chosen (80% -> the mask id, 10% -> a random token, 10% kept),
    the loss on the chosen ones only."""
    mask_prob: float = 0.15
    """With objective=mlm: the share of tokens chosen for prediction (document-ending EOS never is)."""


@dataclass
class DataConfig:
    path: Optional[str] = None
    """A folder (or URL) written by ``distlm prepare`` (holds manifest.json). Or use ``sources``."""
    sources: list[Source] = field(default_factory=list)
    """Several datasets blended by weight, instead of ``path``: ``[{path: ..., weight: ...}, ...]``."""
    on_error: Literal["fail", "skip"] = "fail"
    """Damaged shards (truncated, corrupt, missing): stop the run, or mask their rows and go on."""
    max_error_rate: float = 0.01
    """With on_error=skip: stop once more than this share of the rows read is damaged."""
    allow_pipe: bool = False
    """Allow ``pipe:`` URLs, which run a shell command taken from the config. Off for safety."""
    num_workers: int = 1
    """Loader processes per rank; 0 reads in the training process."""
    shuffle_blocks: int = 8
    """Rows are shuffled within windows of this many consecutive blocks (tar members)."""
    seed: int = 1234
    """Seeds the order of shards and rows; the order is a pure function of (seed, epoch, row)."""


@dataclass
class ParallelConfig:
    """The layout: tp x pp x dp = world size, dp taking what tp and pp leave (README: choosing a layout)."""

    tp: int = 1
    """Tensor-parallel size: each layer's matrices split over this many ranks (keep it within a node)."""
    pp: int = 1
    """Pipeline-parallel size: the layers cut into this many stages, run 1F1B over the micro-batches."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3; at most 1 with pp > 1."""
    sequence_parallel: bool = False
    """With tp > 1: norms, dropout and residuals work on 1/tp of the sequence each (less activation
    memory; the all-reduces become reduce-scatter/all-gather pairs of the same bytes)."""
    pipeline_partition: Literal["parameters", "uniform"] = "parameters"
    """How layers are cut into stages: balance parameter counts, or the same number of blocks each."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: about 1/3 more compute, far less memory."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    """The learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Applied to matrices only: never to biases or norm gains."""
    decay_embeddings: bool = True
    """Whether embedding tables (and a tied head) count as matrices for weight decay (GPT-2, nanoGPT: yes)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: Optional[int] = None
    """Step at which the decay reaches min_lr; None means train.max_steps."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 12
    """Global batch in sequences per optimizer step, across all data-parallel ranks."""
    micro_batch_size: Optional[int] = None
    """Sequences per rank per forward pass; None means batch_size / dp (no accumulation)."""
    seq_len: Optional[int] = None
    """Tokens per training sequence; None takes the data's seq_len."""
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 0
    """Validate every N steps (and at the end); 0 validates only at the end."""
    eval_iters: int = 50
    """Validation batches per evaluation (the validation rows repeat if there are fewer)."""
    save_every: int = 0
    """Checkpoint every N steps (and at the end); 0 saves only at the end."""
    resume: str = "auto"
    """``auto`` continues from the newest checkpoint in checkpoint.dir, ``never`` starts fresh,
    anything else is the path of one checkpoint folder."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU; None uses a known GPU's datasheet value (none on CPU)."""
    threads: Optional[int] = None
    """torch intra-op threads per process; None keeps torch's (or OMP_NUM_THREADS's) choice."""
    compile: bool = False
    """``torch.compile`` the training forward pass (kernels fused by Inductor): the whole forward
    and loss with pp = 1, each block of the stage with pp > 1. The first steps pay the compile
    time (seconds to minutes); weights, checkpoints and hooks are unchanged. Not with ZeRO 3, nor
    with activation checkpointing under pp > 1 (or under tp > 1 with dropout)."""
    init_from: Optional[str] = None
    """Fine-tuning: start from this checkpoint's weights (a run folder, or one checkpoint folder;
    any layout), with a fresh optimizer, step 0 and this config's schedule and data. Ignored once
    the run has checkpoints of its own: a restarted fine-tune resumes from those."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Where checkpoints go; None means RUN_DIR/checkpoints."""
    keep_last: int = 3
    """Keep this many newest checkpoints; 0 keeps all."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (e.g. 1000), whatever keep_last says."""
    async_save: bool = False
    """Snapshot the state to host memory and write it in the background while training goes on."""
    verify: Literal["hash", "size"] = "hash"
    """Check before resuming: every file's SHA-256 and size, or sizes only (faster on huge checkpoints)."""
    on_damaged: Literal["fallback", "fail"] = "fallback"
    """A checkpoint that fails verification: fall back to the newest one that passes (loudly), or stop."""
    on_error: Literal["stop", "continue"] = "stop"
    """A save that fails (a full disk, ...): stop the run, or count it, keep the previous checkpoint and go on."""


@dataclass
class FaultConfig:
    """What a long run does about preemption, hangs, bad steps and crash loops (README: exit codes)."""
    hang_timeout_s: float = 600.0
    """No step progress on a rank for this long: dump every thread's stack, name the stuck rank,
    exit (code 77) so the launcher restarts from the last checkpoint. Must exceed the slowest
    step, save and evaluation; 0 disables the watchdog."""
    collective_timeout_s: float = 1800.0
    """The process groups' timeout: a collective that waits this long fails (and the run exits 78).
    It also bounds startup and resuming, which the watchdog does not watch; keep it above hang_timeout_s
    so that a hang is reported by the watchdog, naming the stuck rank."""
    rendezvous_timeout_s: float = 300.0
    """How long the ranks have to meet at startup (MASTER_ADDR:MASTER_PORT, then every gloo/NCCL
    pair). A failure names the address and interfaces tried (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)."""
    repeat_signal_s: float = 5.0
    """A second signal within this many seconds of the first is the same preemption (torchrun and
    SLURM may both deliver the scheduler's SIGTERM to a worker); a later one stops at once (exit 76)."""
    preempt_save_timeout_s: float = 0.0
    """Seconds a save after SIGTERM/SIGUSR1/SIGUSR2 may take before the run exits without it
    (the previous checkpoint stands; exit 76). Keep it under the scheduler's grace period; 0: no limit."""
    max_bad_steps_in_row: int = 5
    """Updates skipped in a row (NaN/Inf loss or gradient, loss spike) before the run stops (exit 79) or rolls back."""
    spike_factor: float = 0.0
    """Skip an update whose loss exceeds this times the mean of the last spike_window good steps
    (e.g. 3.0); 0 disables spike detection. NaN/Inf steps are always skipped."""
    spike_window: int = 50
    """Good steps the rolling loss mean covers (kept in the checkpoint)."""
    on_bad_steps: Literal["stop", "rollback"] = "stop"
    """After max_bad_steps_in_row: stop, or reload the last checkpoint and go on past the data that caused it."""
    max_rollbacks: int = 3
    """Rollbacks in one run before on_bad_steps=rollback stops too."""
    max_restarts_without_progress: int = 3
    """Starts in a row that resumed from the same checkpoint and failed before the next one:
    then the run refuses to start (exit 80, do not requeue); 0 disables the check."""


@dataclass
class MetricsConfig:
    enabled: bool = False
    """Serve Prometheus metrics from every rank."""
    port: int = 9470
    """Rank r serves on port + local_rank (not 9400: NVIDIA's DCGM exporter takes that on GPU nodes)."""
    bind: str = "127.0.0.1"
    """The address the endpoints listen on; a Prometheus on another machine needs 0.0.0.0 or the node's address."""
    targets_dir: str = "monitoring/targets"
    """Where rank 0 writes the run's Prometheus file_sd target file (DISTLM_TARGETS_DIR overrides; '': none)."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """The run directory: config.yaml, metrics.jsonl, checkpoints."""
    name: Optional[str] = None
    """A label for logs and metrics; None uses the run directory's name."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    deepspeed: dict = field(default_factory=dict)
    """Passed through to DeepSpeed's config, over the keys distlm derives (advanced use)."""


# --------------------------------------------------------------------------- reading


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults), apply ``key.sub=value`` overrides, check types."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    try:
        return from_dict(Config, raw, where="")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value, e.g. train.max_steps=100")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key before '='")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from a mapping, naming the key of anything that does not fit."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"unknown key {_join(where, key)}{hint}; allowed keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, _join(where, name))
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp, value: Any, key: str):
    """Check ``value`` against annotation ``tp``; convert int->float where harmless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {args}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")  # a bug in this module, not the user's


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch splits: batch_size = micro_batch_size * grad_accum * dp."""

    dp: int
    micro_batch_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.dp * self.micro_batch_size * self.grad_accum


def batch_layout(cfg: Config, world_size: int) -> BatchLayout:
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    micro = cfg.train.micro_batch_size
    if micro is None:
        micro = cfg.train.batch_size // max(dp, 1)
    elif micro < 1:
        raise ConfigError(f"train.micro_batch_size must be at least 1; got {micro}")
    if micro < 1 or cfg.train.batch_size % (micro * dp):
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of "
            f"train.micro_batch_size ({micro}) x data-parallel size ({dp}); "
            f"choose train.batch_size from {[micro * dp * k for k in (1, 2, 4, 8)]} "
            f"or set train.micro_batch_size"
        )
    return BatchLayout(dp=dp, micro_batch_size=micro, grad_accum=cfg.train.batch_size // (micro * dp))


def validate(cfg: Config, world_size: int = 1) -> BatchLayout:
    """Reject impossible combinations before any process group starts."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    _validate_data(cfg.data)
    need(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be one of 0, 1, 2, 3; got {p.zero_stage}")
    need(p.pp == 1 or p.zero_stage <= 1,
         f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed's pipeline engine supports "
         f"ZeRO stage 0 or 1 only (stage 2 and 3 partition gradients and weights across the micro-batches the "
         f"pipeline interleaves). Use parallel.zero_stage=1, or pp=1 for ZeRO 2/3")
    try:
        Layout.for_world(p.tp, p.pp, world_size, ranks_per_node_from_env())
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    for key, value in (("model.n_layers", m.n_layers), ("model.d_model", m.d_model), ("model.n_heads", m.n_heads),
                       ("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                       ("train.log_every", t.log_every), ("train.eval_iters", t.eval_iters)):
        need(value >= 1, f"{key} must be at least 1; got {value}")
    for key, value in (("train.eval_every", t.eval_every), ("train.save_every", t.save_every),
                       ("optim.warmup_steps", o.warmup_steps), ("data.num_workers", cfg.data.num_workers),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                       ("checkpoint.keep_every", cfg.checkpoint.keep_every), ("optim.grad_clip", o.grad_clip),
                       ("optim.weight_decay", o.weight_decay)):
        need(value >= 0, f"{key} must be 0 or more; got {value}")
    need(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    for key, value in (("model.n_kv_heads", m.n_kv_heads), ("model.d_ff", m.d_ff), ("model.vocab_size", m.vocab_size),
                       ("model.max_seq_len", m.max_seq_len), ("train.seq_len", t.seq_len),
                       ("optim.decay_steps", o.decay_steps), ("data.shuffle_blocks", cfg.data.shuffle_blocks)):
        need(value is None or value >= 1, f"{key} must be at least 1 (or unset); got {value}")
    need(cfg.data.seed >= 0 and t.seed >= 0, "data.seed and train.seed must be 0 or more")
    need(o.eps > 0, f"optim.eps must be positive; got {o.eps}")
    need(m.init_std > 0 and m.norm_eps > 0, "model.init_std and model.norm_eps must be positive")
    need(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops must be positive (or unset)")
    need(t.threads is None or t.threads >= 1, "train.threads must be at least 1 (or unset)")
    need(not (t.compile and p.zero_stage == 3),
         "train.compile=true with parallel.zero_stage=3: ZeRO 3 gathers each layer's weights in module "
         "hooks that torch.compile would trace; use ZeRO 1 or 2, or train.compile=false")
    need(not (t.compile and p.activation_checkpointing and p.pp > 1),
         "train.compile=true with parallel.activation_checkpointing=true and parallel.pp > 1: DeepSpeed's "
         "pipeline recomputes ranges of layers outside the compiled code, which torch.compile cannot follow; "
         "turn one of them off")
    need(not (t.compile and p.activation_checkpointing and p.tp > 1 and m.dropout > 0),
         "train.compile=true with parallel.activation_checkpointing=true, parallel.tp > 1 and model.dropout > 0: "
         "the recomputation replays each tensor-parallel rank's dropout stream, which torch.compile cannot "
         "trace; set model.dropout=0 (usual in pretraining) or turn one of the others off")
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    need(1 <= kv <= m.n_heads and m.n_heads % kv == 0,
         f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv}")
    need(m.pos != "rope" or (m.d_model // m.n_heads) % 2 == 0,
         f"model.pos=rope needs an even head size; d_model/n_heads = {m.d_model // m.n_heads}")
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1); got {m.dropout}")
    need(0.0 < m.mask_prob < 1.0, f"model.mask_prob must be in (0, 1); got {m.mask_prob}")
    need(t.init_from != "", "train.init_from must be a checkpoint (a run folder or a checkpoint folder), or unset")
    need(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"need 0 <= optim.min_lr ({o.min_lr}) <= optim.lr ({o.lr}) and optim.lr > 0")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    need(t.resume not in ("", None), "train.resume must be auto, never, or a checkpoint folder")
    _validate_fault(cfg.fault, need)
    need(1 <= cfg.metrics.port <= 65535, f"metrics.port must be a TCP port; got {cfg.metrics.port}")
    if t.seq_len is not None and m.max_seq_len is not None:
        need(t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    return batch_layout(cfg, world_size)


def _validate_fault(f: FaultConfig, need) -> None:
    for key, value in (("fault.hang_timeout_s", f.hang_timeout_s), ("fault.preempt_save_timeout_s", f.preempt_save_timeout_s),
                       ("fault.repeat_signal_s", f.repeat_signal_s),
                       ("fault.spike_factor", f.spike_factor), ("fault.max_rollbacks", f.max_rollbacks),
                       ("fault.max_restarts_without_progress", f.max_restarts_without_progress)):
        need(value >= 0, f"{key} must be 0 or more; got {value}")
    need(f.rendezvous_timeout_s > 0, f"fault.rendezvous_timeout_s must be positive; got {f.rendezvous_timeout_s}")
    need(f.collective_timeout_s > 0, f"fault.collective_timeout_s must be positive; got {f.collective_timeout_s}")
    need(f.max_bad_steps_in_row >= 1, f"fault.max_bad_steps_in_row must be at least 1; got {f.max_bad_steps_in_row}")
    need(f.spike_window >= 1, f"fault.spike_window must be at least 1; got {f.spike_window}")
    need(f.spike_factor == 0 or f.spike_factor > 1,
         f"fault.spike_factor must be above 1 (a loss that many times the rolling mean), or 0 to disable; got {f.spike_factor}")


def _validate_data(d: DataConfig) -> None:
    if d.path is None and not d.sources:
        raise ConfigError("data.path is not set: point it at a folder written by `distlm prepare` "
                          "(or list several in data.sources)")
    if d.path is not None and d.sources:
        raise ConfigError("set data.path or data.sources, not both (data.path is a one-source shortcut; "
                          "override data.path=null to use the sources)")
    for i, src in enumerate(d.sources):
        if not src.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight must be positive; got {src.weight}")
    labels = [s.label for s in data_sources(d)]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"data.sources need distinct names (set name: on each); got {labels}")
    if not 0 <= d.max_error_rate < 1:
        raise ConfigError(f"data.max_error_rate must be in [0, 1); got {d.max_error_rate}")
    for i, src in enumerate(data_sources(d)):
        where = "data.path" if d.path is not None else f"data.sources[{i}].path"
        if (src.path.startswith("pipe:") or (src.shards or "").startswith("pipe:")) and not d.allow_pipe:
            raise ConfigError(f"{where} is a pipe: URL, which runs a shell command; set data.allow_pipe=true "
                              f"if you trust this config")


def data_sources(d: DataConfig) -> list[Source]:
    """The sources to read: ``data.path`` is a single one of weight 1."""
    return [Source(d.path)] if d.path is not None else list(d.sources)


# --------------------------------------------------------------------------- writing


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: a crash leaves the old file or the new)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, for help texts."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys
