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
        assert e.name.startswith(("hotsite_", "process_")) and e.help, e
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
            assert p["datasource"]["uid"] == "${datasource}"  # the variable, not a hard-coded uid
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
        "hotsite-coordination",
    } == uids


def test_provisioning_files_point_at_the_dashboards_datasource() -> None:
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "hotsite.yml").read_text())
    assert [d["uid"] for d in datasource["datasources"]] == [dashboards.PROVISIONED_DATASOURCE["uid"]]
    for text in dashboards.build().values():
        variable = json.loads(text)["templating"]["list"][0]
        assert (variable["name"], variable["type"], variable["query"]) == (
            "datasource",
            "datasource",
            "prometheus",
        )
        assert variable["current"]["value"] == dashboards.PROVISIONED_DATASOURCE["uid"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "hotsite.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


def test_process_coordination_and_witness_metrics_are_catalogued() -> None:
    """Issue 19: no process_* metrics; coordination and witness metrics were in no catalogue."""
    names = {e.name for e in catalogue.entries()}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= names
    assert {
        "hotsite_coordination_leader",
        "hotsite_coordination_reachable",
        "hotsite_witness_primary_state",
    } <= names


def test_coordination_and_witness_are_alerted_on_and_charted() -> None:
    alerted = {
        n for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] for n in _names(r["expr"])
    }
    charted = {n for text in dashboards.build().values() for _, e in dashboards.expressions(json.loads(text))
               for n in _names(e)}  # fmt: skip
    for name in (
        "hotsite_coordination_leader",
        "hotsite_coordination_reachable",
        "hotsite_witness_round_age_seconds",
    ):
        assert name in alerted and name in charted, name


def test_the_cpu_ratio_does_not_depend_on_who_scrapes() -> None:
    """Issue 19: cpu_percent(interval=None) at scrape time measured since the previous scrape."""
    import math
    import time
    from collections import namedtuple

    from monitoring.probes.host import CpuSampler, HostCollector, busy_ratio

    sampler = CpuSampler(interval_s=0.2)
    collector = HostCollector(REPO, [], cpu=sampler)

    def scrape() -> float:
        return float(
            next(f for f in collector.collect() if f.name == "hotsite_host_cpu_ratio").samples[0].value
        )

    assert math.isnan(scrape())  # before the first window: no made-up figure
    sampler.ratio = 0.42  # what the daemon's sampler measured over its last window
    assert [scrape() for _ in range(5)] == [0.42] * 5  # a burst of scrapes reads it, never resets it
    Times = namedtuple("Times", "user system idle iowait")
    assert busy_ratio(Times(10, 10, 70, 10), Times(40, 20, 100, 20)) == 0.5  # 40 busy of 80
    sampler.start()
    try:
        deadline = time.monotonic() + 10
        while sampler.ratio == 0.42 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sampler.ratio != 0.42 and 0.0 <= sampler.ratio <= 1.0  # the thread measured a window
    finally:
        sampler.stop()
