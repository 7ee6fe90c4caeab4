"""train.compile: the compiled forward computes what the eager one does, and keeps the module as it was."""

import pytest
import torch

from distlm.config import ConfigError, ModelConfig, load_config, validate
from distlm.model import Transformer
from distlm.train.compile import compile_for_training

pytestmark = pytest.mark.slow  # Inductor compiles C++ kernels: ~10 s per graph on a CPU


def _model(checkpointing: bool, dropout: float) -> Transformer:
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=64, max_seq_len=16, pos="rope", mlp="swiglu",
                      norm="rmsnorm", dropout=dropout)
    return Transformer(cfg, seed=3, checkpoint_activations=checkpointing)


def _loss_and_grads(model: Transformer, tokens: torch.Tensor, seed: int) -> tuple[float, dict]:
    torch.manual_seed(seed)  # the dropout masks
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing, dropout", [(False, 0.0), (True, 0.1)],
                         ids=["plain", "recompute-dropout"])
def test_compiled_training_step_matches_eager(checkpointing, dropout):
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    eager, compiled = _model(checkpointing, dropout), _model(checkpointing, dropout)
    names_before = list(compiled.state_dict())
    logged = []
    compile_for_training(compiled, dropout, logged.append)
    assert list(compiled.state_dict()) == names_before  # checkpoints keep their names
    assert "one graph" in logged[0]
    hooked = []
    compiled.register_forward_hook(lambda *_: hooked.append(1))  # hooks run around the compiled code
    for step in range(2):
        want_loss, want = _loss_and_grads(eager, tokens, seed=step)
        got_loss, got = _loss_and_grads(compiled, tokens, seed=step)
        # Fused kernels sum in another order: float32 rounding, not a different computation.
        # With dropout this also holds only if the compiled masks are eager's (fallback_random).
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
        eager.zero_grad(), compiled.zero_grad()
    assert len(hooked) == 2


def test_pipeline_stages_compile_each_block():
    from distlm.model.transformer import Block

    stage = torch.nn.Sequential(*_model(False, 0.0).blocks)  # what a pipeline stage holds: blocks, not a Transformer
    x = torch.randn(2, 16, 32)
    want = stage(x)
    logged = []
    compile_for_training(stage, 0.0, logged.append)
    assert "each of the 2 blocks" in logged[0]
    assert all(block.forward is not Block.forward.__get__(block) for block in stage)
    torch.testing.assert_close(stage(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides, refused", [
    (["parallel.zero_stage=3"], "parallel.zero_stage=3"),
    (["parallel.activation_checkpointing=true", "parallel.pp=2", "parallel.zero_stage=1"], "parallel.pp > 1"),
    (["parallel.activation_checkpointing=true", "parallel.tp=2", "model.dropout=0.1"], "model.dropout > 0"),
])
def test_compile_refuses_what_it_cannot_trace(overrides, refused):
    cfg = load_config(None, ["data.path=x", "train.compile=true", *overrides])
    with pytest.raises(ConfigError, match=refused.replace("+", r"\+")):
        validate(cfg, 2 if "parallel.pp=2" in overrides or "parallel.tp=2" in overrides else 1)
    cfg.train.compile = False
    validate(cfg, 2 if "parallel.pp=2" in overrides or "parallel.tp=2" in overrides else 1)  # fine without compile
