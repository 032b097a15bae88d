"""A GSM modem on a serial port: 3GPP TS 27.005 AT commands in PDU mode, and the SMS channel on top.

Why it is built this way (each a lesson from gammu and smstools):

- **One command at a time.** An asyncio lock serialises every exchange, so a
  poll, a health check and a page never interleave on the wire.
- **Unsolicited codes can arrive at any moment**, also in the middle of a
  command's reply (``+CMTI``, ``+CDS``, Huawei's ``^RSSI``). The reader files
  them apart from the command's reply lines, by prefix.
- **Modems drop unsolicited codes**: stored messages are also polled with
  ``AT+CMGL=4``, and deleted only after they were processed.
- **Generous timeouts**: ``AT+CMGS`` may take tens of seconds on a real
  network. If the ``>`` prompt never comes, ESC aborts and nothing was sent;
  if the PDU was written and the reply is odd or missing, the text may have
  gone out: it is reported *uncertain* (gammu #416) and the outbox resends
  it on the next channel and, marked "(repeat)", by SMS (``PAGING.md``).
- **A hung modem is reset**: the port is closed (dropping DTR) and reopened,
  then initialised again.

Serial reads are non-blocking (``loop.add_reader`` on the port's descriptor);
writes go through a worker thread, so a stuck port never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serial

from appliance.errors import HotsiteError
from appliance.logs import kv
from appliance.paging import pdu
from appliance.paging.channel import Channel, Delivery, Message
from appliance.paging.oncall import Contact

log = logging.getLogger(f"hotsite.{__name__}")

CTRL_Z, ESC = "\x1a", "\x1b"
FINAL_OK = ("OK",)
URC_PREFIXES = ("+CMTI:", "+CDSI:", "+CDS:", "+CMT:", "RING", "+CREG:", "^", "+CUSD:", "+CBM:")

# +CMS ERROR codes (27.005 3.2.5 and 24.011 annex E) worth a readable name.
CMS_ERRORS: dict[int, str] = {
    1: "unassigned number",
    8: "operator determined barring",
    10: "call barred",
    21: "short message transfer rejected",
    27: "destination out of service",
    28: "unidentified subscriber",
    29: "facility rejected",
    30: "unknown subscriber",
    38: "network out of order",
    41: "temporary failure",
    42: "congestion",
    47: "resources unavailable",
    300: "ME failure",
    302: "operation not allowed",
    304: "invalid PDU mode parameter",
    310: "SIM not inserted",
    311: "SIM PIN required",
    312: "PH-SIM PIN required",
    313: "SIM failure",
    314: "SIM busy",
    315: "SIM wrong",
    316: "SIM PUK required",
    321: "invalid memory index",
    322: "SIM memory full",
    330: "SMSC address unknown",
    331: "no network service",
    332: "network timeout",
    340: "no +CNMA acknowledgement expected",
    500: "unknown error",
    512: "weak signal (vendor)",
    513: "network timeout (vendor)",
    514: "network congestion (vendor)",
}
# Errors that retrying the same message will never fix.
CMS_PERMANENT = {1, 8, 10, 21, 27, 28, 29, 30, 96, 304, 305}
CME_ERRORS = {
    10: "SIM not inserted",
    11: "SIM PIN required",
    12: "SIM PUK required",
    13: "SIM failure",
    14: "SIM busy",
    15: "SIM wrong",
    30: "no network service",
    100: "unknown",
}


class ModemError(HotsiteError):
    """The modem answered with an error, or cannot be used (no SIM, no port)."""

    def __init__(self, message: str, *, cms: int | None = None, cme: int | None = None) -> None:
        super().__init__(message)
        self.cms = cms
        self.cme = cme

    @property
    def permanent(self) -> bool:
        return self.cms in CMS_PERMANENT


class ModemTimeout(ModemError):
    """No final result in time. ``maybe_sent``: the PDU had been written, it may have gone out."""

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


def describe_cms(code: int) -> str:
    return f"+CMS ERROR {code} ({CMS_ERRORS.get(code, 'unknown code')})"


@dataclass(frozen=True, slots=True)
class ModemHealth:
    sim: str  # READY, SIM PIN, absent, …
    registration: int | None  # +CREG stat: 1 home, 5 roaming, 0/2 searching, 3 denied
    rssi: int | None  # +CSQ raw 0-31, 99 unknown
    operator: str = ""

    @property
    def registered(self) -> bool:
        return self.registration in (1, 5)

    @property
    def signal_dbm(self) -> float | None:
        return None if self.rssi is None or self.rssi == 99 else -113.0 + 2 * self.rssi

    def to_json(self) -> dict[str, Any]:
        return {
            "sim": self.sim,
            "registration": self.registration,
            "registered": self.registered,
            "rssi": self.rssi,
            "signal_dbm": self.signal_dbm,
        }


# ---------------------------------------------------------------------------
# The wire


class AtPort:
    """Line-oriented, one-command-at-a-time access to a serial port speaking AT commands.

    Contract: :meth:`command` returns the reply lines (without echo and final
    ``OK``) or raises :class:`ModemError` (an ``ERROR``/``+CMS``/``+CME`` final
    result) or :class:`ModemTimeout`; it never leaves a half-read reply for the
    next command. ``on_urc(line, pdu)`` is called from the event loop for every
    unsolicited line; it must not block.
    """

    def __init__(
        self,
        device: str | Path,
        baud: int = 115200,
        on_urc: Callable[[str, str | None], None] = lambda line, data: None,
    ) -> None:
        self.device = str(device)
        self.baud = baud
        self.on_urc = on_urc
        self._serial: serial.Serial | None = None
        self._lock = asyncio.Lock()
        self._buffer = b""
        self._reply: list[str] = []
        self._final: asyncio.Future[str] | None = None
        self._prompt: asyncio.Event | None = None
        self._expect = ""
        self._echo = ""
        self._pending_cds = False
        self.broken: str | None = None

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    async def open(self) -> None:
        try:
            ser = await asyncio.to_thread(
                serial.Serial, self.device, self.baud, timeout=0, write_timeout=5, rtscts=False
            )
        except (serial.SerialException, OSError) as exc:
            raise ModemError(f"cannot open modem {self.device}: {exc}") from None
        self._serial, self._buffer, self.broken = ser, b"", None
        asyncio.get_running_loop().add_reader(ser.fileno(), self._readable)

    def close(self) -> None:
        ser, self._serial = self._serial, None
        if ser is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(ser.fileno())
        with contextlib.suppress(Exception):
            ser.close()  # drops DTR: many modems reset on that (AT&D3)
        if self._final is not None and not self._final.done():
            self._final.set_exception(ModemTimeout("port closed during a command"))

    def _readable(self) -> None:
        assert self._serial is not None
        try:
            data = os.read(self._serial.fileno(), 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            self.broken = f"read error: {exc.strerror}"
        if not data:
            self.broken = self.broken or "end of file on the port"
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._serial.fileno())
            return
        self._buffer += data
        self._parse()

    def _parse(self) -> None:
        while True:
            stripped = self._buffer.lstrip(b"\r\n")
            if self._prompt is not None and stripped.startswith(b">"):
                self._buffer = stripped[1:].lstrip(b" ")
                self._prompt.set()
                continue
            match = re.search(rb"\r\n|\r|\n", self._buffer)
            if match is None:
                return
            line = self._buffer[: match.start()].decode("ascii", errors="replace").strip()
            self._buffer = self._buffer[match.end() :]
            if line:
                self._line(line)

    def _line(self, line: str) -> None:
        if self._pending_cds:
            self._pending_cds = False
            self.on_urc("+CDS:", line)
            return
        active = self._final is not None and not self._final.done()
        if line.startswith(URC_PREFIXES) and not (active and self._expect and line.startswith(self._expect)):
            if line.startswith("+CDS:"):
                self._pending_cds = True  # the PDU follows on the next line
            else:
                self.on_urc(line, None)
            return
        if not active:
            log.debug("modem line outside a command ignored", extra=kv(line=line[:80]))
            return
        assert self._final is not None
        if line == self._echo or line.startswith(">"):
            return
        if line == "OK" or line == "ERROR" or line.startswith(("+CMS ERROR:", "+CME ERROR:")):
            self._final.set_result(line)
        else:
            self._reply.append(line)

    async def write(self, data: str) -> None:
        ser = self._serial
        if ser is None:
            raise ModemError("modem port is not open")
        try:
            await asyncio.to_thread(ser.write, data.encode("ascii"))
        except (serial.SerialException, OSError) as exc:
            self.broken = f"write error: {exc}"
            raise ModemTimeout(f"cannot write to the modem: {exc}") from None

    async def command(
        self,
        command: str,
        *,
        timeout: float = 5.0,
        data: str | None = None,
        prompt_timeout: float = 10.0,
        on_phase: Callable[[str], None] = lambda phase: None,
    ) -> list[str]:
        """Run one command. ``on_phase`` is told "command", "prompt" and "pdu" *before* each
        step happens (so a crash right after the step finds it recorded)."""
        async with self._lock:
            if self._serial is None:
                raise ModemError("modem port is not open")
            if self.broken:
                raise ModemTimeout(f"modem port broken: {self.broken}")
            loop = asyncio.get_running_loop()
            self._reply, self._final = [], loop.create_future()
            self._echo = command
            self._expect = command[2:].split("=")[0].split("?")[0] + ":" if command.startswith("AT+") else ""
            self._prompt = asyncio.Event() if data is not None else None
            try:
                if data is not None:
                    on_phase("command")
                await self.write(command + "\r")
                written = False
                if data is not None:
                    assert self._prompt is not None
                    try:
                        async with asyncio.timeout(prompt_timeout):
                            await self._prompt.wait()
                    except TimeoutError:
                        await self.write(ESC)
                        with contextlib.suppress(TimeoutError, ModemError):
                            async with asyncio.timeout(min(2.0, prompt_timeout)):
                                await asyncio.shield(self._final)
                        raise ModemTimeout(
                            f"no '>' prompt within {prompt_timeout:g} s; aborted with ESC"
                        ) from None
                    on_phase("prompt")
                    self._echo = data
                    on_phase("pdu")
                    await self.write(data + CTRL_Z)
                    written = True
                try:
                    async with asyncio.timeout(timeout):
                        final = await asyncio.shield(self._final)
                except TimeoutError:
                    raise ModemTimeout(
                        f"no final result to {command.split('=')[0]} within {timeout:g} s", maybe_sent=written
                    ) from None
                except ModemTimeout as exc:
                    raise ModemTimeout(exc.message, maybe_sent=written) from None
                reply = list(self._reply)
            finally:
                self._final, self._prompt, self._expect, self._echo = None, None, "", ""
        if final == "OK":
            return reply
        if final.startswith("+CMS ERROR:"):
            code = _int(final.split(":", 1)[1])
            raise ModemError(describe_cms(code or 0), cms=code)
        if final.startswith("+CME ERROR:"):
            code = _int(final.split(":", 1)[1])
            raise ModemError(f"+CME ERROR {code} ({CME_ERRORS.get(code or 0, 'see 27.007 9.2')})", cme=code)
        raise ModemError(f"{command.split('=')[0]}: ERROR")


def _int(text: str) -> int | None:
    try:
        return int(text.strip().strip('"'))
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# The modem


@dataclass
class StoredMessage:
    index: int
    status: int
    pdu: str


class Modem:
    """Initialisation, health, sending and reading SMS on top of an :class:`AtPort`."""

    def __init__(
        self,
        port: AtPort,
        *,
        pin: str | None = None,
        send_timeout_s: float = 60.0,
        prompt_timeout_s: float = 10.0,
        command_timeout_s: float = 5.0,
        status_reports: bool = True,
    ) -> None:
        self.port = port
        self.pin = pin
        self.send_timeout_s = send_timeout_s
        self.prompt_timeout_s = prompt_timeout_s
        self.command_timeout_s = command_timeout_s
        self.status_reports = status_reports

    async def at(self, command: str, timeout: float | None = None) -> list[str]:
        return await self.port.command(command, timeout=timeout or self.command_timeout_s)

    async def init(self) -> None:
        """Wake the modem, switch echo off, numeric errors, PIN, PDU mode, new-message indications."""
        if not self.port.is_open:
            await self.port.open()
        await self.port.write(ESC)  # abort a half-entered PDU left by a previous life
        for attempt in range(3):
            try:
                await self.at("AT", timeout=2.0)
                break
            except ModemTimeout:
                if attempt == 2:
                    raise
            except ModemError:
                pass
        await self.at("ATE0")
        await self.at("AT+CMEE=1")
        sim = await self.sim_state()
        if sim == "SIM PIN" and self.pin:
            await self.at(f'AT+CPIN="{self.pin}"', timeout=10.0)
            sim = await self.sim_state()
        if sim != "READY":
            raise ModemError(f"SIM not ready: {sim}")
        await self.at("AT+CMGF=0")
        try:
            await self.at(f"AT+CNMI=2,1,0,{1 if self.status_reports else 0},0")
        except ModemError:
            await self.at("AT+CNMI=2,1,0,0,0")  # no status reports on this modem

    async def sim_state(self) -> str:
        try:
            lines = await self.at("AT+CPIN?", timeout=10.0)
        except ModemError as exc:
            if exc.cme is not None and exc.cme in CME_ERRORS:
                return CME_ERRORS[exc.cme]
            raise
        for line in lines:
            if line.startswith("+CPIN:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    async def health(self) -> ModemHealth:
        sim = await self.sim_state()
        stat: int | None = None
        for line in await self.at("AT+CREG?"):
            if line.startswith("+CREG:"):
                fields = line.split(":", 1)[1].split(",")
                stat = _int(fields[1] if len(fields) > 1 else fields[0])
        rssi: int | None = None
        for line in await self.at("AT+CSQ"):
            if line.startswith("+CSQ:"):
                rssi = _int(line.split(":", 1)[1].split(",")[0])
        return ModemHealth(sim, stat, rssi)

    async def send(self, part: pdu.SubmitPdu, on_phase: Callable[[str], None] = lambda phase: None) -> int:
        """Send one PDU; return the message reference (``+CMGS: <mr>``)."""
        lines = await self.port.command(
            f"AT+CMGS={part.tpdu_length}",
            data=part.hex,
            timeout=self.send_timeout_s,
            prompt_timeout=self.prompt_timeout_s,
            on_phase=on_phase,
        )
        for line in lines:
            if line.startswith("+CMGS:"):
                ref = _int(line.split(":", 1)[1].split(",")[0])
                if ref is not None:
                    return ref
        raise ModemTimeout(f"AT+CMGS answered OK without +CMGS: {lines!r}", maybe_sent=True)

    async def list_stored(self) -> list[StoredMessage]:
        """All stored messages (``AT+CMGL=4``): read, unread, sent and unsent."""
        lines = await self.at("AT+CMGL=4", timeout=30.0)
        out: list[StoredMessage] = []
        for header, body in zip(lines, lines[1:], strict=False):
            if header.startswith("+CMGL:"):
                fields = header.split(":", 1)[1].split(",")
                index, status = _int(fields[0]), _int(fields[1]) if len(fields) > 1 else 0
                if index is not None:
                    out.append(StoredMessage(index, status or 0, body))
        return out

    async def read(self, index: int) -> StoredMessage | None:
        try:
            lines = await self.at(f"AT+CMGR={index}", timeout=10.0)
        except ModemError as exc:
            if exc.cms == 321:
                return None  # empty slot: already handled by a poll
            raise
        for header, body in zip(lines, lines[1:], strict=False):
            if header.startswith("+CMGR:"):
                return StoredMessage(index, _int(header.split(":", 1)[1].split(",")[0]) or 0, body)
        return None

    async def delete(self, index: int) -> None:
        await self.at(f"AT+CMGD={index}", timeout=10.0)


# ---------------------------------------------------------------------------
# The SMS channel


@dataclass(frozen=True, slots=True)
class Inbound:
    sender: str
    text: str
    channel: str


@dataclass
class _Partial:
    parts: dict[int, str] = field(default_factory=dict)
    total: int = 0
    first_seen: float = 0.0


class GsmChannel(Channel):
    """SMS through a modem: pages out, acknowledgements and STATUS requests in.

    ``on_text(Inbound)`` gets every received text (the service decides whether
    the sender is known); ``on_report(reference, status_report)`` every delivery
    report; ``on_health(health | None)`` every health check (None: modem down);
    ``on_event(kind)`` counts errors, resets and inbound messages for metrics.
    """

    kind = "gsm"
    reports_phases = True
    exclusive = True

    def __init__(
        self,
        name: str,
        device: str | Path,
        *,
        baud: int = 115200,
        pin: str | None = None,
        smsc: str | None = None,
        send_timeout_s: float = 60.0,
        prompt_timeout_s: float = 10.0,
        command_timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 2.0,
        poll_s: float = 30.0,
        health_s: float = 60.0,
        status_reports: bool = True,
        on_text: Callable[[Inbound], Awaitable[None]] | None = None,
        on_report: Callable[[int, pdu.StatusReport], Awaitable[None]] | None = None,
        on_health: Callable[[ModemHealth | None], None] = lambda h: None,
        on_event: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self.name = name
        self.smsc = smsc
        self.send_timeout_s = send_timeout_s + prompt_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.poll_s = poll_s
        self.health_s = health_s
        self.status_reports = status_reports
        self.on_text = on_text
        self.on_report = on_report
        self.on_health = on_health
        self.on_event = on_event
        self.port = AtPort(device, baud, on_urc=self._urc)
        self.modem = Modem(
            self.port,
            pin=pin,
            send_timeout_s=send_timeout_s,
            prompt_timeout_s=prompt_timeout_s,
            command_timeout_s=command_timeout_s,
            status_reports=status_reports,
        )
        self.up = False
        self.last_error = ""
        self.last_health: ModemHealth | None = None
        self._ready = asyncio.Lock()  # one (re)initialisation at a time
        self._work: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._reference = 0
        self._partials: dict[tuple[str, int], _Partial] = {}

    def can_reach(self, contact: Contact) -> bool:
        return contact.phone is not None

    # -- life ------------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(ModemError):
            await self._ensure_up()
        self._task = asyncio.create_task(self._run(), name=f"modem:{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.port.close()
        self.up = False

    def health(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "up": self.up,
            "error": self.last_error,
            **(self.last_health.to_json() if self.last_health else {}),
        }

    async def _ensure_up(self) -> None:
        async with self._ready:
            if self.up and not self.port.broken:
                return
            await self._reinit("initialise")

    async def _reinit(self, why: str) -> None:
        self.up = False
        if self.port.is_open:
            self.on_event("reset")
            log.warning("resetting the modem", extra=kv(channel=self.name, why=why))
            self.port.close()
            await asyncio.sleep(0.2)
        try:
            await self.modem.init()
        except ModemError as exc:
            self.last_error = exc.message
            self.on_health(None)
            self.port.close()
            log.error("modem not usable", extra=kv(channel=self.name, error=exc.message))
            raise
        self.up, self.last_error = True, ""
        log.info("modem ready", extra=kv(channel=self.name))

    async def reset(self, why: str) -> None:
        async with self._ready:
            with contextlib.suppress(ModemError):
                await self._reinit(why)

    # -- sending ---------------------------------------------------------------

    async def send(self, message: Message) -> Delivery:
        if message.contact.phone is None:
            return Delivery("failed", f"{message.contact.name} has no phone number", retryable=False)
        try:
            await self._ensure_up()
        except ModemError as exc:
            return Delivery("failed", f"modem not usable: {exc.message}")
        self._reference = (self._reference + 1) % 256
        try:
            parts = pdu.encode_submit(
                message.contact.phone,
                message.text,
                reference=self._reference,
                status_report=self.status_reports,
                smsc=self.smsc,
            )
        except pdu.PduError as exc:
            return Delivery("failed", f"cannot encode: {exc.message}", retryable=False)
        references: list[str] = []
        for index, part in enumerate(parts):

            def phase(name: str, index: int = index) -> None:
                message.report(self.name, name, index, len(parts))

            delivery = await self._send_part(part, phase)
            if delivery.result != "sent":
                if references:  # earlier parts went out: resending would duplicate them
                    return Delivery(
                        "uncertain",
                        f"parts 1-{len(references)} of {len(parts)} sent, then {delivery.detail}",
                        reference=",".join(references),
                    )
                return delivery
            references.append(delivery.reference or "")
        return Delivery("sent", f"+CMGS {','.join(references)}", reference=",".join(references))

    async def _send_part(
        self, part: pdu.SubmitPdu, phase: Callable[[str], None] = lambda name: None
    ) -> Delivery:
        """One part, retried on errors that may pass; ``phase`` is told each step (PAGING.md)."""
        last = "not tried"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    await self._ensure_up()
                except ModemError as exc:
                    last = f"modem not usable: {exc.message}"
                    continue
            try:
                mr = await self.modem.send(part, phase)
                phase("answered")
                self.on_event("sent_part")
                if attempt:
                    log.warning(
                        "SMS part went out after errors",
                        extra=kv(channel=self.name, attempts=attempt + 1, errors=last),
                    )
                return Delivery("sent", reference=str(mr))
            except ModemTimeout as exc:
                self.on_event("timeout")
                if exc.maybe_sent:
                    # The PDU reached the modem: not retried here (gammu #416); the outbox
                    # sends it on the next channel and marks an SMS resend "(repeat)".
                    await self.reset(f"odd reply after the PDU: {exc.message}")
                    return Delivery("uncertain", exc.message)
                phase("error")  # no PDU was written: certainly not sent
                last = exc.message
                await self.reset(exc.message)
            except ModemError as exc:
                phase("error")
                self.on_event("cms_error" if exc.cms is not None else "error")
                log.warning(
                    "the modem refused an SMS part",
                    extra=kv(
                        channel=self.name, attempt=attempt + 1, error=exc.message, permanent=exc.permanent
                    ),
                )
                last = exc.message
                if exc.permanent:
                    return Delivery("failed", exc.message, retryable=False)
        return Delivery("failed", f"{last} (after {self.retries + 1} attempts)")

    # -- receiving ---------------------------------------------------------------

    def _urc(self, line: str, data: str | None) -> None:
        """Called by the port for unsolicited lines: queue work, never block."""
        if line.startswith(("+CMTI:", "+CDSI:")):
            index = _int(line.rsplit(",", 1)[-1])
            if index is not None:
                self._work.put_nowait(("read", index))
        elif line.startswith("+CDS:") and data is not None:
            self._work.put_nowait(("report", data))
        else:
            log.debug("unsolicited modem line", extra=kv(channel=self.name, line=line[:80]))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.poll_s
        next_health = loop.time()
        while True:
            timeout = max(0.0, min(next_poll, next_health) - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    kind, value = await self._work.get()
            except TimeoutError:
                kind, value = "", None
            try:
                if not self.up or self.port.broken:
                    await self._ensure_up()
                if kind == "read":
                    stored = await self.modem.read(value)
                    if stored is not None:
                        await self._process(stored)
                elif kind == "report":
                    await self._report(value)
                if loop.time() >= next_poll:
                    next_poll = loop.time() + self.poll_s
                    await self.poll()
                if loop.time() >= next_health:
                    next_health = loop.time() + self.health_s
                    self.last_health = await self.modem.health()
                    self.on_health(self.last_health)
            except ModemTimeout as exc:
                self.on_event("timeout")
                await self.reset(exc.message)
            except ModemError as exc:
                self.last_error = exc.message
                if not self.up:
                    self.on_health(None)
                log.warning("modem background work failed", extra=kv(channel=self.name, error=exc.message))
                await asyncio.sleep(min(self.poll_s, 5.0))
            except Exception:
                log.exception("modem background work crashed; continuing", extra=kv(channel=self.name))
                await asyncio.sleep(1.0)

    async def poll(self) -> int:
        """Read and delete every stored message (modems drop ``+CMTI``). Returns how many."""
        stored = await self.modem.list_stored()
        for message in stored:
            await self._process(message)
        return len(stored)

    async def _process(self, stored: StoredMessage) -> None:
        try:
            first = bytes.fromhex(stored.pdu[: 2 + 2 * int(stored.pdu[:2], 16) + 2])[-1]
            if first & 0x03 == 0x02:
                await self._report(stored.pdu)
            else:
                await self._inbound(pdu.decode_deliver(stored.pdu))
        except (pdu.PduError, ValueError) as exc:
            self.on_event("bad_pdu")
            log.warning(
                "unreadable stored message deleted",
                extra=kv(channel=self.name, index=stored.index, error=str(exc), pdu=stored.pdu[:80]),
            )
        except Exception:
            log.exception("handling a received text failed", extra=kv(channel=self.name, index=stored.index))
        # Delete after processing (even an unreadable one: it must not block the queue, gammu #462).
        await self.modem.delete(stored.index)

    async def _inbound(self, message: pdu.Deliver) -> None:
        text = message.text
        if message.concat is not None:
            ref, total, seq = message.concat
            loop = asyncio.get_running_loop()
            partial = self._partials.setdefault(
                (message.sender, ref), _Partial(total=total, first_seen=loop.time())
            )
            partial.parts[seq] = text
            for key, old in list(self._partials.items()):
                if loop.time() - old.first_seen > 600:
                    del self._partials[key]  # a part that never came: drop the rest after 10 min
            if len(partial.parts) < partial.total:
                return
            del self._partials[(message.sender, ref)]
            text = "".join(partial.parts[i] for i in sorted(partial.parts))
        self.on_event("inbound")
        if self.on_text is not None:
            await self.on_text(Inbound(message.sender, text, self.name))

    async def _report(self, pdu_hex: str) -> None:
        try:
            report = pdu.decode_status_report(pdu_hex)
        except pdu.PduError as exc:
            log.warning("unreadable delivery report", extra=kv(channel=self.name, error=exc.message))
            return
        self.on_event("report")
        if self.on_report is not None:
            await self.on_report(report.reference, report)
