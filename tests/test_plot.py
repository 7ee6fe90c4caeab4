"""``distlm plot``: the PNG really shows each series in its panel, and bad metrics files don't break it."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from distlm.cli import main
from distlm.fault import exit_codes
from distlm.metrics import plot
from distlm.metrics.plot import read_metrics

STEPS, EVAL_EVERY, WARMUP, PEAK_LR = 200, 50, 20, 3e-4


def _lr(step):
    if step <= WARMUP:
        return PEAK_LR * step / WARMUP
    return PEAK_LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def _loss(step):
    return 4.0 - 2.0 * step / STEPS  # falls from 4 to 2


def _step_row(step, loss=None):
    return {"step": step, "loss": _loss(step) if loss is None else loss, "lr": _lr(step),
            "grad_norm": 1.0 + 0.5 * math.sin(step / 7), "tokens_per_s": 1.2e6 + 2e4 * math.sin(step),
            "elapsed_s": 0.3 * step, "ms_per_step": 300.0, "mfu": None, "data_wait": 0.01,
            "tokens": 4096 * step, "mem_bytes": 2**30}


def _rows():
    for step in range(1, STEPS + 1):
        yield _step_row(step)
        if step % EVAL_EVERY == 0:
            yield {"step": step, "val_loss": _loss(step) + 0.1, "val_batches": 4, "elapsed_s": 0.3 * step}


def _write(run_dir, rows, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return run_dir


def _mask(pixels, colour):
    """Pixels within a small distance of ``colour`` (line centres; antialiased edges fade to white)."""
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return np.abs(pixels.astype(int) - rgb).max(axis=2) <= 30


def _quadrants(png):
    """The 2x2 panels, in the order loss, lr, throughput, grad norm."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
    return [pixels[:h, :w], pixels[:h, w:], pixels[h:, :w], pixels[h:, w:]]


def _column_heights(mask):
    """Per column that has any, the median row of the masked pixels (smaller is higher up)."""
    columns = [x for x in range(mask.shape[1]) if mask[:, x].any()]
    return np.array(columns), np.array([np.median(np.nonzero(mask[:, x])[0]) for x in columns])


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """One plot of the known curves, drawn once for the tests that look at it: (png, printed lines)."""
    run_dir = _write(tmp_path_factory.mktemp("plot") / "my-run", _rows())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["plot", str(run_dir)]) == 0
    return run_dir / "metrics.png", printed.getvalue().splitlines()


def test_each_series_is_drawn_in_its_own_panel(plotted):
    plotted, _ = plotted
    with Image.open(plotted) as image:
        assert image.size == (plot.FIGSIZE_IN[0] * plot.DPI, plot.FIGSIZE_IN[1] * plot.DPI)
    panels = _quadrants(plotted)
    colours = [plot.LOSS_COLOUR, plot.LR_COLOUR, plot.THROUGHPUT_COLOUR, plot.GRAD_NORM_COLOUR]
    for i, colour in enumerate(colours):
        for j, panel in enumerate(panels):
            drawn = _mask(panel, colour).sum()
            assert (drawn > 300) if i == j else (drawn == 0), (colour, j, drawn)
    # The val loss shares the loss panel: its markers and line, more than a legend sample.
    assert _mask(panels[0], plot.VAL_LOSS_COLOUR).sum() > 300
    assert not any(_mask(panel, plot.VAL_LOSS_COLOUR).any() for panel in panels[1:])


def test_curves_have_their_shape(plotted):
    loss_panel, lr_panel = _quadrants(plotted[0])[:2]
    columns, heights = _column_heights(_mask(loss_panel, plot.LOSS_COLOUR))
    third = (columns.max() - columns.min()) / 3
    left, right = heights[columns < columns.min() + third], heights[columns > columns.max() - third]
    assert np.median(left) < np.median(right) - 50  # falling loss: drawn higher on the left
    columns, heights = _column_heights(_mask(lr_panel, plot.LR_COLOUR))
    peak = columns[np.argmin(heights)]
    assert peak < columns.min() + 0.2 * (columns.max() - columns.min())  # warmup ends at 10% of the steps


def test_prints_the_path_and_a_summary(plotted):
    png, printed = plotted
    assert printed == [str(png), "steps 1-200 (200 logged), last loss 2.0000, last val_loss 2.1000 at step 200"]


def test_missing_or_empty_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == exit_codes.DATA_ERROR
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "metrics.jsonl") in err and "train first" in err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == exit_codes.DATA_ERROR
    assert "no readable rows" in capsys.readouterr().err


def test_torn_last_line_is_skipped_and_counted(tmp_path, capsys):
    run_dir = _write(tmp_path / "run", _rows(), tail='{"step": 201, "loss": 1.9')
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "elsewhere.png")]) == 0
    assert "skipped 1 unparsable line" in capsys.readouterr().out
    assert (tmp_path / "elsewhere.png").stat().st_size > 0
    assert not (run_dir / "metrics.png").exists()


def test_non_finite_losses_are_left_out(tmp_path, capsys):
    rows = [_step_row(s) for s in range(1, 11)]
    for row in rows[::2]:
        row["loss"] = float("nan")  # json.dumps writes NaN, as a foreign writer might
    rows[1]["loss"] = None  # the logger's own way to write a NaN
    metrics = read_metrics(_write(tmp_path, rows) / "metrics.jsonl")
    assert plot.series(metrics.steps, "loss")[0] == [4, 6, 8, 10]
    assert "6 non-finite losses not drawn" in plot.summary(metrics)
    for row in rows:
        row["loss"] = None
    _write(tmp_path, rows)
    assert main(["plot", str(tmp_path)]) == 0  # an empty loss panel, the other three drawn
    assert "last loss nan, 10 non-finite losses not drawn" in capsys.readouterr().out


def test_a_rollback_keeps_the_later_rows(tmp_path):
    first = [_step_row(s) for s in range(1, 31)] + [{"step": 30, "val_loss": 9.0, "val_batches": 1}]
    again = [_step_row(s, loss=1.0) for s in range(21, 41)]
    metrics = read_metrics(_write(tmp_path, first + again) / "metrics.jsonl")
    assert [row["step"] for row in metrics.steps] == list(range(1, 41))
    assert [row["loss"] for row in metrics.steps[20:]] == [1.0] * 20
    assert metrics.evals == []  # the eval of step 30 was undone with it
