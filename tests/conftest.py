"""Fixtures shared across test modules (most live in their own module)."""

from __future__ import annotations

import pytest

from helpers import SHARED_DATA, ROOT, run_distlm, source_shards
from launchers import reference_curve


@pytest.fixture(scope="session")
def launch_shards(tmp_path_factory):
    """Shards for the launcher tests' shared job (built once per session)."""
    return source_shards(tmp_path_factory.mktemp("launch-data"))


@pytest.fixture(scope="session")
def launch_reference(tmp_path_factory, launch_shards):
    """The curve every launcher must reproduce: the shared job under plain torchrun, 2 ranks."""
    return reference_curve(tmp_path_factory.mktemp("launch-reference"), launch_shards)


@pytest.fixture(scope="session")
def shakespeare_char(tmp_path_factory):
    """../shared/data/tinyshakespeare.txt as character-level shards: rows of 64, 10% held out."""
    from distlm.data.prepare import prepare_corpus

    corpus = SHARED_DATA / "tinyshakespeare.txt"
    if not corpus.is_file():
        pytest.fail(f"{corpus} is missing: the toolkit tests read the shared corpus from ../shared/data")
    out = tmp_path_factory.mktemp("shakespeare") / "char"
    prepare_corpus([str(corpus)], str(out), tokenizer="char", seq_len=64, val_fraction=0.1, block_rows=1024,
                   log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def char_checkpoint(tmp_path_factory, shakespeare_char):
    """A run folder with a small character-level causal model trained 300 steps on it (about 20 s).

    Its validation loss is well below the 4.2 nats of a uniform guess, so generation and
    evaluation have something to show; ``run_dir / "checkpoints"`` holds steps 150 and 300.
    """
    run_dir = tmp_path_factory.mktemp("char-run") / "run"
    run_distlm(["train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={shakespeare_char}",
                f"run.dir={run_dir}", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
                "train.max_steps=300", "train.batch_size=16", "train.log_every=50", "train.save_every=150",
                "train.eval_iters=8", "optim.lr=3e-3", "optim.warmup_steps=20"], timeout=300)
    return run_dir
