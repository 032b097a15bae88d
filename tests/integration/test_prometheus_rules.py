"""The alerting rules, checked and unit-tested by Prometheus' own promtool (Debian ``prometheus``).

``promtool check rules`` catches syntax and template errors; ``promtool test rules`` runs
the scenarios in ``hotsite.rules.test.yml`` (each alert fires after its ``for`` with the labels
operators route on, and not before). A further check makes sure no alert is left without a
scenario, so a new rule cannot slip in untested.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

RULES_DIR = REPO / "monitoring" / "prometheus"
RULES = RULES_DIR / "hotsite.rules.yml"
RULE_TESTS = RULES_DIR / "hotsite.rules.test.yml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package: prometheus)"
)


def _promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    proc = _promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_example_prometheus_config_is_valid() -> None:
    proc = _promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_a_broken_rule_is_caught(tmp_path: Path) -> None:
    """The check is not a rubber stamp: a threshold changed without updating its scenario fails."""
    text = RULES.read_text().replace(
        "expr: hotsite_replication_over_budget == 1", "expr: hotsite_replication_over_budget == 2"
    )
    assert text != RULES.read_text()
    (tmp_path / RULES.name).write_text(text)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    proc = _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0 and "HotsiteReplicationLagOverBudget" in proc.stdout + proc.stderr


def test_every_alert_has_a_scenario_and_a_severity() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    tested = {
        case["alertname"]
        for block in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in block.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) - tested == set(), "alerts without a firing scenario"
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert alert["annotations"].get("summary"), alert["alert"]
