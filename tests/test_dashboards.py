"""The Grafana dashboards (monitoring/grafana): current with their generator, and every query
filtered by the dashboard variables and naming only series that exist. No Prometheus here; the
queries themselves are run against a real one by the monitoring integration test."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distlm.metrics.exporter import Exporter

GRAFANA = Path(__file__).resolve().parent.parent / "monitoring" / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
VARIABLES = {"job", "run", "rank", "node", "__rate_interval", "__interval", "__range"}

# The series the dashboards may use: what the exporter defines (the test asks it), Prometheus'
# own scrape health, and the dcgm-exporter fields the GPU panels read.
PROMETHEUS_SERIES = {"up"}
DCGM_SERIES = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE"}
METRIC_NAME = re.compile(r"\b(?:distlm_\w+|DCGM_FI_\w+|up)\b")
STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')


def _dashboards() -> dict[str, dict]:
    files = sorted((GRAFANA / "dashboards").glob("*.json"))
    return {path.name: json.loads(path.read_text(encoding="utf-8")) for path in files}


DASHBOARDS = _dashboards()


def _panels():
    return [(name, panel) for name, board in DASHBOARDS.items() for panel in board["panels"]]


def _exprs() -> list[str]:
    return [target["expr"] for _, panel in _panels() for target in panel["targets"]]


def _exporter_series() -> set[str]:
    exporter = Exporter(rank=0, run="t")
    return {sample.name for metric in exporter.registry.collect() for sample in metric.samples}


def test_committed_dashboards_are_what_the_generator_writes():
    done = subprocess.run([sys.executable, str(GRAFANA / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_check_names_a_stale_dashboard(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    monkeypatch.setattr(generate, "DASHBOARDS_DIR", tmp_path)
    assert generate.main([]) == 0
    (tmp_path / "distlm-ranks.json").write_text("{}\n")
    assert generate.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "distlm-ranks.json" in err and "distlm-training.json" not in err


def test_dashboard_uids_are_the_two_expected_ones():
    uids = [board["uid"] for board in DASHBOARDS.values()]
    assert sorted(uids) == ["distlm-ranks", "distlm-training"]
    for name, board in DASHBOARDS.items():
        assert name == f"{board['uid']}.json"


@pytest.mark.parametrize("name, panel", _panels(), ids=lambda v: v if isinstance(v, str) else v["title"])
def test_every_panel_queries_the_chosen_datasource(name, panel):
    assert panel["datasource"] == DATASOURCE
    assert panel["description"].strip()
    assert any(target["expr"].strip() for target in panel["targets"])
    assert all(target["datasource"] == DATASOURCE for target in panel["targets"])


@pytest.mark.parametrize("board", DASHBOARDS.values(), ids=DASHBOARDS.keys())
def test_panels_have_unique_ids_and_do_not_overlap(board):
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    taken = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


@pytest.mark.parametrize("board", DASHBOARDS.values(), ids=DASHBOARDS.keys())
def test_templating_offers_datasource_job_run_and_rank(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "job", "run", "rank"} <= variables.keys()
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert not variables["job"]["multi"] and not variables["run"]["multi"]
    rank = variables["rank"]
    assert rank["multi"] and rank["includeAll"] and rank["allValue"] == ".*"


@pytest.mark.parametrize("expr", _exprs())
def test_queries_use_only_known_variables(expr):
    used = set(re.findall(r"\$\{?(\w+)", expr))
    assert used <= VARIABLES, f"unknown variables {used - VARIABLES} in {expr}"


def test_queries_name_only_series_that_exist():
    exporter_series = _exporter_series()
    referenced = {name for expr in _exprs() for name in METRIC_NAME.findall(STRING_LITERAL.sub('""', expr))}
    unknown = {name for name in referenced
               if name not in exporter_series | PROMETHEUS_SERIES | DCGM_SERIES}
    assert not unknown, f"the dashboards query series nothing defines: {sorted(unknown)}"


def test_provisioning_names_the_datasource_and_dashboard_folder():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "distlm.yml").read_text())
    [source] = datasources["datasources"]
    assert (source["name"], source["uid"], source["type"]) == ("distlm-prometheus", "distlm-prometheus", "prometheus")
    assert source["isDefault"] is False
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "distlm.yml").read_text())
    [provider] = providers["providers"]
    assert provider["folder"] == "distlm" and provider["allowUiUpdates"] is False
    assert provider["options"]["foldersFromFilesStructure"] is False
