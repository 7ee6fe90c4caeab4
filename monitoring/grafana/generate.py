"""Build distlm's Grafana dashboards from the compact panel list below.

Dashboards are generated, not edited in Grafana and exported: exported JSON is thousands of
lines of layout and defaults in which a changed query is hard to find in review, and the
filters every panel must share (job, run, rank, node) drift apart when edited one panel at a
time. Here each panel is one call naming its title, unit, description and PromQL; the helpers
supply the rest. Edit this file, then run it and commit its output:

    python monitoring/grafana/generate.py           # rewrite monitoring/grafana/dashboards/*.json
    python monitoring/grafana/generate.py --check   # exit 1, naming each stale file, if they differ

Metric names are those of distlm.metrics.exporter plus Prometheus' own ``up`` and NVIDIA
dcgm-exporter's ``DCGM_FI_*``; recording rules are deliberately not used, so the dashboards work
against any Prometheus that scrapes the ranks.
"""

import json
import sys
from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAG = "distlm"

# Label filters, interpolated into the queries below.
RUN = '{job=~"$job", run=~"$run"}'
RANK = '{job=~"$job", run=~"$run", rank=~"$rank", node=~"$node"}'
GPU = '{node=~"$node"}'
WINDOW = "[$__rate_interval]"

PER_RANK = "rank {{rank}} ({{node}})"
PER_GPU = "{{node}} GPU {{gpu}}"

PANEL_HEIGHT = {"stat": 4, "timeseries": 8}
GRID_WIDTH = 24


# --------------------------------------------------------------------------- panels

def mean_step(selector: str) -> str:
    """PromQL for the mean step time of each rank over the window: seconds observed / steps observed."""
    return (f"rate(distlm_step_duration_seconds_sum{selector}{WINDOW}) "
            f"/ rate(distlm_step_duration_seconds_count{selector}{WINDOW})")


def targets(queries: list[tuple[str, str]], instant: bool = False) -> list[dict]:
    """Grafana targets from (PromQL, legend) pairs, with refIds A, B, ..."""
    return [{"datasource": DATASOURCE, "expr": expr, "instant": instant, "legendFormat": legend,
             "range": not instant, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(queries)]


def timeseries(title: str, unit: str, description: str, queries: list[tuple[str, str]],
               minimum: float | None = None) -> dict:
    """A line graph; minimum pins the y axis (0 for rates and ratios) instead of auto-scaling."""
    defaults = {"custom": {"fillOpacity": 10, "showPoints": "never", "spanNulls": False}, "unit": unit}
    if minimum is not None:
        defaults["min"] = minimum
    return {
        "datasource": DATASOURCE, "description": description, "title": title, "type": "timeseries",
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": targets(queries),
    }


def stat(title: str, unit: str, description: str, queries: list[tuple[str, str]],
         text_mode: str = "value") -> dict:
    """The latest value of each query, uncoloured; text_mode "value_and_name" adds each legend."""
    return {
        "datasource": DATASOURCE, "description": description, "title": title, "type": "stat",
        "fieldConfig": {"defaults": {"color": {"mode": "fixed", "fixedColor": "text"}, "unit": unit},
                        "overrides": []},
        "options": {"colorMode": "none", "graphMode": "none", "justifyMode": "auto",
                    "orientation": "auto", "textMode": text_mode,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": targets(queries, instant=True),
    }


def layout(rows: list[list[dict]]) -> list[dict]:
    """Number the panels and place them: each row shares the grid width evenly, rows stack."""
    panels, y = [], 0
    for row in rows:
        width = GRID_WIDTH // len(row)
        height = max(PANEL_HEIGHT[panel["type"]] for panel in row)
        for column, panel in enumerate(row):
            panels.append({**panel, "id": len(panels) + 1,
                           "gridPos": {"h": height, "w": width, "x": column * width, "y": y}})
        y += height
    return panels


# --------------------------------------------------------------------------- dashboards

def variable(name: str, label: str, query: str, multi: bool = False, numeric: bool = False,
             all_value: str | None = ".*") -> dict:
    """A label_values(...) variable; multi-select ones offer All, sent to Prometheus as ``all_value``
    (None: as the list of the values found, so it matches only those)."""
    return {
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {},
        "datasource": DATASOURCE, "definition": query, "hide": 0, "includeAll": multi,
        "label": label, "multi": multi, "name": name, "options": [], "query": query,
        "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 3 if numeric else 1, "type": "query",
        **({"allValue": all_value} if multi and all_value is not None else {}),
    }


def templating() -> dict:
    return {"list": [
        {"current": {}, "hide": 0, "includeAll": False, "label": "Data source", "multi": False,
         "name": "datasource", "options": [], "query": "prometheus", "refresh": 1, "regex": "",
         "skipUrlSync": False, "type": "datasource"},
        variable("job", "Job", "label_values(distlm_build_info, job)"),
        variable("run", "Run", 'label_values(distlm_build_info{job=~"$job"}, run)'),
        variable("rank", "Rank", f"label_values(distlm_build_info{RUN}, rank)", multi=True, numeric=True),
        # All = this run's nodes, not ".*": the GPU panels would otherwise show every GPU that
        # Prometheus scrapes in the cluster.
        variable("node", "Node", f"label_values(distlm_build_info{RUN}, node)", multi=True, all_value=None),
    ]}


def dashboard(uid: str, title: str, description: str, rows: list[list[dict]]) -> dict:
    """A dashboard with the shared variables, time range and a link to every other distlm one."""
    return {
        "annotations": {"list": []}, "description": description, "editable": True,
        "graphTooltip": 1, "panels": layout(rows), "refresh": "30s", "schemaVersion": 39,
        "tags": [TAG], "templating": templating(), "time": {"from": "now-6h", "to": "now"},
        "timepicker": {}, "timezone": "", "title": title, "uid": uid, "version": 1,
        "links": [{"asDropdown": False, "icon": "dashboard", "includeVars": True, "keepTime": True,
                   "tags": [TAG], "targetBlank": False, "title": "distlm dashboards", "tooltip": "",
                   "type": "dashboards", "url": ""}],
    }


def training() -> dict:
    stats = [
        stat("Step", "short", "The optimizer step the run has reached.",
             [(f"max by (job, run) (distlm_step{RUN})", "step")]),
        stat("Tokens trained", "short",
             "Tokens the whole run has trained (every rank reports the same global count).",
             [(f"max by (job, run) (distlm_tokens_trained{RUN})", "tokens")]),
        stat("World size", "short", "Ranks the run was started with; compare with Targets up.",
             [(f"max by (job, run) (distlm_world_size{RUN})", "ranks")]),
        stat("Targets up", "short",
             "Rank endpoints Prometheus scrapes successfully, out of those listed; fewer up means ranks died or hung.",
             [(f"sum by (job, run) (up{RUN})", "up"), (f"count by (job, run) (up{RUN})", "targets")],
             text_mode="value_and_name"),
        stat("Uptime", "s",
             "Time since the newest rank process started; it drops back to zero when the run restarts.",
             [(f"time() - max by (job, run) (distlm_start_timestamp_seconds{RUN})", "uptime")]),
        stat("Version", "short",
             "The distlm version and commit the ranks run, with how many ranks run each; two lines mean mixed builds.",
             [(f"count by (version, git_sha) (distlm_build_info{RUN})", "{{version}} {{git_sha}}")],
             text_mode="value_and_name"),
    ]
    learning = [
        timeseries("Loss", "short",
                   "Training loss (averaged over ranks by the trainer) and validation loss; "
                   "watch for spikes, NaN and a train/val gap that widens.",
                   [(f"max by (job, run) (distlm_loss{RUN} != 0)", "loss"),
                    (f"max by (job, run) (distlm_val_loss{RUN} != 0)", "val loss")]),
        timeseries("Tokens per second", "short",
                   "Training throughput of the whole run; a drop means a slow rank, slow data or a restart.",
                   [(f"max by (job, run) (rate(distlm_tokens_total{RUN}{WINDOW}))", "tokens/s")], minimum=0),
    ]
    optimizer = [
        timeseries("Learning rate", "short", "The scheduled learning rate; check warm-up and decay follow the config.",
                   [(f"max by (job, run) (distlm_learning_rate{RUN})", "lr")], minimum=0),
        timeseries("Gradient norm", "short",
                   "Gradient norm before clipping; sustained growth or spikes precede divergence.",
                   [(f"max by (job, run) (distlm_grad_norm{RUN})", "grad norm")], minimum=0),
    ]
    health = [
        timeseries("MFU", "percentunit",
                   "Model FLOPs utilisation of the run; a fall without a config change points at "
                   "stragglers, data or communication.",
                   [(f"max by (job, run) (distlm_mfu_ratio{RUN})", "MFU")], minimum=0),
        timeseries("Heartbeat age", "s",
                   "Seconds since the run last completed a step; a steady climb means training is stalled.",
                   [(f"time() - max by (job, run) (distlm_last_step_timestamp_seconds{RUN} > 0)", "since last step")],
                   minimum=0),
    ]
    checkpoints = [
        timeseries("Checkpoint age", "s",
                   "Seconds since the last successful save, against the expected interval (steps between saves "
                   "x mean step time); age well above it means saves fail or stopped.",
                   [(f"time() - max by (job, run) (distlm_checkpoint_last_success_timestamp_seconds{RUN} > 0)", "age"),
                    (f"max by (job, run) (distlm_checkpoint_every_steps{RUN}) * max by (job, run) ({mean_step(RUN)})",
                     "expected interval")],
                   minimum=0),
        timeseries("Checkpoint save duration", "s",
                   "How long the last successful save took on the slowest rank; growth eats into training time "
                   "and the preemption budget.",
                   [(f"max by (job, run) (distlm_checkpoint_save_duration_seconds{RUN})", "save duration")],
                   minimum=0),
    ]
    bad_input = [
        timeseries("Skipped steps", "short",
                   "Optimizer updates skipped per window, by reason (non-finite or spiking); "
                   "repeated skips mean diverging training or bad data.",
                   [(f"max by (job, run, reason) (increase(distlm_skipped_steps_total{RUN}{WINDOW}))", "{{reason}}")],
                   minimum=0),
        timeseries("Data errors", "short",
                   "Damaged data the loader met per window, by kind (totals of all ranks); "
                   "any rise means corrupt or unreadable shards.",
                   [(f"max by (job, run, kind) (increase(distlm_data_errors_total{RUN}{WINDOW}))", "{{kind}}"),
                    (f"max by (job, run) (increase(distlm_data_rows_skipped_total{RUN}{WINDOW}))", "rows skipped")],
                   minimum=0),
    ]
    faults = [
        timeseries("Restarts", "short",
                   "Times the launcher restarted the run; a rising count with little step progress is a crash loop.",
                   [(f"max by (job, run) (distlm_restarts_total{RUN})", "restarts")], minimum=0),
        timeseries("Checkpoint save failures", "short",
                   "Failed checkpoint saves per window on the worst rank; any failure means a restart loses more work.",
                   [(f"max by (job, run) (increase(distlm_checkpoint_save_failures_total{RUN}{WINDOW}))", "failures")],
                   minimum=0),
    ]
    return dashboard("distlm-training", "distlm / training",
                     "Run-level view of one distlm training run: progress, loss, throughput, checkpoints and faults.",
                     [stats, learning, optimizer, health, checkpoints, bad_input, faults])


def ranks() -> dict:
    step_time = [
        timeseries("Step time per rank (mean)", "s",
                   "Mean wall time per optimizer step (data wait included) on each rank; ranks sync every step, "
                   "so one straggler raises all of them.",
                   [(mean_step(RANK), PER_RANK)], minimum=0),
        timeseries("Step time per rank (p90)", "s",
                   "90th percentile of step time per rank, from the histogram; far above the mean means "
                   "occasional long steps (slow batches, stalls).",
                   [(f"histogram_quantile(0.9, sum by (job, run, rank, node, le) "
                     f"(rate(distlm_step_duration_seconds_bucket{RANK}{WINDOW})))", PER_RANK)],
                   minimum=0),
    ]
    stragglers = [
        timeseries("Forward seconds per second per rank", "percentunit",
                   "Share of wall time each rank spends in forward passes, the straggler signal: a rank well "
                   "above the others of its pipeline stage is the slow one (stages differ by design).",
                   [(f"rate(distlm_forward_seconds_total{RANK}{WINDOW})", PER_RANK)], minimum=0),
        timeseries("Data wait fraction per rank", "percentunit",
                   "Share of wall time each rank waits for its next batch; a rank above the rest has slow "
                   "storage or loader workers.",
                   [(f"rate(distlm_dataloader_wait_seconds_total{RANK}{WINDOW})", PER_RANK)], minimum=0),
    ]
    stalls = [
        timeseries("Current data wait per rank", "s",
                   "How long each rank has been waiting for its next batch right now (0: not waiting); "
                   "a line that keeps climbing is a data stall.",
                   # "> bool 0" is 1 while waiting and 0 otherwise: a healthy rank draws 0, not a gap.
                   [(f"(time() - distlm_dataloader_waiting_since_timestamp_seconds{RANK})"
                     f" * (distlm_dataloader_waiting_since_timestamp_seconds{RANK} > bool 0)", PER_RANK)],
                   minimum=0),
        timeseries("Heartbeat age per rank", "s",
                   "Seconds since each rank last completed a step; one rank climbing alone is stuck while "
                   "the others wait on it.",
                   [(f"time() - (distlm_last_step_timestamp_seconds{RANK} > 0)", PER_RANK)], minimum=0),
    ]
    processes = [
        timeseries("Memory per rank", "bytes",
                   "Memory in use at the last logged step (CUDA tensors, or resident set on CPU) and its peak; "
                   "a peak near the device size risks out-of-memory.",
                   [(f"distlm_memory_allocated_bytes{RANK}", "allocated " + PER_RANK),
                    (f"distlm_memory_max_allocated_bytes{RANK}", "peak " + PER_RANK)],
                   minimum=0),
        timeseries("Scrape targets up", "short",
                   "1 when Prometheus scraped a rank's endpoint, 0 when it failed (rank dead, hung or unreachable); "
                   "the run's target file labels each endpoint with its rank and node.",
                   [(f"up{RANK}", PER_RANK + " {{instance}}")], minimum=0),
    ]
    gpus = [
        timeseries("GPU utilisation", "percent",
                   "DCGM: share of time each GPU of the selected nodes was busy; one GPU below its peers "
                   "is a straggler or an idle rank.",
                   [(f"DCGM_FI_DEV_GPU_UTIL{GPU}", PER_GPU)], minimum=0),
        timeseries("GPU memory used", "bytes",
                   "DCGM: framebuffer memory used on each GPU, by all processes (not only distlm's tensors).",
                   [(f"DCGM_FI_DEV_FB_USED{GPU} * 1048576", PER_GPU)], minimum=0),
        timeseries("GPU power", "watt",
                   "DCGM: power draw of each GPU; a GPU drawing much less than its peers does less work.",
                   [(f"DCGM_FI_DEV_POWER_USAGE{GPU}", PER_GPU)], minimum=0),
    ]
    return dashboard("distlm-ranks", "distlm / ranks",
                     "Per-rank and hardware view of one distlm run: stragglers, data stalls, memory and GPUs.",
                     [step_time, stragglers, stalls, processes, gpus])


# --------------------------------------------------------------------------- output

def rendered() -> dict[Path, str]:
    """Each dashboard file and the exact text it should hold."""
    return {DASHBOARDS_DIR / f"{board['uid']}.json": json.dumps(board, indent=2, sort_keys=True) + "\n"
            for board in (training(), ranks())}


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print("usage: generate.py [--check]", file=sys.stderr)
        return 2
    files = rendered()
    if argv == ["--check"]:
        stale = [path for path, text in files.items()
                 if not path.exists() or path.read_text(encoding="utf-8") != text]
        for path in stale:
            print(f"{path} is out of date: run python monitoring/grafana/generate.py", file=sys.stderr)
        return 1 if stale else 0
    DASHBOARDS_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
