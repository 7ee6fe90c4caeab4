"""Matrix row 20: a checkpoint that carries a pickle payload is refused and the payload never runs.

Two attackers: one who swaps a file (the manifest's SHA-256 no longer matches: refused before
unpickling) and one who hands over a whole crafted checkpoint with a manifest that matches
(refused by ``weights_only`` unpickling, which allows tensors, plain values and DeepSpeed's few
state types only). The payload would create a file; the tests check it never appears.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch

from distlm.checkpoint.ds_engine import RoutedCheckpointEngine
from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.manifest import MANIFEST, ManifestError
from helpers import ROOT, run_distlm, source_shards


class Payload:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _plant(path, sentinel, fix_manifest: bool) -> None:
    """Replace ``path`` with a pickle that runs a command; optionally re-sign the manifest."""
    data = pickle.dumps({"state": torch.zeros(2), "evil": Payload(sentinel)})
    path.write_bytes(data)
    if fix_manifest:
        manifest_path = path.parent / MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][path.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest_path.write_text(json.dumps(manifest))


def _checkpoint(tmp_path):
    """A minimal committed checkpoint with one DeepSpeed-style file."""
    from distlm.checkpoint.commit import commit
    from distlm.checkpoint.files import FileWriter, serialize
    from distlm.checkpoint.manifest import build

    tmp = tmp_path / "step-00000001.tmp"
    tmp.mkdir()
    writer = FileWriter(tmp, 1)
    writer.write(tmp / "mp_rank_00_model_states.pt", serialize({"module": {"w": torch.ones(4)}}))
    writer.finish()
    return commit(tmp, build(1, writer.records, {}, {}))


@pytest.mark.parametrize("fix_manifest", [False, True], ids=["swapped-file", "crafted-checkpoint"])
def test_a_planted_payload_is_refused_and_never_runs(tmp_path, fix_manifest):
    folder = _checkpoint(tmp_path)
    sentinel = tmp_path / "pwned"
    io = RoutedCheckpointEngine()
    io.source = (folder, json.loads((folder / MANIFEST).read_text()))
    assert torch.equal(io.load(str(folder / "mp_rank_00_model_states.pt"))["module"]["w"], torch.ones(4))
    _plant(folder / "mp_rank_00_model_states.pt", sentinel, fix_manifest)
    io.source = (folder, json.loads((folder / MANIFEST).read_text()))
    expected = "refused to load" if fix_manifest else "does not match its size and SHA-256"
    with pytest.raises(CheckpointError, match=expected):
        io.load(str(folder / "mp_rank_00_model_states.pt"))
    assert not sentinel.exists()


def test_deepspeed_cannot_read_a_file_the_manifest_does_not_list(tmp_path):
    folder = _checkpoint(tmp_path)
    (folder / "extra.pt").write_bytes(pickle.dumps({"a": 1}))
    io = RoutedCheckpointEngine()
    io.source = (folder, json.loads((folder / MANIFEST).read_text()))
    with pytest.raises(ManifestError, match="not listed"):
        io.load(str(folder / "extra.pt"))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        io.load(str(tmp_path / "elsewhere.pt"))


@pytest.mark.distributed
@pytest.mark.slow
def test_a_run_refuses_a_crafted_deepspeed_optimizer_file(tmp_path):
    """End to end through DeepSpeed's own loader: the run stops with the checkpoint exit code."""
    data = source_shards(tmp_path)
    args = ["train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={data}", f"run.dir={tmp_path / 'run'}",
            "train.max_steps=2", "train.eval_every=0", "parallel.zero_stage=1"]
    run_distlm(args, timeout=240)
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    sentinel = tmp_path / "pwned"
    _plant(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", sentinel, fix_manifest=True)
    result = run_distlm(args[:-2] + ["train.max_steps=4", "parallel.zero_stage=1"], check=False, timeout=240)
    assert result.returncode == 4, result.stdout[-3000:]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load" in result.stdout
    assert not sentinel.exists()
