"""Which checkpoint a run continues from; real folders on disk, no engine needed."""

import json
import random

import numpy as np
import pytest
import torch

from distlm.checkpoint.state import (FORMAT, MARKER, CheckpointError, apply_retention, check_compatible, find_resume, rng_state,
                                     set_rng_state, tag_for)


def _make(ckpt, step, finished=True):
    path = ckpt / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if finished:
        (path / MARKER).write_text(json.dumps({"step": step}))
    return path


def test_fresh_directory_starts_fresh(tmp_path):
    assert find_resume("auto", tmp_path / "none") is None
    assert find_resume("never", tmp_path) is None


def test_auto_follows_latest(tmp_path):
    _make(tmp_path, 5)
    ten = _make(tmp_path, 10)
    (tmp_path / "latest").write_text(tag_for(10))
    assert find_resume("auto", tmp_path) == ten


def test_unfinished_save_is_never_loaded(tmp_path):
    five = _make(tmp_path, 5)
    _make(tmp_path, 10, finished=False)
    (tmp_path / "latest").write_text(tag_for(5))
    assert find_resume("auto", tmp_path) == five


def test_latest_pointing_at_missing_step_warns_and_uses_newest(tmp_path):
    seven = _make(tmp_path, 7)
    (tmp_path / "latest").write_text(tag_for(99))
    said = []
    assert find_resume("auto", tmp_path, log=said.append) == seven
    assert "not a finished checkpoint" in said[0]


def test_only_unfinished_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    _make(tmp_path, 3, finished=False)
    with pytest.raises(CheckpointError, match="none finished saving"):
        find_resume("auto", tmp_path)


def test_explicit_path_must_be_a_finished_checkpoint(tmp_path):
    path = _make(tmp_path, 4)
    assert find_resume(str(path), tmp_path) == path
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        find_resume(str(tmp_path / "step-00000009"), tmp_path)


def test_retention_keeps_the_newest_and_the_protected(tmp_path):
    for step in (1, 2, 3, 4):
        _make(tmp_path, step)
    removed = apply_retention(tmp_path, keep_last=2, protect=tag_for(1))
    assert removed == [tag_for(2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(1), tag_for(3), tag_for(4)]


def _marker_with(path, config, fmt=FORMAT):
    (path / MARKER).write_text(json.dumps({"format": fmt, "step": 1, "config": config}))


def _cfg(d_model=32, seed=1, max_steps=10, decay_steps=None):
    return {"model": {"d_model": d_model}, "data": {"seed": seed},
            "train": {"max_steps": max_steps}, "optim": {"decay_steps": decay_steps}, "deepspeed": {}}


def test_a_different_model_is_refused_naming_the_key(tmp_path):
    path = _make(tmp_path, 1)
    _marker_with(path, _cfg(d_model=32))
    with pytest.raises(CheckpointError, match=r"model.d_model: 32 -> 64"):
        check_compatible(path, _cfg(d_model=64))


def test_a_checkpoint_of_the_old_format_is_refused_with_what_to_do(tmp_path):
    path = _make(tmp_path, 1)
    (path / MARKER).write_text(json.dumps({"step": 1, "config": _cfg()}))  # before "format" existed
    with pytest.raises(CheckpointError, match="format is 1, not 2.*train.resume=never"):
        check_compatible(path, _cfg())
    _marker_with(path, _cfg())
    check_compatible(path, _cfg())


def test_data_order_and_schedule_changes_warn(tmp_path):
    path = _make(tmp_path, 1)
    _marker_with(path, _cfg())
    said = []
    check_compatible(path, _cfg(seed=2, max_steps=20), log=said.append)
    assert any("data.seed changed" in line for line in said)
    assert any("decay now ends at step 20, not 10" in line for line in said)
    said.clear()
    check_compatible(path, _cfg(), log=said.append)
    assert said == []
    # an explicit decay horizon keeps the schedule when only max_steps grows
    _marker_with(path, _cfg(decay_steps=10))
    check_compatible(path, _cfg(max_steps=20, decay_steps=10), log=said.append)
    assert said == []


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
