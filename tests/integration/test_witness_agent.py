"""The witness agent and the appliance's voter, talking real HTTP over loopback.

The agent runs in this process (its probe loop and server on one event loop);
the primary's health endpoint is the lab's stdlib ``healthd``; a raw TCP server
plays a confused or hostile witness.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from appliance.clock import SystemClock
from appliance.errors import StartupError
from failover import witness as w
from failover.thirdvote import Vote
from failover.witness import agent as witness_agent
from provisioning.lab.healthd import make_handler
from tests.conftest import free_port

CLOCK = SystemClock()


@pytest.fixture
def health_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler("primary"))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()
    server.server_close()


def agent_settings(primary: list[str], **extra: object) -> w.WitnessSettings:
    return w.WitnessSettings.model_validate(
        {
            "name": "edge-test",
            "listen": f"127.0.0.1:{free_port()}",
            "primary": primary,
            "interval_s": 0.2,
            "timeout_s": 0.2,
            "rise": 1,
            "fall": 2,
            "allow_plain_http": "tls_cert_file" not in extra,
            "allow_unauthenticated": "token_file" not in extra,
            **extra,
        }
    )


def voter_for(agent: w.WitnessAgent, *, token: str | None = None, **kwargs: object) -> w.HttpWitnessVoter:
    host, port = agent.address
    scheme = "https" if agent.settings.tls_cert_file else "http"
    return w.HttpWitnessVoter(
        f"{scheme}://{host}:{port}/vote",
        timeout_s=1.0,
        max_age_s=2.0,
        clock=CLOCK,
        token=token,
        **kwargs,  # type: ignore[arg-type]
    )


async def vote_until(voter: w.HttpWitnessVoter, want: bool | None, within: float = 5.0) -> Vote:
    deadline = time.monotonic() + within
    while True:
        vote = await voter.vote()
        if vote.primary_alive is want or time.monotonic() > deadline:
            return vote
        await asyncio.sleep(0.05)


def run_agent(
    settings_: w.WitnessSettings,
    body: Callable[[w.WitnessAgent], Awaitable[None]],
    registry: CollectorRegistry,
) -> None:
    async def main() -> None:
        agent = w.WitnessAgent(settings_, registry=registry)
        await agent.start()
        try:
            await body(agent)
        finally:
            await agent.stop()

    asyncio.run(main())


async def raw_exchange(address: tuple[str, int], data: bytes, *, half_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(data)
    await writer.drain()
    if half_close:
        writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return reply


def count(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value("hotsite_witness_requests_total", {"outcome": outcome})
    return value or 0.0


def test_vote_over_http_sees_a_live_primary_and_metrics_say_so(health_url: str) -> None:
    registry = CollectorRegistry()

    async def body(agent: w.WitnessAgent) -> None:
        voter = voter_for(agent)
        try:
            vote = await vote_until(voter, True)
            assert vote.primary_alive is True, vote
            assert vote.source == "witness:edge-test"
            assert vote.detail.startswith("edge-test sees the primary"), vote.detail
            assert health_url in vote.detail
            assert vote.at <= CLOCK.monotonic()
            doc = agent.vote_document()
            assert doc["age_s"] < 0.2 + 0.2 + 0.5  # at most one round (interval + timeout) plus scheduling
        finally:
            await voter.close()
        reply = await raw_exchange(agent.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b'hotsite_witness_primary_state{state="alive"} 1.0' in reply
        assert f'hotsite_witness_target_state{{state="up",target="{health_url}"}} 1.0'.encode() in reply

    run_agent(agent_settings([health_url]), body, registry)
    assert registry.get_sample_value("hotsite_witness_primary_changes_total") == 1.0


GARBAGE = [
    (b"garbage\r\n\r\n", b"HTTP/1.1 400 "),
    (b"GET /vote HTTP/9.9\r\n\r\n", b"HTTP/1.1 400 "),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n", b"HTTP/1.1 400 "),
    (b"GET /vote HTTP/1.1\r\nHost", b"HTTP/1.1 400 "),  # half a request, then EOF
    (b"GET /etc/passwd HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 "),
    (b"POST /vote HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", b"HTTP/1.1 405 "),
    (b"GET /vote HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", b"HTTP/1.1 431 "),
    (b"", b""),  # connect and close: nothing to answer
]


def test_garbage_gets_4xx_is_counted_and_the_witness_keeps_serving(health_url: str) -> None:
    registry = CollectorRegistry()

    async def body(agent: w.WitnessAgent) -> None:
        for data, status in GARBAGE:
            reply = await raw_exchange(agent.address, data)
            assert reply.startswith(status), (data[:40], reply[:80])
        # Still serving, and HEAD answers with headers only.
        reply = await raw_exchange(agent.address, b"HEAD /vote HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"\r\n\r\n")
        voter = voter_for(agent)
        try:
            assert (await vote_until(voter, True)).primary_alive is True
        finally:
            await voter.close()

    run_agent(agent_settings([health_url]), body, registry)
    assert count(registry, "bad_request") == 5  # three malformed, one half request, one empty connection
    assert (count(registry, "not_found"), count(registry, "method_not_allowed")) == (1, 1)
    assert count(registry, "too_large") == 1
    assert count(registry, "ok") >= 2


def test_a_client_that_sends_nothing_gets_408_and_does_not_block_others(
    health_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(witness_agent, "READ_TIMEOUT_S", 0.3)  # the agent reads it per connection
    registry = CollectorRegistry()

    async def body(agent: w.WitnessAgent) -> None:
        silent = asyncio.create_task(raw_exchange(agent.address, b"GET /vote HTTP/1.1\r\n", half_close=False))
        voter = voter_for(agent)
        try:
            assert (await vote_until(voter, True)).primary_alive is True
        finally:
            await voter.close()
        assert (await silent).startswith(b"HTTP/1.1 408 ")

    run_agent(agent_settings([health_url]), body, registry)
    assert count(registry, "timeout") == 1


def test_bearer_token_is_required_when_configured(health_url: str, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("correct-horse\n")
    registry = CollectorRegistry()

    async def body(agent: w.WitnessAgent) -> None:
        for token, alive, detail in (
            (None, None, "refused our token (HTTP 401)"),
            ("wrong-horse", None, "refused our token"),
            ("correct-hors", None, "refused our token"),
            ("correct-horse", True, "edge-test sees the primary"),
        ):
            voter = voter_for(agent, token=token)
            try:
                vote = await vote_until(voter, alive)
            finally:
                await voter.close()
            assert vote.primary_alive is alive and detail in vote.detail, (token, vote)
        reply = await raw_exchange(agent.address, b"GET /metrics HTTP/1.1\r\nAuthorization: Basic x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 401 ") and b"WWW-Authenticate: Bearer" in reply

    run_agent(agent_settings([health_url], token_file=str(tmp_path / "token")), body, registry)
    assert count(registry, "unauthorized") == 4


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "witness")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_with_a_pinned_ca_and_refused_without(health_url: str, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    registry = CollectorRegistry()

    async def body(agent: w.WitnessAgent) -> None:
        trusting = voter_for(agent, verify=ssl.create_default_context(cafile=str(cert)))
        default = voter_for(agent)
        try:
            assert (await vote_until(trusting, True)).primary_alive is True
            vote = await default.vote()
            assert vote.primary_alive is None and "unreachable" in vote.detail, vote
        finally:
            await trusting.close()
            await default.close()

    run_agent(agent_settings([health_url], tls_cert_file=str(cert), tls_key_file=str(key)), body, registry)


def test_a_port_in_use_is_a_startup_error(health_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = w.WitnessAgent(
            agent_settings([health_url], listen=f"127.0.0.1:{port}"), registry=CollectorRegistry()
        )
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(agent.start())


# ---------------------------------------------------------------------------
# The voter against witnesses that misbehave


class RawWitness:
    """A TCP server that answers every connection with fixed bytes (or nothing at all)."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/vote"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in asyncio.all_tasks():
            if task.get_name() == "raw-witness":
                task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asyncio.current_task().set_name("raw-witness")  # type: ignore[union-attr]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if self.reply is None:
                await asyncio.sleep(3600)  # a witness that accepts and never answers
            else:
                writer.write(echo_nonce(self.reply, head))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def echo_nonce(reply: bytes, head: bytes) -> bytes:
    """``@NONCE@`` in a reply's body becomes the nonce of the request (as a real witness echoes it)."""
    if b"@NONCE@" not in reply:
        return reply
    match = re.search(rb"[?&]nonce=([A-Za-z0-9_-]+)", head)
    status = int(reply.split(b" ", 2)[1])
    return http_reply(status, reply.split(b"\r\n\r\n", 1)[1].replace(b"@NONCE@", match[1] if match else b""))


def http_reply(status: int, body: bytes) -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


async def ask(reply: bytes | None, *, timeout_s: float = 0.5) -> Vote:
    async with RawWitness(reply) as url:
        voter = w.HttpWitnessVoter(url, timeout_s=timeout_s, max_age_s=2.0, clock=CLOCK)
        try:
            return await voter.vote()
        finally:
            await voter.close()


ANSWERS = st.one_of(
    st.binary(max_size=400),
    st.builds(http_reply, st.integers(100, 599), st.binary(max_size=300)),
    st.builds(
        lambda doc: http_reply(200, json.dumps(doc).encode()),
        st.dictionaries(
            st.sampled_from(["version", "primary_alive", "age_s", "checked_at", "witness", "evidence"]),
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
        ),
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANSWERS)
def test_any_bytes_from_the_witness_give_a_vote_never_an_exception(reply: bytes) -> None:
    vote = asyncio.run(ask(reply))
    assert isinstance(vote, Vote) and vote.primary_alive in (True, False, None)
    assert len(vote.detail) <= w.MAX_DETAIL_CHARS


def test_unreachable_silent_huge_and_stale_witnesses_say_none() -> None:
    async def scenario() -> None:
        voter = w.HttpWitnessVoter(
            f"http://127.0.0.1:{free_port()}/vote", timeout_s=0.5, max_age_s=2, clock=CLOCK
        )
        vote = await voter.vote()
        await voter.close()
        assert vote.primary_alive is None and "unreachable" in vote.detail, vote

        started = time.monotonic()
        vote = await ask(None, timeout_s=0.4)
        assert vote.primary_alive is None and "did not answer within 0.4s" in vote.detail, vote
        assert time.monotonic() - started < 0.4 + 0.5

        vote = await ask(http_reply(200, b" " * (w.MAX_ANSWER_BYTES + 1)))
        assert vote.primary_alive is None and "larger than" in vote.detail, vote

        doc = {"version": 1, "witness": "old", "primary_alive": False, "checked_at": 0, "age_s": 2.5}
        doc["nonce"] = "@NONCE@"
        vote = await ask(http_reply(200, json.dumps(doc).encode()))
        assert vote.primary_alive is None and "stale" in vote.detail, vote

        doc["age_s"] = 0.1
        vote = await ask(http_reply(200, json.dumps(doc).encode()))
        assert vote.primary_alive is False, vote  # same answer, fresh: counts (checked_at 1970 is ignored)

    asyncio.run(scenario())
