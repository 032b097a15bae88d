"""HTTP, TCP and ICMP probes and the prober's SIP code policy, against real loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from monitoring.prober import Prober
from monitoring.probes.base import REASONS, ProbeResult
from monitoring.sip import build_response, parse_message
from monitoring.targets import Target, parse_url
from tests.conftest import free_port


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 -- the stdlib's name
        if self.path == "/slow":
            time.sleep(1.0)
        code = 503 if self.path == "/down" else 200
        body = b'{"status": "ok", "agents": 12}' if self.path != "/empty" else b'{"agents": 0}'
        self.send_response(code)
        self.close_connection = True
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the probe gave up (the /slow case)
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def probe(target: Target, timeout: float = 0.5) -> ProbeResult:
    async def once() -> ProbeResult:
        prober = Prober()
        try:
            return await prober.probe(target, timeout)
        finally:
            await prober.close()

    result = asyncio.run(once())
    assert result.reason in REASONS
    return result


def with_body(url: str, pattern: str) -> Target:
    import dataclasses

    return dataclasses.replace(parse_url(url, "t"), expect_body=pattern)


def test_http(web: str) -> None:
    ok = probe(parse_url(f"{web}/health", "t"))
    assert (ok.ok, ok.code, ok.reason) == (True, 200, "ok") and ok.rtt_s is not None
    down = probe(parse_url(f"{web}/down", "t"))
    assert (down.ok, down.code, down.reason) == (False, 503, "bad_code")
    grey = probe(with_body(f"{web}/empty", r'"agents":\s*[1-9]'))
    assert (grey.ok, grey.reason) == (False, "bad_body")
    assert probe(with_body(f"{web}/health", r'"agents":\s*[1-9]')).ok
    slow = probe(parse_url(f"{web}/slow", "t"), timeout=0.2)
    assert (slow.ok, slow.reason) == (False, "timeout")
    refused = probe(parse_url(f"http://127.0.0.1:{free_port()}/", "t"))
    assert (refused.ok, refused.reason) == (False, "refused")


def test_tcp() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        ok = probe(parse_url(f"tcp://127.0.0.1:{server.getsockname()[1]}", "t"))
    assert ok.ok and ok.rtt_s is not None and ok.rtt_s < 0.5
    refused = probe(parse_url(f"tcp://127.0.0.1:{free_port()}", "t"))
    assert (refused.ok, refused.reason) == (False, "refused")


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP needs root or CAP_NET_RAW here")
def test_icmp() -> None:
    ok = probe(parse_url("icmp://127.0.0.1", "t"))
    assert ok.ok and ok.rtt_s is not None and ok.rtt_s < 0.1
    unknown = probe(parse_url("icmp://no-such-host.invalid", "t"))
    assert (unknown.ok, unknown.reason) == (False, "unreachable")


class SipAnswer(asyncio.DatagramProtocol):
    def __init__(self, code: int) -> None:
        self.code = code

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = build_response(parse_message(data), self.code, "Whatever", to_tag="t")
        self.transport.sendto(reply, addr)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("code", "accept", "ok"),
    [
        (200, None, True),
        (202, None, True),
        (404, None, False),
        (404, {200, 404}, True),
        (200, {404}, False),
        (408, None, False),
    ],
)
def test_sip_codes_are_judged_by_the_targets_policy(code: int, accept: set[int] | None, ok: bool) -> None:
    async def scenario() -> ProbeResult:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: SipAnswer(code), local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        prober = Prober()
        try:
            target = Target(
                "trunk:x", "sip", "127.0.0.1", port, "udp", accept_codes=frozenset(accept) if accept else None
            )
            return await prober.probe(target, 0.5)
        finally:
            await prober.close()
            transport.close()

    result = asyncio.run(scenario())
    assert result.code == code and result.ok is ok
    assert result.reason == ("ok" if ok else "bad_code")
