"""The OPTIONS probe over TCP and TLS against a real asyncio responder on loopback that can misbehave."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from monitoring.probes.base import ProbeResult
from monitoring.probes.sip import SipOptionsProbe
from monitoring.sip import StreamFramer, build_response, parse_message

LOOPBACK = "127.0.0.1"
Writer = asyncio.StreamWriter


def ok(data: bytes) -> bytes:
    return build_response(parse_message(data), 200, "OK", to_tag="t")


def tampered(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    return lambda data: ok(data).replace(old, new)


class StreamResponder:
    """A fake SBC on a TCP (or TLS) port: answers each request as ``mode`` says, records what it saw."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[bytes] = []
        self.connections = 0
        self.received_raw = b""
        self.server: asyncio.Server | None = None
        self.writers: list[Writer] = []

    async def start(self, tls: ssl.SSLContext | None = None) -> StreamResponder:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0, ssl=tls)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        self.connections += 1
        self.writers.append(writer)
        framer = StreamFramer()
        try:
            while data := await reader.read(4096):
                self.received_raw += data
                for request in framer.feed(data):
                    self.requests.append(request)
                    await self._answer(request, writer)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _answer(self, request: bytes, writer: Writer) -> None:
        mode = self.mode
        if mode == "ok":
            writer.write(ok(request))
        elif mode == "wrong_branch":
            writer.write(tampered(b"branch=z9hG4bK", b"branch=z9hG4bKx")(request))
        elif mode == "wrong_call_id":
            writer.write(tampered(b"Call-ID: ", b"Call-ID: x")(request))
        elif mode == "wrong_cseq":
            writer.write(tampered(b" OPTIONS\r\n", b" INVITE\r\n")(request))
        elif mode == "pieces":  # partial reads: the reply trickles in
            reply = ok(request)
            for piece in (reply[:7], reply[7:60], reply[60:]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)
        elif mode == "stray_junk_and_reply_in_one_write":
            junk = b"\x00\xffnot sip\r\nContent-Length: 0\r\n\r\n"
            writer.write(b"\r\n\r\n" + tampered(b"Call-ID: ", b"Call-ID: x")(request) + junk + ok(request))
        elif mode == "oversized":
            writer.write(b"SIP/2.0 200 OK\r\nX-Filler: " + b"a" * 70_000)
        elif mode == "huge_content_length":
            writer.write(ok(request).replace(b"Content-Length: 0", b"Content-Length: 9999999"))
        elif mode == "no_content_length":
            writer.write(ok(request).replace(b"Content-Length: 0\r\n", b""))
        elif mode == "hang_up":
            writer.close()
        await writer.drain()

    async def stop(self) -> None:
        """Like a dead SBC process: the listener and every open connection close."""
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()


class Harness:
    def __init__(self, **kwargs: object) -> None:
        self.unmatched: list[str] = []
        self.probe = SipOptionsProbe(on_unmatched=self.unmatched.append, **kwargs)  # type: ignore[arg-type]

    async def run(self, port: int, transport: str = "tcp", timeout: float = 1.0) -> tuple[ProbeResult, float]:
        started = time.monotonic()
        result = await self.probe.probe("trunk:t", LOOPBACK, port, timeout=timeout, transport=transport)
        return result, time.monotonic() - started


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def closed_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# -- TCP ------------------------------------------------------------------------


def test_tcp_200_is_up_over_one_persistent_connection() -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder("ok").start(), Harness()
        for _ in range(3):
            result, took = await h.run(fake.port)
            assert (result.ok, result.reason, result.code, result.detail) == (True, "ok", 200, "200 OK")
            assert result.rtt_s is not None and 0 < result.rtt_s < 0.1 and took < 0.3
        assert fake.connections == 1 and len(fake.requests) == 3 and h.unmatched == []
        request = parse_message(fake.requests[0])
        assert (
            request.vias[0].transport == "TCP" and request.uri == f"sip:{LOOPBACK}:{fake.port};transport=tcp"
        )
        await h.probe.close()
        await fake.stop()

    run(scenario)


@pytest.mark.parametrize("mode", ["wrong_branch", "wrong_call_id", "wrong_cseq"])
def test_tcp_mismatched_replies_keep_it_failing(mode: str) -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder(mode).start(), Harness()
        for _ in range(2):
            result, took = await h.run(fake.port, timeout=0.3)
            assert (result.ok, result.reason, result.code) == (False, "timeout", None)
            assert 0.3 <= took < 0.45
        assert h.unmatched == ["no_match", "no_match"]
        assert len(fake.requests) == 2  # no retransmission on a reliable transport

    run(scenario)


def test_tcp_reply_in_pieces_is_reassembled() -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder("pieces").start(), Harness()
        result, _ = await h.run(fake.port)
        assert result.ok and result.rtt_s is not None and result.rtt_s >= 0.04
        assert h.unmatched == []

    run(scenario)


def test_tcp_several_messages_in_one_read_junk_counted_reply_matched() -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder("stray_junk_and_reply_in_one_write").start(), Harness()
        result, _ = await h.run(fake.port)
        assert (result.ok, result.code) == (True, 200)
        assert h.unmatched == ["no_match", "garbage"]
        await asyncio.sleep(0.05)
        assert fake.received_raw.endswith(b"\r\n\r\n\r\n")  # the CRLF ping got its CRLF pong

    run(scenario)


@pytest.mark.parametrize("mode", ["oversized", "huge_content_length", "no_content_length"])
def test_tcp_unframeable_stream_is_counted_reset_and_reconnected(mode: str) -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder(mode).start(), Harness()
        result, took = await h.run(fake.port, timeout=2.0)
        assert (result.ok, result.reason, result.code) == (False, "send_error", None)
        assert result.detail.startswith("connection reset: unframeable data") and took < 0.5
        assert h.unmatched == ["garbage"]
        fake.mode = "ok"
        result, _ = await h.run(fake.port)
        assert result.ok and fake.connections == 2

    run(scenario)


def test_tcp_refused_at_once() -> None:
    async def scenario() -> None:
        h = Harness()
        result, took = await h.run(closed_tcp_port(), timeout=2.0)
        assert (result.ok, result.reason, result.code, result.rtt_s) == (False, "refused", None, None)
        assert took < 0.25

    run(scenario)


def test_tcp_peer_hang_up_fails_at_once_and_the_next_probe_reconnects() -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder("hang_up").start(), Harness()
        result, took = await h.run(fake.port, timeout=2.0)
        assert (result.ok, result.reason) == (False, "send_error") and took < 0.5
        fake.mode = "ok"
        assert (await h.run(fake.port))[0].ok
        assert fake.connections == 2
        await fake.stop()
        await h.probe.close()

    run(scenario)


def test_tcp_server_gone_between_probes_is_refused() -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder("ok").start(), Harness()
        port = fake.port
        assert (await h.run(port))[0].ok
        await fake.stop()
        await asyncio.sleep(0.05)
        for _ in range(2):
            result, took = await h.run(port, timeout=0.5)
            assert (result.ok, result.reason) == (False, "refused") and took < 0.25

    run(scenario)


def test_tcp_concurrent_probes_share_the_connection() -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder("ok").start(), Harness()
        results = await asyncio.gather(*(h.run(fake.port) for _ in range(5)))
        assert all(result.ok for result, _ in results) and h.unmatched == []
        assert fake.connections == 1 and len(fake.requests) == 5

    run(scenario)


def test_udp_and_tcp_to_the_same_port_are_separate() -> None:
    async def scenario() -> None:
        fake, h = await StreamResponder("ok").start(), Harness()
        assert (await h.run(fake.port, transport="TCP"))[0].ok
        result, _ = await h.run(fake.port, transport="udp", timeout=0.3)
        assert not result.ok  # nothing listens on UDP there

    run(scenario)


def test_unknown_transport_is_an_error() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="udp, tcp, tls"):
            await SipOptionsProbe().probe("t", LOOPBACK, 5060, transport="sctp")

    run(scenario)


# -- TLS ------------------------------------------------------------------------

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl CLI)."""
    assert OPENSSL is not None

    def openssl(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=directory, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=hotsite test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=sbc.test", "-keyout", "sbc.key", "-out", "sbc.csr")  # fmt: skip
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:sbc.test\n")
    openssl("x509", "-req", "-in", "sbc.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "ext.cnf", "-out", "sbc.pem")  # fmt: skip
    return directory / "ca.pem", directory / "sbc.pem", directory / "sbc.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    if OPENSSL is None:
        pytest.skip("openssl CLI not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(pki: tuple[Path, Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki[1], pki[2])
    return context


def client_context(pki: tuple[Path, Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki[0]))


@needs_openssl
def test_tls_200_is_up_with_a_verified_certificate(pki: tuple[Path, Path, Path]) -> None:
    async def scenario() -> None:
        fake = await StreamResponder("ok").start(server_context(pki))
        h = Harness(ssl_context=client_context(pki))
        for _ in range(2):
            result, _ = await h.run(fake.port, transport="tls")
            assert (result.ok, result.code) == (True, 200), result
        assert fake.connections == 1
        request = parse_message(fake.requests[0])
        assert request.vias[0].transport == "TLS" and (request.uri or "").endswith(";transport=tls")
        await h.probe.close()
        await fake.stop()

    run(scenario)


@needs_openssl
def test_tls_unverifiable_certificate_fails_by_default(pki: tuple[Path, Path, Path]) -> None:
    async def scenario() -> None:
        fake = await StreamResponder("ok").start(server_context(pki))
        h = Harness()  # the system's CAs do not know our test CA
        result, _ = await h.run(fake.port, transport="tls")
        assert (result.ok, result.reason) == (False, "send_error")
        assert result.detail.startswith("TLS handshake failed: CERTIFICATE_VERIFY_FAILED")
        assert fake.requests == []
        await fake.stop()

    run(scenario)


@needs_openssl
@pytest.mark.parametrize("mode", ["wrong_call_id", "wrong_branch"])
def test_tls_mismatched_replies_keep_it_failing(pki: tuple[Path, Path, Path], mode: str) -> None:
    async def scenario() -> None:
        fake = await StreamResponder(mode).start(server_context(pki))
        h = Harness(ssl_context=client_context(pki))
        result, _ = await h.run(fake.port, transport="tls", timeout=0.3)
        assert (result.ok, result.reason) == (False, "timeout") and h.unmatched == ["no_match"]

    run(scenario)


@needs_openssl
def test_tls_oversized_data_resets_and_recovers(pki: tuple[Path, Path, Path]) -> None:
    async def scenario() -> None:
        fake = await StreamResponder("oversized").start(server_context(pki))
        h = Harness(ssl_context=client_context(pki), max_stream_message=4096)
        result, _ = await h.run(fake.port, transport="tls")
        assert (result.ok, result.reason) == (False, "send_error") and h.unmatched == ["garbage"]
        fake.mode = "ok"
        assert (await h.run(fake.port, transport="tls"))[0].ok and fake.connections == 2

    run(scenario)
