"""Issue 14's failures, each reproduced against a real PagingService (real state DB, the pty modem
emulator, a real HTTP server for PagerDuty) and each failing on the code before the fix.

Items: (2) a critical page is never held by a limit and a held page is loud; (3) a new
condition in an acknowledged incident's group is never silent; (4) a permanent ``+CMS``
error falls back to the next channel and a page no channel took is loud and escalates at
once; (5) a digest instead of silence. And from issue 16: the SMS ACK rules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from appliance.clock import SimulatedClock
from appliance.migrations import COMPONENTS
from appliance.paging.channel import NullChannel
from appliance.paging.service import PagingService
from appliance.paging.webhook import WebhookChannel
from appliance.store import Store
from tests.integration.test_paging_service import LI, ROOT, T0, ZHANG, make_config, run, texts_to, until
from tests.support.modem import ModemEmulator


@pytest.fixture
def emulator() -> Iterator[ModemEmulator]:
    emu = ModemEmulator().start()
    yield emu
    emu.stop()


def service(
    tmp_path: Path, device: str, registry: CollectorRegistry, clock: SimulatedClock, extra: str = ""
) -> tuple[PagingService, Store]:
    store = Store.open(tmp_path, components=COMPONENTS)
    from appliance import config
    from tests.integration.test_paging_service import CONFIG

    cfg = config.parse(CONFIG.replace("{device}", device) + extra) if extra else make_config(device)
    return PagingService(cfg, store, registry, clock=clock, tick_s=3600), store


def test_critical_is_never_held_and_a_held_page_is_loud(tmp_path: Path, caplog: Any) -> None:
    """Item 2: 20 warnings to one contact, then "primary site down": it goes out at once."""
    clock = SimulatedClock(start=0, wall_offset=T0)
    registry = CollectorRegistry()
    email = NullChannel("email")
    svc, store = service(tmp_path, "/dev/null", registry, clock)
    svc.channels, svc.order = {"email": email}, ["email"]

    async def body() -> None:
        await svc.start()
        try:
            for n in range(20):
                await svc.raise_incident(f"w:{n}", f"warning {n}", "warning")
            await until(lambda: len(email.sent) >= 3)  # the limit is 3 per hour in this config
            await asyncio.sleep(0.3)
            sent = len(email.sent)
            with caplog.at_level(logging.WARNING):
                await svc.raise_incident("site:primary", "primary site down", "critical", group="site")
                await until(lambda: any("primary site down" in m.text for m in email.sent[sent:]))
            listing = await svc.handlers()["incidents"](ROOT, {})
            held = [p for i in listing["active"] for p in i["pages"] if p["state"] == "held"]
            assert len(held) == 17 and all(p["line"].startswith("held until ") for p in held)
            (critical,) = [i for i in listing["active"] if i["severity"] == "critical"]
            assert critical["pages"] == [{"contact": "Zhang Wei", "state": "sent", "line": "paged (email)"}]
            assert len(store.events(kind="paging.held", limit=100)) == 17
            assert registry.get_sample_value("hotsite_paging_deferred_total", {"reason": "rate_limit"}) == 17
            assert any("held until" in r.message for r in caplog.records if r.levelno == logging.WARNING) or (
                len(store.events(kind="paging.held")) > 0
            )
        finally:
            await svc.stop()

    run(body)
    store.close()


def test_a_permanent_cms_error_falls_back_and_a_page_nobody_took_is_loud(
    tmp_path: Path, emulator: ModemEmulator, caplog: Any
) -> None:
    """Item 4: +CMS ERROR 304 -> e-mail; both channels failing -> ERROR, audit, metric,
    NOT DELIVERED in `incidents`, and the next escalation step at once (not after 300 s)."""
    clock = SimulatedClock(start=0, wall_offset=T0)
    registry = CollectorRegistry()
    svc, store = service(tmp_path, emulator.path, registry, clock)
    email = NullChannel("email")
    svc.channels["email"] = email
    svc.order.append("email")

    async def body() -> None:
        await svc.start()
        try:
            emulator.cms_errors = [304]
            with caplog.at_level(logging.WARNING):
                await svc.raise_incident("trunk:a", "trunk a down", group="trunk")
                await until(lambda: len(email.sent) == 1)
            assert email.sent[0].contact.name == "Zhang Wei"
            assert any(
                "invalid PDU mode parameter" in r.getMessage() + str(r.__dict__) for r in caplog.records
            )
            # Now nothing can take a page: the modem refuses for good and e-mail fails.
            email.result, email.retryable = "failed", False
            emulator.cms_errors = [304] * 10
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                await svc.raise_incident("site:x", "site x down", group="site")
                # Escalated at once: step 2 (Li Na by SMS, Site Mgr by e-mail) without a tick.
                await until(
                    lambda: (
                        registry.get_sample_value("hotsite_paging_undelivered_total", {"kind": "trigger"})
                        is not None
                    )
                )
                await until(lambda: any(m.contact.name == "Site Mgr" for m in email.sent), timeout=10)
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert any("NOT DELIVERED" in r.getMessage() for r in errors)
            (failed, *_) = store.events(kind="paging.page_failed")
            assert failed.message.startswith("NOT DELIVERED to ")
            assert any(
                "escalating to the next step now" in e.message
                for e in store.events(kind="paging.undelivered")
            )
            listing = await svc.handlers()["incidents"](ROOT, {})
            (incident,) = [i for i in listing["active"] if i["summary"] == "site x down"]
            lines = {p["contact"]: p["line"] for p in incident["pages"]}
            assert lines["Zhang Wei"].startswith("NOT DELIVERED: ")
        finally:
            await svc.stop()

    run(body)
    store.close()


def test_a_new_condition_after_an_ack_pages_again(tmp_path: Path) -> None:
    """Item 3: trunk A acknowledged, then trunk B goes down: B is paged (a new incident)."""
    clock = SimulatedClock(start=0, wall_offset=T0)
    sms = NullChannel("sms")
    svc, store = service(tmp_path, "/dev/null", CollectorRegistry(), clock)
    svc.channels, svc.order = {"sms": sms}, ["sms"]

    async def body() -> None:
        await svc.start()
        try:
            await svc.raise_incident("trunk:a", "trunk a down", group="trunk")
            await until(lambda: len(sms.sent) == 1)
            await svc.handlers()["ack"](ROOT, {"id": 1})
            await svc.raise_incident("trunk:b", "trunk b down", group="trunk")
            await until(lambda: any("trunk b down" in m.text for m in sms.sent))
            (page,) = [m for m in sms.sent if "trunk b down" in m.text]
            assert "#1 is acknowledged" in page.text and page.incident == 2
        finally:
            await svc.stop()

    run(body)
    store.close()


def test_a_digest_instead_of_silence(tmp_path: Path) -> None:
    """Item 5: 40 alerts, 3 pages per hour: 3 pages, ONE notice, then ONE digest ("and N more")."""
    clock = SimulatedClock(start=0, wall_offset=T0)
    sms = NullChannel("sms")
    svc, store = service(tmp_path, "/dev/null", CollectorRegistry(), clock)
    svc.channels, svc.order = {"sms": sms}, ["sms"]

    async def body() -> None:
        await svc.start()
        try:
            for n in range(40):
                await svc.raise_incident(f"a:{n}", f"alert {n}", "warning")
            await until(lambda: len(sms.sent) == 4)
            await asyncio.sleep(0.3)
            assert len(sms.sent) == 4
            assert "page limit reached: 37 incident(s) waiting" in sms.sent[3].text
            clock.advance(3601)
            svc.wake()
            await until(lambda: len(sms.sent) == 5)
            await asyncio.sleep(0.3)
            assert len(sms.sent) == 5
            digest = sms.sent[4].text
            assert "digest, 37 page(s) held" in digest and "and 32 more" in digest and "STATUS" in digest
            assert svc.outbox.depth() == 0 and svc.outbox.count("held") == 0
        finally:
            await svc.stop()

    run(body)
    store.close()


def test_sms_ack_needs_the_code_and_a_paged_or_on_call_contact(
    tmp_path: Path, emulator: ModemEmulator
) -> None:
    """Issue 16: `ACK 1` alone is refused; a stranger in the roster who was not paged is refused;
    the code from the paged contact, written in the national form, is accepted; the reply names #1."""
    clock = SimulatedClock(start=0, wall_offset=T0)
    registry = CollectorRegistry()
    svc, store = service(
        tmp_path,
        emulator.path,
        registry,
        clock,
        extra='\n[[contacts]]\nname = "Other"\nphone = "+8613600136000"\n',
    )

    async def body() -> None:
        await svc.start()
        try:
            await svc.raise_incident("site:primary", "primary site down", "critical", group="site")
            await until(lambda: len(texts_to(emulator, ZHANG)) == 1)
            code = svc.state.incidents[1].short_code
            emulator.inject_sms(ZHANG, "ACK 1")  # the sequential number alone: refused
            await until(lambda: any("not acknowledged" in t for t in texts_to(emulator, ZHANG)))
            assert svc.state.incidents[1].status == "open"
            assert "4-digit code" in [t for t in texts_to(emulator, ZHANG) if "not acknowledged" in t][0]
            emulator.inject_sms("+8613600136000", code)  # a contact, but never paged, not on call
            await until(lambda: len(store.events(kind="paging.sms_ack_refused")) == 2)
            assert svc.state.incidents[1].status == "open"
            emulator.inject_sms("13800138000", f"ACK 1 {code}")  # national form: unknown without a code
            await until(
                lambda: (
                    registry.get_sample_value(
                        "hotsite_paging_inbound_sms_total", {"result": "unknown_sender"}
                    )
                    == 1
                )
            )
            svc.roster = dataclasses.replace(svc.roster, country_code="86")  # paging.country_code = "86"
            emulator.inject_sms("13800138000", f"ACK 1 {code}")  # national form, number + code
            await until(lambda: svc.state.incidents[1].status == "acked")
            assert svc.state.incidents[1].acked_by == "Zhang Wei"
            await until(lambda: any("#1 acknowledged" in t for t in texts_to(emulator, ZHANG)))
            assert (
                registry.get_sample_value("hotsite_paging_inbound_sms_total", {"result": "ack_refused"}) == 2
            )
            # Li Na is on call next week, not now, and was never paged: refused as well.
            assert not texts_to(emulator, LI)
        finally:
            await svc.stop()

    run(body)
    store.close()


class _PagerDuty:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.events.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/enqueue"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_pagerduty_is_told_about_ack_and_resolve(tmp_path: Path) -> None:
    clock = SimulatedClock(start=0, wall_offset=T0)
    pd = _PagerDuty()
    svc, store = service(tmp_path, "/dev/null", CollectorRegistry(), clock)
    channel = WebhookChannel("pd", pd.url, "pagerduty", secret="routing-key", retries=0)
    svc.channels, svc.order = {"pd": channel}, ["pd"]

    async def body() -> None:
        await svc.start()
        try:
            await svc.raise_incident("site:primary", "primary site down", "critical", group="site")
            await until(lambda: len(pd.events) == 1)
            await svc.handlers()["ack"](ROOT, {"id": 1})
            await until(lambda: any(e["event_action"] == "acknowledge" for e in pd.events))
            await svc.clear("site:primary")
            await until(lambda: any(e["event_action"] == "resolve" for e in pd.events))
            keys = {e["dedup_key"] for e in pd.events}
            assert len(keys) == 1  # one PagerDuty incident, triggered, acknowledged, resolved
        finally:
            await svc.stop()
            pd.server.shutdown()

    run(body)
    store.close()


def test_a_live_uncertain_send_goes_out_on_the_next_channel_and_again_marked(
    tmp_path: Path, emulator: ModemEmulator
) -> None:
    """The modem takes the PDU and says nothing (gammu #416): e-mail at once, and "(repeat)" by SMS."""
    clock = SimulatedClock(start=0, wall_offset=T0)
    svc, store = service(tmp_path, emulator.path, CollectorRegistry(), clock)
    email = NullChannel("email")
    svc.channels["email"] = email
    svc.order.append("email")

    async def body() -> None:
        await svc.start()
        try:
            emulator.silent_after_pdu = True
            await svc.raise_incident("site:primary", "primary site down", "critical", group="site")
            await until(lambda: len(email.sent) == 1, timeout=15)
            assert email.sent[0].contact.name == "Zhang Wei"
            await until(lambda: len(texts_to(emulator, ZHANG)) == 2, timeout=15)
            first, again = texts_to(emulator, ZHANG)
            assert again == "(repeat) " + first
            rows = {r["dedup"]: r["state"] for r in svc.outbox.rows()}
            assert rows["1:trigger:r0:s0:Zhang Wei"] == "sent"  # e-mail took it
            assert rows["1:trigger:r0:s0:Zhang Wei:repeat:sms"] == "sent"
            assert store.events(kind="paging.page_uncertain")
        finally:
            await svc.stop()

    run(body)
    store.close()


def test_a_page_held_for_the_night_is_shown_counted_and_critical_is_not_held(tmp_path: Path) -> None:
    clock = SimulatedClock(start=0, wall_offset=T0)  # 10:00 in Shanghai
    registry = CollectorRegistry()
    sms = NullChannel("sms")
    night = '\n[paging.night]\nstart = "09:00"\nend = "11:00"\ntimezone = "Asia/Shanghai"\n'
    svc, store = service(tmp_path, "/dev/null", registry, clock, extra=night)
    svc.channels, svc.order = {"sms": sms}, ["sms"]

    async def body() -> None:
        await svc.start()
        try:
            await svc.raise_incident("disk:a", "disk a full", "warning", group="disk")
            await svc.raise_incident("site:primary", "primary site down", "critical", group="site")
            await until(lambda: len(sms.sent) == 1)
            assert "primary site down" in sms.sent[0].text
            assert registry.get_sample_value("hotsite_paging_deferred_total", {"reason": "night"}) == 1
            listing = await svc.handlers()["incidents"](ROOT, {})
            (held,) = [i for i in listing["active"] if i["severity"] == "warning"]
            from appliance.paging.service import _hhmm

            assert held["pages"] == [
                {"contact": "Zhang Wei", "state": "held", "line": f"held until {_hhmm(T0 + 3600)} (night)"}
            ]
        finally:
            await svc.stop()

    run(body)
    store.close()
