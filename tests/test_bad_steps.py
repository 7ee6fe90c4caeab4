"""Bad steps with real processes (matrix row 17): NaN/Inf and loss spikes are skipped by every rank.

The fault hook makes one rank's loss NaN (its gradient then poisons the reduced norm) or ten
times larger, at chosen steps. What is checked is what a user relies on: the skipped update
changed neither the weights nor the optimizer (checkpoints before and after are equal), every
rank skipped it, the counter in metrics.jsonl grows, K in a row stop the run with exit code
79, the spike window survives a resume, and a rollback goes on past the bad data.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from distlm.fault import exit_codes
from distlm.fault.inject import Fault
from helpers import ROOT, curve, run_distlm, same_weights, source_shards, step_rows

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CONFIG = str(ROOT / "configs" / "tiny-test.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return source_shards(tmp_path_factory.mktemp("bad-steps-corpus"), shard_mb=0.05)


def _args(data_dir, run_dir, steps, *extra):
    return ["train", CONFIG, f"data.path={data_dir}", f"run.dir={run_dir}", f"train.max_steps={steps}",
            "train.log_every=1", "train.batch_size=8", "train.eval_every=0", "checkpoint.keep_last=0", *extra]


def _checkpoint(run_dir, step) -> dict:
    """Every file of a checkpoint loaded (weights, ZeRO partitions, optimizer moments)."""
    from distlm.checkpoint.safe_load import load_file

    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    return {p.name: load_file(p) for p in sorted(folder.glob("*.pt")) if not p.name.startswith("distlm-rank")}


def _tensors(tree) -> list:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _unchanged(run_dir, before: int, after: int) -> bool:
    a, b = _checkpoint(run_dir, before), _checkpoint(run_dir, after)
    ta, tb = _tensors(a), _tensors(b)
    return a.keys() == b.keys() and len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb))


def _skipped(run_dir) -> list[int]:
    return [sum((r.get("skipped_steps") or {}).values()) for r in step_rows(run_dir)]


@pytest.mark.parametrize("layout", ["zero1-dp2", "pp2"])
def test_a_nan_loss_on_one_rank_is_skipped_by_every_rank(data_dir, tmp_path, layout):
    run_dir = tmp_path / layout
    extra = ["parallel.zero_stage=1"] if layout == "zero1-dp2" else ["parallel.pp=2", "parallel.zero_stage=0"]
    nan = Fault(rank=1, step=3, phase="loss", signal="NAN")  # rank 1: a data-parallel peer / the last stage
    out = run_distlm(_args(data_dir, run_dir, 5, "train.save_every=1", *extra), nproc=2, timeout=240,
                     env={"DISTLM_FAULT": nan.to_env()}).stdout
    assert "step 3: update SKIPPED on every rank (the loss or the gradient is NaN/Inf)" in out
    assert _skipped(run_dir) == [0, 0, 1, 1, 1]
    assert step_rows(run_dir)[-1]["skipped_steps"] == {"nonfinite": 1}
    assert _unchanged(run_dir, 2, 3)          # weights and optimizer state, on every rank's files
    assert not _unchanged(run_dir, 3, 4)      # and the run trains on afterwards
    final = json.loads((run_dir / "checkpoints" / "step-00000005" / "distlm.json").read_text())
    assert final["state"]["bad_steps"]["skipped"] == {"nonfinite": 1}


def test_k_bad_steps_in_a_row_stop_every_rank_with_exit_79(data_dir, tmp_path):
    """Plain fp32 without ZeRO: the path where distlm, not DeepSpeed, vetoes the update."""
    run_dir = tmp_path / "k"
    nan = Fault(rank=1, step=3, phase="loss", signal="NAN", repeat=3)
    result = run_distlm(_args(data_dir, run_dir, 8, "train.save_every=1", "parallel.zero_stage=0",
                              "fault.max_bad_steps_in_row=3"), nproc=2, timeout=240, check=False,
                        env={"DISTLM_FAULT": nan.to_env()})
    out = result.stdout
    assert result.returncode != 0
    assert len(re.findall(rf"exitcode\s*:\s*{exit_codes.BAD_STEPS}\b", out)) >= 1, out[-3000:]
    assert "3 updates in a row were skipped up to step 5" in out
    ended = json.loads((run_dir / exit_codes.EXIT_FILE).read_text())
    assert ended["code"] == exit_codes.BAD_STEPS and ended["step"] == 5
    assert _unchanged(run_dir, 2, 3) and _unchanged(run_dir, 2, 4)
    assert not (run_dir / "checkpoints" / "step-00000005").exists()  # a stopping run saves nothing new


SPIKE_ARGS = ("fault.spike_factor=3", "fault.spike_window=3", "train.save_every=5")


def test_a_loss_spike_is_skipped_and_its_window_survives_a_resume(data_dir, tmp_path):
    spike = {"DISTLM_FAULT": Fault(rank=0, step=7, phase="loss", signal="SPIKE").to_env()}
    whole = tmp_path / "whole"
    out = run_distlm(_args(data_dir, whole, 9, *SPIKE_ARGS), env=spike).stdout
    assert re.search(r"step 7: update SKIPPED on every rank \(loss [\d.]+ is over 3x the mean [\d.]+ of the last 3 steps\)", out)
    assert step_rows(whole)[-1]["skipped_steps"] == {"spike": 1}

    # The same run stopped at step 5 and resumed: the window of steps 3-5 comes from the checkpoint.
    split = tmp_path / "split"
    run_distlm(_args(data_dir, split, 5, *SPIKE_ARGS), env=spike)
    out = run_distlm(_args(data_dir, split, 9, *SPIKE_ARGS), env=spike).stdout
    assert "step 7: update SKIPPED" in out
    assert curve(split) == curve(whole)
    assert same_weights(_checkpoint(whole, 9)["model-stage00-tp00.pt"]["tensors"],
                        _checkpoint(split, 9)["model-stage00-tp00.pt"]["tensors"])


def test_rollback_reloads_the_last_checkpoint_and_reads_on_past_the_bad_data(data_dir, tmp_path):
    run_dir = tmp_path / "rollback"
    nan = Fault(rank=0, step=5, phase="loss", signal="NAN", repeat=3)
    out = run_distlm(_args(data_dir, run_dir, 10, "train.save_every=2", "fault.max_bad_steps_in_row=3",
                           "fault.on_bad_steps=rollback"), env={"DISTLM_FAULT": nan.to_env()}).stdout
    assert "rollback 1/3: weights and optimizer back to step-00000004" in out
    assert "(24 rows skipped)" in out  # steps 5-7: 3 x 8 rows read once and not again
    final = json.loads((run_dir / "checkpoints" / "step-00000010" / "distlm.json").read_text())
    assert final["state"]["rows_consumed"] == (10 + 3) * 8
    assert final["state"]["bad_steps"]["rollbacks"] == 1
    assert final["state"]["bad_steps"]["skipped"] == {"nonfinite": 3}
    assert all(r["loss"] is not None for r in step_rows(run_dir) if r["step"] > 7)
    # Step 6 was saved during the streak, retired by the rollback and saved again after it.
    resaved = json.loads((run_dir / "checkpoints" / "step-00000006" / "distlm.json").read_text())
    assert resaved["state"]["rows_consumed"] == (6 + 3) * 8
