"""Resharding: a checkpoint of one (tp, pp, dp, ZeRO) layout continues on another.

Real DeepSpeed engines on gloo processes. Layout A trains a few steps with AdamW and writes
its canonical files (:func:`shard_payloads`, saved with ``torch.save`` as a checkpoint would),
then takes one more step. Layout B builds a fresh engine, loads the files with
:func:`load_resharded`, and must then hold exactly A's weights, moments and step (read back
through ``shard_payloads`` on B and compared with ``torch.equal``), take the step A took with
the same loss, and land on the same weights and moments. Each layout's DeepSpeed optimizer
(:data:`OPTIMIZER`) keeps the state differently; the cases cover every kind.

The tests at the end need no processes: torch's AdamW in one process, and the errors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distlm.checkpoint.consolidate import (
    consolidated_optimizer_state,
    consolidated_state_dict,
    optim_file,
    shard_file,
    shard_payloads,
)
from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.reshard import load_resharded
from spawn import spawn_ranks


STEPS = 3            # steps before the checkpoint
BATCH, MICRO, SEQ, VOCAB = 8, 2, 16, 64
LR = 1e-2
ARCH = {
    # RoPE, SwiGLU, RMSNorm, grouped-query attention, tied embeddings
    "llama": dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, pos="rope", mlp="swiglu",
                  norm="rmsnorm", tie_embeddings=True),
    # learned positions, biases, LayerNorm, GELU, an untied head
    "gpt2": dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, pos="learned", mlp="gelu", norm="layernorm",
                 bias=True, tie_embeddings=False),
}
# name -> (arch, tp, pp, dp, zero stage, precision)
SAVED = {
    "fp32-dp2-zero1": ("llama", 1, 1, 2, 1, "fp32"),
    "gpt2-tp2-zero0": ("gpt2", 2, 1, 1, 0, "fp32"),
    "bf16-dp2-zero1": ("llama", 1, 1, 2, 1, "bf16"),
}
# case -> (saved run, (tp, pp, dp, zero stage) it continues on); the precision stays
CASES = {
    "dp2-zero1-to-tp2-zero2": ("fp32-dp2-zero1", (2, 1, 1, 2)),
    "tp2-zero0-to-pp2-zero1": ("gpt2-tp2-zero0", (1, 2, 1, 1)),
    "dp2-zero1-to-one-rank-zero0": ("fp32-dp2-zero1", (1, 1, 1, 0)),
    "dp2-zero1-to-pp2-zero0": ("fp32-dp2-zero1", (1, 2, 1, 0)),  # the tied table on both stages
    "dp2-zero1-to-dp2-zero3": ("fp32-dp2-zero1", (1, 1, 2, 3)),
    "bf16-dp2-zero1-to-tp2": ("bf16-dp2-zero1", (2, 1, 1, 1)),
    "bf16-dp2-zero1-to-zero0": ("bf16-dp2-zero1", (1, 1, 1, 0)),
    "bf16-dp2-zero1-to-dp2-zero2": ("bf16-dp2-zero1", (1, 1, 2, 2)),  # parameters straddle two partitions
}

# The DeepSpeed optimizer each layout gets, so the cases above cover every kind of state keeping:
# flat fp32 partitions (ZeRO 1/2, bf16), ZeRO 3 partitions, fp32 copies per parameter (bf16
# without ZeRO), and torch's AdamW on the module's own parameters (fp32 without ZeRO).
OPTIMIZER = {
    "fp32-dp2-zero1": "DeepSpeedZeroOptimizer", "gpt2-tp2-zero0": "AdamW", "bf16-dp2-zero1": "BF16_Optimizer",
    "dp2-zero1-to-tp2-zero2": "DeepSpeedZeroOptimizer", "tp2-zero0-to-pp2-zero1": "DeepSpeedZeroOptimizer",
    "dp2-zero1-to-one-rank-zero0": "AdamW", "dp2-zero1-to-pp2-zero0": "AdamW",
    "dp2-zero1-to-dp2-zero3": "DeepSpeedZeroOptimizer_Stage3", "bf16-dp2-zero1-to-tp2": "BF16_Optimizer",
    "bf16-dp2-zero1-to-zero0": "FP16_UnfusedOptimizer", "bf16-dp2-zero1-to-dp2-zero2": "DeepSpeedZeroOptimizer",
}


# --------------------------------------------------------------------------- in each rank


def _engine(rank, world, arch, tp, pp, zero, precision):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import logging
    import warnings
    from datetime import timedelta

    import deepspeed

    from distlm.parallel.distributed import hand_to_deepspeed

    warnings.simplefilter("ignore")
    deepspeed.utils.logger.setLevel(logging.WARNING)
    hand_to_deepspeed(timedelta(minutes=5))  # joins the group spawn_ranks made

    from distlm.config import Config, ModelConfig, batch_layout
    from distlm.model import parameter_groups
    from distlm.parallel.layout import Layout, ParallelGroups
    from distlm.train.engine import build_engine
    from distlm.train.parallelize import build_model, seed_random

    cfg = Config()
    cfg.model = ModelConfig(vocab_size=VOCAB, max_seq_len=SEQ, **ARCH[arch])
    cfg.train.seq_len, cfg.train.batch_size, cfg.train.micro_batch_size = SEQ, BATCH, MICRO
    cfg.train.precision, cfg.optim.lr = precision, LR
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, zero
    if zero == 3:  # partition even this tiny model's weights (else all are kept whole on every rank)
        cfg.deepspeed = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    groups = ParallelGroups(Layout.for_world(tp, pp, world), rank)
    device = torch.device("cpu")
    model = build_model(cfg, groups, seed_random(cfg.train.seed, groups, device))
    batch = batch_layout(cfg, world)
    engine = build_engine(model, parameter_groups(model, cfg.optim.weight_decay), cfg, batch, device, groups.mpu)
    if pp == 1:
        named = list(model.named_parameters())
    else:
        from distlm.model.pipeline import canonical_name

        named = [(canonical_name(n, cfg.model.n_layers), p) for n, p in model.named_parameters()]
    return engine, named, groups, batch


def _step(engine, groups, batch, step: int) -> float:
    """One optimizer step on global batch ``step`` (the same rows for every layout); the global mean loss."""
    from distlm.parallel.distributed import all_reduce_mean
    from distlm.train.step import train_step

    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    rows = (start + 7 * torch.arange(SEQ + 1)) % VOCAB  # a rule the model can learn
    noise = torch.rand(rows.shape, generator=g) < 0.2
    rows = torch.where(noise, torch.randint(0, VOCAB, rows.shape, generator=g), rows)
    per_rank = BATCH // batch.dp
    mine = rows[groups.coords.dp_rank * per_rank:(groups.coords.dp_rank + 1) * per_rank]
    micro = [(m[:, :-1].contiguous(), m[:, 1:].contiguous(), None) for m in mine.split(batch.micro_batch_size)]
    result = train_step(engine, micro, torch.device("cpu"), want_grad_norm=False)
    return all_reduce_mean(result.loss).item()


def _save(engine, named, groups, folder: Path) -> None:
    from distlm.parallel.distributed import barrier

    c, layout = groups.coords, groups.layout
    payloads = shard_payloads(named, engine.optimizer, c.stage, c.tp_rank, layout.tp, layout.pp,
                              writes=c.dp_rank == 0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        torch.save(payload, folder / name)
    barrier()


def _train_and_save(rank, world, saved, folder):
    arch, tp, pp, dp, zero, precision = SAVED[saved]
    engine, named, groups, batch = _engine(rank, world, arch, tp, pp, zero, precision)
    losses = [_step(engine, groups, batch, s) for s in range(STEPS)]
    _save(engine, named, groups, Path(folder) / "checkpoint")
    losses.append(_step(engine, groups, batch, STEPS))
    _save(engine, named, groups, Path(folder) / "after")
    return losses, type(engine.optimizer).__name__


def _load_and_continue(rank, world, saved, layout, checkpoint, folder):
    arch, *_, precision = SAVED[saved]
    tp, pp, dp, zero = layout
    engine, named, groups, batch = _engine(rank, world, arch, tp, pp, zero, precision)
    step = load_resharded(engine, named, groups, checkpoint, log=lambda *_: None)
    _save(engine, named, groups, Path(folder) / "loaded")
    loss = _step(engine, groups, batch, STEPS)
    _save(engine, named, groups, Path(folder) / "after")
    return step, loss, type(engine.optimizer).__name__


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            world = SAVED[name][1] * SAVED[name][2] * SAVED[name][3]
            losses, optimizer = spawn_ranks(_train_and_save, world, name, str(folder), timeout=240)[0]
            assert losses[-1] < losses[0], losses  # it learns: the state carried over is not trivial
            made[name] = (folder, losses, optimizer)
        return made[name]
    return get


def _both(folder: Path) -> tuple[dict, dict]:
    return consolidated_state_dict(folder), consolidated_optimizer_state(folder)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_continues_on_another_layout(case, saved_runs, tmp_path):
    saved, layout = CASES[case]
    folder, losses, saved_optimizer = saved_runs(saved)
    tp, pp, dp, _ = layout
    step, loss, optimizer = spawn_ranks(_load_and_continue, tp * pp * dp, saved, layout, str(folder / "checkpoint"),
                                        str(tmp_path), timeout=240)[0]
    assert (saved_optimizer, optimizer) == (OPTIMIZER[saved], OPTIMIZER[case])
    # (a) after loading, layout B holds exactly A's fp32 weights, both moments and the step
    weights, optim = _both(folder / "checkpoint")
    got_weights, got_optim = _both(tmp_path / "loaded")
    assert step == optim["step"] == got_optim["step"] == STEPS + (saved_optimizer == "FP16_UnfusedOptimizer")
    assert weights.keys() == got_weights.keys() == optim["exp_avg"].keys() == got_optim["exp_avg"].keys()
    for name in weights:
        assert torch.equal(got_weights[name], weights[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got_optim[key][name], optim[key][name]), (key, name)
    assert any(t.abs().max() > 0 for t in optim["exp_avg_sq"].values())

    # (b) the next step: the loss A had, and the weights and moments A reached
    bf16 = SAVED[saved][-1] == "bf16"
    assert loss == pytest.approx(losses[-1], rel=1e-3 if bf16 else 1e-5), (optimizer, saved_optimizer)
    weights, optim = _both(folder / "after")
    got_weights, got_optim = _both(tmp_path / "after")
    assert got_optim["step"] == optim["step"] == step + 1
    tol = dict(rtol=1e-2, atol=1e-3) if bf16 else dict(rtol=1e-4, atol=1e-6)
    for name in weights:
        if name.endswith("attn.k_proj.bias"):
            # Its gradient is zero but for rounding (a key bias shifts all of a query's scores
            # alike), so Adam's normalised step is rounding noise that differs between layouts.
            continue
        torch.testing.assert_close(got_weights[name], weights[name], **tol,
                                   msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(got_optim["exp_avg"][name], optim["exp_avg"][name],
                                   rtol=tol["rtol"] * 10, atol=1e-3 if bf16 else 1e-6,
                                   msg=lambda m: f"{name} exp_avg: {m}")


def _load_or_error(rank, world, checkpoint, layout):
    tp, pp, dp, zero = layout
    engine, named, groups, _ = _engine(rank, world, "llama", tp, pp, zero, "fp32")
    try:
        load_resharded(engine, named, groups, checkpoint, log=lambda *_: None)
    except CheckpointError as e:
        return str(e)
    return None


@pytest.mark.distributed
@pytest.mark.slow
def test_a_file_that_does_not_fit_one_stage_stops_every_rank(saved_runs, tmp_path):
    folder, *_ = saved_runs("fp32-dp2-zero1")
    for f in (folder / "checkpoint").iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    model = torch.load(tmp_path / shard_file(0, 0), weights_only=True)
    model["tensors"]["blocks.1.mlp.up_proj.weight"] = model["tensors"]["blocks.1.mlp.up_proj.weight"][:32]
    torch.save(model, tmp_path / shard_file(0, 0))
    # pipeline stage 1 holds block 1; stage 0 must not go on to train alone
    errors = spawn_ranks(_load_or_error, 2, str(tmp_path), (1, 2, 1, 0), timeout=240)
    assert errors[0] == errors[1] and errors[0] is not None, errors
    assert ("model-stage00-tp00.pt holds blocks.1.mlp.up_proj.weight with the one-process shape (32, 32), "
            "this model's is (64, 32)") in errors[0], errors[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_missing_optimizer_files_are_named(saved_runs, tmp_path):
    folder, *_ = saved_runs("gpt2-tp2-zero0")
    for f in (folder / "checkpoint").iterdir():
        if f.name != optim_file(0, 1):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="lacks the optim files"):
        consolidated_optimizer_state(tmp_path)
    assert consolidated_state_dict(tmp_path).keys()  # the model files alone still consolidate (export)


# --------------------------------------------------------------------------- one process, torch's AdamW


class _Engine:
    """What load_resharded uses of a DeepSpeed engine, around a plain model and torch's AdamW."""

    def __init__(self, arch="llama", seed=5):
        from distlm.config import ModelConfig
        from distlm.model import Transformer, parameter_groups

        self.module = Transformer(ModelConfig(vocab_size=VOCAB, max_seq_len=SEQ, **ARCH[arch]), seed=seed)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.module, 0.1), lr=LR, foreach=True)
        self.global_steps = self.global_samples = 0

    def train_batch_size(self):
        return BATCH

    def step(self, step: int) -> float:
        g = torch.Generator().manual_seed(1000 + step)
        rows = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        loss = self.module(rows[:, :-1], rows[:, 1:])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, payload in shard_payloads(self.module.named_parameters(), self.optimizer, 0, 0, 1, 1, True).items():
            torch.save(payload, folder / name)


def _one_rank():
    from types import SimpleNamespace

    from distlm.parallel.layout import Coords, Layout

    return SimpleNamespace(layout=Layout(1, 1, 1), coords=Coords(0, 0, 0), rank=0)


def test_payloads_are_copies_that_training_does_not_change(tmp_path):
    engine = _Engine()
    engine.step(0)
    payloads = shard_payloads(engine.module.named_parameters(), engine.optimizer, 0, 0, 1, 1, writes=True)
    assert set(payloads) == {shard_file(0, 0), optim_file(0, 0)}
    model, optim = payloads[shard_file(0, 0)], payloads[optim_file(0, 0)]
    assert optim["step"] == 1 and set(optim) >= {"exp_avg", "exp_avg_sq", "sliced_dim", "tp_size", "pp", "stage"}
    before = {k: v.clone() for k, v in model["tensors"].items()}
    engine.step(1)
    assert all(torch.equal(model["tensors"][k], v) for k, v in before.items())
    assert shard_payloads(engine.module.named_parameters(), engine.optimizer, 0, 0, 1, 1, writes=False) == {}


def test_plain_adamw_state_is_created_and_continues(tmp_path):
    saved = _Engine()
    for s in range(STEPS):
        saved.step(s)
    saved.save(tmp_path / "checkpoint")
    fresh = _Engine(seed=6)  # other weights, and no optimizer state yet
    assert not fresh.optimizer.state
    assert load_resharded(fresh, fresh.module.named_parameters(), _one_rank(), tmp_path / "checkpoint",
                          log=lambda *_: None) == STEPS
    assert fresh.global_steps == STEPS
    assert fresh.step(STEPS) == saved.step(STEPS)  # the same arithmetic, bit for bit
    for (name, a), b in zip(saved.module.named_parameters(), fresh.module.parameters()):
        assert torch.equal(a, b), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved.optimizer.state[a][key], fresh.optimizer.state[b][key]), (name, key)


def test_files_that_do_not_fit_are_named(tmp_path):
    saved = _Engine()
    saved.step(0)
    saved.save(tmp_path / "ok")
    other = _Engine("gpt2")
    with pytest.raises(CheckpointError) as e:
        load_resharded(other, other.module.named_parameters(), _one_rank(), tmp_path / "ok", log=lambda *_: None)
    assert "model-stage00-tp00.pt holds blocks.0.attn.k_proj.weight with the one-process shape (16, 32), this " \
           "model's is (32, 32)" in str(e.value)
    assert "no model-stage*-tp*.pt file holds blocks.0.attn.k_proj.bias" in str(e.value)
    assert str(e.value).endswith("more")  # a long list is cut short
    (tmp_path / "no-optim").mkdir()
    (tmp_path / "no-optim" / shard_file(0, 0)).write_bytes((tmp_path / "ok" / shard_file(0, 0)).read_bytes())
    with pytest.raises(CheckpointError, match=r"optim-stage00-tp00.pt is missing"):
        load_resharded(saved, saved.module.named_parameters(), _one_rank(), tmp_path / "no-optim", log=lambda *_: None)
