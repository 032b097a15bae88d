"""SIGKILL the real daemon (``hotsite run``) at each phase of an SMS send and restart it.

The promise under test (``appliance/paging/PAGING.md``): every page is delivered at
least once on some channel; a duplicate SMS happens only for a page that was
*uncertain* (its PDU reached the modem without a final answer) and carries the
``(repeat)`` marker; the outbox, ``hotsite incidents``, the audit log and the metrics
agree about what happened.

Parts: the real daemon as a subprocess, its real state DB, a real SMTP server
(aiosmtpd) for the e-mail channel, and the pty modem emulator, which kills the
daemon from its own thread at the exact point of the exchange (``on_step``). An
incident with ``PAGES`` contacts in one escalation step puts that many pages in
flight at once; it is raised through the Alertmanager receiver, with its token.

Each case runs ``HOTSITE_CHAOS_RUNS`` times (default 2).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, metrics, wait_for
from tests.support.modem import ModemEmulator

RUNS = int(os.environ.get("HOTSITE_CHAOS_RUNS", "2"))
PHONES = [f"+86138001380{n:02d}" for n in range(6)]
TOKEN = "chaos-token-0123456789"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []  # (to, body)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        body = message_from_bytes(envelope.content).get_payload(decode=True)
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
        for to in envelope.rcpt_tos:
            self.messages.append((to, text))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[int, Inbox]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, inbox
    controller.stop()


def chaos_config(base: str, tmp: Path, device: str, smtp_port: int, pages: int) -> tuple[Path, str]:
    token = tmp / "am.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    listen = f"127.0.0.1:{free_port()}"
    contacts = "".join(
        f'\n[[contacts]]\nname = "c{n}"\nphone = "{PHONES[n]}"\nemail = "c{n}@example.com"\n'
        for n in range(6)
    )
    targets = ", ".join(f'"c{n}"' for n in range(pages))
    text = (
        base
        + contacts
        + '\n[[contacts]]\nname = "sink"\nemail = "sink@example.com"\n'
        + f"""
[channels.sms]
type = "gsm"
device = "{device}"
send_timeout_s = 60
prompt_timeout_s = 60
retries = 1
poll_s = 30
health_s = 600

[channels.mail]
type = "smtp"
host = "127.0.0.1"
port = {smtp_port}
starttls = false
from_addr = "hotsite@example.com"

[paging]
channels = ["sms", "mail"]
rate_limit_per_hour = 1000
retry_backoff_s = 1
default_policy = "quiet"
alertmanager_listen = "{listen}"
alertmanager_token_file = "{token}"

[paging.severity_policies]
warning = "chaos"

[paging.policies.quiet]
repeat = 0
[[paging.policies.quiet.steps]]
targets = ["sink"]
channels = ["mail"]
escalate_after_s = 3600

[paging.policies.chaos]
repeat = 0
[[paging.policies.chaos.steps]]
targets = [{targets}]
escalate_after_s = 3600
"""
    )
    path = tmp / "hotsite.toml"
    path.write_text(text)
    return path, listen


def alert(listen: str, name: str) -> None:
    body = {
        "version": "4",
        "groupKey": name,
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": name, "severity": "warning"},
                "annotations": {"summary": f"chaos {name}"},
                "fingerprint": name,
            }
        ],
    }
    response = httpx.post(
        f"http://{listen}/alertmanager", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert response.status_code == 200, response.text


@dataclass
class Phase:
    """How to bring the modem to a phase, and at which emulator step (plus delay) to kill."""

    name: str
    step: str
    delay_s: float = 0.0
    setup: Callable[[ModemEmulator], None] = lambda emu: None
    uncertain: bool = False  # does the first page's PDU reach the modem before the kill?


def _slow_prompt(emu: ModemEmulator) -> None:
    emu.prompt_delay = 30.0


def _slow_answer(emu: ModemEmulator) -> None:
    emu.reply_delay = 30.0


def _one_error(emu: ModemEmulator) -> None:
    emu.cms_errors = [331]  # no network service: retried after a back-off


PHASES = [
    Phase("claimed-queued", "command"),  # first AT+CMGS arriving; the others claimed or queued
    Phase("waiting-for-prompt", "command", 0.5, _slow_prompt),
    Phase("pdu-written", "pdu", uncertain=True),
    Phase("waiting-for-final", "pdu", 0.5, _slow_answer, uncertain=True),
    Phase("retry-backoff", "cms", 0.5, _one_error),
]


def _outbox(state: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{state / 'hotsite.db'}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM paging_outbox ORDER BY id")]


def _sms_by_number(emu: ModemEmulator, marker: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for to, text in emu.submitted_texts():
        if marker in text:
            out.setdefault(to, []).append(text)
    return out


@pytest.mark.parametrize("pages", [1, 2, 6])
@pytest.mark.parametrize("phase", PHASES, ids=lambda p: p.name)
@pytest.mark.parametrize("run", range(RUNS))
def test_sigkill_in_each_send_phase(
    phase: Phase,
    pages: int,
    run: int,
    tmp_path: Path,
    minimal_config_text: str,
    smtp: tuple[int, Inbox],
) -> None:
    smtp_port, inbox = smtp
    emu = ModemEmulator().start()
    cfg, listen = chaos_config(minimal_config_text, tmp_path, emu.path, smtp_port, pages)
    state = tmp_path / "state"
    first = RunningDaemon(cfg, tmp_path / "first.log")
    second: RunningDaemon | None = None
    killed = threading.Event()

    def kill() -> None:
        if not killed.is_set():
            killed.set()
            os.kill(first.proc.pid, signal.SIGKILL)

    def on_step(step: str) -> None:
        if step == phase.step and not killed.is_set():
            if phase.delay_s:
                threading.Timer(phase.delay_s, kill).start()
            else:
                kill()

    try:
        first.wait_ready(timeout=30)
        phase.setup(emu)
        emu.on_step = on_step
        name = f"chaos{run}{phase.name}{pages}".replace("-", "")
        alert(listen, name)
        wait_for(
            lambda: first.proc.poll() is not None, timeout=30, what="the kill", on_fail=first.log.read_text
        )
        first.stop()
        emu.on_step = lambda step: None
        emu.prompt_delay = emu.reply_delay = 0.0
        at_kill = _outbox(state)
        second = RunningDaemon(cfg, tmp_path / "second.log")
        second.wait_ready(timeout=30)
        marker = f"chaos {name}"

        def settled() -> bool:
            rows = [r for r in _outbox(state) if marker in r["text"]]
            return len(rows) >= pages and all(r["state"] in ("sent", "uncertain") for r in rows)

        wait_for(settled, timeout=60, what="every page settled", on_fail=lambda: json.dumps(_outbox(state)))
        rows = [r for r in _outbox(state) if marker in r["text"]]
        originals = [r for r in rows if r.get("repeat_of") is None]
        assert sorted(r["contact"] for r in originals) == [f"c{n}" for n in range(pages)]
        sms = _sms_by_number(emu, marker)
        mail = [to for to, body in inbox.messages if marker in body]
        uncertain = {r["contact"] for r in originals if r["state"] == "uncertain"}
        for n in range(pages):
            texts = sms.get(PHONES[n], [])
            # 1. At least once, on some channel.
            assert texts or f"c{n}@example.com" in mail, f"c{n} never got the page"
            # 2. A duplicate SMS only for an uncertain page, and marked.
            plain = [t for t in texts if not t.startswith("(repeat)")]
            assert len(plain) <= 1, f"c{n} got the page twice unmarked: {texts}"
            if len(texts) > 1:
                assert f"c{n}" in uncertain, f"c{n} got a repeat of a page that was not uncertain"
        # Only the page whose PDU reached the modem before the kill may be uncertain.
        assert len(uncertain) == (1 if phase.uncertain else 0), (phase.name, uncertain)
        for who in uncertain:  # ... and it was sent again at once: e-mail and a marked SMS
            assert f"{who}@example.com" in mail
            n = int(who[1:])
            assert any(t.startswith("(repeat)") for t in sms.get(PHONES[n], []))
        # 3. The outbox, the audit log, the metrics and `hotsite incidents` agree.
        sending = [r["id"] for r in at_kill if r["state"] == "sending"]
        events = json.loads(hotsite("events", "--json", "--kind", "paging.recovered", config=cfg).stdout)
        assert len(events) == 1, events
        data = events[0]["data"]
        assert sorted(data["resent"] + data["uncertain"] + data["sent"]) == sorted(sending)
        ours = {r["id"] for r in originals}
        assert set(data["uncertain"]) & ours == {r["id"] for r in originals if r["state"] == "uncertain"}
        text = metrics(_listen(cfg))
        for outcome in ("resent", "uncertain", "sent"):
            found = re.search(rf'^hotsite_paging_recovered_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
            value = float(found.group(1)) if found else 0.0
            assert value == len(data[outcome]), (outcome, found)
        listing = json.loads(hotsite("incidents", "--json", config=cfg).stdout)
        (incident,) = [i for i in listing["active"] if marker in i["summary"]]
        assert {p["contact"]: p["state"] for p in incident["pages"]} == {
            f"c{n}": "sent" for n in range(pages)
        }
        assert "Traceback" not in second.log.read_text()
    finally:
        emu.on_step = lambda step: None
        if second is not None:
            second.stop()
        if first.proc.poll() is None:
            first.stop()
        emu.stop()


def _listen(cfg: Path) -> str:
    import tomllib

    return str(tomllib.loads(cfg.read_text())["metrics"]["listen"])
