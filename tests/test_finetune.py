"""Fine-tuning (train.init_from): pretrained weights, a fresh optimizer and schedule, any layout.

The corpus is cut in two: a model pretrained on the first half and fine-tuned on the second
must reach a lower loss there than the same model trained from scratch for the same steps.
The fine-tune runs on another layout (tp=2 over 2 processes) than the one-process pretraining.
"""

from __future__ import annotations

import pytest

from distlm.data.prepare import prepare_corpus
from helpers import ROOT, SHARED_DATA, read_metrics, run_distlm, step_rows

MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.vocab_size=66", "train.batch_size=16",
         "train.log_every=10", "train.eval_iters=8", "optim.lr=3e-3", "optim.warmup_steps=10", "train.threads=1"]
FINE_TUNE_STEPS = 40


@pytest.fixture(scope="module")
def halves(tmp_path_factory, shakespeare_char):
    """Both halves of the corpus as shards, with the whole corpus's character tokenizer."""
    root = tmp_path_factory.mktemp("halves")
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()
    cut = text.index("\n\n", len(text) // 2) + 2  # between two speeches
    out = []
    for name, part in (("first", text[:cut]), ("second", text[cut:])):
        (root / f"{name}.txt").write_text(part)
        prepare_corpus([str(root / f"{name}.txt")], str(root / name), tokenizer=str(shakespeare_char / "tokenizer.json"),
                       seq_len=64, val_fraction=0.1, block_rows=1024, log=lambda *_: None)
        out.append(root / name)
    return out


def _train(data, run_dir, steps: int, extra=(), nproc: int = 1, check: bool = True):
    return run_distlm(["train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={data}", f"run.dir={run_dir}",
                       f"train.max_steps={steps}", *MODEL, *extra], nproc=nproc, timeout=300, check=check)


def _val(run_dir) -> float:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]


def test_fine_tuning_beats_training_from_scratch(halves, tmp_path):
    first, second = halves
    pretrained = tmp_path / "pretrained"
    _train(first, pretrained, 200)

    tuned, scratch = tmp_path / "tuned", tmp_path / "scratch"
    out = _train(second, tuned, FINE_TUNE_STEPS, [f"train.init_from={pretrained}", "parallel.tp=2"], nproc=2).stdout
    _train(second, scratch, FINE_TUNE_STEPS)
    assert "fine-tuning from" in out and "step-00000200" in out, out[-3000:]
    # a fresh run: its own step count and schedule (warmup from 0), not the pretraining's
    rows = step_rows(tuned)
    assert [r["step"] for r in rows] == list(range(10, FINE_TUNE_STEPS + 1, 10))
    assert rows[0]["lr"] < 3e-3
    tuned_val, scratch_val, pretrained_val = _val(tuned), _val(scratch), _val(pretrained)
    print(f"second half val loss after {FINE_TUNE_STEPS} steps: fine-tuned {tuned_val:.3f}, from scratch "
          f"{scratch_val:.3f} (pretrained on the first half: {pretrained_val:.3f} on its own val)")
    assert tuned_val < scratch_val - 0.2, (tuned_val, scratch_val)

    # Restarted, the fine-tune resumes its own checkpoint; init_from is not read again. One process
    # (its tp=2 checkpoint resharded, as any resume may be): a second 2-process launch costs CI time.
    again = _train(second, tuned, FINE_TUNE_STEPS + 10, [f"train.init_from={pretrained}"]).stdout
    assert "is not read: the run resumes from its own" in again and f"at step {FINE_TUNE_STEPS}" in again, again[-3000:]


def test_init_from_another_model_names_what_differs(halves, tmp_path, char_checkpoint):
    """Another width, and another norm (same shapes, another function): refused on both ranks, named."""
    first, _ = halves
    result = _train(first, tmp_path / "wrong", 5, [f"train.init_from={char_checkpoint}", "model.d_model=32",
                                                   "model.n_heads=2", "model.norm=rmsnorm"], nproc=2, check=False)
    assert result.returncode != 0 and "exitcode: 4" in result.stdout, result.stdout[-3000:]  # torchrun's own is 1
    assert result.stdout.count("the pretrained model is not this config's model") == 2  # each rank, none waiting
    assert "model.d_model=64 (this config: 32)" in result.stdout
    assert "model.norm=layernorm (this config: rmsnorm)" in result.stdout
    assert "(this config: 64)" not in result.stdout  # max_seq_len is the same: not named


def test_shape_check_names_the_tensors(halves, tmp_path):
    """Below the config check, each tensor's shape is checked against this layout's slice."""
    import torch

    from distlm.checkpoint.errors import CheckpointError
    from distlm.checkpoint.reshard import load_weights
    from distlm.config import ModelConfig
    from distlm.model import Transformer
    from types import SimpleNamespace

    first, _ = halves
    pretrained = tmp_path / "pretrained"
    _train(first, pretrained, 1, ["model.d_model=32", "model.n_heads=2"])
    folder = pretrained / "checkpoints" / "step-00000001"
    groups = SimpleNamespace(coords=SimpleNamespace(tp_rank=0), layout=SimpleNamespace(tp=1))  # one process
    ok = Transformer(ModelConfig(vocab_size=66, max_seq_len=64, n_layers=2, d_model=32, n_heads=2), seed=5)
    wide = Transformer(ModelConfig(vocab_size=66, max_seq_len=64, n_layers=2, d_model=64, n_heads=2), seed=5)
    assert load_weights(ok.named_parameters(), groups, folder) == len(list(ok.parameters()))
    saved = torch.load(folder / "model-stage00-tp00.pt", weights_only=True)["tensors"]
    assert all(torch.equal(p, saved[n]) for n, p in ok.named_parameters())
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.q_proj\.weight with the one-process shape"):
        load_weights(wide.named_parameters(), groups, folder)
