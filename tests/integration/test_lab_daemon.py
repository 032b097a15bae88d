"""End to end in the lab: real SIPp trunks and SBCs, the real daemon, the CLI and /metrics.

The path probe -> health -> CLI/metrics is exercised for real, and a trunk's
link is cut with tc netem to see it judged down, then healed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.lab import Lab
from provisioning.lab import config as lab_config
from tests.conftest import free_port
from tests.integration.daemon_helpers import hotsite, metrics, wait_for
from tests.support import lab as lab_rig
from tests.support.lab import LabDaemon

pytestmark = lab_rig.marks(pytest.mark.slow)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, Any]]]:
    with lab_rig.netns_lab(tmp_path_factory) as up:
        yield up


@pytest.fixture(scope="module")
def daemon(lab: tuple[Lab, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDaemon]:
    with lab_rig.lab_daemon(lab[1], tmp_path_factory) as running:
        yield running


def _states(daemon: LabDaemon) -> dict[str, str]:
    status = daemon.status()
    states = {f"site:{s['name']}": s["state"] for s in status["sites"]}
    states.update({f"trunk:{t['name']}": t["state"] for t in status["trunks"]})
    return states


def test_every_trunk_and_sbc_is_seen_up(daemon: LabDaemon) -> None:
    states = wait_for(
        lambda: (s := _states(daemon)) and all(v == "up" for v in s.values()) and s,
        what="all targets up",
    )
    assert set(states) == {"site:primary", "site:backup", "trunk:trunk-a", "trunk:trunk-b"}
    status = daemon.status()
    for trunk in status["trunks"]:
        assert trunk["last_code"] == 200
        assert 0 < trunk["rtt_ms"] < 100
    text = metrics(daemon.listen)
    for target in ("site:primary:sbc", "site:backup:sbc", "trunk:trunk-a", "trunk:trunk-b"):
        assert f'hotsite_probe_up{{kind="sip",target="{target}"}} 1.0' in text
    assert 'hotsite_probe_rtt_seconds_count{target="trunk:trunk-a"}' in text
    human = hotsite("status", config=daemon.config)
    assert human.returncode == 0 and "trunk-a" in human.stdout and "UP" in human.stdout


def test_a_cut_trunk_goes_down_and_comes_back(lab: tuple[Any, dict[str, Any]], daemon: LabDaemon) -> None:
    the_lab, _ = lab
    wait_for(lambda: _states(daemon).get("trunk:trunk-a") == "up", what="trunk-a up")
    proc = hotsite("lab", "impair", "--workdir", str(the_lab_workdir(the_lab)), "trunk-a", "--cut")
    assert proc.returncode == 0, proc.stderr
    try:
        wait_for(lambda: _states(daemon)["trunk:trunk-a"] == "down", what="trunk-a down")
        states = _states(daemon)
        assert states["trunk:trunk-b"] == "up" and states["site:primary"] == "up"
        trunk = next(t for t in daemon.status()["trunks"] if t["name"] == "trunk-a")
        assert "timeout" in trunk["reason"]
        assert 'hotsite_probe_up{kind="sip",target="trunk:trunk-a"} 0.0' in metrics(daemon.listen)
        events = json.loads(hotsite("events", "--json", "--kind", "probe", config=daemon.config).stdout)
        assert any(e["subject"] == "trunk:trunk-a" and e["data"]["state"] == "down" for e in events)
    finally:
        healed = hotsite("lab", "heal", "--workdir", str(the_lab_workdir(the_lab)), "trunk-a")
        assert healed.returncode == 0, healed.stderr
    wait_for(lambda: _states(daemon)["trunk:trunk-a"] == "up", what="trunk-a up again")


def test_lab_status_json_lists_every_host(lab: tuple[Any, dict[str, Any]]) -> None:
    the_lab, _ = lab
    proc = hotsite("lab", "status", "--json", "--workdir", str(the_lab_workdir(the_lab)))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    names = {h["name"] for h in info["hosts"]}
    assert names == {"carrier", "trunk-a", "trunk-b", "primary", "backup", "witness"}
    for host in info["hosts"]:
        assert host["namespace"].startswith("hs-lab-")
        assert host["processes"] and all(p["alive"] for p in host["processes"])
    assert info["kamailio"]["rpc_url"].startswith("http://")


def test_the_shipped_lab_config_is_what_the_lab_generates(lab: tuple[Any, dict[str, Any]]) -> None:
    _, info = lab
    generated = lab_config.render(info).replace(info["workdir"], "/run/hotsite-lab")
    assert lab_config.SHIPPED.read_text() == generated


def the_lab_workdir(the_lab: Any) -> Path:
    return Path(the_lab.workdir)


def test_free_port_helper_gives_distinct_ports() -> None:
    assert free_port() != 0 and free_port(socket.SOCK_DGRAM) != 0


def _sipp_call(number: str, port: int, *, calls: int = 1, hold_ms: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            "hs-lab-trunk-b",
            "sipp",
            "-sn",
            "uac",
            "10.77.0.10:5060",
            "-s",
            number,
            "-m",
            str(calls),
            "-l",
            str(calls),
            "-r",
            str(calls),
            "-d",
            str(hold_ms),
            "-i",
            "10.77.0.12",
            "-p",
            str(port),
            "-nostdin",
            "-timeout",
            "15s",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _rpc(method: str, *params: Any) -> Any:
    reply = httpx.post(
        "http://10.77.0.10:5071/RPC",
        json={"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1},
        timeout=3,
        trust_env=False,
    )
    return reply.json()["result"]


def test_a_dead_primary_fails_over_by_plan_and_back_under_control(
    lab: tuple[Any, dict[str, Any]], daemon: LabDaemon
) -> None:
    """The whole path: cut -> verdict (two kinds agree) -> witness agrees -> auto failover -> calls
    land at the backup by plan -> primary back -> failback only when an operator says so."""
    the_lab, _ = lab
    site = lambda name: next(s for s in daemon.status()["sites"] if s["name"] == name)  # noqa: E731
    failover = lambda: daemon.status()["failover"]  # noqa: E731
    wait_for(
        lambda: site("primary")["verdict"] == "up" and failover()["state"] == "primary_active",
        what="primary up, normal routing",
    )
    assert hotsite("lab", "impair", "--workdir", str(the_lab.workdir), "primary", "--cut").returncode == 0
    try:
        down = wait_for(lambda: (p := site("primary"))["verdict"] == "down" and p, what="primary down")
        assert down["why"][-1] == "2 independent kinds of evidence agree (http, sip)"
        state = wait_for(
            lambda: (f := failover())["state"] == "backup_active" and f, timeout=30, what="automatic failover"
        )
        assert state["routing"] == "failover" and state["epoch"] >= 1
        assert state["witness"]["primary_alive"] is False
        assert _rpc("htable.get", "hotlines", "95588")["item"]["value"] == 2
        # The primary's SBC is fenced; set 1 keeps the backup as its per-call fallback.
        flags = _dispatcher_flags()
        assert flags[1]["sip:10.77.0.20:5060"].startswith("D") and flags[1]["sip:10.77.0.30:5060"].startswith(
            "A"
        )
        text = metrics(daemon.listen)
        assert 'hotsite_failover_state{state="backup_active"} 1.0' in text
        assert 'hotsite_site_verdict{site="primary",verdict="down"} 1.0' in text
        call = _sipp_call("95588", 5090, hold_ms=2000)
        wait_for(lambda: daemon.status()["sites"][1]["calls_in_progress"] == 1, what="the call at the backup")
        assert call.wait(timeout=20) == 0
        decisions = json.loads(
            hotsite("events", "--json", "--kind", "failover.decision", config=daemon.config).stdout
        )
        assert any("the witness" in d["message"] and "starting failover" in d["message"] for d in decisions)
    finally:
        assert hotsite("lab", "heal", "--workdir", str(the_lab.workdir), "primary").returncode == 0
    # Back, but failback is manual: nothing moves until an operator says so.
    wait_for(lambda: failover()["state"] == "failback_pending", timeout=30, what="failback pending")
    assert failover()["routing"] == "failover"
    back = hotsite("failback", "--yes", "--reason", "primary repaired", config=daemon.config)
    assert back.returncode == 0, back.stderr
    wait_for(lambda: failover()["state"] == "primary_active", timeout=20, what="failback done")
    assert _rpc("htable.get", "hotlines", "95588")["item"]["value"] == 1
    assert all(
        not flags.startswith("D")
        for set_flags in _dispatcher_flags().values()
        for flags in set_flags.values()
    )
    refused = hotsite("failback", "--yes", config=daemon.config)
    assert refused.returncode == 1 and "routing is already normal" in refused.stderr


def _dispatcher_flags() -> dict[int, dict[str, str]]:
    result = _rpc("dispatcher.list")
    return {
        rec["SET"]["ID"]: {t["DEST"]["URI"]: t["DEST"]["FLAGS"] for t in rec["SET"]["TARGETS"]}
        for rec in result["RECORDS"]
    }


def test_the_appliance_link_is_watched_by_netlink(daemon: LabDaemon) -> None:
    probes = json.loads(hotsite("probes", "--json", config=daemon.config).stdout)
    link = next(p for p in probes if p["target"] == "link:hs-appl")
    assert link["state"] == "up" and link["kind"] == "link"


def test_calls_in_progress_are_read_from_kamailio(daemon: LabDaemon) -> None:
    """Three 10-second calls from trunk-a through Kamailio: counted per trunk and per site, then gone.

    Trunks, sites and metrics come from three separate reads, so they are judged
    together, in one condition that is retried: on a loaded machine one poll of
    Kamailio may land between two of the reads. The calls last long enough that
    all three see them while they are up.
    """
    call = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            "hs-lab-trunk-a",
            "sipp",
            "-sn",
            "uac",
            "10.77.0.10:5060",
            "-s",
            "1000",
            "-m",
            "3",
            "-l",
            "3",
            "-r",
            "3",
            "-d",
            "10000",
            "-i",
            "10.77.0.11",
            "-p",
            "5071",
            "-nostdin",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def counted() -> Any:
            trunks = {
                t["name"]: t["calls_in_progress"]
                for t in json.loads(hotsite("trunks", "--json", config=daemon.config).stdout)
            }
            sites = {s["name"]: s["calls_in_progress"] for s in daemon.status()["sites"]}
            exported = metrics(daemon.listen)
            seen = (trunks, sites, exported)
            return (
                trunks["trunk-a"] == 3
                and sites["primary"] == 3
                and 'hotsite_trunk_calls_in_progress{trunk="trunk-a"} 3.0' in exported
                and seen
            )

        trunks, sites, exported = wait_for(
            counted, timeout=20, what="3 calls counted by trunk, site and metric"
        )
        assert trunks["trunk-b"] == 0 and sites == {"primary": 3, "backup": 0}
        assert "hotsite_kamailio_rpc_up 1.0" in exported
        assert call.wait(timeout=40) == 0
    finally:
        call.kill()
    wait_for(lambda: daemon.status()["sites"][0]["calls_in_progress"] == 0, timeout=20, what="calls ended")


def test_a_drill_checks_the_backup_path_without_moving_production(daemon: LabDaemon) -> None:
    wait_for(lambda: daemon.status()["failover"]["state"] == "primary_active", what="normal operation")
    wait_for(lambda: all(s["verdict"] == "up" for s in daemon.status()["sites"]), what="both sites up")
    before = _rpc("htable.dump", "hotlines")
    started = hotsite("drill", "--json", config=daemon.config)
    assert started.returncode == 0, started.stderr
    wait_for(lambda: daemon.status()["failover"]["state"] == "primary_active", what="drill finished")
    drills = json.loads(hotsite("events", "--json", "--kind", "failover.drill", config=daemon.config).stdout)
    report = drills[0]["data"]
    checks = {c["name"]: c for c in report["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    assert "answered 200 by the backup SBC" in checks["test call through the backup path"]["detail"]
    assert "10.77.0.30" in checks["test call through the backup path"]["detail"]
    rto = report["expected_rto"]
    assert rto["total_s"] == round(rto["detection_s"] + rto["hold_down_s"] + rto["runbook_s"], 3)
    assert _rpc("htable.dump", "hotlines") == before  # the test number is gone again, hotlines untouched
    decision = json.loads(
        hotsite("events", "--json", "--kind", "failover.decision", config=daemon.config).stdout
    )[0]
    assert decision["message"].startswith("drill passed: 5/5 checks passed, expected RTO")


def _failover_state(daemon: LabDaemon) -> str:
    return str(daemon.status()["failover"]["state"])


def _steady(daemon: LabDaemon) -> None:
    wait_for(
        lambda: (
            _failover_state(daemon) == "primary_active"
            and all(s["verdict"] == "up" for s in daemon.status()["sites"])
        ),
        timeout=30,
        what="steady state",
    )


def _no_failover_for(daemon: LabDaemon, seconds: float) -> list[str]:
    """Watch for ``seconds``: the engine may get worried, but never starts a runbook."""
    seen, deadline = set(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = _failover_state(daemon)
        seen.add(state)
        assert state not in ("failing_over", "backup_active"), state
        time.sleep(0.2)
    return sorted(seen)


def test_grey_failure_moves_the_hotlines_although_the_sbc_answers(
    lab: tuple[Any, dict[str, Any]], daemon: LabDaemon
) -> None:
    """The primary's SBC keeps answering OPTIONS and calls, but its health says nobody can take calls:
    Kamailio's dispatcher and keepalived cannot see this; hotsite moves the hotlines by plan."""
    the_lab, _ = lab
    _steady(daemon)
    assert hotsite("lab", "degrade", "--workdir", str(the_lab.workdir), "primary").returncode == 0
    started = time.monotonic()
    try:
        site = wait_for(
            lambda: (
                (p := next(s for s in daemon.status()["sites"] if s["name"] == "primary"))["verdict"]
                == "down"
                and p
            ),
            what="grey verdict",
        )
        assert site["why"] == ["site:primary:http says the site cannot serve (HTTP 503): grey failure"]
        assert next(t for t in site["targets"] if t["target"] == "site:primary:sbc")["state"] == "up"
        wait_for(lambda: _failover_state(daemon) == "backup_active", timeout=20, what="grey failover")
        moved_after = time.monotonic() - started
        assert _rpc("htable.get", "hotlines", "95566")["item"]["value"] == 2
        decision = json.loads(
            hotsite("events", "--json", "--kind", "failover.decision", config=daemon.config).stdout
        )
        assert any("grey failure" in d["message"] for d in decision)
        print(f"grey failure: health bad -> hotlines moved in {moved_after:.2f}s")
    finally:
        hotsite("lab", "heal", "--workdir", str(the_lab.workdir), "primary")
    wait_for(lambda: _failover_state(daemon) == "failback_pending", timeout=20, what="primary healthy again")
    assert hotsite("failback", "--yes", config=daemon.config).returncode == 0
    _steady(daemon)


def test_no_failover_when_only_the_link_to_the_primary_is_cut(
    lab: tuple[Any, dict[str, Any]], daemon: LabDaemon
) -> None:
    """Backup cut from the primary, the witness still sees it: a partition, never a failover."""
    the_lab, _ = lab
    _steady(daemon)
    assert hotsite("lab", "partition", "--workdir", str(the_lab.workdir), "primary").returncode == 0
    try:
        wait_for(
            lambda: next(s for s in daemon.status()["sites"] if s["name"] == "primary")["verdict"] == "down",
            what="primary down from here",
        )
        seen = _no_failover_for(daemon, 8.0)  # hold-down is 3 s: well past it
        assert "primary_degraded" in seen
        assert daemon.status()["failover"]["witness"]["primary_alive"] is True
        decisions = json.loads(
            hotsite("events", "--json", "--kind", "failover.decision", config=daemon.config).stdout
        )
        assert any("a partition, not failing over" in d["message"] for d in decisions[:5])
    finally:
        hotsite("lab", "heal", "--workdir", str(the_lab.workdir), "primary")
    _steady(daemon)


def test_no_failover_on_a_blip_or_when_only_the_witness_dies(
    lab: tuple[Any, dict[str, Any]], daemon: LabDaemon
) -> None:
    the_lab, _ = lab
    _steady(daemon)
    workdir = str(the_lab.workdir)
    assert hotsite("lab", "impair", "--workdir", workdir, "primary", "--cut").returncode == 0
    time.sleep(1.0)  # a 1 s blip: shorter than detection + the 3 s hold-down
    assert hotsite("lab", "heal", "--workdir", workdir, "primary").returncode == 0
    _no_failover_for(daemon, 6.0)
    assert hotsite("lab", "impair", "--workdir", workdir, "witness", "--cut").returncode == 0
    try:
        _no_failover_for(daemon, 5.0)
        assert daemon.status()["failover"]["witness"]["primary_alive"] is None
    finally:
        hotsite("lab", "heal", "--workdir", workdir, "witness")
    _steady(daemon)
