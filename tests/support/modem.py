"""A GSM modem on a pseudo-terminal, speaking 3GPP TS 27.005 AT commands in PDU mode.

The driver under test opens ``emulator.path`` with pyserial like a real
``/dev/ttyUSB2``. A thread answers on the master side, with the faults real
modems have, each switchable from the test:

- ``prompt_delay`` (a slow ``>`` prompt), ``reply_delay`` (a slow ``+CMGS``);
- ``cms_errors`` (the next submissions fail with these ``+CMS ERROR`` codes);
- ``sim`` ("READY", "SIM PIN", "absent") and ``creg`` (1 home, 0 searching…);
- ``hang_on`` (stop answering at a command, until the port is closed and
  reopened: DTR drop resets it, back to echo on);
- ``silent_after_pdu`` (takes the PDU, sends it, then says nothing: gammu #416);
- ``inject_sms`` (store a GSM-7 or UCS2 text, announce it with ``+CMTI`` or
  not, or announce it in the middle of the next command's reply).

Everything the modem "sent" is in ``submitted`` as (monotonic time, PDU hex, length).

``on_step(step)`` is called from the emulator's thread at each point of a
submission, *before* the modem answers it: "command" (an ``AT+CMGS`` line
arrived), "prompt" (the ``>`` is about to be written), "pdu" (the PDU and
Ctrl-Z arrived; it is already in ``submitted``: it went out), "final" (the
``+CMGS`` answer is about to be written), "cms" (a ``+CMS ERROR`` is about to
be written). The chaos test SIGKILLs the daemon from there, at an exact phase.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import itertools
import os
import select
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.paging import pdu


@dataclass
class Submitted:
    at: float
    hex: str
    length: int
    reference: int


class ModemEmulator:
    def __init__(self, *, sim: str = "READY", pin: str | None = None, creg: int = 1, rssi: int = 20) -> None:
        self.sim = sim
        self.pin = pin
        self.creg = creg
        self.rssi = rssi
        self.prompt_delay = 0.0
        self.reply_delay = 0.0
        self.report_delay = 0.05
        self.cms_errors: list[int] = []
        self.hang_on: str | None = None
        self.silent_after_pdu = False
        self.on_step: Callable[[str], None] = lambda step: None
        self.hung = False
        self.echo = True
        self.cnmi = ""
        self.resets = 0
        self.commands: list[str] = []
        self.command_times: list[float] = []  # time.monotonic() when each command line was complete
        self.submitted: list[Submitted] = []
        self.storage: dict[int, tuple[int, str]] = {}  # index -> (stat, pdu)
        self._urc_mid: list[str] = []
        self._mr = 0
        self._mode = "command"
        self._pdu_length = 0
        self._line = b""
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        os.close(slave)  # the driver's close is then visible to us (EIO), like a DTR drop
        self._thread = threading.Thread(target=self._run, name="modem-emulator", daemon=True)

    # -- test controls -----------------------------------------------------------

    def start(self) -> ModemEmulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        os.close(self.master)

    def inject_sms(
        self,
        sender: str,
        text: str,
        *,
        ucs2: bool | None = None,
        notify: bool = True,
        mid_command: bool = False,
        concat: tuple[int, int, int] | None = None,
    ) -> int:
        hexpdu = pdu.encode_deliver(sender, text, ucs2=ucs2, concat=concat)
        return self.store_pdu(hexpdu, notify=notify, mid_command=mid_command)

    def store_pdu(self, hexpdu: str, *, notify: bool = True, mid_command: bool = False) -> int:
        with self._lock:
            index = next(i for i in itertools.count(1) if i not in self.storage)
            self.storage[index] = (0, hexpdu)
            urc = f'\r\n+CMTI: "SM",{index}\r\n'
            if mid_command:
                self._urc_mid.append(urc)
            elif notify:
                self._write(urc)
        return index

    def submitted_texts(self) -> list[tuple[str, str]]:
        """(recipient, text) of every submitted part, decoded with our decoder's peer, smspdudecoder."""
        return [read_submit(s.hex) for s in self.submitted]

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        closed = False
        while not self._stop.is_set():
            timeout = 0.02
            with self._lock:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, action = heapq.heappop(self._timers)
                    action()
                if self._timers:
                    timeout = min(timeout, max(0.0, self._timers[0][0] - now))
            try:
                readable, _, _ = select.select([self.master], [], [], timeout)
            except (OSError, ValueError):
                return
            if not readable:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: nobody has the port open
                if not closed:
                    closed = True
                    self._port_closed()
                time.sleep(0.01)
                continue
            closed = False
            with self._lock:
                self._feed(data)

    def _port_closed(self) -> None:
        with self._lock:
            if self.hung:
                self.resets += 1
            self.hung, self.echo, self._mode, self._line, self._timers = False, True, "command", b"", []

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), action))

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self.master, text.encode())

    def _feed(self, data: bytes) -> None:
        if self.hung:
            return
        if self.echo:
            self._write(data.decode("latin-1"))
        for byte in data:
            ch = bytes([byte])
            if self._mode == "pdu":
                if ch == b"\x1a":
                    self._mode = "command"
                    self._submit(self._line.decode().strip())
                    self._line = b""
                elif ch == b"\x1b":
                    self._mode, self._line = "command", b""
                    self._write("\r\nOK\r\n")
                elif ch not in b"\r\n":
                    self._line += ch
                continue
            if ch == b"\x1b":
                self._line = b""
            elif ch == b"\r":
                line, self._line = self._line.decode("latin-1").strip(), b""
                if line:
                    self._command(line)
            elif ch != b"\n":
                self._line += ch

    def _respond(self, *lines: str, final: str = "OK") -> None:
        body = "".join(f"\r\n{line}\r\n" for line in lines)
        if self._urc_mid:  # an unsolicited code lands between the reply and the final result
            body += "".join(self._urc_mid)
            self._urc_mid.clear()
        self._write(body + f"\r\n{final}\r\n")

    def _command(self, line: str) -> None:
        self.commands.append(line)
        self.command_times.append(time.monotonic())
        if self.hang_on is not None and line.upper().startswith(self.hang_on):
            self.hung, self.hang_on = True, None
            return
        cmd = line.upper()
        if cmd in ("AT", "AT+CMEE=1", "AT+CMGF=0") or cmd.startswith("AT+CNMI="):
            if cmd.startswith("AT+CNMI="):
                self.cnmi = cmd
            self._respond()
        elif cmd in ("ATE0", "ATE1"):
            self.echo = cmd == "ATE1"
            self._respond()
        elif cmd == "AT+CPIN?":
            if self.sim == "absent":
                self._respond(final="+CME ERROR: 10")
            else:
                self._respond(f"+CPIN: {self.sim}")
        elif cmd.startswith("AT+CPIN="):
            if self.pin is not None and line.split("=", 1)[1].strip('"') == self.pin:
                self.sim = "READY"
                self._respond()
            else:
                self._respond(final="+CME ERROR: 16")
        elif cmd == "AT+CREG?":
            self._respond(f"+CREG: 0,{self.creg}")
        elif cmd == "AT+CSQ":
            self._respond(f"+CSQ: {self.rssi},99")
        elif cmd.startswith("AT+CMGS="):
            if self.sim != "READY":
                self._respond(final="+CMS ERROR: 310")
                return
            self._pdu_length = int(cmd.split("=", 1)[1])
            self.on_step("command")

            def prompt() -> None:
                self.on_step("prompt")
                self._mode = "pdu"
                self._write("\r\n> ")

            self._later(self.prompt_delay, prompt) if self.prompt_delay else prompt()
        elif cmd == "AT+CMGL=4":
            lines = []
            for index, (stat, hexpdu) in sorted(self.storage.items()):
                lines += [f"+CMGL: {index},{stat},,{len(hexpdu) // 2 - 1 - int(hexpdu[:2], 16)}", hexpdu]
                self.storage[index] = (1 if stat == 0 else stat, hexpdu)
            self._respond(*lines)
        elif cmd.startswith("AT+CMGR="):
            index = int(cmd.split("=", 1)[1])
            if index not in self.storage:
                self._respond(final="+CMS ERROR: 321")
                return
            stat, hexpdu = self.storage[index]
            self.storage[index] = (1 if stat == 0 else stat, hexpdu)
            self._respond(f"+CMGR: {stat},,{len(hexpdu) // 2 - 1 - int(hexpdu[:2], 16)}", hexpdu)
        elif cmd.startswith("AT+CMGD="):
            self.storage.pop(int(cmd.split("=", 1)[1].split(",")[0]), None)
            self._respond()
        elif cmd == "AT+CFUN=1,1":
            self.echo = True
            self._respond()
        else:
            self._respond(final="ERROR")

    def _submit(self, hexpdu: str) -> None:
        try:
            data = bytes.fromhex(hexpdu)
            length_ok = len(data) - 1 - data[0] == self._pdu_length
        except ValueError:
            length_ok = False
        if not length_ok:
            self._respond(final="+CMS ERROR: 304")
            return
        if self.cms_errors:
            code = self.cms_errors.pop(0)

            def refuse() -> None:
                self.on_step("cms")
                self._respond(final=f"+CMS ERROR: {code}")

            self._later(self.reply_delay, refuse)
            return
        if self.creg not in (1, 5):
            self._later(self.reply_delay, lambda: self._respond(final="+CMS ERROR: 331"))
            return
        self._mr = (self._mr + 1) % 256
        mr = self._mr
        self.submitted.append(Submitted(time.monotonic(), hexpdu, self._pdu_length, mr))
        self.on_step("pdu")
        if self.silent_after_pdu:
            self.silent_after_pdu = False
            return

        def answer() -> None:
            self.on_step("final")
            self._respond(f"+CMGS: {mr}")

        self._later(self.reply_delay, answer)
        first = data[1 + data[0]]
        if first & 0x20 and self.cnmi.endswith(",1,0"):
            number_len = data[1 + data[0] + 2]
            raw = data[1 + data[0] + 4 : 1 + data[0] + 4 + (number_len + 1) // 2]
            digits = "".join(f"{b:02X}"[::-1] for b in raw).rstrip("F")
            report = pdu.encode_status_report(mr, "+" + digits, 0)

            def cds() -> None:
                self._write(f"\r\n+CDS: {len(report) // 2 - 1}\r\n{report}\r\n")

            self._later(self.reply_delay + self.report_delay, cds)


def read_submit(hexpdu: str) -> tuple[str, str]:
    """(recipient, text) of one SMS-SUBMIT as the network would deliver it: smspdudecoder's reading,
    with its text cut to the UDL (see :func:`gsm_text`)."""
    from smspdudecoder.easy import read_outgoing_sms
    from smspdudecoder.fields import SMSSubmit

    decoded = SMSSubmit.decode(io.StringIO(hexpdu))
    text = gsm_text(hexpdu, decoded) if decoded["dcs"]["encoding"] == "gsm" else decoded["user_data"]["data"]
    return read_outgoing_sms(hexpdu)["recipient"], text


def gsm_text(hexpdu: str, decoded: dict[str, Any]) -> str:
    """smspdudecoder's GSM-7 text cut to the PDU's UDL.

    smspdudecoder slices the decoded *characters* by the UDL in *septets*, so with extension
    characters (two septets each) the padding septet leaks out as a trailing character ('@', or
    the <CR> that 3GPP TS 23.038 puts in 7 spare bits). A handset reads exactly UDL septets: so
    does this (the UDL read straight from the PDU).
    """
    data = bytes.fromhex(hexpdu)
    pos = 1 + data[0] + 2  # SMSC field, first octet, message reference
    pos += 2 + (data[pos] + 1) // 2 + 3  # address, PID, DCS, validity
    udl = data[pos]
    header = decoded["user_data"]["header"]
    budget = udl - ((header["length"] + 1) * 8 + 6) // 7 if header else udl
    out = ""
    for ch in decoded["user_data"]["data"]:
        need = len(pdu.gsm7_septets(ch) or [])
        if need > budget:
            break
        out, budget = out + ch, budget - need
    return out
