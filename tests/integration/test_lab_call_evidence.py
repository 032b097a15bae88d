"""Issue 20: test calls as critical evidence for the site serving a hotline, in the lab.

The primary's SBC keeps answering OPTIONS (its health URL says healthy) but rejects
INVITEs with 503: the grey failure only a call reveals. The lab's carrier edge falls
back at once to the backup's SBC (dispatcher set 1: primary first, backup second), so
each test call to 95588 is answered *at the backup* while the routing in force names
the primary. With ``site_critical_failures = 3`` that is critical evidence: routing
moves to the backup (never to both), and the decision says why. A single failed call
(a blip: impaired, then healed before the next call) moves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.lab import config as lab_config
from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]
for ok, why in [
    (os.geteuid() == 0, "the namespace lab needs root"),
    (shutil.which("kamailio") is not None, "kamailio is not installed"),
    (shutil.which("sipp") is not None, "sipp (sip-tester) is not installed"),
]:
    if not ok:
        pytestmark.append(pytest.mark.skip(reason=why))

TESTCALLS = """
[testcalls]
caller = "10086"
hotlines = ["vip"]
interval_s = 8
duration_s = 1
setup_timeout_s = 2
site_critical_failures = 3
site_critical_window_s = 60
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any]]]:
    from provisioning.lab import Lab

    the_lab = Lab(tmp_path_factory.mktemp("lab"))
    try:
        info = the_lab.up(mode="netns")
        the_lab.wait_ready()
        yield the_lab, info
    finally:
        the_lab.down()


@pytest.fixture(scope="module")
def daemon(
    lab: tuple[Any, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningDaemon]:
    _, info = lab
    path = Path(info["workdir"]) / "hotsite.toml"
    path.write_text(lab_config.render(info, metrics_listen=f"127.0.0.1:{free_port()}") + TESTCALLS)
    running = RunningDaemon(path, tmp_path_factory.mktemp("daemon") / "daemon.log")
    try:
        running.wait_ready()
        yield running
    finally:
        assert running.stop() == 0


def _events(daemon: RunningDaemon, kind: str) -> list[dict[str, Any]]:
    proc = hotsite("events", "--json", "--kind", kind, "--limit", "100", config=daemon.config)
    return list(json.loads(proc.stdout)) if proc.returncode == 0 else []


def _last_call(daemon: RunningDaemon) -> dict[str, Any]:
    probes = json.loads(hotsite("probes", "--json", config=daemon.config).stdout)
    return dict(next(p for p in probes if p["target"] == "testcall:vip").get("last_call") or {})


def _next_call(daemon: RunningDaemon, after: float, answered_by: str) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (
                (c := _last_call(daemon)).get("started", 0) > after
                and c.get("answered_by") == answered_by
                and c
            ),
            timeout=40,
            what=f"a test call to 95588 answered by {answered_by}",
            on_fail=lambda: json.dumps(_last_call(daemon)),
        )
    )


def _impair(the_lab: Any, *args: str) -> None:
    proc = hotsite("lab", args[0], "--workdir", str(the_lab.workdir), *args[1:])
    assert proc.returncode == 0, proc.stderr


def _hotline_set(number: str) -> int:
    body = {"jsonrpc": "2.0", "method": "htable.get", "params": ["hotlines", number], "id": 1}
    reply = httpx.post("http://10.77.0.10:5071/RPC", json=body, timeout=3, trust_env=False).json()
    return int(reply["result"]["item"]["value"])


def test_a_single_failed_call_moves_nothing(lab: tuple[Any, dict[str, Any]], daemon: RunningDaemon) -> None:
    the_lab, _ = lab
    wait_for(
        lambda: (
            (s := daemon.status())["failover"]["state"] == "primary_active"
            and all(site["verdict"] == "up" for site in s["sites"])
        ),
        timeout=60,
        what="both sites up, normal routing",
    )
    good = _next_call(daemon, 0, "site:primary")
    _impair(the_lab, "impair", "primary", "--reject-invites", "503")
    try:
        _next_call(daemon, good["started"], "site:backup")  # one call refused at the primary
    finally:
        _impair(the_lab, "heal", "primary")
    _next_call(daemon, good["started"], "site:primary")  # healed before the next: the run is broken
    assert daemon.status()["failover"]["state"] == "primary_active"
    assert not [
        e for e in _events(daemon, "site.verdict") if e["subject"] == "primary" and "-> down" in e["message"]
    ]
    assert not [e for e in _events(daemon, "failover.decision") if "starting failover" in e["message"]]


def test_calls_refused_at_the_primary_move_routing_to_the_backup_and_say_why(
    lab: tuple[Any, dict[str, Any]], daemon: RunningDaemon
) -> None:
    the_lab, _ = lab
    impaired_at = time.monotonic()
    _impair(the_lab, "impair", "primary", "--reject-invites", "503")
    try:
        moved = wait_for(
            lambda: (
                (f := daemon.status()["failover"])["routing"] == "failover"
                and f["state"] in ("backup_active", "failback_pending")
                and f
            ),
            timeout=120,
            what="routing moved to the backup on the calls' evidence",
            on_fail=lambda: daemon.log.read_text()[-4000:],
        )
        print(f"INVITEs rejected -> routing on the backup: {time.monotonic() - impaired_at:.1f} s")
        print(json.dumps(moved["last_decision"]))
        decisions = [e["message"] for e in _events(daemon, "failover.decision")]
        started = [d for d in decisions if d.startswith("starting failover")]
        print(started)
        assert len(started) == 1, decisions
        assert "primary reports it cannot serve (grey failure)" in started[0]
        assert "test calls to 95588 failing at primary: answered at backup ×3" in started[0]
        # Never both: every hotline is served by the backup's set, and the engine holds one routing.
        assert _hotline_set("95588") == 2 and _hotline_set("95566") == 2
        verdicts = [e for e in _events(daemon, "site.verdict") if e["subject"] == "primary"]
        assert any("-> down" in e["message"] and e["data"]["grey"] for e in verdicts)
        # The primary's SBC answered OPTIONS all along: only the calls told.
        probes = json.loads(hotsite("probes", "--json", config=daemon.config).stdout)
        assert next(p for p in probes if p["target"] == "site:primary:sbc")["state"] == "up"
    finally:
        _impair(the_lab, "heal", "primary")
    assert daemon.status()["failover"]["routing"] == "failover"  # routing stays; failback is manual
