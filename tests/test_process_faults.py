"""Dead, frozen and looping ranks under torchrun with restarts (matrix rows 13-16).

Each test runs a real 2-process job under ``torchrun --max-restarts``, makes one rank die
(SIGKILL), freeze (SIGSTOP) or skip a collective at a chosen step of the first start only
(``restart=0``), and checks that the peers stop within seconds (a lost peer: exit 78) or
within the hang timeout (the watchdog: exit 77, naming the stuck rank), that torchrun's
restart resumes from the last checkpoint, and that the finished run equals an uninterrupted
one bit for bit. A crash that repeats in every start ends in exit 80 ("do not requeue").

Detection times come from the run's own records: the fault hook prints when it fires, and
every ending is appended to ``RUN_DIR/exits.jsonl`` with its time and rank.
"""

from __future__ import annotations

import json
import re

import pytest

from distlm.fault import exit_codes
from distlm.fault.crash_loop import STARTS_FILE
from distlm.fault.inject import Fault
from helpers import ROOT, curve, final_weights, run_distlm, same_weights, source_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CONFIG = str(ROOT / "configs" / "tiny-test.yaml")
STEPS = 8
SAVE_EVERY = 2
HANG_TIMEOUT_S = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return source_shards(tmp_path_factory.mktemp("process-faults-corpus"), shard_mb=0.05)


def _args(data_dir, run_dir, *extra):
    return ["train", CONFIG, f"data.path={data_dir}", f"run.dir={run_dir}", f"train.max_steps={STEPS}",
            "train.log_every=1", "train.batch_size=8", "train.eval_every=0", f"train.save_every={SAVE_EVERY}",
            "parallel.zero_stage=1", "model.dropout=0.1", "data.num_workers=1", "checkpoint.keep_last=0",
            f"fault.hang_timeout_s={HANG_TIMEOUT_S}", *extra]


@pytest.fixture(scope="module")
def golden(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("golden")
    run_distlm(_args(data_dir, run_dir), nproc=2, timeout=300)
    return run_dir


def _exits(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / exit_codes.EXITS_LOG).read_text().splitlines()]


def _fault_time(out: str) -> float:
    return float(re.search(r"fault injection: .* \(time ([\d.]+)\)", out).group(1))


def _restarted_and_equal(run_dir, golden, out: str, resumed_from: int) -> None:
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{resumed_from:08d}'} at step {resumed_from}" in out
    assert f"done: {STEPS} steps" in out
    assert curve(run_dir) == curve(golden)
    assert same_weights(final_weights(run_dir, STEPS), final_weights(golden, STEPS))


def test_a_killed_rank_stops_its_peer_in_seconds_and_the_restart_resumes_exactly(data_dir, golden, tmp_path):
    """Row 13: SIGKILL mid-training; the survivor's next collective fails at once (exit 78)."""
    run_dir = tmp_path / "killed"
    kill = Fault(rank=1, step=5, phase="step", signal="KILL", restart=0)
    out = run_distlm(_args(data_dir, run_dir), nproc=2, timeout=300, torchrun=("--max-restarts=1",),
                     env={"DISTLM_FAULT": kill.to_env()}).stdout
    lost = [e for e in _exits(run_dir) if e["code"] == exit_codes.PEER_LOST]
    assert lost and lost[0]["rank"] == 0, _exits(run_dir)
    detected = lost[0]["time"] - _fault_time(out)
    print(f"row 13: rank 0 stopped {detected:.2f} s after rank 1 was killed at step 5; "
          f"lost: step 5 (resumed from step 4)")
    assert detected < 10
    _restarted_and_equal(run_dir, golden, out, resumed_from=4)


@pytest.mark.parametrize("fault, verdict", [
    (Fault(rank=1, step=3, phase="step", signal="STOP", restart=0), "frozen"),        # row 14
    (Fault(rank=1, step=3, phase="agree", signal="SKIP", restart=0), "out of step"),  # row 15
], ids=["sigstop", "skipped-collective"])
def test_a_stuck_rank_is_named_within_the_hang_timeout_and_the_restart_resumes(data_dir, golden, tmp_path, fault,
                                                                              verdict):
    run_dir = tmp_path / fault.signal.lower()
    out = run_distlm(_args(data_dir, run_dir), nproc=2, timeout=300, torchrun=("--max-restarts=1",),
                     env={"DISTLM_FAULT": fault.to_env()}).stdout
    hangs = [e for e in _exits(run_dir) if e["code"] == exit_codes.HANG]
    assert hangs, (_exits(run_dir), out[-4000:])
    first = hangs[0]
    assert re.search(rf"stuck: rank 1 \({verdict}", first["reason"]), first["reason"]
    assert (run_dir / "hangs" / f"rank-{first['rank']:05d}.txt").read_text().strip()  # the stacks
    # The skipping rank has no fault-injection line (it only skips): its hang starts at step 3's boundary.
    started = _fault_time(out) if fault.signal == "STOP" else None
    if started is not None:
        detected = first["time"] - started
        print(f"row 14: rank {first['rank']} named rank 1 {detected:.2f} s after SIGSTOP "
              f"(hang_timeout_s={HANG_TIMEOUT_S}); lost: step 3 (resumed from step 2)")
        assert detected < HANG_TIMEOUT_S + 5
    else:
        print(f"row 15: rank {first['rank']} named rank 1 out of step after {first['step']=}: {first['reason'][:200]}")
    _restarted_and_equal(run_dir, golden, out, resumed_from=2)


def test_a_crash_in_every_start_ends_with_the_do_not_requeue_code(data_dir, tmp_path):
    """Row 16: the same crash after every restart; the second start from step 2 refuses to run."""
    run_dir = tmp_path / "loop"
    crash = Fault(rank=0, step=3, phase="step", signal="KILL")  # every start
    result = run_distlm(_args(data_dir, run_dir, "fault.max_restarts_without_progress=1"), nproc=2, timeout=400,
                        torchrun=("--max-restarts=2",), env={"DISTLM_FAULT": crash.to_env()}, check=False)
    out = result.stdout
    assert result.returncode != 0
    assert re.search(rf"exitcode\s*:\s*{exit_codes.CRASH_LOOP}\b", out), out[-4000:]
    ended = json.loads((run_dir / exit_codes.EXIT_FILE).read_text())
    assert ended["code"] == exit_codes.CRASH_LOOP and "resumed from step 2 and failed" in ended["reason"]
    starts = [json.loads(line) for line in (run_dir / STARTS_FILE).read_text().splitlines()]
    # From scratch (saves step 2, dies at 3), once from step 2 (dies at 3), then refused.
    assert [s["resume_step"] for s in starts] == [0, 2, 2]
    assert starts[0].get("ended") is None  # rank 0 itself was killed: nobody wrote its ending
    assert starts[2]["ended"] == "crash loop"
    refused = [e for e in _exits(run_dir) if e["code"] == exit_codes.CRASH_LOOP][0]
    print(f"row 16: {len(starts)} starts, the 3rd refused with exit {exit_codes.CRASH_LOOP} "
          f"{refused['time'] - starts[2]['time']:.2f} s after it began")
