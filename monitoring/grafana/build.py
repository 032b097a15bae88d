# ruff: noqa: E501  (PromQL expressions read better unbroken than split across string literals)
"""Build the Grafana dashboards (``monitoring/grafana/dashboards/*.json``) from this one description.

Why generate: five dashboards share a datasource, variables, colours and the state
encodings; written by hand they drift apart. The JSON files are committed (Grafana
provisions them from disk) and a test checks they equal what this module builds, so an
edit here without ``python -m monitoring.grafana.build`` fails the test suite.

Every query names only metrics the daemon exports (``monitoring/METRICS.md``). Template
variables have an ``allValue`` regex, so a test can run each expression against a real
Prometheus with the variables set to "All" (tests/integration/test_prometheus_lab.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
# Panels name the datasource through the ``datasource`` variable, so the dashboards work with
# whichever Prometheus datasource a site has; its default is the provisioned one.
PROVISIONED_DATASOURCE = {"type": "prometheus", "uid": "hotsite-prometheus"}  # provisioning/datasources/
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
WIDTH = 24


def _datasource_var() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": False, "text": "hotsite Prometheus", "value": PROVISIONED_DATASOURCE["uid"]},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def _instance_var() -> dict[str, Any]:
    return _query_var("instance", "Appliance", "label_values(hotsite_build_info, instance)")


def _query_var(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"var-{name}"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".+",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def target(expr: str, legend: str = "", *, instant: bool = False, fmt: str = "time_series") -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "instant": instant,
        "range": not instant,
        "format": fmt,
    }


def _mapping(values: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    return [
        {
            "type": "value",
            "options": {
                str(v): {"text": text, "color": color, "index": i}
                for i, (v, (text, color)) in enumerate(values.items())
            },
        }
    ]


VERDICTS = {0: ("unknown", "gray"), 1: ("down", "red"), 2: ("degraded", "orange"), 3: ("up", "green")}
UP_DOWN = {0: ("down", "red"), 1: ("up", "green")}
# One number per site from the one-hot verdict gauge: the state timeline colours it.
SITE_VERDICT = (
    'hotsite_site_verdict{instance=~"$instance", verdict="up"} * 3'
    ' + ignoring(verdict) hotsite_site_verdict{instance=~"$instance", verdict="degraded"} * 2'
    ' + ignoring(verdict) hotsite_site_verdict{instance=~"$instance", verdict="down"}'
)


class Layout:
    """Places panels left to right, wrapping at Grafana's 24 columns; ids in order."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1
        self.panels: list[dict[str, Any]] = []

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > WIDTH:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = self.next_id
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        panel.setdefault("datasource", DATASOURCE)
        for i, t in enumerate(panel.get("targets", [])):
            t["refId"] = chr(ord("A") + i)
        self.panels.append(panel)
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)


def panel(
    kind: str,
    title: str,
    targets: list[dict[str, Any]],
    *,
    description: str = "",
    unit: str = "",
    mappings: dict[int, tuple[str, str]] | None = None,
    thresholds: list[tuple[float | None, str]] | None = None,
    options: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    transformations: list[dict[str, Any]] | None = None,
    minimum: float | None = None,
) -> dict[str, Any]:
    """One panel. *options* are the panel type's options; *custom* its field config
    (``fieldConfig.defaults.custom``: ``drawStyle``, ``thresholdsStyle``…), where Grafana
    reads them: under ``options`` it silently ignores them (the schema test catches that)."""
    defaults: dict[str, Any] = {}
    if custom:
        defaults["custom"] = custom
    if unit:
        defaults["unit"] = unit
    if minimum is not None:
        defaults["min"] = minimum
    if mappings:
        defaults["mappings"] = _mapping(mappings)
        defaults["color"] = {"mode": "thresholds"}
    steps = thresholds or [(None, "green")]
    defaults["thresholds"] = {
        "mode": "absolute",
        "steps": [{"value": value, "color": color} for value, color in steps],
    }
    result: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
    }
    if transformations:
        result["transformations"] = transformations
    return result


def dashboard(
    uid: str, title: str, description: str, layout: Layout, variables: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["hotsite"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [_datasource_var(), *variables]},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["hotsite"],
                "asDropdown": True,
                "title": "hotsite",
                "includeVars": True,
            }
        ],
        "panels": layout.panels,
    }


I = '{instance=~"$instance"}'  # noqa: E741 - the selector every panel repeats
RI = "$__rate_interval"


def overview() -> dict[str, Any]:
    lay = Layout()
    lay.add(
        panel(
            "state-timeline",
            "Site verdicts",
            [target(SITE_VERDICT, "{{site}}")],
            description="Each site's verdict from all its vantage points (SBC probe, health URL, witness).",
            mappings=VERDICTS,
            thresholds=[(None, "gray"), (1, "red"), (2, "orange"), (3, "green")],
            options={"mergeValues": True, "showValue": "auto", "rowHeight": 0.8},
        ),
        24,
        6,
    )
    lay.add(
        panel(
            "state-timeline",
            "Failover engine state",
            [target('hotsite_failover_state{instance=~"$instance"} == 1', "{{state}}")],
            description="The engine's state over time (one row per state it was in).",
            options={"mergeValues": True, "showValue": "never", "rowHeight": 0.8},
        ),
        24,
        6,
    )
    lay.add(
        panel(
            "stat",
            "Routing applied",
            [target('hotsite_failover_routing{instance=~"$instance"} == 1', "{{routing}}", instant=True)],
            options={"textMode": "name", "colorMode": "background", "graphMode": "none"},
            thresholds=[(None, "green")],
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "stat",
            "Trunks up",
            [
                target(
                    'sum by (instance) (hotsite_probe_up{instance=~"$instance", kind="sip", target=~"trunk:.+"})',
                    "up",
                    instant=True,
                ),
                target(
                    'count by (instance) (hotsite_probe_up{instance=~"$instance", kind="sip", target=~"trunk:.+"})',
                    "configured",
                    instant=True,
                ),
            ],
            options={"textMode": "value_and_name", "graphMode": "none"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "stat",
            "Open incidents",
            [
                target(
                    f"sum by (instance, status) (hotsite_paging_incidents_open{I})",
                    "{{status}}",
                    instant=True,
                )
            ],
            thresholds=[(None, "green"), (1, "red")],
            options={"textMode": "value_and_name", "colorMode": "background", "graphMode": "none"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "stat",
            "Fencing epoch",
            [target(f"hotsite_failover_epoch{I}", "epoch", instant=True)],
            description="Increases with every routing decision.",
            options={"graphMode": "none"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "timeseries",
            "Calls in progress by site",
            [target(f"hotsite_site_calls_in_progress{I}", "{{site}}")],
            description="From Kamailio's dialog profiles at the carrier edge.",
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Probe state of every target",
            [target(f"hotsite_probe_up{I}", "{{target}}")],
            mappings=UP_DOWN,
            minimum=0,
        ),
        12,
        8,
    )
    return dashboard(
        "hotsite-overview",
        "hotsite / Site overview",
        "Both call-centre sites, the failover engine and routing, trunks and incidents at a glance.",
        lay,
        [_instance_var()],
    )


def trunks() -> dict[str, Any]:
    lay = Layout()
    sel = 'instance=~"$instance", target=~"$trunk"'
    lay.add(
        panel(
            "table",
            "Trunks",
            [
                target(f"hotsite_probe_up{{{sel}}}", "", instant=True, fmt="table"),
                target(f"hotsite_probe_last_status_code{{{sel}}}", "", instant=True, fmt="table"),
                target(
                    f"sum by (instance, target) (increase(hotsite_probe_failures_total{{{sel}}}[1h]))",
                    "",
                    instant=True,
                    fmt="table",
                ),
                target(
                    f"histogram_quantile(0.5, sum by (instance, target, le) (rate(hotsite_probe_rtt_seconds_bucket{{{sel}}}[5m])))",
                    "",
                    instant=True,
                    fmt="table",
                ),
            ],
            description="State (1 up), last SIP code, failed probes in the last hour, median RTT (5 min).",
            transformations=[
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "job": True, "kind": True},
                        "renameByName": {
                            "Value #A": "up",
                            "Value #B": "last SIP code",
                            "Value #C": "failures (1h)",
                            "Value #D": "median RTT (s)",
                        },
                    },
                },
            ],
        ),
        24,
        8,
    )
    lay.add(
        panel(
            "heatmap",
            "SIP OPTIONS round-trip time",
            [
                target(
                    f"sum by (le) (increase(hotsite_probe_rtt_seconds_bucket{{{sel}}}[{RI}]))",
                    "{{le}}",
                    fmt="heatmap",
                )
            ],
            description="Distribution of successful probes' RTT over the selected trunks.",
            options={
                "calculate": False,
                "yAxis": {"unit": "s"},
                "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5},
                "cellGap": 1,
            },
        ),
        12,
        9,
    )
    lay.add(
        panel(
            "timeseries",
            "RTT, 90th percentile",
            [
                target(
                    f"histogram_quantile(0.9, sum by (target, le) (rate(hotsite_probe_rtt_seconds_bucket{{{sel}}}[{RI}])))",
                    "{{target}}",
                )
            ],
            unit="s",
            minimum=0,
        ),
        12,
        9,
    )
    lay.add(
        panel(
            "timeseries",
            "Failed probes by reason",
            [
                target(
                    f"sum by (target, reason) (rate(hotsite_probe_failures_total{{{sel}}}[{RI}]))",
                    "{{target}} {{reason}}",
                )
            ],
            unit="ops",
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Calls in progress by trunk",
            [target('hotsite_trunk_calls_in_progress{instance=~"$instance"}', "{{trunk}}")],
            minimum=0,
        ),
        12,
        8,
    )
    trunk_var = _query_var("trunk", "Trunk", 'label_values(hotsite_probe_up{kind="sip"}, target)')
    trunk_var["regex"] = "trunk:.*"
    trunk_var["allValue"] = "trunk:.+"
    return dashboard(
        "hotsite-trunks",
        "hotsite / Carrier trunks",
        "Every carrier trunk's state, last SIP code, RTT distribution and failures.",
        lay,
        [_instance_var(), trunk_var],
    )


def replication() -> dict[str, Any]:
    lay = Layout()
    sel = 'instance=~"$instance", stream=~"$stream"'
    lay.add(
        panel(
            "timeseries",
            "Replication lag (data-loss window)",
            [target(f"hotsite_replication_lag_seconds{{{sel}}}", "{{stream}}")],
            description="Seconds since the replica last held the newest committed source state.",
            unit="s",
            minimum=0,
            thresholds=[(None, "green"), (5, "red")],
            custom={"thresholdsStyle": {"mode": "line"}},
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Bytes not yet applied",
            [target(f"hotsite_replication_lag_bytes{{{sel}}}", "{{stream}}")],
            unit="bytes",
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "state-timeline",
            "Connected / within budget",
            [
                target(f"hotsite_replication_connected{{{sel}}}", "{{stream}} connected"),
                target(f"1 - hotsite_replication_over_budget{{{sel}}}", "{{stream}} within budget"),
            ],
            mappings={0: ("no", "red"), 1: ("yes", "green")},
            thresholds=[(None, "red"), (1, "green")],
            options={"mergeValues": True, "showValue": "auto"},
        ),
        24,
        6,
    )
    lay.add(
        panel(
            "timeseries",
            "Throughput",
            [
                target(
                    f"rate(hotsite_replication_transactions_total{{{sel}}}[{RI}])",
                    "{{stream}} transactions/s",
                ),
                target(
                    f"rate(hotsite_replication_received_bytes_total{{{sel}}}[{RI}])", "{{stream}} bytes/s"
                ),
            ],
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Trouble (per hour)",
            [
                target(
                    f"increase(hotsite_replication_checksum_mismatches_total{{{sel}}}[1h])",
                    "{{stream}} checksum mismatches",
                ),
                target(
                    f"increase(hotsite_replication_corrupt_messages_total{{{sel}}}[1h])",
                    "{{stream}} corrupt messages",
                ),
                target(
                    f"increase(hotsite_replication_resnapshots_total{{{sel}}}[1h])", "{{stream}} resnapshots"
                ),
            ],
            minimum=0,
        ),
        12,
        8,
    )
    return dashboard(
        "hotsite-replication",
        "hotsite / Replication",
        "Replication of the primary's databases and configuration files: lag against the budget.",
        lay,
        [
            _instance_var(),
            _query_var("stream", "Stream", "label_values(hotsite_replication_connected, stream)"),
        ],
    )


def paging() -> dict[str, Any]:
    lay = Layout()
    lay.add(
        panel(
            "timeseries",
            "Pages by channel and result",
            [
                target(
                    f"sum by (channel, result) (increase(hotsite_paging_pages_total{I}[{RI}]))",
                    "{{channel}} {{result}}",
                )
            ],
            custom={"drawStyle": "bars", "fillOpacity": 80},
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Time to acknowledge",
            [
                target(
                    f"histogram_quantile(0.5, sum by (le) (increase(hotsite_paging_time_to_ack_seconds_bucket{I}[1d])))",
                    "median (1 day)",
                ),
                target(
                    f"histogram_quantile(0.9, sum by (le) (increase(hotsite_paging_time_to_ack_seconds_bucket{I}[1d])))",
                    "90th percentile (1 day)",
                ),
            ],
            description="From an incident opening to its acknowledgement (SMS reply, CLI or webhook).",
            unit="s",
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "stat",
            "Acknowledged incidents (range)",
            [
                target(
                    f"sum(increase(hotsite_paging_time_to_ack_seconds_count{I}[$__range]))",
                    "acknowledged",
                    instant=True,
                )
            ],
            options={"graphMode": "none"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "stat",
            "Outbox",
            [target(f"hotsite_paging_outbox_depth{I}", "waiting", instant=True)],
            thresholds=[(None, "green"), (1, "orange")],
            options={"graphMode": "area"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "timeseries",
            "Incidents by status",
            [target(f"hotsite_paging_incidents_open{I}", "{{status}}")],
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "GSM modem signal",
            [target(f"hotsite_modem_signal_dbm{I}", "{{channel}}")],
            unit="dBm",
            thresholds=[(None, "red"), (-107, "orange"), (-93, "green")],
            custom={"thresholdsStyle": {"mode": "area"}},
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "state-timeline",
            "GSM modem",
            [
                target(f"hotsite_modem_up{I}", "{{channel}} answering"),
                target(f"hotsite_modem_registered{I}", "{{channel}} registered"),
            ],
            mappings=UP_DOWN,
            thresholds=[(None, "red"), (1, "green")],
            options={"mergeValues": True},
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Texts received",
            [target(f"sum by (result) (increase(hotsite_paging_inbound_sms_total{I}[{RI}]))", "{{result}}")],
            custom={"drawStyle": "bars", "fillOpacity": 80},
            minimum=0,
        ),
        24,
        6,
    )
    return dashboard(
        "hotsite-paging",
        "hotsite / Pages and acknowledgements",
        "Pages sent to maintenance contractors, time to acknowledge, the outbox and the GSM modem.",
        lay,
        [_instance_var()],
    )


def host() -> dict[str, Any]:
    lay = Layout()
    lay.add(
        panel(
            "stat",
            "Scrape",
            [target('up{job="hotsite", instance=~"$instance"}', "{{instance}}", instant=True)],
            mappings=UP_DOWN,
            thresholds=[(None, "red"), (1, "green")],
            options={"colorMode": "background", "graphMode": "none"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "stat",
            "Daemon uptime",
            [target(f"time() - hotsite_start_time_seconds{I}", "{{instance}}", instant=True)],
            unit="s",
            options={"graphMode": "none"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "stat",
            "Restarts (24 h)",
            [target(f"changes(hotsite_start_time_seconds{I}[1d])", "{{instance}}", instant=True)],
            description="Crashes or systemd watchdog kills show up here.",
            thresholds=[(None, "green"), (1, "orange"), (3, "red")],
            options={"graphMode": "none", "colorMode": "background"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "stat",
            "Version",
            [target(f"hotsite_build_info{I}", "{{version}}", instant=True)],
            options={"textMode": "name", "graphMode": "none"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "timeseries",
            "CPU busy",
            [target(f"hotsite_host_cpu_ratio{I}", "{{instance}}")],
            unit="percentunit",
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Memory available",
            [
                target(f"hotsite_host_memory_available_bytes{I}", "available"),
                target(f"hotsite_host_memory_total_bytes{I}", "installed"),
            ],
            unit="bytes",
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Disk free (state directory)",
            [target(f"hotsite_host_disk_free_bytes{I}", "{{path}}")],
            unit="bytes",
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Temperature",
            [target(f"hotsite_host_temperature_celsius{I}", "{{sensor}}")],
            unit="celsius",
            thresholds=[(None, "green"), (75, "orange"), (85, "red")],
            custom={"thresholdsStyle": {"mode": "line"}},
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "NIC errors and drops",
            [target(f"rate(hotsite_host_nic_errors_total{I}[{RI}])", "{{interface}} {{kind}}")],
            unit="pps",
            minimum=0,
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "state-timeline",
            "Host and link checks",
            [target('hotsite_probe_up{instance=~"$instance", kind=~"host|link"}', "{{target}}")],
            mappings=UP_DOWN,
            thresholds=[(None, "red"), (1, "green")],
            options={"mergeValues": True},
        ),
        12,
        8,
    )
    lay.add(
        panel(
            "timeseries",
            "Probe slots skipped, bad API requests, Kamailio RPC",
            [
                target(
                    f"sum by (target) (increase(hotsite_probe_slots_skipped_total{I}[{RI}]))",
                    "skipped {{target}}",
                ),
                target(
                    f"sum by (reason) (increase(hotsite_api_bad_requests_total{I}[{RI}]))",
                    "bad request {{reason}}",
                ),
                target(f"hotsite_kamailio_rpc_up{I}", "Kamailio RPC up"),
            ],
            minimum=0,
        ),
        24,
        8,
    )
    return dashboard(
        "hotsite-host",
        "hotsite / Appliance host",
        "The appliance itself: scrape, restarts, CPU, memory, disk, temperature, NICs.",
        lay,
        [_instance_var()],
    )


def coordination() -> dict[str, Any]:
    """Who may act: the etcd lease (HA pairs, several sites) and the witness's view of the primary."""
    lay = Layout()
    lay.add(
        panel(
            "state-timeline",
            "Lease holder (etcd)",
            [target(f"hotsite_coordination_leader{I}", "{{instance}}")],
            description="Which appliance holds the routing domain's lease: only the leader moves routing."
            " Two leaders at once never happen; no leader at all means nobody acts.",
            mappings={0: ("standby", "blue"), 1: ("leader", "green")},
            thresholds=[(None, "blue"), (1, "green")],
            options={"mergeValues": True, "showValue": "auto", "rowHeight": 0.8},
        ),
        12,
        6,
    )
    lay.add(
        panel(
            "state-timeline",
            "etcd reachable",
            [target(f"hotsite_coordination_reachable{I}", "{{instance}}")],
            description="0: this appliance cannot read etcd clearly and is not acting.",
            mappings={0: ("unreachable", "red"), 1: ("reachable", "green")},
            thresholds=[(None, "red"), (1, "green")],
            options={"mergeValues": True, "showValue": "auto", "rowHeight": 0.8},
        ),
        12,
        6,
    )
    lay.add(
        panel(
            "stat",
            "Fencing token",
            [target(f"hotsite_coordination_token{I}", "{{instance}}", instant=True)],
            description="The token the leader's actuators carry; 0 on a standby.",
            options={"graphMode": "none", "textMode": "value_and_name"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "stat",
            "etcd members",
            [target(f"hotsite_coordination_members{I}", "{{instance}}", instant=True)],
            thresholds=[(None, "red"), (2, "orange"), (3, "green")],
            options={"graphMode": "none", "colorMode": "background", "textMode": "value_and_name"},
        ),
        6,
        4,
    )
    lay.add(
        panel(
            "timeseries",
            "Role changes",
            [
                target(
                    f"sum by (role) (increase(hotsite_coordination_role_changes_total{I}[{RI}]))", "{{role}}"
                )
            ],
            description="More than one or two an hour: the lease is flapping (etcd latency, TTL too short).",
            custom={"drawStyle": "bars", "fillOpacity": 80},
            minimum=0,
        ),
        12,
        4,
    )
    lay.add(
        panel(
            "timeseries",
            "etcd round trips (p95)",
            [
                target(
                    "histogram_quantile(0.95, sum by (le, op) "
                    f"(rate(hotsite_coordination_request_seconds_bucket{I}[{RI}])))",
                    "{{op}}",
                )
            ],
            unit="s",
            minimum=0,
            thresholds=[(None, "green"), (0.5, "red")],
            custom={"thresholdsStyle": {"mode": "line"}},
        ),
        24,
        7,
    )
    witness = 'instance=~"$witness"'
    lay.add(
        panel(
            "state-timeline",
            "Witness: the primary as seen from the carrier edge",
            [target(f"hotsite_witness_primary_state{{{witness}}} == 1", "{{state}}")],
            description="The witness's belief about the primary; a failover needs it to agree the primary is lost.",
            options={"mergeValues": True, "showValue": "auto", "rowHeight": 0.8},
        ),
        24,
        5,
    )
    lay.add(
        panel(
            "timeseries",
            "Witness probe round age",
            [target(f"hotsite_witness_round_age_seconds{{{witness}}}", "{{instance}}")],
            description="Seconds since the witness last finished probing; a stale round is no evidence.",
            unit="s",
            minimum=0,
            thresholds=[(None, "green"), (30, "red")],
            custom={"thresholdsStyle": {"mode": "line"}},
        ),
        12,
        7,
    )
    lay.add(
        panel(
            "timeseries",
            "Witness probes and requests",
            [
                target(
                    f"sum by (reason) (increase(hotsite_witness_probes_total{{{witness}}}[{RI}]))",
                    "probe {{reason}}",
                ),
                target(
                    f"sum by (outcome) (increase(hotsite_witness_requests_total{{{witness}}}[{RI}]))",
                    "request {{outcome}}",
                ),
            ],
            minimum=0,
        ),
        12,
        7,
    )
    return dashboard(
        "hotsite-coordination",
        "hotsite / Coordination and witness",
        "Who may move routing: the etcd lease of an HA pair or several sites, and the witness's vote.",
        lay,
        [
            _instance_var(),
            _query_var("witness", "Witness", "label_values(hotsite_witness_primary_state, instance)"),
        ],
    )


BUILDERS = {
    "hotsite-overview": overview,
    "hotsite-trunks": trunks,
    "hotsite-replication": replication,
    "hotsite-paging": paging,
    "hotsite-host": host,
    "hotsite-coordination": coordination,
}


def build() -> dict[str, str]:
    """File name -> JSON text (stable: sorted keys, two-space indent, trailing newline)."""
    return {
        f"{name}.json": json.dumps(make(), indent=2, sort_keys=True) + "\n" for name, make in BUILDERS.items()
    }


def expressions(dashboard_json: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expression) for every query of a dashboard, rows included."""
    for p in dashboard_json["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
        for inner in p.get("panels", []):
            for t in inner.get("targets", []):
                yield inner["title"], t["expr"]


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards; with ``--check`` only say whether the committed files are current."""
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    DASHBOARDS_DIR.mkdir(exist_ok=True)
    for name, text in build().items():
        path = DASHBOARDS_DIR / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not check:
            path.write_text(text)
    if check and stale:
        print(f"stale: {', '.join(stale)}; run python -m monitoring.grafana.build", file=sys.stderr)
        return 1
    print(("written: " if stale else "up to date: ") + ", ".join(stale or sorted(build())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
