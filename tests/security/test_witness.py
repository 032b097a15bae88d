"""Attacks on the real ``hotsite witness`` agent: idle connections, replayed votes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.clock import SystemClock
from failover.witness import HttpWitnessVoter
from tests.conftest import free_port

pytestmark = pytest.mark.slow
TOKEN = "witness-t0ken"


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[str]:
    """A witness watching a live TCP 'primary'; yields its /vote URL."""
    primary = socket.create_server(("127.0.0.1", 0))
    primary.listen(64)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = free_port()
    log = (tmp_path / "witness.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.witness", "--listen", f"127.0.0.1:{port}", "--name", "edge"]
        + ["--primary", f"tcp://127.0.0.1:{primary.getsockname()[1]}", "--interval", "0.2"]
        + ["--timeout", "0.2", "--rise", "1", "--token-file", str(token), "--allow-plain-http"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/vote"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                r = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1)
                if r.status_code == 200 and r.json()["primary_alive"] is True:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "witness.log").read_text()
            time.sleep(0.1)
        else:
            raise AssertionError((tmp_path / "witness.log").read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        primary.close()
        log.close()


def vote(url: str) -> tuple[bool | None, str]:
    async def ask() -> tuple[bool | None, str]:
        voter = HttpWitnessVoter(url, timeout_s=3.0, max_age_s=5.0, clock=SystemClock(), token=TOKEN)
        try:
            result = await voter.vote()
        finally:
            await voter.close()
        return result.primary_alive, result.detail

    return asyncio.run(ask())


def test_idle_connections_cannot_starve_votes(witness: str) -> None:
    port = int(witness.rsplit(":", 1)[1].split("/")[0])
    stop = threading.Event()
    idle: list[socket.socket] = []

    def flood() -> None:
        """Keep 200 idle unauthenticated connections open, reopening those the witness closes.

        The attacker is another host on the LAN (source 127.0.0.2; the voter is 127.0.0.1): the
        per-peer cap makes it evict its own idlers. From the voter's own address nothing could
        tell the two apart, and a reconnect storm there would evict a vote still in flight.
        """
        while not stop.is_set():
            idle[:] = [s for s in idle if _open(s)]
            while len(idle) < 200 and not stop.is_set():
                try:
                    idle.append(
                        socket.create_connection(
                            ("127.0.0.1", port), timeout=2, source_address=("127.0.0.2", 0)
                        )
                    )
                except OSError:
                    break
            time.sleep(0.05)

    attacker = threading.Thread(target=flood, daemon=True)
    attacker.start()
    try:
        time.sleep(1.0)
        results = [vote(witness) for _ in range(20)]
    finally:
        stop.set()
        attacker.join(5)
        for sock in idle:
            sock.close()
    answered = [alive for alive, _ in results if alive is True]
    print(f"witness under 200 idle connections: {len(answered)}/20 votes answered")
    assert len(answered) == 20, [detail for alive, detail in results if alive is not True]


def _open(sock: socket.socket) -> bool:
    """False (and closed) if the server has closed its end."""
    sock.setblocking(False)
    try:
        gone = sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        gone = False
    except OSError:
        gone = True
    if gone:
        sock.close()
    return not gone


def test_a_replayed_vote_is_refused(witness: str) -> None:
    # A genuine answer, recorded on the way (plain http): the witness saw the primary then.
    recorded = httpx.get(witness + "?nonce=recorded-earlier", headers={"Authorization": f"Bearer {TOKEN}"})
    assert recorded.status_code == 200 and recorded.json()["primary_alive"] is True
    body = recorded.content

    async def replay() -> tuple[bool | None, str]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        voter = HttpWitnessVoter(
            f"http://127.0.0.1:{port}/vote", timeout_s=3.0, max_age_s=60.0, clock=SystemClock(), token=TOKEN
        )
        try:
            result = await voter.vote()
        finally:
            await voter.close()
            server.close()
        return result.primary_alive, result.detail

    alive, detail = asyncio.run(replay())
    assert alive is None and "nonce" in detail, detail
    assert vote(witness)[0] is True  # the witness itself still answers fresh votes
