"""benchmarks/gpu/run.sh --dry: the GPU benchmark's code paths on the CPU, tiny sizes (about 1-2 minutes).

The figures mean nothing here; what is checked is that the correctness check ran and passed,
that every (size, variant) of the dry run has a row with tokens/s, and that the table's ratio
column is distlm / plain of the same size.
"""

import json
import os
import re
import subprocess

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow

DRY_ROWS = [("tiny", v) for v in ("distlm", "plain", "distlm+ckpt", "distlm+ckpt+compile")]


def _table(stdout: str) -> list[dict]:
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[0] != "size":
            rows.append(dict(zip(("size", "variant", "tokens_per_s", "mfu_pct", "vs_plain", "peak_gib", "status"),
                                 cells)))
    return rows


def test_dry_run_checks_precision_then_measures_every_variant(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    result = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry", "--work", str(tmp_path / "work")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    last = result.stdout.strip().splitlines()[-1]
    summary = dict(part.split("=", 1) for part in last.split())
    assert summary["correctness"] == "ok", last
    assert summary["dry"] == "1" and summary["nominal_peak"] == "1", last
    assert "NOMINAL peak" in result.stdout

    # The correctness check compared every step of fp32 and bf16, within the tolerance.
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    check = next(r for r in records if r["kind"] == "correctness")
    assert check["status"] == "ok" and check["problems"] == []
    assert set(check["losses"]) == {"fp32", "bf16"}
    assert all(x is not None for losses in check["losses"].values() for x in losses)
    assert check["worst"]["bf16"]["max_rel_diff"] <= check["tol"]

    table = _table(result.stdout)
    assert [(r["size"], r["variant"]) for r in table] == DRY_ROWS, table
    assert int(summary["rows"]) == len(DRY_ROWS) and summary["failed"] == "0", last
    plain = {r["size"]: float(r["tokens_per_s"]) for r in table if r["variant"] == "plain"}
    for row in table:
        assert row["status"] == "ok", row
        tokens_per_s = float(row["tokens_per_s"])
        assert tokens_per_s > 0, row
        assert float(row["mfu_pct"]) > 0, row
        # tokens/s are printed to the unit and the ratio to 3 decimals.
        assert float(row["vs_plain"]) == pytest.approx(tokens_per_s / plain[row["size"]], rel=1e-2, abs=2e-3), row
        if row["variant"].startswith("distlm"):
            assert float(row["peak_gib"]) > 0, row

    # Every measurement is on disk as it finished, and each distlm run's metrics were kept.
    measured = {(r["size"], r["variant"]) for r in records if r["kind"] == "throughput" and r["status"] == "ok"}
    assert measured == set(DRY_ROWS)
    for size, variant in DRY_ROWS:
        assert (out / "logs" / f"{size}-{variant}.log").exists()
        if variant.startswith("distlm"):
            assert (out / "runs" / f"{size}-{variant}" / "metrics.jsonl").exists()
    assert re.search(r"best_mfu_pct_tiny=[\d.]+ ", last), last
    assert (out / "table.md").read_text().count("| tiny |") == len(DRY_ROWS)
    # Checkpoints and data stay in the work folder, never in what comes back from the device.
    assert not list(out.rglob("*.tar")) and not list(out.rglob("checkpoints"))
