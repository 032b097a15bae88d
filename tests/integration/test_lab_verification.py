"""Issue 20: every routing change verified by calls, in the lab (real Kamailio, SIPp SBCs echoing RTP,
the real daemon and CLI).

A hard cut of the primary: the failover runbook's verification calls dial each hotline through the
carrier edge and must be answered *by the backup's SBC* (its own Contact) with audio; the decision
says so, and the incident report shows each hotline's first good call, timed from detection. After
the failback the same calls must land at the primary. The drill places the same calls through the
backup path with no hotline moved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from provisioning.lab import Lab
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for
from tests.support import lab as lab_rig
from tests.support.lab import LabDaemon

pytestmark = lab_rig.marks(pytest.mark.slow)

# Short calls; the scheduled test calls rarely (the verification is what this file is about).
TESTCALLS = """
[testcalls]
caller = "10086"
hotlines = ["vip", "cards"]
interval_s = 600
duration_s = 1
setup_timeout_s = 2
verify_timeout_s = 30
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, Any]]]:
    with lab_rig.netns_lab(tmp_path_factory, ready=False) as up:
        yield up


@pytest.fixture(scope="module")
def daemon(lab: tuple[Lab, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDaemon]:
    with lab_rig.lab_daemon(lab[1], tmp_path_factory, TESTCALLS) as running:
        yield running


def _events(daemon: RunningDaemon, kind: str) -> list[dict[str, Any]]:
    proc = hotsite("events", "--json", "--kind", kind, "--limit", "50", config=daemon.config)
    return list(json.loads(proc.stdout)) if proc.returncode == 0 else []


def _steady(daemon: RunningDaemon) -> None:
    wait_for(
        lambda: (
            (s := daemon.status())["failover"]["state"] == "primary_active"
            and all(site["verdict"] == "up" for site in s["sites"])
        ),
        timeout=60,
        what="both sites up, normal routing",
    )


def _verification(daemon: RunningDaemon, kind: str, after: int) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: next(
                (
                    e
                    for e in _events(daemon, "failover.verification")
                    if e["id"] > after and e["data"]["kind"] == kind
                ),
                None,
            ),
            timeout=60,
            what=f"the {kind}'s verification calls",
            on_fail=lambda: daemon.log.read_text()[-3000:],
        )
    )


def _last_id(daemon: RunningDaemon) -> int:
    events = json.loads(hotsite("events", "--json", "--limit", "1", config=daemon.config).stdout)
    return int(events[0]["id"]) if events else 0


def test_the_drill_calls_every_hotline_through_the_backup_path(daemon: RunningDaemon) -> None:
    _steady(daemon)
    assert hotsite("drill", config=daemon.config).returncode == 0
    drill = wait_for(
        lambda: next(iter(_events(daemon, "failover.drill")), None), timeout=60, what="the drill"
    )
    checks = {c["name"]: c for c in drill["data"]["checks"]}
    calls = checks["hotline calls through the backup path"]
    print(calls)
    assert calls["ok"], calls
    # Each hotline's call went to the test number, routed where the plan sends the hotline.
    assert "vip: 99999 at backup (PDD" in calls["detail"] and "cards: 99999 at backup (PDD" in calls["detail"]
    wait_for(lambda: daemon.status()["failover"]["state"] == "primary_active", what="the drill over")


def test_a_hard_cut_is_verified_by_calls_answered_at_the_backup_and_reported(
    lab: tuple[Any, dict[str, Any]], daemon: RunningDaemon
) -> None:
    the_lab, _ = lab
    _steady(daemon)
    before = _last_id(daemon)
    cut_at = time.time()
    assert hotsite("lab", "impair", "--workdir", str(the_lab.workdir), "primary", "--cut").returncode == 0
    try:
        verified = _verification(daemon, "failover", before)
    finally:
        assert hotsite("lab", "heal", "--workdir", str(the_lab.workdir), "primary").returncode == 0
    data = verified["data"]
    print(json.dumps(data, indent=1))
    assert data["ok"], data
    by_number = {h["number"]: h for h in data["hotlines"]}
    assert [h["number"] for h in data["hotlines"]] == ["95588", "95566"]  # priority order
    for h in by_number.values():
        assert h["answered_by"] == "site:backup" and h["mos"] > 4.0 and h["pdd_ms"] is not None
        print(f"{h['number']}: first good call {h['answered_at_epoch'] - cut_at:.2f} s after the cut")
    decisions = _events(daemon, "failover.decision")
    assert any(d["message"].startswith("failover verified by calls (epoch") for d in decisions)
    # The incident report, anchored on the decision that started the failover.
    start = next(d for d in decisions if d["id"] > before and d["data"].get("to") == "failing_over")
    report = json.loads(
        hotsite("report", "incident", str(start["id"]), "--format", "json", config=daemon.config).stdout
    )
    firsts = report["figures"]["first_good_call_after_detection"]
    assert set(firsts) == {"95588", "95566"} and report["figures"]["verified_by_calls"] is True
    assert all(" s (PDD " in text and "MOS 4." in text for text in firsts.values()), firsts
    # Failback: the same calls must now land at the primary.
    wait_for(
        lambda: daemon.status()["failover"]["state"] == "failback_pending",
        timeout=60,
        what="failback pending",
    )
    back_from = _last_id(daemon)
    assert hotsite("failback", "--yes", "--reason", "primary repaired", config=daemon.config).returncode == 0
    back = _verification(daemon, "failback", back_from)["data"]
    assert back["ok"] and {h["answered_by"] for h in back["hotlines"]} == {"site:primary"}, back
