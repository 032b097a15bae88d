"""A real Prometheus scrapes the real daemon in the lab; every dashboard and rule expression must return data.

The world: the namespace lab (Kamailio, SIPp trunks and SBCs, witness), a GSM modem
emulator on a pty (the one part we cannot have), a real replication source agent
(``hotsite source``) serving a SQLite database and a config directory over mutual TLS on
loopback, one deliberately dead trunk (a closed loopback UDP port: probe failures, an
incident, a page by SMS, an acknowledgement), a test page, an inbound text and a bad
control request, so that the counters that only exist after an event exist.

Prometheus (Debian ``prometheus``) runs on 127.0.0.1 on a free port with a 1 s scrape
interval, loads ``hotsite.rules.yml`` itself (every rule must evaluate with health ok), and
after a few scrapes every expression goes through ``/api/v1/query``:

- dashboard queries with the template variables set to their "All" value, ``$__rate_interval``
  as 10s and ``$__range`` as 1m;
- rule expressions with their threshold comparisons removed (``x == 1`` -> ``x``, also on
  each side of ``or``), so a healthy appliance still returns the series the alert watches;
  ``absent(x)`` is queried as ``x``.

An expression may return no series only if it is listed in ``EVENT_ONLY`` (a counter of
trouble we do not cause here, e.g. checksum mismatches) or ``HARDWARE`` (temperature sensors,
when this machine has none): then every ``hotsite_*`` name it uses must still be declared
in the daemon's /metrics (``# HELP`` line), which catches a misspelt or renamed metric.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from appliance import api
from appliance.errors import HotsiteError
from monitoring.grafana.build import build, expressions
from provisioning.lab import config as lab_config
from tests.conftest import REPO, free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, metrics, wait_for
from tests.support.modem import ModemEmulator

pytestmark = [pytest.mark.lab, pytest.mark.slow]
for ok, why in [
    (os.geteuid() == 0, "the namespace lab needs root"),
    (shutil.which("kamailio") is not None, "kamailio is not installed"),
    (shutil.which("sipp") is not None, "sipp (sip-tester) is not installed"),
    (shutil.which("prometheus") is not None, "prometheus is not installed (Debian package: prometheus)"),
]:
    if not ok:
        pytestmark.append(pytest.mark.skip(reason=why))

RULES = REPO / "monitoring" / "prometheus" / "hotsite.rules.yml"
ON_CALL = "+8613800138000"  # "Lab On-Call" in the lab config
VARIABLES = {
    "$instance": ".+",
    "$trunk": "trunk:.+",
    "$stream": ".+",
    "$witness": ".+",
    "$__rate_interval": "10s",
    "$__range": "1m",
}
# Counters of trouble this test does not cause; each must still be declared in /metrics.
EVENT_ONLY = {
    "hotsite_replication_checksum_mismatches_total": "no replica diverges from its source here",
    "hotsite_replication_corrupt_messages_total": "no message is corrupted on loopback",
    "hotsite_replication_resnapshots_total": "the source keeps the replica's position",
    "hotsite_probe_slots_skipped_total": "no probe overruns its interval",
    'result=~"failed|uncertain"': "every page in this test is delivered",
}
HARDWARE = {"hotsite_host_temperature_celsius": "this machine has no temperature sensors"}
# Metrics of a backend or a process this lab does not scrape: their names are checked against the
# catalogue generated from the code instead of this daemon's /metrics.
ELSEWHERE = {
    "hotsite_coordination_": "the lab coordinates through the witness, not etcd",
    "hotsite_witness_": "the witness agent's own /metrics is not scraped here",
}


def _extra_config(dead_port: int, modem: str, certs: Path, agent: str, work: Path) -> str:
    return f"""
[trunks.trunk-dead]
address = "127.0.0.1:{dead_port}"
transport = "udp"
carrier = "A trunk nobody answers (closed loopback port)"

[channels.sms]
type = "gsm"
device = "{modem}"
send_timeout_s = 5
prompt_timeout_s = 2
poll_s = 0.5

[paging.policies.default]
repeat = 0
[[paging.policies.default.steps]]
targets = ["Lab On-Call"]
escalate_after_s = 600

[replication]
source_agent = "{agent}"
server_name = "source"
tls_cert_file = "{certs / "appliance.pem"}"
tls_key_file = "{certs / "appliance.key"}"
tls_ca_file = "{certs / "ca.pem"}"

[replication.streams.customers]
kind = "sqlite"
source = "customers"
replica = "{work / "replica" / "customers.db"}"
rpo_budget_s = 5

[replication.streams.etc]
kind = "files"
source = "etc"
replica = "{work / "replica" / "etc"}"
"""


def _source_agent(work: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    from appliance.replication.certs import issue, make_ca

    certs = work / "tls"
    make_ca(certs)
    issue(certs, "source", hosts=["127.0.0.1"], server=True)
    issue(certs, "appliance", hosts=[], server=False)
    db = work / "customers.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO c(name) VALUES ('first customer')")
    conn.close()
    (work / "etc").mkdir()
    (work / "etc" / "routing.tbl").write_text("vip 1\n")
    listen = f"127.0.0.1:{free_port()}"
    config = work / "source.toml"
    config.write_text(
        f"""[source]
listen = "{listen}"
tls_cert_file = "{certs / "source.pem"}"
tls_key_file = "{certs / "source.key"}"
tls_ca_file = "{certs / "ca.pem"}"
heartbeat_s = 0.2

[streams.customers]
kind = "sqlite"
path = "{db}"

[streams.etc]
kind = "files"
path = "{work / "etc"}"
"""
    )
    log = (work / "source.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "source", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    host, port = listen.rsplit(":", 1)
    wait_for(lambda: _connectable(host, int(port)) or proc.poll() is not None, what="source agent listening")
    assert proc.poll() is None, (work / "source.log").read_text()
    return proc, listen, certs


def _connectable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
    except OSError:
        return False
    return True


class Prometheus:
    def __init__(self, work: Path, target: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(RULES, work / RULES.name)
        (work / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [RULES.name],
                    "scrape_configs": [
                        {
                            "job_name": "hotsite",
                            "scrape_timeout": "900ms",
                            "static_configs": [{"targets": [target]}],
                        }
                    ],
                }
            )
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = (work / "prometheus.log").open("wb")
        self.log_path = work / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = reply.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningDaemon, Prometheus]]:
    from provisioning.lab import Lab

    work = tmp_path_factory.mktemp("promlab")
    the_lab = Lab(work / "lab")
    modem = ModemEmulator().start()
    source = daemon = prometheus = None
    try:
        info = the_lab.up(mode="netns")
        the_lab.wait_ready()
        source, agent, certs = _source_agent(work)
        listen = f"127.0.0.1:{free_port()}"
        config = Path(info["workdir"]) / "hotsite.toml"
        extra = _extra_config(free_port(socket.SOCK_DGRAM), modem.path, certs, agent, work)
        config.write_text(lab_config.render(info, metrics_listen=listen) + extra)
        daemon = RunningDaemon(config, work / "daemon.log")
        daemon.listen = listen  # type: ignore[attr-defined]
        daemon.wait_ready()
        prometheus = Prometheus(work / "prometheus", listen)
        wait_for(prometheus.ready, timeout=30, what="prometheus ready")
        _cause_events(daemon, modem, work / "customers.db")
        wait_for(
            lambda: _scrapes(prometheus) >= 6,
            timeout=30,
            what="six scrapes of the daemon",
        )
        yield daemon, prometheus
    finally:
        for stop in (prometheus, daemon):
            if stop is not None:
                stop.stop()
        if source is not None:
            source.terminate()
            source.wait(10)
        modem.stop()
        the_lab.down()


def _scrapes(prometheus: Prometheus) -> int:
    result = prometheus.query('count_over_time(up{job="hotsite"}[1m]) and on() up{job="hotsite"} == 1')
    return int(float(result[0]["value"][1])) if result else 0


def _cause_events(daemon: RunningDaemon, modem: ModemEmulator, source_db: Path) -> None:
    """The counters that only appear after an event: a page, an ack, a text in, a bad request,
    transactions at the source."""
    conn = sqlite3.connect(source_db, isolation_level=None)
    for i in range(20):
        conn.execute("INSERT INTO c(name) VALUES (?)", (f"customer {i}",))
    conn.close()
    incident = wait_for(
        lambda: next(
            (i for i in _incidents(daemon)["active"] if "trunk-dead" in i["summary"] and i["paged"]), None
        ),
        timeout=20,
        what="the dead trunk's incident paged",
    )
    acked = hotsite("ack", str(incident["id"]), config=daemon.config)
    assert acked.returncode == 0, acked.stderr
    modem.inject_sms(ON_CALL, "STATUS")
    tested = hotsite("page", "test", "Lab On-Call", "--json", config=daemon.config, timeout=60)
    assert tested.returncode == 0, tested.stderr
    with pytest.raises(HotsiteError):
        api.call(daemon.config.parent / "run", "no.such.method")  # render(): runtime_dir
    listen = daemon.listen  # type: ignore[attr-defined]
    wait_for(
        lambda: all(
            name in metrics(listen)
            for name in (
                "hotsite_paging_inbound_sms_total{",
                "hotsite_api_bad_requests_total{",
                "hotsite_replication_lag_seconds{",
                "hotsite_modem_signal_dbm{",
                "hotsite_replication_transactions_total{",
            )
        ),
        timeout=20,
        what="event counters and replication/modem gauges in /metrics",
    )


def _incidents(daemon: RunningDaemon) -> dict[str, Any]:
    proc = hotsite("incidents", "--json", config=daemon.config)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- expression handling (pure, also unit-tested below) --------------------------------------

_COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*-?[0-9][0-9.e+]*\s*$")


def _split_top_level(expr: str, words: tuple[str, ...] = ("or", "and", "unless")) -> list[str]:
    """Split on set operators outside parentheses and braces (keeping them as separate items)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        c = expr[i]
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif depth == 0:
            for word in words:
                token = f" {word} "
                if expr.startswith(token, i):
                    parts += [expr[start:i], word]
                    i += len(token)
                    start = i
                    break
            else:
                i += 1
                continue
            continue
        i += 1
    parts.append(expr[start:])
    return parts


def without_thresholds(expr: str) -> str:
    """``a == 1 or b < -107`` -> ``a or b``; ``absent(x)`` -> ``x``."""
    expr = " ".join(expr.split())
    absent = re.fullmatch(r"absent\((.*)\)", expr)
    if absent:
        return absent.group(1)
    parts = _split_top_level(expr)
    return " ".join(p if p in ("or", "and", "unless") else _COMPARISON.sub("", p).strip() for p in parts)


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def test_threshold_stripping() -> None:
    assert (
        without_thresholds('hotsite_site_verdict{verdict="down"} == 1')
        == 'hotsite_site_verdict{verdict="down"}'
    )
    assert without_thresholds("a == 1 or b < -107") == "a or b"
    assert without_thresholds("predict_linear(x[6h], 24 * 3600) < 0") == "predict_linear(x[6h], 24 * 3600)"
    assert without_thresholds('max by (i) (up{job="x"}) == 0') == 'max by (i) (up{job="x"})'
    assert without_thresholds("absent(up)") == "up"
    assert without_thresholds("changes(x[30m]) > 1") == "changes(x[30m])"


# -- the tests -------------------------------------------------------------------------------


def _declared(listen: str) -> set[str]:
    return {line.split()[2] for line in metrics(listen).splitlines() if line.startswith("# HELP ")}


def _exempt(expr: str, declared: set[str]) -> str | None:
    """Why an empty result is acceptable for ``expr``, or None."""
    names = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"\bhotsite_[a-z_]+", expr)}
    elsewhere = [
        why for prefix, why in ELSEWHERE.items() if names and all(n.startswith(prefix) for n in names)
    ]
    if elsewhere:
        from monitoring.catalogue import entries

        catalogued = {e.name for e in entries()}
        assert names <= catalogued, f"{expr}: not in the catalogue: {sorted(names - catalogued)}"
        return elsewhere[0]
    reasons = [why for key, why in EVENT_ONLY.items() if key in expr]
    if not psutil.sensors_temperatures():
        reasons += [why for key, why in HARDWARE.items() if key in expr]
    if not reasons:
        return None
    names = set(re.findall(r"\bhotsite_[a-z_]+", expr))
    base = {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    missing = {n for n in base if n not in declared and n.removesuffix("_total") not in declared}
    assert not missing, f"{expr}: not declared in /metrics: {sorted(missing)}"
    return "; ".join(reasons)


def test_every_dashboard_expression_returns_series(world: tuple[RunningDaemon, Prometheus]) -> None:
    daemon, prometheus = world
    declared = _declared(daemon.listen)  # type: ignore[attr-defined]
    empty: list[str] = []
    exempted: list[str] = []
    checked = 0
    for name, text in build().items():
        for title, expr in expressions(json.loads(text)):
            query = substitute(expr)
            assert "$" not in query, f"{name} {title}: unsubstituted variable in {query}"
            checked += 1
            if prometheus.query(query):
                continue
            why = _exempt(query, declared)
            (exempted if why else empty).append(f"{name} / {title}: {query}" + (f" ({why})" if why else ""))
    print(f"{checked} dashboard expressions; exempted: {exempted}")
    assert checked > 40
    assert not empty, "dashboard expressions without series:\n" + "\n".join(empty)


def test_every_rule_expression_returns_series(world: tuple[RunningDaemon, Prometheus]) -> None:
    daemon, prometheus = world
    declared = _declared(daemon.listen)  # type: ignore[attr-defined]
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    empty: list[str] = []
    exempted: list[str] = []
    for rule in rules:
        query = without_thresholds(rule["expr"])
        if prometheus.query(query):
            continue
        why = _exempt(query, declared)
        (exempted if why else empty).append(
            f"{rule.get('alert', rule.get('record'))}: {query}" + (f" ({why})" if why else "")
        )
    print(f"{len(rules)} rules; exempted: {exempted}")
    assert not empty, "rule expressions without series:\n" + "\n".join(empty)


def test_prometheus_loaded_and_evaluated_every_rule(world: tuple[RunningDaemon, Prometheus]) -> None:
    _, prometheus = world
    expected = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return (
            rules
            if all(r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown" for r in rules)
            else []
        )

    rules = wait_for(evaluated, timeout=10, what="every rule evaluated")
    assert {r["name"] for r in rules} == expected
    assert [r for r in rules if r["health"] != "ok"] == []


def test_the_dead_trunk_alert_fires_for_real(world: tuple[RunningDaemon, Prometheus]) -> None:
    """The one alert this world really causes: HotsiteTrunkDown is pending or firing for trunk-dead only."""
    _, prometheus = world
    alerts = wait_for(
        lambda: [
            a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == "HotsiteTrunkDown"
        ],
        timeout=10,
        what="HotsiteTrunkDown pending",
    )
    assert {a["labels"]["target"] for a in alerts} == {"trunk:trunk-dead"}
    # Its "for" is 1m: pending is what a short test sees (promtool tests the firing).
    assert all(a["state"] in ("pending", "firing") for a in alerts)
