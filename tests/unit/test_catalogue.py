"""The metrics catalogue, the dashboards and the rules agree with the code.

No Prometheus needed: names are compared with the catalogue generated from the code's
metric classes (the lab test then checks the same expressions against a real scrape).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from monitoring import catalogue
from monitoring.grafana import build as dashboards
from tests.conftest import REPO

RULES = REPO / "monitoring" / "prometheus" / "hotsite.rules.yml"
PROVISIONING = REPO / "monitoring" / "grafana" / "provisioning"


def _names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bhotsite_[a-z_]+", expr)}


def test_committed_catalogue_equals_the_generated_one() -> None:
    assert catalogue.CATALOGUE.read_text() == catalogue.render(catalogue.entries()), (
        "monitoring/METRICS.md is stale: run python -m monitoring.catalogue"
    )


def test_catalogue_lists_every_metric_once_with_units_and_help() -> None:
    items = catalogue.entries()
    names = [e.name for e in items]
    assert len(names) == len(set(names))
    assert {"hotsite_probe_up", "hotsite_paging_pages_total", "hotsite_replication_lag_seconds"} <= set(names)
    assert "hotsite_host_nic_errors_total" in names  # a custom collector's counter, as exposed
    for e in items:
        assert e.name.startswith("hotsite_") and e.help, e
        assert e.type in ("counter", "gauge", "histogram", "info"), e
        if e.type == "counter":
            assert e.name.endswith("_total"), e
    histogram = next(e for e in items if e.name == "hotsite_probe_rtt_seconds")
    assert histogram.type == "histogram" and histogram.labels == ("target",)


def test_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "METRICS.md"
    stale.write_text("old\n")
    monkeypatch.setattr(catalogue, "CATALOGUE", stale)
    assert catalogue.main(["--check"]) == 1
    assert catalogue.main([]) == 0
    assert catalogue.main(["--check"]) == 0


def test_rules_use_only_catalogued_metrics() -> None:
    known = {e.name for e in catalogue.entries()}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            unknown = _names(rule["expr"]) - known
            assert not unknown, f"{rule['alert']}: {sorted(unknown)} not exported by the code"


def test_committed_dashboards_equal_the_generated_ones() -> None:
    for name, text in dashboards.build().items():
        path = dashboards.DASHBOARDS_DIR / name
        assert path.read_text() == text, f"{name} is stale: run python -m monitoring.grafana.build"
    assert sorted(p.name for p in dashboards.DASHBOARDS_DIR.glob("*.json")) == sorted(dashboards.build())


def test_dashboards_are_provisionable_and_use_only_catalogued_metrics() -> None:
    known = {e.name for e in catalogue.entries()}
    uids = set()
    for name, text in dashboards.build().items():
        board = json.loads(text)
        assert board["uid"] not in uids and len(board["uid"]) <= 40
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        cells: set[tuple[int, int]] = set()
        for p in board["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, (name, p["title"])
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not area & cells, f"{name}: {p['title']} overlaps another panel"
            cells |= area
            assert p["datasource"]["uid"] == "hotsite-prometheus"
            assert p["targets"], (name, p["title"])
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))
            for t in p["targets"]:
                unknown = _names(t["expr"]) - known
                assert not unknown, f"{name} / {p['title']}: {sorted(unknown)} not exported by the code"
        variables = {v["name"] for v in board["templating"]["list"]}
        used = {m for t in dashboards.expressions(board) for m in re.findall(r"\$(\w+)", t[1])}
        assert used - {"__rate_interval", "__range"} <= variables, name
    assert {
        "hotsite-overview",
        "hotsite-trunks",
        "hotsite-replication",
        "hotsite-paging",
        "hotsite-host",
    } == uids


def test_provisioning_files_point_at_the_dashboards_datasource() -> None:
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "hotsite.yml").read_text())
    assert [d["uid"] for d in datasource["datasources"]] == [dashboards.DATASOURCE["uid"]]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "hotsite.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
