"""The shipped Prometheus configuration and alert rules: valid, and tested by promtool.

``monitoring/prometheus/`` holds prometheus.yml, the rules it loads (alerts.yml) and promtool unit
tests for them (tests/*.yml). Here promtool checks the config and the rules and runs those unit
tests; without promtool they are skipped locally, but fail under CI (env CI set and not
0/false/no), which must run them. The checks that need no promtool run everywhere: every alerting
rule has a unit test in which it fires and every alert name one in which it must not, the unit
tests evaluate the recording rules before the alerts (group_eval_order), and every alert carries
what the on-call person needs (severity, summary, description, runbook).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, system_unavailable

PROM_DIR = ROOT / "monitoring" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
UNIT_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))

PROMTOOL_TIMEOUT_S = 120
SEVERITIES = {"critical", "warning"}


def _promtool() -> str:
    """The promtool to run ($PROMTOOL, else the one on PATH); skip (fail under CI) without one."""
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if path:
        return path
    reason = ("promtool not found (not on PATH and $PROMTOOL unset): install Prometheus "
              "(Debian/Ubuntu: apt-get install prometheus) to check the shipped rules")
    system_unavailable(reason)


def _run_promtool(*args: str) -> None:
    cmd = [_promtool(), *args]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish in {PROMTOOL_TIMEOUT_S}s\n{e.stdout or ''}{e.stderr or ''}",
                    pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}{done.stderr}", pytrace=False)


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _alerting_rules() -> list[dict]:
    return [rule for group in _load(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


def _alert_cases() -> list[dict]:
    """Every alert_rule_test entry of every unit test file."""
    return [case for path in UNIT_TESTS for test in _load(path).get("tests") or []
            for case in test.get("alert_rule_test") or []]


def _rel(paths) -> list[str]:
    return sorted(str(Path(p).resolve().relative_to(ROOT)) for p in paths)


# ---------------------------------------------------------------------- promtool


def test_promtool_check_config():
    _run_promtool("check", "config", str(CONFIG.relative_to(ROOT)))


def test_promtool_check_rules():
    _run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))


def test_promtool_unit_tests_pass():
    assert UNIT_TESTS, f"no promtool unit tests in {PROM_DIR / 'tests'}"
    _run_promtool("test", "rules", *(str(p.relative_to(ROOT)) for p in UNIT_TESTS))


# ---------------------------------------------------------------------- coverage and contents


def test_unit_tests_load_the_rule_files_prometheus_loads():
    """A rule file that Prometheus loads but no unit test does would go untested."""
    loaded = _rel(CONFIG.parent / f for f in _load(CONFIG)["rule_files"])
    assert loaded == [str(ALERTS.relative_to(ROOT))]
    for path in UNIT_TESTS:
        assert _rel(path.parent / f for f in _load(path)["rule_files"]) == loaded, path


def test_unit_tests_evaluate_recording_rules_before_the_alerts():
    """Without group_eval_order promtool evaluates the groups in a random order each run, so an alert
    reading a recorded series sees it one evaluation late by chance and a case timed to the minute
    fails now and then. Every group must be listed, the recording-only ones before the others."""
    groups = _load(ALERTS)["groups"]
    recording = [g["name"] for g in groups if all("record" in r for r in g["rules"])]
    others = [g["name"] for g in groups if g["name"] not in recording]
    for path in UNIT_TESTS:
        order = _load(path).get("group_eval_order") or []
        assert sorted(order) == sorted(recording + others), f"{path}: group_eval_order {order}"
        assert max(map(order.index, recording), default=-1) < min(map(order.index, others), default=len(order)), \
            f"{path}: group_eval_order {order} must list the recording groups {recording} first"


def test_every_alerting_rule_has_a_case_where_it_fires():
    """Per rule, not only per name: a case firing with the rule's own labels (severity, detected_by)."""
    fired = [(case["alertname"], alert.get("exp_labels") or {})
             for case in _alert_cases() for alert in case.get("exp_alerts") or []]
    untested = []
    for rule in _alerting_rules():
        labels = {k: str(v) for k, v in (rule.get("labels") or {}).items()}
        if not any(name == rule["alert"] and all(str(exp.get(k)) == v for k, v in labels.items())
                   for name, exp in fired):
            untested.append(f"{rule['alert']} {labels}")
    assert not untested, f"alerting rules that no promtool test expects to fire: {untested}"


def test_every_alert_has_a_case_where_it_must_not_fire():
    quiet = {case["alertname"] for case in _alert_cases() if not case.get("exp_alerts")}
    missing = sorted({rule["alert"] for rule in _alerting_rules()} - quiet)
    assert not missing, f"alerts without a promtool test case in which they must stay silent: {missing}"


def test_every_alert_has_severity_summary_description_and_runbook():
    problems = []
    for rule in _alerting_rules():
        name, labels, notes = rule["alert"], rule.get("labels") or {}, rule.get("annotations") or {}
        if labels.get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity {labels.get('severity')!r} not in {sorted(SEVERITIES)}")
        for key in ("summary", "description"):
            if not str(notes.get(key) or "").strip():
                problems.append(f"{name}: no {key} annotation")
        if "$labels.run" not in str(notes.get("summary", "")) + str(notes.get("description", "")):
            problems.append(f"{name}: summary and description never name the run ($labels.run)")
        expected_runbook = f"monitoring/README.md#{name.lower()}"
        if notes.get("runbook") != expected_runbook:
            problems.append(f"{name}: runbook {notes.get('runbook')!r}, expected {expected_runbook!r}")
    assert not problems, "\n".join(problems)
