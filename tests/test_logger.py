import io
import json

from distlm.metrics.logger import RunLog, format_step_line
from distlm.metrics.mfu import mfu


def _row(step, **extra):
    row = {"step": step, "loss": 3.4123, "lr": 3e-4, "grad_norm": 0.91, "ms_per_step": 312.0,
           "tokens_per_s": 1.05e6, "mfu": 0.412, "data_wait": 0.013, "mem_bytes": int(61.2 * 2**30)}
    row.update(extra)
    return row


def test_step_line_has_every_field():
    line = format_step_line(_row(120), 10000)
    assert line == ("step 120/10000 | loss 3.4123 | lr 3.0e-04 | grad 0.91 | 312 ms | 1.05M tok/s | "
                    "mfu 41.2% | data 1.3% | mem 61.2 GiB")
    assert "mfu" not in format_step_line(_row(1, mfu=None), 10)


def test_metrics_jsonl_rows_and_truncation_on_resume(tmp_path):
    out = io.StringIO()
    log = RunLog(tmp_path, 100, stream=out)
    for step in (10, 20, 30):
        log.step(_row(step))
    log.eval({"step": 20, "val_loss": 2.5, "val_batches": 4})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 20]
    assert rows[-1]["val_loss"] == 2.5
    assert out.getvalue().count("\n") == 4
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "loss"')  # torn by a crash
    assert log.truncate_after(20) == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 20]


def test_fresh_start_keeps_old_metrics_aside(tmp_path):
    log = RunLog(tmp_path, 10, stream=io.StringIO())
    log.step(_row(1))
    assert log.start_fresh() == "metrics.1.jsonl"
    log.step(_row(1))
    assert log.start_fresh() == "metrics.2.jsonl"
    assert not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / "metrics.1.jsonl").read_text())["step"] == 1


def test_non_finite_values_are_written_as_null(tmp_path):
    log = RunLog(tmp_path, 10, stream=io.StringIO())
    log.step(_row(3, loss=float("nan"), grad_norm=float("inf")))
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["loss"] is None and row["grad_norm"] is None and row["step"] == 3


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path, 10, enabled=False, stream=io.StringIO())
    log.step(_row(1))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_mfu():
    assert mfu(6e9, 1000.0, 2, 1e13) == 6e12 / 2e13
    assert mfu(6e9, 1000.0, 1, None) is None
