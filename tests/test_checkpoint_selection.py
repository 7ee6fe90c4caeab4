"""Which checkpoint a run continues from (matrix rows 1, 3, 4, 5): real folders committed by
the real commit code, then damaged the way disks and kills damage them. No engine needed."""

import json
import random

import numpy as np
import pytest
import torch

from distlm.checkpoint.commit import commit
from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.files import FileWriter, serialize
from distlm.checkpoint.manifest import MANIFEST, build
from distlm.checkpoint.retention import steps_to_delete
from distlm.checkpoint.select import clean_leftovers, find_resume, tag_for
from distlm.checkpoint.state import check_compatible, rng_state, set_rng_state


def _cfg(d_model=32, seed=1, max_steps=10, decay_steps=None):
    return {"model": {"d_model": d_model}, "data": {"seed": seed},
            "train": {"max_steps": max_steps}, "optim": {"decay_steps": decay_steps}, "deepspeed": {}}


def _make(ckpt, step, config=None, finished=True):
    """A checkpoint folder written and committed the way a save does it."""
    tmp = ckpt / (tag_for(step) + ".tmp")
    tmp.mkdir(parents=True)
    writer = FileWriter(tmp, step)
    writer.write(tmp / "mp_rank_00_model_states.pt", serialize({"w": torch.arange(1000.0) + step}))
    writer.write(tmp / "distlm.json", json.dumps({"step": step, "config": config or _cfg(), "state": {}}).encode())
    writer.finish()
    if not finished:
        return tmp
    return commit(tmp, build(step, writer.records, {"tp": 1}, config or _cfg()))


def _flip_byte(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_fresh_directory_starts_fresh(tmp_path):
    assert find_resume("auto", tmp_path / "none") is None
    assert find_resume("never", tmp_path) is None


def test_auto_follows_latest_written_by_the_commit(tmp_path):
    _make(tmp_path, 5)
    ten = _make(tmp_path, 10)
    assert (tmp_path / "latest").read_text() == tag_for(10)
    assert find_resume("auto", tmp_path) == ten


def test_an_unfinished_save_is_never_loaded_and_is_cleaned(tmp_path):
    five = _make(tmp_path, 5)
    _make(tmp_path, 10, finished=False)
    said = []
    assert find_resume("auto", tmp_path, log=said.append) == five
    assert clean_leftovers(tmp_path, log=said.append) == [tag_for(10) + ".tmp"]
    assert not (tmp_path / (tag_for(10) + ".tmp")).exists()


def test_only_an_unfinished_first_save_starts_from_zero_saying_so(tmp_path):
    _make(tmp_path, 3, finished=False)
    said = []
    assert find_resume("auto", tmp_path, log=said.append) is None
    assert any("only unfinished saves" in line and "step 0" in line for line in said)


@pytest.mark.parametrize("latest", [b"", b"step-000", b"\xff\xfe garbage", b"step-00000099"],
                         ids=["empty", "torn", "binary", "deleted-step"])
def test_a_bad_latest_pointer_warns_and_uses_the_newest_valid(tmp_path, latest):
    _make(tmp_path, 5)
    seven = _make(tmp_path, 7)
    (tmp_path / "latest").write_bytes(latest)
    said = []
    assert find_resume("auto", tmp_path, log=said.append) == seven
    assert any("names no checkpoint folder" in line for line in said)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest-torn"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage):
    five = _make(tmp_path, 5)
    ten = _make(tmp_path, 10)
    target = ten / "mp_rank_00_model_states.pt"
    if damage == "flip":
        _flip_byte(target)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "delete":
        target.unlink()
    else:
        (ten / MANIFEST).write_text('{"format": 3, "fi')
    said = []
    assert find_resume("auto", tmp_path, log=said.append) == five
    named = "manifest.json" if damage == "manifest-torn" else "mp_rank_00_model_states.pt"
    assert any(tag_for(10) in line and named in line for line in said)
    assert any("resuming from step-00000005 instead" in line for line in said)
    with pytest.raises(CheckpointError, match="on_damaged=fail"):
        find_resume("auto", tmp_path, on_damaged="fail")


def test_size_only_verification_catches_truncation_but_not_a_flipped_bit(tmp_path):
    _make(tmp_path, 5)
    ten = _make(tmp_path, 10)
    _flip_byte(ten / "mp_rank_00_model_states.pt")
    assert find_resume("auto", tmp_path, verify="size") == ten  # the documented cost of verify=size
    (ten / "distlm.json").write_bytes(b"{}")
    assert find_resume("auto", tmp_path, verify="size") != ten


def test_checkpoints_that_all_fail_verification_stop_the_run(tmp_path):
    for step in (5, 10):
        _flip_byte(_make(tmp_path, step) / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="none verifies.*Not starting from scratch"):
        find_resume("auto", tmp_path)


def test_an_explicit_checkpoint_must_verify(tmp_path):
    five = _make(tmp_path, 5)
    assert find_resume(str(five), tmp_path) == five
    with pytest.raises(CheckpointError, match="train.resume=.*no manifest.json"):
        find_resume(str(tmp_path / "step-00000009"), tmp_path)
    _flip_byte(five / "distlm.json", 3)
    with pytest.raises(CheckpointError, match="distlm.json does not match its SHA-256"):
        find_resume(str(five), tmp_path)


def test_a_checkpoint_of_the_previous_format_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / tag_for(4)
    old.mkdir()
    (old / "distlm.json").write_text(json.dumps({"format": 2, "step": 4}))
    with pytest.raises(CheckpointError, match="older than checkpoint format 3.*another run.dir"):
        find_resume("auto", tmp_path)


def test_committing_a_step_again_replaces_the_abandoned_folder(tmp_path):
    _make(tmp_path, 5, config=_cfg(seed=1))
    again = _make(tmp_path, 5, config=_cfg(seed=2))
    assert find_resume("auto", tmp_path) == again
    assert json.loads((again / "distlm.json").read_text())["config"]["data"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(5)]


def test_retention_keeps_the_newest_every_mth_and_the_protected():
    steps = [100, 200, 300, 400, 500, 600]
    assert steps_to_delete(steps, keep_last=2, keep_every=0, protect=[]) == [100, 200, 300, 400]
    assert steps_to_delete(steps, keep_last=2, keep_every=300, protect=[]) == [100, 200, 400]
    assert steps_to_delete(steps, keep_last=2, keep_every=0, protect=[200]) == [100, 300, 400]
    assert steps_to_delete(steps, keep_last=0, keep_every=0, protect=[]) == []


def test_a_different_model_is_refused_naming_the_key(tmp_path):
    path = _make(tmp_path, 1, config=_cfg(d_model=32))
    with pytest.raises(CheckpointError, match=r"model.d_model: 32 -> 64"):
        check_compatible(path, _cfg(d_model=64))


def test_data_order_and_schedule_changes_warn(tmp_path):
    path = _make(tmp_path, 1)
    said = []
    check_compatible(path, _cfg(seed=2, max_steps=20), log=said.append)
    assert any("data.seed changed" in line for line in said)
    assert any("decay now ends at step 20, not 10" in line for line in said)
    said.clear()
    check_compatible(path, _cfg(), log=said.append)
    assert said == []
    # an explicit decay horizon keeps the schedule when only max_steps grows
    path = _make(tmp_path, 2, config=_cfg(decay_steps=10))
    check_compatible(path, _cfg(max_steps=20, decay_steps=10), log=said.append)
    assert said == []


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_kill_while_a_step_is_being_replaced_puts_the_old_one_back(tmp_path):
    """Between moving the old step-N aside and renaming the new one in: neither name is step-N."""
    five = _make(tmp_path, 5, config=_cfg(seed=1))
    five.rename(tmp_path / (tag_for(5) + ".replaced"))
    _make(tmp_path, 5, config=_cfg(seed=2), finished=False)   # the new save, complete but not renamed
    said = []
    assert find_resume("auto", tmp_path, log=said.append) == five
    assert json.loads((five / "distlm.json").read_text())["config"]["data"]["seed"] == 1
    assert any("put step-00000005 back" in line for line in said)
    clean_leftovers(tmp_path, log=said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(5)]


def test_an_interrupted_deletion_is_cleaned_not_loaded(tmp_path):
    from distlm.checkpoint.select import delete_checkpoint

    five, ten = _make(tmp_path, 5), _make(tmp_path, 10)
    five.rename(tmp_path / (tag_for(5) + ".deleting"))           # killed after the rename
    (tmp_path / (tag_for(5) + ".deleting") / "distlm.json").unlink()  # ... and partway through deleting
    assert find_resume("auto", tmp_path) == ten
    assert clean_leftovers(tmp_path, log=lambda *_: None) == [tag_for(5) + ".deleting"]
    delete_checkpoint(ten)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_starting_fresh_over_an_earlier_runs_checkpoints_is_refused(tmp_path):
    from distlm.checkpoint.select import refuse_fresh_start_over

    refuse_fresh_start_over(tmp_path / "none")
    _make(tmp_path, 5)
    with pytest.raises(CheckpointError, match="train.resume=never.*step-00000005.*another run.dir"):
        refuse_fresh_start_over(tmp_path)


def test_a_manifest_entry_that_is_not_a_file_is_a_damaged_checkpoint(tmp_path):
    five, ten = _make(tmp_path, 5), _make(tmp_path, 10)
    manifest = json.loads((ten / MANIFEST).read_text())
    manifest["files"]["."] = {"size": 0, "sha256": ""}
    (ten / MANIFEST).write_text(json.dumps(manifest))
    said = []
    assert find_resume("auto", tmp_path, log=said.append) == five
    assert any("not a file inside the checkpoint folder" in line for line in said)
