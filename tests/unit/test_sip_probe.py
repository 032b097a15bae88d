"""The OPTIONS probe against a real UDP responder on loopback that can misbehave."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from monitoring.probes import sip as sip_probe
from monitoring.probes.base import ProbeResult
from monitoring.probes.sip import SipOptionsProbe, default_accept
from monitoring.sip import build_response, parse_message

LOOPBACK = "127.0.0.1"
Mode = Callable[["Responder", bytes, Any], None]


class Responder(asyncio.DatagramProtocol):
    """A fake SBC: answers each request as ``mode`` says, and records what it saw."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.transport: asyncio.DatagramTransport | None = None
        self.seen: list[tuple[bytes, Any]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append((data, addr))
        MODES[self.mode](self, data, addr)

    def send(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


def answer(code: int, reason: str, old: bytes = b"", new: bytes = b"") -> Mode:
    def respond(responder: Responder, data: bytes, addr: Any) -> None:
        reply = build_response(parse_message(data), code, reason, to_tag="t")
        responder.send(reply.replace(old, new) if old else reply, addr)

    return respond


def sequence(*modes: Mode) -> Mode:
    def respond(responder: Responder, data: bytes, addr: Any) -> None:
        for mode in modes:
            mode(responder, data, addr)

    return respond


def later(delay: float, mode: Mode) -> Mode:
    def respond(responder: Responder, data: bytes, addr: Any) -> None:
        asyncio.get_running_loop().call_later(delay, mode, responder, data, addr)

    return respond


def nth(n: int, mode: Mode) -> Mode:
    """Answer only the n-th datagram (1-based): the others are 'lost'."""

    def respond(responder: Responder, data: bytes, addr: Any) -> None:
        if len(responder.seen) == n:
            mode(responder, data, addr)

    return respond


def raw(payload: bytes) -> Mode:
    return lambda responder, data, addr: responder.send(payload, addr)


OK = answer(200, "OK")
MODES: dict[str, Mode] = {
    "ok": OK,
    "silent": lambda responder, data, addr: None,
    "503": answer(503, "Service Unavailable"),
    "408": answer(408, "Request Timeout"),
    "wrong_branch": answer(200, "OK", b"branch=z9hG4bK", b"branch=z9hG4bKx"),
    "wrong_call_id": answer(200, "OK", b"Call-ID: ", b"Call-ID: x"),
    "wrong_cseq": answer(200, "OK", b" OPTIONS\r\n", b" INVITE\r\n"),
    "trying_only": answer(100, "Trying"),
    "trying_then_ok": sequence(answer(100, "Trying"), later(0.05, OK)),
    "garbage_then_ok": sequence(raw(b"\x00garbage\xff"), raw(b"\r\n\r\n"), OK),
    "spoof_then_ok": sequence(answer(200, "OK", b"Call-ID: ", b"Call-ID: x"), OK),
    "ok_twice": sequence(OK, OK),
    "slow": later(0.4, OK),
    "drop_first": nth(2, OK),
}


async def responder(mode: str, port: int = 0) -> Responder:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: Responder(mode), local_addr=(LOOPBACK, port))
    return proto


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class Harness:
    def __init__(self, **kwargs: Any) -> None:
        self.unmatched: list[str] = []
        self.probe = SipOptionsProbe(on_unmatched=self.unmatched.append, **kwargs)

    async def run(self, port: int, timeout: float = 1.0) -> tuple[ProbeResult, float]:
        started = time.monotonic()
        result = await self.probe.probe("trunk:test", LOOPBACK, port, timeout=timeout)
        return result, time.monotonic() - started


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


# -- replies --------------------------------------------------------------------


def test_200_is_up_with_rtt() -> None:
    async def scenario() -> None:
        fake, h = await responder("ok"), Harness()
        result, took = await h.run(fake.port)
        assert (result.ok, result.reason, result.code, result.detail) == (True, "ok", 200, "200 OK")
        assert result.target == "trunk:test"
        assert result.rtt_s is not None and 0 < result.rtt_s < 0.1 and took < 0.2
        assert h.unmatched == [] and len(fake.seen) == 1
        await h.probe.close()

    run(scenario)


@pytest.mark.parametrize(
    "mode,code,detail",
    [("503", 503, "503 Service Unavailable"), ("408", 408, "408 Request Timeout")],
)
def test_error_codes_are_down(mode: str, code: int, detail: str) -> None:
    async def scenario() -> None:
        fake, h = await responder(mode), Harness()
        result, _ = await h.run(fake.port)
        assert (result.ok, result.reason, result.code, result.detail) == (
            False,
            "bad_code",
            code,
            detail,
        )
        assert result.rtt_s is not None

    run(scenario)


def test_accept_callable_widens_success_but_never_to_408() -> None:
    async def scenario() -> None:
        h = Harness(accept=lambda code: True)
        result, _ = await h.run((await responder("503")).port)
        assert (result.ok, result.code) == (True, 503)
        result, _ = await h.run((await responder("408")).port)
        assert (result.ok, result.reason, result.code) == (False, "bad_code", 408)

    run(scenario)
    assert default_accept(200) and default_accept(299)
    assert not any(default_accept(c) for c in (100, 180, 199, 300, 404, 408, 503))


@pytest.mark.parametrize("mode", ["wrong_branch", "wrong_call_id", "wrong_cseq"])
def test_mismatched_replies_are_ignored_and_counted(mode: str) -> None:
    async def scenario() -> None:
        fake, h = await responder(mode), Harness()
        result, took = await h.run(fake.port, timeout=0.3)
        assert (result.ok, result.reason, result.code) == (False, "timeout", None)
        assert h.unmatched == ["no_match"] and took < 0.4

    run(scenario)


def test_provisional_only_times_out_and_says_so() -> None:
    async def scenario() -> None:
        h = Harness()
        result, took = await h.run((await responder("trying_only")).port, timeout=0.3)
        assert (result.ok, result.reason, result.code) == (False, "timeout", None)
        assert result.detail == "only 100 Trying within 0.3s"
        assert 0.3 <= took < 0.4 and h.unmatched == []

    run(scenario)


def test_provisional_then_final_is_judged_on_the_final() -> None:
    async def scenario() -> None:
        h = Harness()
        result, _ = await h.run((await responder("trying_then_ok")).port)
        assert (result.ok, result.code) == (True, 200)
        assert result.rtt_s is not None and result.rtt_s >= 0.05

    run(scenario)


@pytest.mark.parametrize(
    "mode,unmatched", [("garbage_then_ok", ["garbage"]), ("spoof_then_ok", ["no_match"])]
)
def test_junk_before_the_real_reply_is_counted_not_fatal(mode: str, unmatched: list[str]) -> None:
    async def scenario() -> None:
        h = Harness()
        result, _ = await h.run((await responder(mode)).port)
        assert (result.ok, result.code) == (True, 200)
        assert h.unmatched == unmatched  # the CRLF keep-alive is not counted

    run(scenario)


def test_silence_times_out_within_the_timeout() -> None:
    async def scenario() -> None:
        h = Harness()
        fake = await responder("silent")
        result, took = await h.run(fake.port, timeout=0.3)
        assert (result.ok, result.reason, result.rtt_s) == (False, "timeout", None)
        assert result.detail == "no reply within 0.3s"
        assert 0.3 <= took < 0.4

    run(scenario)


def test_late_reply_to_a_timed_out_probe_never_counts() -> None:
    async def scenario() -> None:
        h = Harness()
        fake = await responder("slow")  # answers 0.4 s after each request
        first, _ = await h.run(fake.port, timeout=0.2)
        assert first.reason == "timeout"
        await asyncio.sleep(0.3)  # the late 200 arrives now, with no probe outstanding
        assert h.unmatched == ["late"]
        fake.mode = "silent"
        second, _ = await h.run(fake.port, timeout=0.2)
        assert second.reason == "timeout"

    run(scenario)


def test_duplicate_final_is_late_not_a_second_success() -> None:
    async def scenario() -> None:
        h = Harness()
        fake = await responder("ok_twice")
        result, _ = await h.run(fake.port)
        await asyncio.sleep(0.05)
        assert result.ok and h.unmatched == ["late"]

    run(scenario)


# -- retransmission -------------------------------------------------------------


def test_lost_request_is_retransmitted_after_t1() -> None:
    async def scenario() -> None:
        h = Harness()
        fake = await responder("drop_first")
        result, took = await h.run(fake.port, timeout=1.0)
        assert result.ok and result.rtt_s is not None and 0.5 <= result.rtt_s < 0.7
        assert len(fake.seen) == 2 and fake.seen[0][0] == fake.seen[1][0]  # same transaction

    run(scenario)


def test_retransmissions_follow_timer_e() -> None:
    async def scenario() -> None:
        h = Harness()
        fake = await responder("silent")
        await h.run(fake.port, timeout=1.7)
        assert len(fake.seen) == 3  # at 0, 0.5 and 1.5 s

    run(scenario)


# -- sockets and errors ---------------------------------------------------------


def test_closed_port_is_unreachable_at_once() -> None:
    async def scenario() -> None:
        h = Harness()
        result, took = await h.run(closed_udp_port(), timeout=2.0)
        assert (result.ok, result.reason, result.code, result.rtt_s) == (
            False,
            "unreachable",
            None,
            None,
        )
        assert took < 0.25  # ICMP, not the 2 s timeout

    run(scenario)


def test_one_socket_per_target_reused_and_replaced_after_an_error() -> None:
    async def scenario() -> None:
        h = Harness()
        port = closed_udp_port()
        assert (await h.run(port))[0].reason == "unreachable"
        fake = await responder("ok", port)  # the SBC comes back on the same port
        assert (await h.run(port))[0].ok
        assert (await h.run(port))[0].ok
        sources = {addr for _, addr in fake.seen}
        assert len(sources) == 1 and len(fake.seen) == 2
        await h.probe.close()

    run(scenario)


def test_sockets_of_targets_no_longer_probed_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sip_probe, "IDLE_CLOSE_S", 0.05)

    async def scenario() -> None:
        h = Harness()
        old, new = await responder("ok"), await responder("ok")
        assert (await h.run(old.port))[0].ok
        await asyncio.sleep(0.1)
        assert (await h.run(new.port))[0].ok
        assert set(h.probe._endpoints) == {(LOOPBACK, new.port)}
        assert (await h.run(old.port))[0].ok  # and come back when needed

    run(scenario)


def test_concurrent_probes_to_one_target_each_get_their_reply() -> None:
    async def scenario() -> None:
        h = Harness()
        fake = await responder("trying_then_ok")
        results = await asyncio.gather(*(h.run(fake.port) for _ in range(5)))
        assert all(result.ok for result, _ in results) and h.unmatched == []
        assert len({addr for _, addr in fake.seen}) == 1

    run(scenario)


def test_unresolvable_host_is_a_send_error_not_an_exception() -> None:
    async def scenario() -> None:
        probe = SipOptionsProbe()
        result = await probe.probe("t", "no-such-host.invalid", 5060, timeout=2.0)
        assert (result.ok, result.reason) == (False, "send_error") or result.reason == "timeout"

    run(scenario)


def test_cancellation_propagates_and_leaves_nothing_pending() -> None:
    async def scenario() -> None:
        h = Harness()
        fake = await responder("silent")
        task = asyncio.create_task(h.run(fake.port, timeout=5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        endpoint = next(iter(h.probe._endpoints.values()))
        assert endpoint.pending == {}

    run(scenario)


def test_clock_callable_stamps_results_and_bad_callbacks_are_contained() -> None:
    def explode(reason: str) -> None:
        raise RuntimeError(reason)

    async def scenario() -> None:
        probe = SipOptionsProbe(clock=lambda: 42.0, on_unmatched=explode)
        fake = await responder("garbage_then_ok")
        result = await probe.probe("t", LOOPBACK, fake.port)
        assert result.ok and result.at == 42.0

    run(scenario)


def test_closed_probe_refuses_work_and_bad_arguments_are_errors() -> None:
    async def scenario() -> None:
        probe = SipOptionsProbe()
        with pytest.raises(ValueError):
            await probe.probe("t", LOOPBACK, 5060, timeout=0)
        with pytest.raises(ValueError):
            await probe.probe("t", LOOPBACK, 70000)
        await probe.close()
        with pytest.raises(RuntimeError):
            await probe.probe("t", LOOPBACK, 5060)

    run(scenario)
