"""A synthetic test call: a real SIP call with media, judged as a customer would judge it.

OPTIONS only proves a peer is up. The classic carrier failures answer OPTIONS
and still fail calls (INVITEs rejected with 403/480/503, calls that connect
with no audio), so this probe dials the hotline number like a customer:

1. INVITE over UDP with an SDP offer of PCMU (G.711 mu-law), marked as a test
   call (a header and the configured caller number, so the call centre's
   reports can exclude it), retransmitted per RFC 3261 17.1.1.2 (T1 doubling);
   100/180/183 are timed (post-dial delay to ringing and to answer); a 3xx-6xx
   is acknowledged and is the result; no final reply within the set-up timeout
   is a CANCELled call.
2. On 200 OK: ACK (by the route set from Record-Route, to the Contact), then
   ``duration_s`` of G.711 RTP every 20 ms (a 1004 Hz tone) while receiving:
   packets, loss and jitter (RFC 3550), the audio level, and the round trip of
   our own packets when the far end echoes them. The answer's Contact and its
   Server (or a configured) header say *who* answered, not what we assumed.
3. BYE, retransmitted until its final reply: the call was hung up cleanly or
   not. A BYE from the far end ends the call early (answered 200).

A hand-written UAC: no maintained Python SIP UAC library exists on PyPI, and
this one needs only a single dialog. Everything from the network is parsed
strictly (:mod:`monitoring.sip`, :mod:`monitoring.rtp`); what does not parse or
does not belong to the call is counted in ``garbage`` and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from monitoring import mos, rtp
from monitoring.probes.base import ProbeResult
from monitoring.sip import USER_AGENT, SipMessage, SipParseError, new_branch, parse_message, split_commas

T1_S = 0.5  # RFC 3261 T1
FRAME_S = 0.020
MARK_HEADER = "X-Hotsite-Test-Call"
# Mouth-to-ear delay the endpoints add to the network's one way (G.107's Ta):
# a 20 ms frame plus a 40 ms jitter buffer, which no probe can observe.
ENDPOINT_DELAY_MS = 60.0
_URI_RE = re.compile(r"<?sips?:(?:[^@;>\s]+@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?")
_SDP_C_RE = re.compile(r"^c=IN IP4 ([0-9.]{7,15})\s*$", re.M)
_SDP_M_RE = re.compile(r"^m=audio ([0-9]{1,5}) RTP/AVP((?: [0-9]{1,3})+)\s*$", re.M)


@dataclass(frozen=True, slots=True)
class CallSpec:
    """What to dial, from whom, through which next hop, and how to judge it."""

    name: str  # the check's name, e.g. "testcall:vip" or "testcall:trunk:trunk-a"
    number: str  # the dialled hotline number
    caller: str  # the test caller identity (From user)
    host: str  # next hop: the carrier edge proxy or a trunk
    port: int = 5060
    duration_s: float = 3.0  # media time once answered
    setup_timeout_s: float = 10.0  # INVITE -> final reply
    answer_header: str = "server"  # header naming who answered (falls back to Server, then Contact)
    audio_floor_dbov: float = -50.0  # received audio quieter than this is "no audio"
    min_mos: float = 0.0  # below this estimate the call fails ("poor audio")
    # The far end echoes our RTP (an echo test number, the lab's SBCs): none of ours coming
    # back while its own stream arrives is one-way audio (it cannot hear the caller).
    expect_echo: bool = False
    peers: dict[str, str] = field(default_factory=dict, compare=False)  # "host:port" -> a name


@dataclass(slots=True)
class CallResult:
    """Everything one test call found out; ``ok`` when it was answered with audio (and MOS met)."""

    name: str
    number: str
    ok: bool = False
    reason: str = "error"  # ok | rejected | timeout | no_audio | one_way | poor_audio | send_error | error
    code: int | None = None
    status: str = ""  # "503 Service Unavailable"
    pdd_ringing_ms: float | None = None  # INVITE -> first 180/183
    pdd_answer_ms: float | None = None  # INVITE -> 200
    answered_by: str | None = None
    contact: str | None = None
    tx_packets: int = 0  # caller -> far end: sent
    tx_echoed: int = 0  # ... and came back (our SSRC and sequence): proof the far end received them
    rx_packets: int = 0  # far end -> caller: received (any stream), then lost, loss, jitter
    rx_expected: int = 0
    rx_lost: int = 0
    loss_pct: float | None = None
    jitter_ms: float | None = None
    rtt_ms: float | None = None
    level_dbov: float | None = None
    audio: bool = False
    r_factor: float | None = None
    mos: float | None = None
    hangup: str = ""  # "200 OK", "remote BYE", "no reply", "not answered"
    garbage: int = 0
    started: float = 0.0  # monotonic
    elapsed_s: float = 0.0

    @property
    def detail(self) -> str:
        """One line for a ``why``: ``95566: 503 Service Unavailable``, ``95588: no audio``."""
        if self.reason == "ok":
            mos_text = f", MOS {self.mos:.2f}" if self.mos is not None else ""
            pdd = f", PDD {self.pdd_answer_ms:.0f} ms" if self.pdd_answer_ms is not None else ""
            return f"{self.number}: answered by {self.answered_by}{pdd}{mos_text}"
        if self.reason == "rejected":
            return f"{self.number}: {self.status}"
        if self.reason == "no_audio":
            return f"{self.number}: no audio ({self.rx_packets} RTP packets received)"
        if self.reason == "one_way":
            return (
                f"{self.number}: one-way audio: none of our {self.tx_packets} RTP packets came back"
                f" from {self.answered_by} ({self.rx_packets} of its own received)"
            )
        if self.reason == "poor_audio":
            return f"{self.number}: poor audio (MOS {self.mos:.2f})"
        return f"{self.number}: {self.status or self.reason}"

    def to_probe(self) -> ProbeResult:
        reason = {"ok": "ok", "timeout": "timeout", "send_error": "send_error", "error": "error"}
        return ProbeResult(
            self.name,
            self.ok,
            self.started,
            None,  # not a round trip: PDD and MOS are in the call's own record (Prober.last_calls)
            self.code,
            reason.get(self.reason, "bad_code" if self.reason == "rejected" else "threshold"),
            self.detail,
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["detail"] = self.detail
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 3)
        return out


def local_address_for(host: str, port: int) -> str:
    """The source address the kernel routes from towards ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return str(s.getsockname()[0])


def parse_uri_address(value: str) -> tuple[str, int] | None:
    """``<sip:user@10.0.0.1:5070;lr>`` -> ("10.0.0.1", 5070); None if it is no SIP URI."""
    match = _URI_RE.search(value)
    if match is None:
        return None
    port = int(match.group(2)) if match.group(2) else 5060
    return (match.group(1).strip("[]"), port) if 0 < port < 65536 else None


def parse_sdp_answer(body: bytes) -> tuple[str, int, int] | None:
    """(address, port, first payload type) of the audio stream of an SDP answer; None if unusable."""
    try:
        text = body[:4096].decode("ascii")
    except UnicodeDecodeError:
        return None
    c, m = _SDP_C_RE.search(text), _SDP_M_RE.search(text)
    if c is None or m is None or not 0 < int(m.group(1)) < 65536:
        return None
    return c.group(1), int(m.group(1)), int(m.group(2).split()[0])


class _Endpoint(asyncio.DatagramProtocol):
    """Queues datagrams; the call reads them in order."""

    def __init__(self, limit: int = 4096) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int], float]] = asyncio.Queue(limit)
        self.dropped = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.queue.put_nowait((data, addr, time.monotonic()))
        except asyncio.QueueFull:
            self.dropped += 1


class TestCall:
    """One call, placed by :meth:`run`; a new instance per call."""

    __test__ = False  # not a pytest class

    def __init__(self, spec: CallSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self._clock = clock
        self.result = CallResult(spec.name, spec.number)
        self._call_id = secrets.token_hex(12)
        self._from_tag = secrets.token_hex(6)
        self._branch = new_branch()
        self._to_tag = ""
        self._route: list[str] = []
        self._remote_target = ""
        self._sip: _Endpoint | None = None
        self._sip_transport: asyncio.DatagramTransport | None = None
        self._rtp: _Endpoint | None = None
        self._rtp_transport: asyncio.DatagramTransport | None = None
        self._local = ""
        # (seq, timestamp, ssrc, arrival) of every RTP packet received, when a caller wants the
        # raw trace (the benchmark recomputes loss, jitter and MOS from it offline).
        self.trace: list[tuple[int, int, int, float]] | None = None

    # -- the call ------------------------------------------------------------------

    async def run(self) -> CallResult:
        r = self.result
        r.started = self._clock()
        try:
            await self._open()
            answer = await self._invite()
            if answer is not None:
                await self._ack(answer)
                remote_bye = await self._media(answer)
                r.hangup = "remote BYE" if remote_bye else await self._bye()
                self._judge()
            else:
                r.hangup = "not answered"
        except OSError as exc:
            r.reason, r.status = "send_error", f"{type(exc).__name__}: {exc.strerror or exc}"
        finally:
            r.elapsed_s = self._clock() - r.started
            self._close()
        return r

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._local = local_address_for(self.spec.host, self.spec.port)
        self._sip_transport, self._sip = await loop.create_datagram_endpoint(
            _Endpoint, local_addr=(self._local, 0)
        )
        self._rtp_transport, self._rtp = await loop.create_datagram_endpoint(
            _Endpoint, local_addr=(self._local, 0)
        )

    def _close(self) -> None:
        self.result.garbage += (self._sip.dropped if self._sip else 0) + (
            self._rtp.dropped if self._rtp else 0
        )
        for transport in (self._sip_transport, self._rtp_transport):
            if transport is not None:
                transport.close()

    @property
    def _sip_port(self) -> int:
        assert self._sip_transport is not None
        return int(self._sip_transport.get_extra_info("sockname")[1])

    @property
    def _rtp_port(self) -> int:
        assert self._rtp_transport is not None
        return int(self._rtp_transport.get_extra_info("sockname")[1])

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self._sip_transport is not None
        self._sip_transport.sendto(data, addr)

    async def _invite(self) -> SipMessage | None:
        """Send the INVITE until a final reply or the set-up timeout; the 2xx, or None."""
        r, spec = self.result, self.spec
        invite = self._invite_bytes()
        hop = (spec.host, spec.port)
        sent = self._clock()
        deadline = sent + spec.setup_timeout_s
        self._send(invite, hop)
        interval, next_retransmit, provisional = T1_S, sent + T1_S, False
        while True:
            now = self._clock()
            if now >= deadline:
                r.reason = "timeout"
                r.status = f"no final reply in {spec.setup_timeout_s:g} s" + (
                    "" if provisional else ", nothing at all"
                )
                if provisional:
                    await self._cancel(hop)
                return None
            wait = min(deadline, next_retransmit) - now if not provisional else deadline - now
            reply = await self._next_reply(wait, "INVITE")
            if reply is None:
                if not provisional and self._clock() >= next_retransmit:
                    self._send(invite, hop)
                    interval = min(interval * 2, 4.0)
                    next_retransmit = self._clock() + interval
                continue
            code = reply.code or 0
            elapsed_ms = (self._clock() - sent) * 1000
            if code < 200:
                provisional = True
                if code in (180, 183) and r.pdd_ringing_ms is None:
                    r.pdd_ringing_ms = elapsed_ms
                continue
            r.code, r.status = code, reply.status
            if code < 300:
                r.pdd_answer_ms = elapsed_ms
                return reply
            self._send(self._ack_for_failure(reply), hop)
            r.reason = "rejected"
            return None

    async def _next_reply(self, timeout: float, method: str) -> SipMessage | None:
        """The next response to our ``method`` in this call; requests in the call are answered."""
        assert self._sip is not None
        deadline = self._clock() + max(0.0, timeout)
        while True:
            left = deadline - self._clock()
            if left <= 0:
                return None
            try:
                async with asyncio.timeout(left):
                    data, addr, _ = await self._sip.queue.get()
            except TimeoutError:
                return None
            message = self._parse(data)
            if message is None:
                continue
            if not message.is_response:
                self._answer_request(message, addr)
                continue
            number, cseq_method = message.cseq
            if cseq_method == method:
                return message
            # a stray reply of an earlier transaction (e.g. a late 200 to the INVITE): re-ACK it
            if cseq_method == "INVITE" and message.code and 200 <= message.code < 300 and self._to_tag:
                self._send(self._ack_bytes(), self._next_hop())

    def _parse(self, data: bytes) -> SipMessage | None:
        try:
            message = parse_message(data)
        except SipParseError:
            self.result.garbage += 1
            return None
        if message.call_id != self._call_id:
            self.result.garbage += 1
            return None
        if message.is_response and message.top_branch is None:
            self.result.garbage += 1
            return None
        return message

    def _answer_request(self, request: SipMessage, addr: tuple[str, int]) -> None:
        """Requests inside our call: BYE and anything else get 200 (BYE ends the media)."""
        lines = ["SIP/2.0 200 OK"]
        lines += [f"Via: {v}" for v in request.header_values("via")]
        lines += [
            f"From: {request.header('from') or ''}",
            f"To: {request.header('to') or ''}",
            f"Call-ID: {request.call_id}",
            f"CSeq: {request.header('cseq') or ''}",
            f"User-Agent: {USER_AGENT}",
            "Content-Length: 0",
        ]
        self._send(("\r\n".join(lines) + "\r\n\r\n").encode(), addr)
        if request.method == "BYE":
            self._remote_bye = True

    _remote_bye = False

    # -- messages ----------------------------------------------------------------

    def _uri(self) -> str:
        host = f"[{self.spec.host}]" if ":" in self.spec.host else self.spec.host
        return f"sip:{self.spec.number}@{host}:{self.spec.port}"

    def _common(self, method: str, uri: str, branch: str, cseq: int, to_tag: str = "") -> list[str]:
        local = f"{self._local}:{self._sip_port}"
        to = f"<sip:{self.spec.number}@{self.spec.host}:{self.spec.port}>" + (
            f";tag={to_tag}" if to_tag else ""
        )
        return [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {local};branch={branch};rport",
            "Max-Forwards: 70",
            f'From: "hotsite test call" <sip:{self.spec.caller}@{local}>;tag={self._from_tag}',
            f"To: {to}",
            f"Call-ID: {self._call_id}",
            f"CSeq: {cseq} {method}",
        ]

    def _invite_bytes(self) -> bytes:
        sdp = (
            "v=0\r\n"
            f"o=hotsite {secrets.randbelow(2**31)} 1 IN IP4 {self._local}\r\n"
            "s=hotsite test call\r\n"
            f"c=IN IP4 {self._local}\r\n"
            "t=0 0\r\n"
            f"m=audio {self._rtp_port} RTP/AVP 0\r\n"
            "a=rtpmap:0 PCMU/8000\r\n"
            "a=ptime:20\r\n"
            "a=sendrecv\r\n"
        ).encode()
        lines = self._common("INVITE", self._uri(), self._branch, 1)
        lines += [
            f"Contact: <sip:{self.spec.caller}@{self._local}:{self._sip_port}>",
            f"{MARK_HEADER}: 1",
            f"User-Agent: {USER_AGENT}",
            "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS",
            "Content-Type: application/sdp",
            f"Content-Length: {len(sdp)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + sdp

    def _ack_for_failure(self, reply: SipMessage) -> bytes:
        """RFC 3261 17.1.1.3: same branch and Request-URI as the INVITE, To from the reply."""
        lines = self._common("ACK", self._uri(), self._branch, 1)
        lines = [line if not line.startswith("To:") else f"To: {reply.header('to') or ''}" for line in lines]
        lines += ["Content-Length: 0"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _cancel(self, hop: tuple[str, int]) -> None:
        lines = self._common("CANCEL", self._uri(), self._branch, 1) + ["Content-Length: 0"]
        self._send(("\r\n".join(lines) + "\r\n\r\n").encode(), hop)
        # The 487 to the INVITE must be ACKed, or the far end retransmits it for 32 s.
        reply = await self._next_reply(2 * T1_S * 4, "INVITE")
        if reply is not None and reply.code and reply.code >= 300:
            self._send(self._ack_for_failure(reply), hop)

    def _in_dialog(self, method: str, cseq: int) -> bytes:
        lines = self._common(method, self._remote_target, new_branch(), cseq, self._to_tag)
        lines += [f"Route: {route}" for route in self._route]
        lines += [f"User-Agent: {USER_AGENT}", "Content-Length: 0"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _ack_bytes(self) -> bytes:
        return self._in_dialog("ACK", 1)

    def _next_hop(self) -> tuple[str, int]:
        """RFC 3261 12.2.1.1 with loose routing: the first Route, else the remote target."""
        target = parse_uri_address(self._route[0] if self._route else self._remote_target)
        return target or (self.spec.host, self.spec.port)

    async def _ack(self, answer: SipMessage) -> None:
        r = self.result
        to = answer.header("to") or ""
        self._to_tag = to.split(";tag=", 1)[1].split(";")[0] if ";tag=" in to else ""
        contact = answer.header("contact") or ""
        r.contact = contact[:120]
        match = _URI_RE.search(contact)
        self._remote_target = match.group(0).lstrip("<") if match else self._uri()
        self._route = [
            v for rr in reversed(answer.header_values("record-route")) for v in reversed(split_commas(rr))
        ]
        r.answered_by = self._who(answer)
        self._send(self._ack_bytes(), self._next_hop())

    def _who(self, answer: SipMessage) -> str:
        spec = self.spec
        address = parse_uri_address(answer.header("contact") or "")
        if address is not None:
            named = spec.peers.get(f"{address[0]}:{address[1]}") or spec.peers.get(address[0])
            if named:
                return named
        for header in (spec.answer_header, "server", "user-agent"):
            value = answer.header(header)
            if value:
                return re.sub(r"[^\x20-\x7e]", "?", value)[:80]
        return f"{address[0]}:{address[1]}" if address else "unknown"

    # -- media -------------------------------------------------------------------

    async def _media(self, answer: SipMessage) -> bool:
        """Send and receive RTP for ``duration_s``; True if the far end hung up first."""
        assert self._rtp is not None and self._rtp_transport is not None
        r, spec = self.result, self.spec
        remote = parse_sdp_answer(answer.body)
        if remote is None:
            r.status = "200 OK without a usable SDP answer"
            await asyncio.sleep(min(spec.duration_s, 1.0))
            return self._remote_bye
        address, port, _ = remote
        audio = rtp.tone(samples=rtp.FRAME_SAMPLES * 50)
        ssrc, seq0 = secrets.randbits(32), secrets.randbelow(2**15)
        stats, rtts = rtp.ReceiverStats(), list[float]()
        sent_at: dict[int, float] = {}
        start = self._clock()
        frames = max(1, round(spec.duration_s / FRAME_S))
        for k in range(frames + 10):  # 10 more frames of listening for the echo's tail
            if k < frames:
                offset = (k % 50) * rtp.FRAME_SAMPLES
                payload = audio[offset : offset + rtp.FRAME_SAMPLES]
                packet = rtp.build(rtp.PCMU, seq0 + k, k * rtp.FRAME_SAMPLES, ssrc, payload, marker=k == 0)
                self._rtp_transport.sendto(packet, (address, port))
                sent_at[(seq0 + k) % rtp.SEQ_MOD] = time.monotonic()  # the clock arrivals are stamped with
                r.tx_packets += 1
            await self._receive_until(start + (k + 1) * FRAME_S, stats, ssrc, sent_at, rtts)
            await self._poll_sip()
            if self._remote_bye:
                break
        r.rx_packets, r.rx_expected, r.rx_lost = stats.received, stats.expected, max(0, stats.lost)
        r.loss_pct = 100 * stats.loss_fraction if stats.expected else None
        r.jitter_ms = stats.jitter_ms if stats.received > 1 else None
        r.level_dbov = stats.level_dbov if stats.received else None
        r.rtt_ms = sorted(rtts)[len(rtts) // 2] * 1000 if rtts else None
        return self._remote_bye

    async def _receive_until(
        self, until: float, stats: rtp.ReceiverStats, ssrc: int, sent_at: dict[int, float], rtts: list[float]
    ) -> None:
        assert self._rtp is not None
        while True:
            left = until - self._clock()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(left):
                    data, _, arrival = await self._rtp.queue.get()
            except TimeoutError:
                return
            try:
                packet = rtp.parse(data)
            except rtp.RtpParseError:
                self.result.garbage += 1
                continue
            if self.trace is not None:
                self.trace.append((packet.seq, packet.timestamp, packet.ssrc, arrival))
            # Our own packet, echoed: counted once per packet (duplicates and probation included).
            sent = sent_at.pop(packet.seq, None) if packet.ssrc == ssrc else None
            self.result.tx_echoed += sent is not None
            if not stats.add(packet, arrival):
                continue
            if sent is not None:
                rtts.append(arrival - sent)

    async def _poll_sip(self) -> None:
        """Answer what arrived on the SIP socket meanwhile (a BYE, a retransmitted 200)."""
        await self._next_reply(0.0001, "-")

    async def _bye(self) -> str:
        hop, data = self._next_hop(), self._in_dialog("BYE", 2)
        self._send(data, hop)
        interval, deadline = T1_S, self._clock() + 8 * T1_S
        while self._clock() < deadline:
            reply = await self._next_reply(min(interval, deadline - self._clock()), "BYE")
            if reply is not None and reply.code and reply.code >= 200:
                return reply.status
            if reply is None:
                self._send(data, hop)
                interval = min(interval * 2, 4.0)
        return "no reply to BYE"

    def _judge(self) -> None:
        r, spec = self.result, self.spec
        r.audio = r.rx_packets >= 5 and r.level_dbov is not None and r.level_dbov >= spec.audio_floor_dbov
        if r.loss_pct is not None:
            one_way = (r.rtt_ms / 2) if r.rtt_ms is not None else 0.0
            r.r_factor = mos.r_factor(one_way + ENDPOINT_DELAY_MS, r.loss_pct)
            r.mos = mos.mos_from_r(r.r_factor)
        if not r.audio:
            r.reason = "no_audio"
        elif spec.expect_echo and r.tx_packets and not r.tx_echoed:
            r.reason = "one_way"  # we hear the far end; it never heard us
        elif r.mos is not None and r.mos < spec.min_mos:
            r.reason = "poor_audio"
        else:
            r.reason, r.ok = "ok", True


async def place_call(spec: CallSpec) -> CallResult:
    """Place one test call and return what it found (never raises for network trouble)."""
    return await TestCall(spec).run()
