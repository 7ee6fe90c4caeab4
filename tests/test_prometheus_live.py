"""A real Prometheus, started with the shipped configuration, scrapes a real 2-rank training run.

The run is started by ``launch/local.sh``; once every rank serves, rank 0 writes the run's
file_sd target file, and the server finds the ranks through it. Every PromQL expression of every shipped Grafana dashboard
(and every template-variable query) must then return at least one series, each rank's target
must be up, and the shipped alert rules must load. When the run ends, its target file must be
gone, so a finished run never reads as ranks missing.

The GPU panels read NVIDIA's dcgm-exporter, which needs a GPU. Here a small HTTP server stands
in for it, serving text in dcgm-exporter's format (metric names and labels as its documentation
lists them), found the way a user's exporter would be: a file in ``targets/dcgm/``.

Outside CI a machine without Prometheus skips these tests, saying so; under CI=true they fail.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from distlm.config import load_config
from distlm.fault import exit_codes
from distlm.metrics.targets import targets_file
from helpers import ROOT, free_ports, process_alive, source_shards, system_unavailable
from launchers import CONFIG, launcher_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"))
SCRAPE_S = 1          # the shipped 15 s would make this test minutes long; nothing else is changed
DEADLINE_S = 150      # for the run to start and every query to have data
# Grafana's variables, as an "All" selection expands them.
VARIABLES = {"$__rate_interval": "15s", "$__interval": "1s", "$__range": "1m",
             "$job": ".*", "$run": ".*", "$rank": ".*", "$node": ".*"}


@pytest.fixture(scope="module")
def prometheus_binary():
    if not (os.path.exists(PROMETHEUS) and os.access(PROMETHEUS, os.X_OK)):
        system_unavailable("no prometheus server (Debian: apt-get install prometheus; "
                           ".ci/install-systems.sh does it)")
    return PROMETHEUS






# --------------------------------------------------------------------------- the stand-in DCGM exporter

def _dcgm_text() -> str:
    labels = (f'gpu="0",UUID="GPU-00000000-0000-0000-0000-000000000000",device="nvidia0",'
              f'modelName="NVIDIA H200",Hostname="{socket.gethostname()}",DCGM_FI_DRIVER_VERSION="570.86.15"')
    lines = []
    for name, kind, value in (("DCGM_FI_DEV_GPU_UTIL", "gauge", 87), ("DCGM_FI_DEV_FB_USED", "gauge", 61234),
                              ("DCGM_FI_DEV_POWER_USAGE", "gauge", 612.5)):
        lines += [f"# HELP {name} {name}.", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def dcgm_endpoint():
    body = _dcgm_text().encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- the server

class Prometheus:
    def __init__(self, binary: str, root: Path):
        """Copy the shipped monitoring/prometheus/ beside an empty targets/ folder, as in the repository."""
        self.config_dir = root / "monitoring" / "prometheus"
        shutil.copytree(ROOT / "monitoring" / "prometheus", self.config_dir)
        self.targets_dir = root / "monitoring" / "targets"
        (self.targets_dir / "dcgm").mkdir(parents=True)
        config_file = self.config_dir / "prometheus.yml"
        config = yaml.safe_load(config_file.read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{SCRAPE_S}s"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_ports()
        self.log = root / "prometheus.log"
        self.command = [binary, f"--config.file={config_file}", f"--web.listen-address=127.0.0.1:{self.port}",
                        f"--storage.tsdb.path={root / 'tsdb'}"]
        self.proc = None

    def start(self) -> "Prometheus":
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready in 60 s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]


# --------------------------------------------------------------------------- dashboard expressions

def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, where, PromQL with Grafana's variables expanded) for every panel target and
    every query variable; ``label_values(EXPR, LABEL)`` is asked as ``count by (LABEL) (EXPR)``."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((path.name, f"panel {panel.get('title')!r}", _expand(target["expr"])))
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
            expr = f"count by ({match.group(2)}) ({match.group(1)})" if match else query
            found.append((path.name, f"variable {variable['name']!r}", _expand(expr)))
    return found


def _panels(panels: list) -> list:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold their own


def _expand(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):  # $__rate_interval before $__range ...
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def test_the_dashboards_are_there():
    assert DASHBOARDS, "no dashboards under monitoring/grafana/dashboards/"
    assert len(dashboard_queries()) >= 20


# --------------------------------------------------------------------------- the run

def test_prometheus_scrapes_a_two_rank_run_and_every_dashboard_query_has_data(
        prometheus_binary, dcgm_endpoint, tmp_path):
    shards = source_shards(tmp_path, val_fraction=0.1)
    server = Prometheus(prometheus_binary, tmp_path)
    (server.targets_dir / "dcgm" / "gpu-node.json").write_text(json.dumps([{"targets": [dcgm_endpoint]}]))
    metrics_port = free_ports(2)
    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", "run.name=live", f"data.path={shards}", "train.max_steps=100000",
                 "train.log_every=2", "train.eval_every=10", "train.save_every=10", "checkpoint.keep_last=1",
                 "train.batch_size=8", "metrics.enabled=true", f"metrics.port={metrics_port}"]
    launcher = None
    try:
        server.start()
        launcher = subprocess.Popen(
            ["bash", "launch/local.sh", CONFIG, *overrides], cwd=ROOT, text=True, start_new_session=True,
            stdout=open(tmp_path / "launcher.log", "w"), stderr=subprocess.STDOUT,
            env=launcher_env(NPROC="2", DISTLM_TARGETS_DIR=str(server.targets_dir)))
        run_cfg = load_config(CONFIG, overrides)
        target_file = _wait_for_target_file(targets_file(run_cfg, {"DISTLM_TARGETS_DIR": str(server.targets_dir)}),
                                            launcher, tmp_path)
        assert [group["targets"] for group in json.loads(target_file.read_text())] == [
            [f"127.0.0.1:{metrics_port}"], [f"127.0.0.1:{metrics_port + 1}"]]

        missing = _wait_until_every_query_has_data(server, launcher, tmp_path)
        assert not missing, "dashboard queries without data:\n" + "\n".join(missing)

        up = {(r["metric"]["rank"], r["metric"]["instance"]): r["value"][1] for r in server.query('up{job="distlm"}')}
        assert up == {("0", f"127.0.0.1:{metrics_port}"): "1", ("1", f"127.0.0.1:{metrics_port + 1}"): "1"}, up
        ranks = {r["metric"]["rank"] for r in server.query('distlm_build_info{job="distlm", run="live"}')}
        assert ranks == {"0", "1"}

        loaded = {rule["name"] for group in server.api("rules")["groups"] for rule in group["rules"]
                  if rule["type"] == "alerting"}
        assert {"DistlmTrainingStalled", "DistlmRankMissing", "DistlmThroughputDrop", "DistlmLossNotFinite",
                "DistlmLossSpike", "DistlmCheckpointTooOld", "DistlmDataLoaderStalled",
                "DistlmStragglerRank"} <= loaded, loaded
    finally:
        if launcher is not None:
            _stop(launcher)
        server.stop()

    # The ranks stopped (SIGTERM: save and exit 75; torchrun itself reports the signal): rank 0
    # took the target file with it.
    codes = {json.loads(line)["code"] for line in (run_dir / exit_codes.EXITS_LOG).read_text().splitlines()}
    assert codes == {exit_codes.PREEMPTED}, f"{codes}\n{_tail(tmp_path / 'launcher.log')}"
    assert not list(server.targets_dir.glob("*.json")), "the run's target file outlived it"


def _wait_for_target_file(path: Path, launcher, log_dir: Path) -> Path:
    deadline = time.monotonic() + 90
    while not path.exists():
        assert launcher.poll() is None, f"launcher exited {launcher.returncode}:\n{_tail(log_dir / 'launcher.log')}"
        assert time.monotonic() < deadline, f"no {path} in 90 s:\n{_tail(log_dir / 'launcher.log')}"
        time.sleep(0.2)
    return path


def _wait_until_every_query_has_data(server: Prometheus, launcher, log_dir: Path) -> list[str]:
    """The queries still without a series at the deadline (empty once all have data)."""
    queries = dashboard_queries()
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert launcher.poll() is None, f"training exited {launcher.returncode}:\n{_tail(log_dir / 'launcher.log')}"
        missing = [f"{name}, {where}: {expr}" for name, where, expr in queries if not server.query(expr)]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(2)


def _stop(launcher) -> None:
    """SIGTERM, as a scheduler would: the ranks save and exit; SIGKILL the group if they hang."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    deadline = time.monotonic() + 10
    while process_alive(launcher.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no output)"
