"""Matrix row 11 and the checkpoint issue's reshard item, end to end: a 2-process data-parallel
ZeRO-1 run saves at step 4 and continues there on another layout (tp=2; pp=2; one process).

The weights and Adam state are re-sliced from the checkpoint's layout-free files; the losses of
steps 5-8 must follow the uninterrupted run within ``TOLERANCE`` (relative). Measured: identical
to about 1e-6 (reductions sum in another order on another layout), see the printed figures.
"""

from __future__ import annotations

import shutil

import pytest

from helpers import ROOT, run_distlm, source_shards, step_rows

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, SAVE_AT = 8, 4
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return source_shards(tmp_path_factory.mktemp("reshard-corpus"))


def _args(data_dir, run_dir, *extra):
    # vocab 258: divisible by tp=2 (the byte tokenizer has 257 ids)
    return ["train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={data_dir}", f"run.dir={run_dir}",
            f"train.max_steps={STEPS}", "train.log_every=1", "train.batch_size=8", "train.eval_every=0",
            f"train.save_every={SAVE_AT}", "model.vocab_size=258", "checkpoint.keep_last=0", *extra]


@pytest.fixture(scope="module")
def saved(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp2")
    run_distlm(_args(data_dir, run_dir, "parallel.zero_stage=1"), nproc=2, timeout=300)
    return run_dir


@pytest.mark.parametrize("nproc, layout", [(2, ["parallel.tp=2", "parallel.zero_stage=1"]),
                                           (2, ["parallel.pp=2", "parallel.zero_stage=0"]),
                                           (1, ["parallel.zero_stage=0"])],
                         ids=["to-tp2", "to-pp2", "to-one-process"])
def test_a_checkpoint_continues_on_another_layout(data_dir, saved, tmp_path, nproc, layout):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved / "checkpoints" / f"step-{SAVE_AT:08d}", run_dir / "checkpoints" / f"step-{SAVE_AT:08d}")
    shutil.copy(saved / "metrics.jsonl", run_dir / "metrics.jsonl")
    out = run_distlm(_args(data_dir, run_dir, *layout), nproc=nproc, timeout=300).stdout
    assert f"resharding step-{SAVE_AT:08d} for this layout" in out
    assert f"at step {SAVE_AT}" in out
    mine, ref = step_rows(run_dir), step_rows(saved)
    assert [r["step"] for r in mine] == list(range(1, STEPS + 1))
    assert [r["data_digest"] for r in mine] == [r["data_digest"] for r in ref]   # the same rows, none twice
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(mine[SAVE_AT:], ref[SAVE_AT:]))
    print(f"{'/'.join(layout)}: largest relative loss difference over steps {SAVE_AT + 1}-{STEPS}: {worst:.1e}")
    assert worst <= TOLERANCE
