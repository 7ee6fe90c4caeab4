"""``distlm plot RUN_DIR``: a PNG of a run's curves from ``RUN_DIR/metrics.jsonl``, for people without Grafana.

Four panels against the step: train and validation loss, learning rate, throughput (tokens/s)
and gradient norm. Only ``metrics.jsonl`` is read; the ``metrics.N.jsonl`` files that earlier
fresh starts set aside belong to other runs. matplotlib is imported only when drawing, through its
object API with the Agg canvas, so plotting works headless and opens no window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The logger writes a NaN or Inf as null; older or foreign files may hold NaN itself: neither is drawn.
from distlm.metrics.exporter import is_finite_number

# One fixed colour per series, so a reader (and the tests) can tell them apart.
LOSS_COLOUR = "#1f77b4"        # blue
VAL_LOSS_COLOUR = "#d62728"    # red
LR_COLOUR = "#2ca02c"          # green
THROUGHPUT_COLOUR = "#9467bd"  # purple
GRAD_NORM_COLOUR = "#ff7f0e"   # orange

FIGSIZE_IN = (12, 8)
DPI = 100


class NoMetrics(FileNotFoundError):
    """RUN_DIR has nothing to plot: metrics.jsonl is missing, empty, or has no readable row.

    A FileNotFoundError, so ``distlm`` reports it as a one-line data error, not a traceback.
    """


class MatplotlibMissing(ImportError):
    """matplotlib, which only ``distlm plot`` needs, is not installed."""


@dataclass
class Metrics:
    """The rows of one metrics.jsonl, in step order, after any rollback was applied."""

    path: Path
    steps: list[dict]
    evals: list[dict]
    skipped_lines: int


def read_metrics(path: str | Path) -> Metrics:
    """Parse metrics.jsonl; torn or foreign lines are skipped and counted, not fatal."""
    path = Path(path)
    if not path.is_file():
        where = "" if path.parent.is_dir() else f" (and {path.parent} is not a folder)"
        raise NoMetrics(f"{path} not found{where}: train first (distlm train CONFIG), "
                        f"or check that RUN_DIR is the run folder (run.dir)")
    metrics = Metrics(path, [], [], 0)
    # errors="replace": a line torn inside a multi-byte character is just another torn line.
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            _add(metrics, _parse(line))
    if not metrics.steps and not metrics.evals:
        raise NoMetrics(f"{path} has no readable rows ({metrics.skipped_lines} unparsable lines): "
                        f"train until the first train.log_every step, or check RUN_DIR")
    return metrics


def _parse(line: str) -> dict | None:
    try:
        row = json.loads(line)  # accepts NaN and Infinity too, should a writer have used them
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return row if isinstance(step, int) and not isinstance(step, bool) else None


def _add(metrics: Metrics, row: dict | None) -> None:
    if row is None:
        metrics.skipped_lines += 1
    elif "val_loss" in row:
        _drop_from(metrics.evals, row["step"])
        metrics.evals.append(row)
    else:
        # A step at or before one already seen means the run rolled back (a resume, or a
        # rollback after bad steps): what was logged from that step on was undone, evals included.
        _drop_from(metrics.steps, row["step"])
        _drop_from(metrics.evals, row["step"])
        metrics.steps.append(row)


def _drop_from(rows: list[dict], step: int) -> None:
    """Drop rows of ``step`` and later; rows stay sorted, so they are at the end."""
    while rows and rows[-1]["step"] >= step:
        rows.pop()


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The (step, value) points of ``key`` whose value is a finite number."""
    points = [(row["step"], row[key]) for row in rows if is_finite_number(row.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def summary(metrics: Metrics) -> str:
    """One line: steps covered, last loss, last val_loss, and what was not drawn."""
    parts = []
    if metrics.steps:
        first, last = metrics.steps[0], metrics.steps[-1]
        parts.append(f"steps {first['step']}-{last['step']} ({len(metrics.steps)} logged)")
        parts.append(f"last loss {_number(last.get('loss'))}")
    else:
        parts.append("no step rows")
    if metrics.evals:
        parts.append(f"last val_loss {_number(metrics.evals[-1]['val_loss'])} at step {metrics.evals[-1]['step']}")
    not_finite = sum(1 for row in metrics.steps if not is_finite_number(row.get("loss")))
    if not_finite:
        parts.append(f"{not_finite} non-finite losses not drawn")
    if metrics.skipped_lines:
        parts.append(f"skipped {metrics.skipped_lines} unparsable line{'s' if metrics.skipped_lines > 1 else ''}")
    return ", ".join(parts)


def _number(value) -> str:
    return f"{value:.4f}" if is_finite_number(value) else "nan"


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, str]:
    """Write the PNG of ``RUN_DIR/metrics.jsonl`` (default ``RUN_DIR/metrics.png``); return it and the summary."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out) if out is not None else run_dir / "metrics.png"
    last_step = max(row["step"] for row in metrics.steps + metrics.evals)
    figure = _figure(metrics, f"{run_dir.resolve().name}: step {last_step}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    return out, summary(metrics)


def _figure(metrics: Metrics, title: str):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MatplotlibMissing("plot needs matplotlib, which is not installed: pip install matplotlib") from e
    figure = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: savefig renders with Agg, no GUI backend involved
    figure.suptitle(title)
    (loss, lr), (throughput, grad) = figure.subplots(2, 2, sharex=True)
    _loss_panel(loss, metrics)
    _line_panel(lr, metrics.steps, "lr", "learning rate", LR_COLOUR)
    lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    _line_panel(throughput, metrics.steps, "tokens_per_s", "throughput (tokens/s)", THROUGHPUT_COLOUR)
    throughput.yaxis.set_major_formatter(_human_count)
    # From zero, with headroom: jitter of a few percent must not look like a collapse.
    throughput.set_ylim(0, 1.1 * throughput.get_ylim()[1])
    _line_panel(grad, metrics.steps, "grad_norm", "gradient norm", GRAD_NORM_COLOUR)
    for ax in (throughput, grad):
        ax.set_xlabel("step")
    return figure


def _loss_panel(ax, metrics: Metrics) -> None:
    _line_panel(ax, metrics.steps, "loss", "loss", LOSS_COLOUR, label="train loss")
    steps, values = series(metrics.evals, "val_loss")
    if steps:
        ax.plot(steps, values, color=VAL_LOSS_COLOUR, marker="o", markersize=5, linewidth=1.5, label="val loss")
    if ax.lines:
        ax.legend(loc="upper right")


def _line_panel(ax, rows: list[dict], key: str, title: str, colour: str, label: str | None = None) -> None:
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    steps, values = series(rows, key)
    if steps:
        ax.plot(steps, values, color=colour, linewidth=1.5, label=label)
    else:
        ax.text(0.5, 0.5, f"no finite {key} values", transform=ax.transAxes, ha="center", va="center", color="grey")


def _human_count(value: float, _position=None) -> str:
    """Tick labels like 950, 1.5k, 2M: throughput spans orders of magnitude across setups."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"
