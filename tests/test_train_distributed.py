"""End to end with real processes: prepare -> train (1 and 2 gloo processes) -> resume.

Each run is a fresh ``python -m distlm`` or ``torchrun`` with a hard timeout. The single-process
run is the reference: ZeRO stages 0-3 on 2 processes must follow its loss curve, since each
rank reads its half of the same global batches.
"""

from __future__ import annotations

import math

import pytest

from distlm.data.prepare import prepare_corpus
from helpers import ROOT, read_metrics, run_distlm, step_rows

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CONFIG = str(ROOT / "configs" / "tiny-test.yaml")
STEPS = 8


def _corpus_text() -> str:
    # Deterministic, varied text: the package's own source, which every checkout has.
    files = sorted((ROOT / "distlm").rglob("*.py"))
    return "\n".join(f.read_text() for f in files)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    text_file = root / "corpus.txt"
    text_file.write_text(_corpus_text() * 2)
    out = root / "shards"
    prepare_corpus([str(text_file)], str(out), tokenizer="byte", seq_len=32, val_fraction=0.05,
                   block_rows=64, log=lambda *_: None)
    return out


def _train(data_dir, run_dir, nproc=1, *extra, timeout=300):
    args = ["train", CONFIG, f"data.path={data_dir}", f"run.dir={run_dir}", f"train.max_steps={STEPS}",
            "train.log_every=1", "train.batch_size=8", f"optim.decay_steps={STEPS}", "train.eval_iters=2",
            *extra]
    return run_distlm(args, nproc=nproc, timeout=timeout)


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    out = _train(data_dir, run_dir, 1).stdout
    return run_dir, out


@pytest.fixture(scope="module")
def reference(reference_run):
    return step_rows(reference_run[0])


def _model_line(stdout: str) -> str:
    """The start-up line with parameter and FLOP counts (the part that must not depend on layout)."""
    line = next(l for l in stdout.splitlines() if l.startswith("model "))
    return line.split(" | ")[0]


def _val_loss(run_dir) -> float:
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert len(evals) == 1 and math.isfinite(evals[0]["val_loss"])
    return evals[0]["val_loss"]


def test_single_process_run_writes_its_files(reference, data_dir, tmp_path_factory):
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"):
        assert all(key in r for r in reference), key
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in reference)
    assert reference[-1]["loss"] < reference[0]["loss"]  # it learns something


@pytest.mark.parametrize("stage, micro", [(0, None), (1, None), (2, None), (3, None), (2, 2)])
def test_two_processes_follow_the_single_process_loss(stage, micro, reference, reference_run, data_dir, tmp_path):
    """ZeRO 0-3 on 2 ranks, and with 2 accumulation steps per rank, match one process."""
    extra = [f"train.micro_batch_size={micro}"] if micro else []
    out = _train(data_dir, tmp_path, 2, f"parallel.zero_stage={stage}", *extra).stdout
    rows = step_rows(tmp_path)
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for mine, ref in zip(rows, reference):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5), (stage, mine["step"])
        assert mine["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3), (stage, mine["step"])
    # the same rows are evaluated whatever the layout
    assert _val_loss(tmp_path) == pytest.approx(_val_loss(reference_run[0]), rel=1e-4)
    # parameter and FLOP counts are the model's, not one ZeRO-3 partition's
    assert _model_line(out) == _model_line(reference_run[1])
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step-{STEPS:08d}"


def test_bf16_follows_the_fp32_loss_within_tolerance(reference, data_dir, tmp_path):
    _train(data_dir, tmp_path, 1, "train.precision=bf16")
    rows = step_rows(tmp_path)
    assert len(rows) == len(reference)
    for mine, ref in zip(rows, reference):
        assert math.isfinite(mine["loss"])
        assert mine["loss"] == pytest.approx(ref["loss"], rel=2e-2), mine["step"]


def test_resume_continues_the_uninterrupted_run_exactly(data_dir, tmp_path):
    """Stop at step 4 (checkpoint), start fresh processes, finish: the same losses as one run.

    With dropout and a loader worker, so the restored RNG and the data position both matter.
    """
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("parallel.zero_stage=1", "train.save_every=4", "model.dropout=0.1", "data.num_workers=1")
    _train(data_dir, whole, 2, *common)
    _train(data_dir, split, 2, *common, "train.max_steps=4")
    assert (split / "checkpoints" / "latest").read_text() == "step-00000004"
    out = _train(data_dir, split, 2, *common).stdout
    assert "resumed from" in out and "at step 4" in out
    whole_rows, split_rows = step_rows(whole), step_rows(split)
    assert [r["step"] for r in split_rows] == list(range(1, STEPS + 1))
    for a, b in zip(whole_rows, split_rows):
        assert a["loss"] == b["loss"], a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9)


def test_config_errors_stop_before_any_process_starts(data_dir, tmp_path):
    result = run_distlm(["train", CONFIG, f"data.path={data_dir}", "model.n_heads=3"], check=False, timeout=60)
    assert result.returncode == 2
    assert "model.d_model=32 must be divisible by model.n_heads=3" in result.stdout
    assert "accelerator" not in result.stdout  # DeepSpeed was never even imported
    assert "Traceback" not in result.stdout


def test_data_without_a_validation_split_trains_and_saves(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(_corpus_text())
    prepare_corpus([str(text)], str(tmp_path / "d"), tokenizer="byte", seq_len=32, val_fraction=0.0,
                   log=lambda *_: None)
    out = _train(tmp_path / "d", tmp_path / "run", 1, "train.eval_every=2").stdout
    assert "no validation split: evaluation is skipped" in out
    assert not [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step-{STEPS:08d}"


def test_blended_sources_with_a_damaged_shard_train_and_report_it(data_dir, tmp_path):
    """Two sources (one missing a shard) on 2 ranks with data.on_error=skip: the run finishes,
    counts the fault once per rank that met it, and reports each source's rows."""
    import shutil

    from distlm.data.shards import load_manifest

    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    (damaged / load_manifest(damaged).split("train").shards[0].path).unlink()
    sources = f"data.sources=[{{path: {data_dir}, weight: 3, name: clean}}, {{path: {damaged}, name: damaged}}]"
    out = run_distlm(["train", CONFIG, "data.path=null", sources, f"run.dir={tmp_path / 'run'}", f"train.max_steps={STEPS}",
                      "train.log_every=1", "train.batch_size=8", "data.on_error=skip", "data.max_error_rate=0.9",
                      "data.shuffle_blocks=1", "train.eval_iters=2"], nproc=2, timeout=300).stdout
    assert "data error (missing)" in out and "bad data:" in out
    rows = step_rows(tmp_path / "run")
    last = rows[-1]
    assert last["source_rows"]["clean"] + last["source_rows"]["damaged"] == STEPS * 8
    assert abs(last["source_rows"]["damaged"] - STEPS * 8 / 4) <= 8
    assert last["source_tokens"]["clean"] == last["source_rows"]["clean"] * 32
    assert last["data_errors"]["missing"] >= 1 and last["data_errors"]["rows_skipped"] >= 1
    assert all(math.isfinite(r["loss"]) for r in rows)
