"""PagingService end to end on real parts: the state DB, the modem emulator on a pty, the outbox.

The failover engine does not exist yet, so incidents are raised here the way
it will raise them (``raise_incident``); the lab test "primary dies -> page"
belongs to the engine's issue.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from appliance import config
from appliance.api import Caller, RequestError
from appliance.clock import SimulatedClock
from appliance.migrations import COMPONENTS
from appliance.paging.channel import NullChannel
from appliance.paging.service import PagingService
from appliance.store import Store
from tests.support import configs
from tests.support.modem import ModemEmulator

T0 = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=8))).timestamp()
ZHANG, LI, STRANGER = "+8613800138000", "+8613900139000", "+8613700000000"
ROOT = Caller(pid=1, uid=0, gid=0)

CONFIG = (
    '\n[appliance]\nname = "dr1"\n'
    + configs.two_sites("10.0.0.1", "10.0.0.2")
    + """
[[contacts]]
name = "Zhang Wei"
phone = "+8613800138000"
email = "zw@example.com"

[[contacts]]
name = "Li Na"
phone = "+8613900139000"

[[contacts]]
name = "Site Mgr"
email = "sm@example.com"

[channels.sms]
type = "gsm"
device = "{device}"
send_timeout_s = 2
prompt_timeout_s = 1
retries = 0
poll_s = 0.3
health_s = 30

[paging]
rate_limit_per_hour = 3
retry_backoff_s = 1

[paging.rotations.primary]
contacts = ["Zhang Wei", "Li Na"]
start = 2026-03-02T09:00:00+08:00

[paging.policies.default]
repeat = 0
[[paging.policies.default.steps]]
targets = ["rotation:primary"]
escalate_after_s = 300
[[paging.policies.default.steps]]
targets = ["Li Na", "Site Mgr"]
escalate_after_s = 600
"""
)


@pytest.fixture
def emulator() -> Iterator[ModemEmulator]:
    emu = ModemEmulator().start()
    yield emu
    emu.stop()


def make_config(device: str) -> config.Config:
    return config.parse(CONFIG.replace("{device}", device))


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


def texts_to(emu: ModemEmulator, number: str) -> list[str]:
    return [text for to, text in emu.submitted_texts() if to == number]


def test_escalation_ack_by_sms_and_resolve_notices(tmp_path: Path, emulator: ModemEmulator) -> None:
    clock = SimulatedClock(start=0, wall_offset=T0)
    store = Store.open(tmp_path, components=COMPONENTS)
    registry = CollectorRegistry()
    email = NullChannel("email")

    async def body() -> None:
        svc = PagingService(
            make_config(emulator.path),
            store,
            registry,
            clock=clock,
            tick_s=3600,
            status_text=lambda: "primary DOWN, calls on backup",
        )
        svc.channels["email"] = email
        svc.order.append("email")  # an extra channel, last in the fallback order
        await svc.start()
        try:
            await svc.raise_incident("site:primary", "primary site down", "critical", group="site")
            await svc.raise_incident("site:primary", "primary site down", "critical", group="site")  # dedupe
            await until(lambda: len(emulator.submitted) == 1)
            (page,) = texts_to(emulator, ZHANG)
            assert page.startswith("[dr1] #1 CRITICAL: primary site down. Reply ACK 1 or ")
            clock.advance(299)
            await svc.apply_tick()
            await asyncio.sleep(0.2)
            assert len(emulator.submitted) == 1  # not yet
            clock.advance(1)
            await svc.apply_tick()
            await until(lambda: len(texts_to(emulator, LI)) == 1 and len(email.sent) == 1)
            assert email.sent[0].contact.name == "Site Mgr"
            emulator.inject_sms(STRANGER, "ACK 1")  # unknown number: logged, never acted on
            await until(
                lambda: (
                    registry.get_sample_value(
                        "hotsite_paging_inbound_sms_total", {"result": "unknown_sender"}
                    )
                    == 1
                )
            )
            assert svc.state.incidents[1].status == "open"
            code = svc.state.incidents[1].short_code
            emulator.inject_sms(LI, code, notify=False)  # +CMTI dropped: the poll finds it
            await until(lambda: svc.state.incidents[1].status == "acked")
            assert svc.state.incidents[1].acked_by == "Li Na"
            await until(lambda: any("acknowledged" in t for t in texts_to(emulator, LI)))
            assert "#1 acknowledged" in [t for t in texts_to(emulator, LI) if "acknowledged" in t][0]
            # Everyone else who was paged is told who acknowledged (issue 14).
            await until(lambda: any("acknowledged by Li Na" in t for t in texts_to(emulator, ZHANG)))
            await until(lambda: len(email.sent) == 2)
            assert email.sent[1].kind == "ack" and "acknowledged by Li Na" in email.sent[1].text
            assert registry.get_sample_value("hotsite_paging_time_to_ack_seconds_count") == 1
            emulator.inject_sms(ZHANG, "status")
            await until(lambda: any("primary DOWN" in t for t in texts_to(emulator, ZHANG)))
            status = [t for t in texts_to(emulator, ZHANG) if "primary DOWN" in t][0]
            assert "#1 critical primary site down ack Li Na" in status
            before = len(emulator.submitted)
            clock.advance(3600)
            await svc.apply_tick()
            await asyncio.sleep(0.3)
            assert len(emulator.submitted) == before  # nothing after the ack
            await svc.clear("site:primary")
            await until(lambda: len(emulator.submitted) == before + 2 and len(email.sent) == 3)
            resolved = [t for t in (texts_to(emulator, ZHANG) + texts_to(emulator, LI)) if "RESOLVED" in t]
            assert resolved == ["[dr1] RESOLVED #1: primary site down"] * 2
            assert email.sent[2].kind == "resolve"
            listing = await svc.handlers()["incidents"](ROOT, {})
            assert listing["active"] == [] and listing["recent"][0]["status"] == "resolved"
            sent = registry.get_sample_value(
                "hotsite_paging_pages_total", {"channel": "sms", "result": "sent"}
            )
            assert sent is not None and sent >= 4
            kinds = [e.kind for e in store.events(limit=100)]
            assert {
                "paging.opened",
                "paging.duplicate",
                "paging.acked",
                "paging.resolved",
                "paging.sms_ignored",
            } <= set(kinds)
        finally:
            await svc.stop()

    run(body)
    store.close()


def test_outbox_restart_resends_what_never_went_out_and_repeats_the_uncertain(tmp_path: Path) -> None:
    """The recovery rule (PAGING.md): claimed/prompt -> resent; PDU written -> uncertain, sent again
    marked "(repeat)"; every part answered -> sent, not resent. Metrics and audit say so."""
    cfg = make_config("/dev/null")
    clock = SimulatedClock(start=0, wall_offset=T0)

    async def first_life() -> None:
        store = Store.open(tmp_path, components=COMPONENTS)
        down = NullChannel("sms", result="failed")
        svc = PagingService(cfg, store, CollectorRegistry(), clock=clock, channels={"sms": down}, tick_s=3600)
        await svc.start()
        await svc.raise_incident("trunk:a", "trunk a down")
        await until(lambda: len(down.sent) == 1)
        # Simulate a crash mid-send of three more pages, each stopped at another phase.
        for dedup, phase, parts in (("x", "", 0), ("y", "pdu", 1), ("z", "answered", 1)):
            with store.transaction() as conn:
                svc.outbox.enqueue(
                    conn,
                    dedup=dedup,
                    incident_id=1,
                    contact="Li Na",
                    kind="trigger",
                    text=f"text {dedup}",
                    reason="r",
                    channels=[],
                    now=clock.time(),
                )
            (row,) = [r for r in svc.outbox.due(clock.time() + 10) if r.dedup == dedup]
            assert svc.outbox.claim(row.id, clock.time())
            if phase:
                svc.outbox.progress(row.id, "sms", phase, 0, parts)
        await svc.stop()
        store.close()

    async def second_life() -> None:
        store = Store.open(tmp_path, components=COMPONENTS)
        up = NullChannel("sms")
        registry = CollectorRegistry()
        svc = PagingService(cfg, store, registry, clock=clock, channels={"sms": up}, tick_s=3600)
        assert svc.state.incidents[1].summary == "trunk a down"  # escalation state came back
        await svc.start()
        clock.advance(5)  # past the retry backoff
        svc.wake()
        await until(lambda: len(up.sent) == 3)
        await asyncio.sleep(0.2)
        assert sorted(m.text for m in up.sent if m.contact.name == "Li Na") == ["(repeat) text y", "text x"]
        states = {r["dedup"]: r["state"] for r in svc.outbox.rows()}
        assert states == {
            "1:trigger:r0:s0:Zhang Wei": "sent",
            "x": "sent",
            "y": "uncertain",
            "y:repeat:sms": "sent",
            "z": "sent",
        }
        for outcome in ("resent", "uncertain", "sent"):
            assert registry.get_sample_value("hotsite_paging_recovered_total", {"outcome": outcome}) == 1
        (event,) = store.events(kind="paging.recovered")
        assert len(event.data["resent"]) == 1 and len(event.data["uncertain"]) == 1
        await svc.stop()
        store.close()

    run(first_life)
    run(second_life)


def test_fallback_rate_limit_and_api(tmp_path: Path) -> None:
    cfg = make_config("/dev/null")
    clock = SimulatedClock(start=0, wall_offset=T0)
    store = Store.open(tmp_path, components=COMPONENTS)
    registry = CollectorRegistry()
    sms, email = NullChannel("sms", result="failed", retryable=False), NullChannel("email")

    async def body() -> None:
        svc = PagingService(
            cfg, store, registry, clock=clock, tick_s=3600, channels={"sms": sms, "email": email}
        )
        await svc.start()
        try:
            for n in range(5):
                await svc.raise_incident(f"disk:{n}", f"disk {n} full", "warning")
            # Fell back to e-mail; 3 per hour per contact, then ONE notice instead of silence.
            await until(lambda: len(email.sent) == 4)
            await asyncio.sleep(0.2)
            assert len(email.sent) == 4 and svc.outbox.depth() == 0 and svc.outbox.count("held") == 2
            assert email.sent[3].kind == "notice"
            assert "page limit reached: 2 incident(s) waiting" in email.sent[3].text
            assert "Reply STATUS" in email.sent[3].text
            # Held pages are loud: WARNING-logged, audited, counted, shown as held.
            assert registry.get_sample_value("hotsite_paging_deferred_total", {"reason": "rate_limit"}) == 2
            assert len(store.events(kind="paging.held")) == 2
            listing = await svc.handlers()["incidents"](ROOT, {})
            lines = {i["id"]: [p["line"] for p in i["pages"]] for i in listing["active"]}
            assert lines[1] == ["paged (email)"]
            assert lines[4][0].startswith("held until ") and lines[5][0].startswith("held until ")
            # A critical page is never held by the limit.
            await svc.raise_incident("site:primary", "primary site down", "critical")
            await until(lambda: len(email.sent) == 5)
            assert "primary site down" in email.sent[4].text
            clock.advance(3601)
            svc.wake()
            # The window reopens: the held pages go out as ONE digest.
            await until(lambda: len(email.sent) == 6)
            await asyncio.sleep(0.2)
            assert len(email.sent) == 6 and email.sent[5].kind == "digest"
            assert "2 page(s) held" in email.sent[5].text
            assert "disk 3 full" in email.sent[5].text and "disk 4 full" in email.sent[5].text
            assert svc.outbox.depth() == 0 and svc.outbox.count("held") == 0
            handlers = svc.handlers()
            assert (await handlers["ack"](ROOT, {"id": "2"}))["incident"] == 2
            with pytest.raises(RequestError, match="already acknowledged"):
                await handlers["ack"](ROOT, {"id": 2})
            with pytest.raises(RequestError, match="no active incident"):
                await handlers["ack"](ROOT, {"id": "999"})
            oncall = await handlers["oncall"](ROOT, {})
            assert oncall["rotations"][0]["on_call"] == "Zhang Wei"
            result = await handlers["page_test"](ROOT, {"contact": "Site Mgr"})
            assert [r["result"] for r in result["results"]] == ["failed", "sent"]
            result = await handlers["page_test"](ROOT, {"contact": "Li Na", "channel": "email"})
            assert result["results"][0]["result"] == "sent"
            with pytest.raises(RequestError, match="unknown contact"):
                await handlers["page_test"](ROOT, {"contact": "Nobody"})
        finally:
            await svc.stop()

    run(body)
    store.close()
