"""Hotlines judged by calls, in the lab: real Kamailio, real SIPp peers, the real daemon and CLI.

The failure keepalives cannot see: a trunk that answers OPTIONS but rejects
every INVITE with 503, or answers calls without media. Kamailio's dispatcher
keeps it active (its OPTIONS pass); hotsite's test calls fail, and the trunk
goes ``degraded`` with the SIP code or "no audio" in its why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from provisioning.lab import Lab
from provisioning.lab import kamailio as lab_kamailio
from provisioning.lab.checks import dispatcher_flags, jsonrpc
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for
from tests.support import lab as lab_rig
from tests.support.lab import LabDaemon

pytestmark = lab_rig.marks(pytest.mark.slow)

# Short calls, often: fall 2 at 8 s means "calls failing" some 10-25 s after the fault.
TESTCALLS = """
[testcalls]
caller = "10086"
hotlines = ["vip"]
trunks = ["trunk-a"]
interval_s = 8
duration_s = 1
setup_timeout_s = 2
fall = 2
echo = true
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, Any]]]:
    with lab_rig.netns_lab(tmp_path_factory, ready=False) as up:
        yield up


@pytest.fixture(scope="module")
def daemon(lab: tuple[Lab, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDaemon]:
    with lab_rig.lab_daemon(lab[1], tmp_path_factory, TESTCALLS) as running:
        yield running


def _trunk(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    return next(t for t in daemon.status()["trunks"] if t["name"] == name)


def _trunk_flags(info: dict[str, Any]) -> dict[str, str]:
    carrier = next(h for h in info["hosts"] if h["name"] == "carrier")
    result = jsonrpc(carrier["address"], carrier["ports"]["rpc"], "/RPC", "dispatcher.list")
    return dispatcher_flags(result).get(lab_kamailio.SET_TRUNKS, {})


def test_a_healthy_hotline_answers_with_audio(daemon: RunningDaemon) -> None:
    proc = hotsite("testcall", "vip", config=daemon.config)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answered by site:primary" in proc.stdout  # from the answer's Contact, the primary's SBC
    assert "ringing after" in proc.stdout and "answered after" in proc.stdout  # post-dial delay
    record = json.loads(hotsite("testcall", "95588", "--json", config=daemon.config).stdout)
    assert record["ok"] and record["mos"] > 4.0 and record["audio"] and record["hangup"] == "200 OK"
    assert record["rx_packets"] == record["tx_packets"] > 0 and record["loss_pct"] == 0.0
    assert record["pdd_answer_ms"] >= record["pdd_ringing_ms"] > 0


def test_a_trunk_rejecting_invites_is_degraded_while_the_dispatcher_keeps_it(
    lab: tuple[Any, dict[str, Any]], daemon: RunningDaemon
) -> None:
    the_lab, info = lab
    wait_for(lambda: _trunk(daemon, "trunk-a")["state"] == "up", timeout=30, what="trunk-a up")
    impair = hotsite("lab", "impair", "--workdir", str(the_lab.workdir), "trunk-a", "--reject-invites", "503")
    assert impair.returncode == 0, impair.stderr
    try:
        once = hotsite("testcall", "vip", "--via", "trunk-a", config=daemon.config)
        assert once.returncode == 1 and "FAILED: 95588: 503 Service Unavailable" in once.stdout, once.stdout
        trunk = wait_for(
            lambda: (t := _trunk(daemon, "trunk-a"))["state"] == "degraded" and t,
            timeout=60,
            what="trunk-a degraded by its failing calls",
            on_fail=lambda: json.dumps(daemon.status()["trunks"], indent=1),
        )
        assert trunk["why"].startswith("calls failing: ") and "95588: 503 Service Unavailable" in trunk["why"]
        # Kamailio's own view: its OPTIONS keepalives pass, so the trunk stays active and probed.
        assert wait_for(
            lambda: _trunk_flags(info).get(f"sip:{_addr(info, 'trunk-a')}:5060") == "AP", timeout=10
        )
        # And hotsite's OPTIONS probe agrees the trunk answers: only the calls tell.
        probes = json.loads(hotsite("probes", "--json", config=daemon.config).stdout)
        assert next(p for p in probes if p["target"] == "testcall:trunk:trunk-a")["last_code"] == 503
    finally:
        assert hotsite("lab", "heal", "--workdir", str(the_lab.workdir), "trunk-a").returncode == 0
    wait_for(
        lambda: _trunk(daemon, "trunk-a")["state"] == "up", timeout=60, what="trunk-a's calls good again"
    )


def test_a_trunk_without_media_fails_with_no_audio(
    lab: tuple[Any, dict[str, Any]], daemon: RunningDaemon
) -> None:
    the_lab, _ = lab
    impair = hotsite("lab", "impair", "--workdir", str(the_lab.workdir), "trunk-a", "--no-media")
    assert impair.returncode == 0, impair.stderr
    try:
        once = hotsite("testcall", "vip", "--via", "trunk-a", config=daemon.config)
        assert once.returncode == 1 and "no audio" in once.stdout and "NO AUDIO" in once.stdout, once.stdout
        trunk = wait_for(
            lambda: (t := _trunk(daemon, "trunk-a"))["state"] == "degraded" and t,
            timeout=60,
            what="trunk-a degraded: no audio",
        )
        assert "95588: no audio" in trunk["why"]
    finally:
        assert hotsite("lab", "heal", "--workdir", str(the_lab.workdir), "trunk-a").returncode == 0


def test_a_trunk_with_one_way_audio_fails_naming_the_direction(
    lab: tuple[Any, dict[str, Any]], daemon: RunningDaemon
) -> None:
    """trunk-a answers and plays its prompt, but never hears (echoes) the caller."""
    the_lab, _ = lab
    wait_for(lambda: _trunk(daemon, "trunk-a")["state"] == "up", timeout=60, what="trunk-a up")
    impair = hotsite("lab", "impair", "--workdir", str(the_lab.workdir), "trunk-a", "--one-way")
    assert impair.returncode == 0 and "one-way audio" in impair.stdout, impair.stderr
    try:
        once = hotsite("testcall", "vip", "--via", "trunk-a", "--json", config=daemon.config)
        assert once.returncode == 1, once.stdout + once.stderr
        r = json.loads(once.stdout)
        assert r["reason"] == "one_way" and r["code"] == 200, r
        # Per direction: ours went out and none came back; the far end's prompt arrived, with audio.
        assert r["tx_packets"] > 0 and r["tx_echoed"] == 0, r
        assert r["rx_packets"] >= 5 and r["audio"], r
        assert r["detail"].startswith(f"95588: one-way audio: none of our {r['tx_packets']} RTP packets"), r
        text = hotsite("testcall", "vip", "--via", "trunk-a", config=daemon.config).stdout
        assert "FAILED: 95588: one-way audio" in text and "ONE-WAY AUDIO" in text and "(0 came back)" in text
        trunk = wait_for(
            lambda: (t := _trunk(daemon, "trunk-a"))["state"] == "degraded" and t,
            timeout=60,
            what="trunk-a degraded: one-way audio",
        )
        assert "95588: one-way audio" in trunk["why"]
    finally:
        assert hotsite("lab", "heal", "--workdir", str(the_lab.workdir), "trunk-a").returncode == 0
    good = hotsite("testcall", "vip", "--via", "trunk-a", "--json", config=daemon.config)
    assert good.returncode == 0 and json.loads(good.stdout)["tx_echoed"] > 0, good.stdout


def _addr(info: dict[str, Any], host: str) -> str:
    return str(next(h for h in info["hosts"] if h["name"] == host)["address"])
