"""The test-call UAC against a small in-process UAS on loopback (real sockets, ephemeral ports).

The lab tests (tests/integration/test_lab_testcalls.py) run it against SIPp
and Kamailio; these cover what the lab cannot stage on demand: garbage on
both sockets, a peer that never answers, a BYE from the far end, and the
parsing helpers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitoring import rtp
from monitoring.probes.testcall import (
    MARK_HEADER,
    CallSpec,
    TestCall,
    parse_sdp_answer,
    parse_uri_address,
)
from monitoring.sip import parse_message


class FakeUas(asyncio.DatagramProtocol):
    """Answers one kind of way: ``ok``, ``reject``, ``silent`` (no media), ``mute`` (no SIP), ``hangup``."""

    def __init__(self, mode: str, rtp_port: int) -> None:
        self.mode = mode
        self.rtp_port = rtp_port
        self.transport: asyncio.DatagramTransport | None = None
        self.requests: list[Any] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = parse_message(data)
        self.requests.append(request)
        if self.mode == "mute":
            return
        if request.method == "INVITE":
            self._reply(request, addr, "100 Trying")
            if self.mode == "garbage":
                assert self.transport is not None
                self.transport.sendto(b"\x00\x01garbage\r\n\r\n", addr)
            if self.mode == "reject":
                self._reply(request, addr, "503 Service Unavailable", tag=True)
                return
            self._reply(request, addr, "180 Ringing", tag=True)
            sdp = f"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {self.rtp_port} RTP/AVP 0\r\n"
            self._reply(request, addr, "200 OK", tag=True, body=sdp)
        elif request.method == "BYE":
            self._reply(request, addr, "200 OK")
        elif request.method == "ACK" and self.mode == "hangup":
            bye = (
                f"BYE sip:hotsite@{addr[0]}:{addr[1]} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKbye1\r\n"
                f"From: {request.header('to')}\r\nTo: {request.header('from')}\r\nCall-ID: {request.call_id}\r\n"
                "CSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
            )
            assert self.transport is not None
            self.transport.sendto(bye.encode(), addr)

    def _reply(
        self, request: Any, addr: tuple[str, int], status: str, tag: bool = False, body: str = ""
    ) -> None:
        assert self.transport is not None
        to = request.header("to") + (";tag=uas1" if tag else "")
        port = self.transport.get_extra_info("sockname")[1]
        lines = [f"SIP/2.0 {status}", *(f"Via: {v}" for v in request.header_values("via"))]
        lines += [f"From: {request.header('from')}", f"To: {to}", f"Call-ID: {request.call_id}"]
        lines += [f"CSeq: {request.header('cseq')}", f"Contact: <sip:127.0.0.1:{port}>", "Server: fake-sbc/1"]
        lines += ["Content-Type: application/sdp"] if body else []
        lines += [f"Content-Length: {len(body)}"]
        self.transport.sendto(("\r\n".join(lines) + "\r\n\r\n" + body).encode(), addr)


class Echo(asyncio.DatagramProtocol):
    """The far end's media: echoes what it receives, or (``prompt``) plays its own stream instead.

    ``prompt`` is one-way audio as the lab stages it: the caller hears the far end's
    prompt, the far end never hears (so never echoes) the caller.
    """

    def __init__(self, enabled: bool, garbage: bool, prompt: bool = False) -> None:
        self.enabled, self.garbage, self.prompt = enabled, garbage, prompt
        self.transport: asyncio.DatagramTransport | None = None
        self.packets = 0
        self.audio = rtp.tone(samples=rtp.FRAME_SAMPLES)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.packets += 1
        assert self.transport is not None
        if self.prompt:  # its own stream, for every packet it gets: same pace, another SSRC
            n = self.packets
            self.transport.sendto(rtp.build(rtp.PCMU, n, n * rtp.FRAME_SAMPLES, 0x5EED, self.audio), addr)
        elif self.enabled:
            self.transport.sendto(data, addr)
        if self.garbage and self.packets % 10 == 0:
            self.transport.sendto(b"\x00garbage", addr)


async def _call(mode: str, **spec: Any) -> tuple[Any, FakeUas, Echo]:
    loop = asyncio.get_running_loop()
    echo_t, echo = await loop.create_datagram_endpoint(
        lambda: Echo(mode not in ("silent",), mode == "garbage", mode == "one-way"),
        local_addr=("127.0.0.1", 0),
    )
    uas_t, uas = await loop.create_datagram_endpoint(
        lambda: FakeUas(mode, echo_t.get_extra_info("sockname")[1]), local_addr=("127.0.0.1", 0)
    )
    port = uas_t.get_extra_info("sockname")[1]
    settings: dict[str, Any] = {"duration_s": 0.6, "setup_timeout_s": 2.0, **spec}
    try:
        result = await TestCall(
            CallSpec("testcall:vip", "95588", "10086", "127.0.0.1", port, **settings)
        ).run()
        await asyncio.sleep(0.1)  # the last datagram (an ACK) reaches the UAS before it closes
    finally:
        uas_t.close()
        echo_t.close()
    return result, uas, echo


def test_answered_call_with_echoed_audio() -> None:
    r, uas, echo = asyncio.run(_call("ok"))
    assert r.ok and r.reason == "ok" and r.code == 200
    assert (
        r.pdd_ringing_ms is not None and r.pdd_answer_ms is not None and r.pdd_ringing_ms <= r.pdd_answer_ms
    )
    assert r.answered_by == "fake-sbc/1" and r.hangup == "200 OK"
    assert r.tx_packets == 30 and r.rx_packets == 30 and r.loss_pct == 0.0 and echo.packets == 30
    assert r.level_dbov == pytest.approx(-20, abs=0.5) and r.audio
    assert r.mos is not None and r.mos > 4.0 and r.rtt_ms is not None
    invite = uas.requests[0]
    assert invite.header(MARK_HEADER) == "1" and "sip:10086@" in (invite.header("from") or "")
    assert b"m=audio" in invite.body and b"RTP/AVP 0" in invite.body
    assert [m.method for m in uas.requests] == ["INVITE", "ACK", "BYE"]


def test_who_answered_comes_from_the_answer_and_names_known_peers() -> None:
    r, _, _ = asyncio.run(_call("ok", answer_header="x-not-there"))
    assert r.answered_by == "fake-sbc/1"  # no such header: Server
    assert r.contact is not None and r.contact.startswith("<sip:127.0.0.1:")
    named, _, _ = asyncio.run(_call("ok", peers={"127.0.0.1": "site:backup"}))
    assert named.answered_by == "site:backup"  # the Contact is a configured SBC


def test_rejected_call_reports_the_code_and_acks_it() -> None:
    r, uas, _ = asyncio.run(_call("reject"))
    assert not r.ok and r.reason == "rejected" and r.code == 503
    assert r.detail == "95588: 503 Service Unavailable"
    assert r.to_probe().reason == "bad_code" and r.to_probe().code == 503
    assert [m.method for m in uas.requests] == ["INVITE", "ACK"]
    ack = uas.requests[1]
    assert ack.top_branch == uas.requests[0].top_branch  # a non-2xx ACK is part of the INVITE transaction


def test_answered_without_media_is_no_audio() -> None:
    r, _, echo = asyncio.run(_call("silent"))
    assert not r.ok and r.reason == "no_audio" and r.code == 200
    assert r.rx_packets == 0 and echo.packets == 30
    assert r.detail == "95588: no audio (0 RTP packets received)"
    assert r.to_probe().reason == "threshold"


def test_our_rtp_never_coming_back_from_an_echo_is_one_way_audio() -> None:
    r, _, echo = asyncio.run(_call("one-way", expect_echo=True))
    assert not r.ok and r.reason == "one_way" and r.code == 200 and r.audio  # its prompt was heard
    assert (r.tx_packets, r.tx_echoed, r.rx_packets, echo.packets) == (30, 0, 30, 30)
    assert r.detail == (
        "95588: one-way audio: none of our 30 RTP packets came back from fake-sbc/1 (30 of its own received)"
    )
    assert r.to_probe().reason == "threshold"


def test_a_far_end_playing_a_prompt_is_fine_when_no_echo_is_expected() -> None:
    r, _, _ = asyncio.run(_call("one-way"))  # an IVR: it talks, it does not echo
    assert r.ok and r.reason == "ok" and (r.tx_echoed, r.rx_packets) == (0, 30)


def test_an_echo_counts_our_packets_back_per_direction() -> None:
    r, _, _ = asyncio.run(_call("ok", expect_echo=True))
    assert r.ok and (r.tx_packets, r.tx_echoed, r.rx_packets) == (30, 30, 30)


def test_a_peer_that_never_answers_times_out_after_retransmitting() -> None:
    r, uas, _ = asyncio.run(_call("mute", setup_timeout_s=1.6))
    assert not r.ok and r.reason == "timeout" and r.code is None
    assert r.hangup == "not answered" and "nothing at all" in r.status
    assert len(uas.requests) >= 3  # 0, 0.5, 1.5 s: RFC 3261 Timer A doubling from T1


def test_garbage_on_both_sockets_is_counted_not_fatal() -> None:
    r, _, _ = asyncio.run(_call("garbage"))
    assert r.ok and r.garbage >= 3


def test_a_bye_from_the_far_end_ends_the_call() -> None:
    r, uas, _ = asyncio.run(_call("hangup", duration_s=3.0))
    assert r.hangup == "remote BYE" and r.tx_packets < 150
    assert "BYE" not in [m.method for m in uas.requests]


def test_the_min_mos_threshold_fails_a_poor_call() -> None:
    r, _, _ = asyncio.run(_call("ok", min_mos=4.45))  # a perfect G.711 call estimates 4.41
    assert not r.ok and r.reason == "poor_audio" and "poor audio (MOS 4.41)" in r.detail


def test_a_network_error_is_a_result() -> None:
    spec = CallSpec("testcall:x", "95588", "1", "127.0.0.1", 9, setup_timeout_s=1.0)
    r = asyncio.run(TestCall(spec).run())  # nothing listens on port 9: ICMP refusals or silence
    assert not r.ok and r.reason in ("timeout", "send_error")


# -- parsing helpers --------------------------------------------------------------------


def test_uri_addresses() -> None:
    assert parse_uri_address("<sip:10.77.0.20:5060;transport=UDP>") == ("10.77.0.20", 5060)
    assert parse_uri_address("<sip:user@sbc.example.com;lr>") == ("sbc.example.com", 5060)
    assert parse_uri_address("<sip:[2001:db8::1]:5070>") == ("2001:db8::1", 5070)
    assert parse_uri_address("tel:+123") is None
    assert parse_uri_address("<sip:1.2.3.4:99999>") is None


def test_sdp_answers() -> None:
    body = b"v=0\r\nc=IN IP4 10.0.0.1\r\nm=audio 6000 RTP/AVP 8 0\r\n"
    assert parse_sdp_answer(body) == ("10.0.0.1", 6000, rtp.PCMA)
    assert parse_sdp_answer(b"v=0\r\nm=audio 6000 RTP/AVP 0\r\n") is None  # no address
    assert parse_sdp_answer(b"\xff\xfe") is None


@given(st.text(max_size=200))
def test_uri_parsing_never_raises(text: str) -> None:
    result = parse_uri_address(text)
    assert result is None or 0 < result[1] < 65536


@given(st.binary(max_size=300))
def test_sdp_parsing_never_raises(data: bytes) -> None:
    result = parse_sdp_answer(data)
    assert result is None or 0 < result[1] < 65536


def test_the_prober_bounds_concurrent_calls_and_keeps_the_last_record() -> None:
    from monitoring.prober import Prober
    from monitoring.targets import Target

    async def scenario() -> tuple[list[Any], float, Prober]:
        loop = asyncio.get_running_loop()
        echo_t, _ = await loop.create_datagram_endpoint(
            lambda: Echo(True, False), local_addr=("127.0.0.1", 0)
        )
        uas_t, _ = await loop.create_datagram_endpoint(
            lambda: FakeUas("ok", echo_t.get_extra_info("sockname")[1]), local_addr=("127.0.0.1", 0)
        )
        port = uas_t.get_extra_info("sockname")[1]
        prober = Prober(max_calls=1)
        targets = [
            Target(
                name, "testcall", "127.0.0.1", port, call=CallSpec(name, "95588", "1", "127.0.0.1", port, 0.5)
            )
            for name in ("testcall:a", "testcall:b")
        ]
        started = time.monotonic()
        try:
            results = await asyncio.gather(*(prober.probe(t, 10) for t in targets))
        finally:
            uas_t.close()
            echo_t.close()
        return results, time.monotonic() - started, prober

    results, elapsed, prober = asyncio.run(scenario())
    assert all(r.ok for r in results) and [r.target for r in results] == ["testcall:a", "testcall:b"]
    assert elapsed >= 2 * 0.5  # one after the other, not together
    assert prober.last_calls["testcall:b"].mos is not None
