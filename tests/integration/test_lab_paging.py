"""Paging end to end in the lab: the primary dies, the on-call contractor's modem gets the page,
nobody answers, the next step is paged on time, an ACK by SMS stops it, and when the primary is
back and routing returns, everyone who was paged gets the resolve text.

The GSM modem is the pseudo-terminal emulator (the one part we cannot have for real).
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
from tests.support.modem import ModemEmulator

pytestmark = lab_rig.marks(pytest.mark.slow)

ON_CALL = "+8613800138000"  # "Lab On-Call" in the lab config
BACKUP = "+8613900139000"
ESCALATE_AFTER_S = 4

PAGING = f"""
[[contacts]]
name = "Backup Contractor"
company = "Example Telecom Services"
phone = "{BACKUP}"

[channels.sms]
type = "gsm"
device = "{{device}}"
send_timeout_s = 5
prompt_timeout_s = 2
poll_s = 0.5

[paging.policies.default]
repeat = 0
[[paging.policies.default.steps]]
targets = ["Lab On-Call"]
escalate_after_s = {ESCALATE_AFTER_S}
[[paging.policies.default.steps]]
targets = ["Backup Contractor"]
escalate_after_s = 600
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, ModemEmulator, LabDaemon]]:
    with (
        lab_rig.modem() as modem,
        lab_rig.netns_lab(tmp_path_factory) as (the_lab, info),
        lab_rig.lab_daemon(
            info, tmp_path_factory, PAGING.replace("{device}", modem.path), clean_exit=False
        ) as daemon,
    ):
        yield the_lab, modem, daemon


def _texts_to(modem: ModemEmulator, number: str) -> list[str]:
    return [text for to, text in modem.submitted_texts() if to == number]


def _failover_incident(daemon: RunningDaemon) -> dict[str, Any] | None:
    incidents = json.loads(hotsite("incidents", "--json", config=daemon.config).stdout)
    return next((i for i in incidents["active"] if i["group"] == "failover"), None)


def test_page_escalate_ack_by_sms_resolve(world: tuple[Any, ModemEmulator, RunningDaemon]) -> None:
    the_lab, modem, daemon = world
    wait_for(
        lambda: (
            daemon.status()["failover"]["state"] == "primary_active"
            and all(s["verdict"] == "up" for s in daemon.status()["sites"])
        ),
        timeout=30,
        what="steady",
    )
    offset = time.time() - time.monotonic()  # the emulator stamps with the (system-wide) monotonic clock
    assert hotsite("lab", "impair", "--workdir", str(the_lab.workdir), "primary", "--cut").returncode == 0
    try:
        # 1. The decision (primary judged down) pages the on-call contractor within a second.
        incident = wait_for(lambda: _failover_incident(daemon), timeout=20, what="failover incident")
        wait_for(lambda: _texts_to(modem, ON_CALL), timeout=10, what="page to the on-call contractor")
        decisions = json.loads(
            hotsite("events", "--json", "--kind", "failover.decision", config=daemon.config).stdout
        )
        decided = min(d["at_epoch"] for d in decisions if d["message"].startswith("primary judged down"))
        wait_for(
            lambda: any("judged down" in t for t in _texts_to(modem, ON_CALL)),
            timeout=10,
            what="the failover page",
        )
        first_sms = offset + next(  # the parts line up with their decoded texts
            sub.at
            for sub, (to, text) in zip(modem.submitted, modem.submitted_texts(), strict=True)
            if to == ON_CALL and "judged down" in text
        )
        print(f"decision -> AT+CMGS written: {(first_sms - decided) * 1000:.0f} ms")
        assert 0 <= first_sms - decided < 1.0
        assert any("Primary site" in t for t in _texts_to(modem, ON_CALL))
        # 2. No ACK: the next step is paged on time.
        wait_for(lambda: _texts_to(modem, BACKUP), timeout=ESCALATE_AFTER_S + 10, what="escalation")
        assert _texts_to(modem, BACKUP) and not _texts_to(modem, BACKUP)[0].lower().startswith("resolved")
        # 3. The on-call contractor answers by SMS: escalation stops.
        incident = _failover_incident(daemon)
        assert incident is not None
        modem.inject_sms(ON_CALL, f"ACK {incident['id']} {incident['short_code']}")  # the code is required
        acked = wait_for(
            lambda: (i := _failover_incident(daemon)) and i["status"] == "acked" and i,
            timeout=10,
            what="ack by SMS",
        )
        assert ON_CALL in str(acked["acked_by"]) or "Lab On-Call" in str(acked["acked_by"])
        # An unknown number is never obeyed.
        modem.inject_sms("+8613000000000", f"ACK {incident['id']}")
        wait_for(lambda: daemon.status()["failover"]["state"] == "backup_active", timeout=30, what="failover")
    finally:
        assert hotsite("lab", "heal", "--workdir", str(the_lab.workdir), "primary").returncode == 0
    paged_before_resolve = len(modem.submitted)
    wait_for(
        lambda: daemon.status()["failover"]["state"] == "failback_pending", timeout=30, what="primary back"
    )
    assert hotsite("failback", "--yes", config=daemon.config).returncode == 0
    # 4. Routing back: the incident resolves and both who were paged get the resolve text.
    wait_for(lambda: _failover_incident(daemon) is None, timeout=30, what="incident resolved")
    wait_for(
        lambda: (
            any("resolved" in t.lower() for t in _texts_to(modem, ON_CALL))
            and any("resolved" in t.lower() for t in _texts_to(modem, BACKUP))
        ),
        timeout=20,
        what="resolve texts",
    )
    assert len(modem.submitted) > paged_before_resolve
    unknown = json.loads(hotsite("events", "--json", "--kind", "paging", config=daemon.config).stdout)
    assert any("+8613000000000" in json.dumps(e) for e in unknown)
