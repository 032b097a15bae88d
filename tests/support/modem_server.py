"""The demo's GSM modem: the emulator on a pty, reachable through ``provisioning.lab.modem_link``.

    python -m tests.support.modem_server WORKDIR

Runs until SIGTERM. Every text the daemon sends (a page) and every text injected through the
socket (a reply, ``hotsite lab sms``) is appended to ``WORKDIR/sms.log`` with its UTC time.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from appliance import timefmt
from provisioning.lab import modem_link
from tests.support.modem import ModemEmulator


class ModemServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.modem = ModemEmulator()
        self._stop = threading.Event()
        self._logged = 0
        self._log_lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def start(self) -> ModemServer:
        self.modem.start()
        path = self.workdir / modem_link.SOCKET
        path.unlink(missing_ok=True)
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._sock.settimeout(0.5)
        threading.Thread(target=self._accept, name="modem link", daemon=True).start()
        threading.Thread(target=self._watch, name="sms log", daemon=True).start()
        (self.workdir / modem_link.DEVICE).write_text(self.modem.path)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        self.modem.stop()
        for name in (modem_link.SOCKET, modem_link.DEVICE):
            (self.workdir / name).unlink(missing_ok=True)

    def log(self, direction: str, number: str, text: str) -> None:
        line = f"{timefmt.clock(time.time())}  {direction}  {number}  {' '.join(text.split())}\n"
        with self._log_lock, (self.workdir / modem_link.LOG).open("a") as f:
            f.write(line)

    def _watch(self) -> None:
        """Log each text the daemon sent, once its parts are complete."""
        while not self._stop.wait(0.2):
            texts = self.modem.submitted_texts()
            for to, text in texts[self._logged :]:
                self.log("out", to, text)
            self._logged = len(texts)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = json.loads(conn.makefile("rb").readline())
            sender, text = str(request["from"]), str(request["text"])
            self.modem.inject_sms(sender, text)
            self.log("in ", sender, text)
            answer: dict[str, object] = {"ok": True}
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        conn.sendall(json.dumps(answer).encode() + b"\n")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.support.modem_server WORKDIR", file=sys.stderr)
        return 2
    server = ModemServer(Path(argv[0])).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
