"""The demo's GSM modem, seen from outside its process: a reply by SMS, and the SMS log.

``make demo`` runs the modem emulator (``tests/support/modem.py``: the one emulated device) on a
pseudo-terminal in a process of its own (``python -m tests.support.modem_server WORKDIR``); the
daemon opens the pty like a real ``/dev/ttyUSB2``. This module is the small protocol around it,
so the CLI need not import test code:

* ``WORKDIR/modem.device``: the pty's path, written once the emulator answers;
* ``WORKDIR/modem.sock``: one JSON line in (``{"from": NUMBER, "text": TEXT}``: a text a phone
  sent to the modem), one JSON line out (``{"ok": true}`` or ``{"ok": false, "error": ...}``);
* ``WORKDIR/sms.log``: one line per text out (a page) or in (a reply), for the live view.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

DEVICE = "modem.device"
SOCKET = "modem.sock"
LOG = "sms.log"
FILES = (DEVICE, SOCKET, LOG)


class ModemLinkError(Exception):
    """The demo's modem is not there or refused the text."""


def send_sms(workdir: Path, sender: str, text: str, timeout: float = 5.0) -> None:
    """Deliver *text* to the modem as if *sender*'s phone had sent it."""
    path = workdir / SOCKET
    if not path.exists():
        raise ModemLinkError(f"no demo modem at {path} (is 'hotsite lab demo' running?)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"from": sender, "text": text}).encode() + b"\n")
            reply = sock.makefile("rb").readline()
        except OSError as exc:
            raise ModemLinkError(f"the demo modem at {path} does not answer: {exc}") from exc
    answer = json.loads(reply or b'{"ok": false, "error": "no reply"}')
    if not answer.get("ok"):
        raise ModemLinkError(str(answer.get("error")))


def log_tail(workdir: Path, lines: int) -> list[str]:
    """The last *lines* lines of the SMS log (none yet: an empty list)."""
    try:
        text = (workdir / LOG).read_text(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:] if lines > 0 else []
