"""The SIP OPTIONS probe over UDP, TCP and TLS: is this trunk or SBC answering, and how fast?

Why it is built this way:

* UDP: one *connected* socket per (host, port), reused across probes.
  Connected, because Linux then reports an ICMP port/host unreachable to that
  socket (``ECONNREFUSED`` in ``error_received``), so a dead SBC fails the
  probe at once instead of after the whole timeout; the kernel also drops
  datagrams from any other source address. Reused, so a hundred trunks probed
  every second do not churn sockets. A socket that saw an error is replaced.
* TCP and TLS: one persistent connection per (host, port, transport), as a
  proxy keeps it (RFC 3261 18); opened on first use and again after any error.
  The byte stream is cut into messages by Content-Length
  (:class:`monitoring.sip.StreamFramer`); a stream that cannot be framed
  (oversized, no Content-Length) is counted as ``garbage`` and reset, since
  its message boundaries are lost. A refused connection is reason ``refused``.
  TLS verifies the peer's certificate unless the caller's ``ssl_context`` says
  otherwise. There are no retransmissions on a reliable transport (17.1.2.2).
* A reply counts only if its top Via branch, Call-ID and CSeq match the
  outstanding request, whatever the transport. The branch and Call-ID are
  random, so a stray, spoofed or late message can never mark a target up;
  each ignored one is reported through ``on_unmatched`` with a bounded word.
* ``probe()`` never raises for network trouble and always returns within its
  timeout (plus scheduling jitter); over UDP it retransmits per RFC 3261
  timer E (T1 = 500 ms, doubling, capped at T2 = 4 s) inside that timeout.
* The per-probe path is kept lean (one timer handle per probe, no lock or
  task when the socket exists): the appliance probes thousands of targets
  a second on one core (tests/benchmarks/bench_sip_probe.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from monitoring.probes.base import ProbeResult
from monitoring.sip import (
    MAX_CSEQ,
    MAX_STREAM_MESSAGE,
    OptionsRequest,
    SipFramingError,
    SipMessage,
    SipParseError,
    StreamFramer,
    build_options,
    parse_response,
)

log = logging.getLogger(f"hotsite.{__name__}")

Transport = Literal["udp", "tcp", "tls"]
TRANSPORTS: tuple[str, ...] = ("udp", "tcp", "tls")
T1 = 0.5  # RFC 3261 17.1.2.2: first retransmission interval
T2 = 4.0  # RFC 3261: cap on the retransmission interval
LATE_MEMORY = 256  # finished branches remembered per socket to tell "late" from "no_match"
IDLE_CLOSE_S = 600.0  # a socket unused this long belongs to a target removed by a reload
MAX_WRITE_BUFFER = 64 * 1024  # bytes queued to a peer that does not read: reset the connection
UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
STREAM_UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})


def default_accept(code: int) -> bool:
    """Any 2xx means alive, as Kamailio's dispatcher judges OPTIONS replies by default."""
    return 200 <= code < 300


@dataclass(frozen=True, slots=True)
class _Reply:
    message: SipMessage
    received: float  # time.perf_counter() when the bytes arrived


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    detail: str


_Outcome = _Reply | _Failure


class _Transaction:
    """One outstanding OPTIONS: what was sent, its one timer, and where its answer goes.

    A single timer handle serves both the retransmissions (UDP) and the
    deadline, so a probe costs one heap entry in the event loop, not two tasks.
    """

    __slots__ = (
        "request",
        "future",
        "provisional",
        "_channel",
        "_loop",
        "_deadline",
        "_timeout",
        "_interval",
        "_handle",
    )

    def __init__(self, request: OptionsRequest, channel: _Channel) -> None:
        self._loop = asyncio.get_running_loop()
        self.request = request
        self.future: asyncio.Future[_Outcome] = self._loop.create_future()
        self.provisional: SipMessage | None = None
        self._channel = channel
        self._deadline = 0.0
        self._timeout = 0.0
        self._interval: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def settle(self, outcome: _Outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def arm(self, deadline: float, timeout: float, retransmit: bool) -> None:
        """Schedule timer E (when ``retransmit``) and the deadline, whichever comes first."""
        self._deadline, self._timeout = deadline, timeout
        self._interval = T1 if retransmit else None
        self._schedule(self._loop.time())

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        at = self._deadline if self._interval is None else min(now + self._interval, self._deadline)
        self._handle = self._loop.call_at(at, self._tick, at >= self._deadline)

    def _tick(self, is_deadline: bool) -> None:
        self._handle = None
        if self.future.done():
            return
        if is_deadline:
            self.settle(_Failure("timeout", self._timeout_detail()))
            return
        assert self._interval is not None
        self._channel.send(self)
        self._interval = T2 if self.provisional else min(self._interval * 2, T2)
        if not self.future.done():
            self._schedule(self._loop.time())

    def _timeout_detail(self) -> str:
        if self.provisional is not None:
            return f"only {self.provisional.status} within {self._timeout:g}s"
        return f"no reply within {self._timeout:g}s"


class _Channel:
    """What UDP sockets and stream connections share: matching replies to transactions."""

    def __init__(self, on_unmatched: Callable[[str], None]) -> None:
        self.pending: dict[str, _Transaction] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.broken = False
        self.last_used = 0.0  # event-loop time of the last probe begun
        self.local = ("", 0)
        self._on_unmatched = on_unmatched

    def deliver(self, data: bytes, received: float) -> None:
        """One whole message from the peer: a reply to match, or something to count."""
        try:
            reply = parse_response(data)
        except SipParseError:
            self._on_unmatched("garbage")
            return
        branch = reply.top_branch or ""
        txn = self.pending.get(branch)
        if txn is None or not txn.request.matches(reply):
            self._on_unmatched("late" if txn is None and branch in self.finished else "no_match")
        elif txn.future.done():
            self._on_unmatched("late")  # a retransmitted final: already answered
        elif reply.code is not None and reply.code < 200:
            txn.provisional = reply  # RFC 3261 17.1.2.2: not final, keep waiting
        else:
            txn.settle(_Reply(reply, received))

    @property
    def usable(self) -> bool:
        raise NotImplementedError

    def local_address(self) -> tuple[str, int]:
        return self.local

    def begin(self, request: OptionsRequest) -> _Transaction:
        txn = _Transaction(request, self)
        self.last_used = asyncio.get_running_loop().time()
        self.pending[request.branch] = txn
        return txn

    def end(self, txn: _Transaction) -> None:
        """Forget a transaction, but remember its branch so a late reply is named as such."""
        self.pending.pop(txn.request.branch, None)
        self.finished[txn.request.branch] = None
        if len(self.finished) > LATE_MEMORY:
            self.finished.popitem(last=False)

    def send(self, txn: _Transaction) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _fail_all(self, failure: _Failure) -> None:
        for txn in list(self.pending.values()):
            txn.settle(failure)

    def _set_local(self, transport: asyncio.BaseTransport) -> None:
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.local = (str(sockname[0]), int(sockname[1]))


class _Endpoint(_Channel, asyncio.DatagramProtocol):
    """A connected UDP socket to one (host, port) and the probes waiting on it."""

    def __init__(self, on_unmatched: Callable[[str], None]) -> None:
        super().__init__(on_unmatched)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.last_used = asyncio.get_running_loop().time()
        self._set_local(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        received = time.perf_counter()
        if not data.strip(b"\r\n"):
            return  # a CRLF keep-alive (RFC 5626 3.5.1): legitimate, not a reply
        self.deliver(data, received)

    def error_received(self, exc: Exception) -> None:
        self.broken = True
        code = getattr(exc, "errno", None)
        reason = "unreachable" if code in UNREACHABLE_ERRNOS else "send_error"
        self._fail_all(_Failure(reason, str(exc) or type(exc).__name__))

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self._fail_all(_Failure("send_error", f"socket closed: {exc}" if exc else "socket closed"))

    @property
    def usable(self) -> bool:
        return not self.broken and self.transport is not None and not self.transport.is_closing()

    def send(self, txn: _Transaction) -> None:
        """Send or retransmit; asyncio routes a send failure to ``error_received``."""
        if self.transport is None or self.transport.is_closing():
            txn.settle(_Failure("send_error", "socket closed"))
            return
        self.transport.sendto(txn.request.data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Connection(_Channel, asyncio.Protocol):
    """A TCP or TLS connection to one (host, port): framing, keep-alives, and its probes."""

    def __init__(self, on_unmatched: Callable[[str], None], max_message: int) -> None:
        super().__init__(on_unmatched)
        self.transport: asyncio.Transport | None = None
        self._framer = StreamFramer(max_message)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.last_used = asyncio.get_running_loop().time()
        self._set_local(transport)

    def data_received(self, data: bytes) -> None:
        received = time.perf_counter()
        try:
            messages = self._framer.feed(data)
        except SipFramingError as exc:
            self._on_unmatched("garbage")
            self.reset(f"unframeable data from the peer: {exc}")
            return
        while self._framer.pings:
            self._framer.pings -= 1
            self._write(b"\r\n")  # RFC 5626 4.4.1: answer a CRLF ping with a pong
        for message in messages:
            self.deliver(message, received)

    def eof_received(self) -> bool:
        return False  # the peer closed its side: close ours, connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        detail = f"connection lost: {exc}" if exc else "connection closed by the peer"
        self._fail_all(_Failure("send_error", detail))

    @property
    def usable(self) -> bool:
        return not self.broken and self.transport is not None and not self.transport.is_closing()

    def send(self, txn: _Transaction) -> None:
        if not self.usable:
            txn.settle(_Failure("send_error", "connection closed"))
            return
        self._write(txn.request.data)
        assert self.transport is not None
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.reset(f"peer does not read: over {MAX_WRITE_BUFFER} bytes queued")

    def reset(self, why: str) -> None:
        """Drop the connection at once; its probes fail and the next probe reconnects."""
        self.broken = True
        self._fail_all(_Failure("send_error", f"connection reset: {why}"))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class SipOptionsProbe:
    """Probes SIP targets with OPTIONS over UDP, TCP or TLS; one instance serves every target.

    ``ssl_context`` is used for TLS; by default the system's CAs with hostname
    checking (``ssl.create_default_context()``). ``max_stream_message`` caps one
    message on a stream; a longer one resets the connection.
    """

    def __init__(
        self,
        *,
        accept: Callable[[int], bool] = default_accept,
        clock: Callable[[], float] = time.monotonic,
        on_unmatched: Callable[[str], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_stream_message: int = MAX_STREAM_MESSAGE,
    ) -> None:
        StreamFramer(max_stream_message)  # validates the cap now, not at the first TCP probe
        self._accept = accept
        self._clock = clock
        self._on_unmatched = on_unmatched or (lambda reason: None)
        self._ssl_context = ssl_context
        self._max_message = max_stream_message
        self._endpoints: dict[tuple[str, int], _Endpoint] = {}
        self._streams: dict[tuple[str, int, str], _Connection] = {}
        self._locks: dict[tuple[Any, ...], asyncio.Lock] = {}
        self._cseq = 0
        self._closed = False
        self._next_sweep = 0.0

    async def probe(
        self,
        target: str,
        host: str,
        port: int = 5060,
        *,
        timeout: float = 1.0,
        transport: Transport | str = "udp",
    ) -> ProbeResult:
        """Send one OPTIONS (retransmitted over UDP) and judge the final reply."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        kind = transport.lower()
        if kind not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if self._closed:
            raise RuntimeError("SipOptionsProbe is closed")
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + timeout
        if now >= self._next_sweep:
            self._close_idle(now)
        channel: _Channel | None = (
            self._endpoints.get((host, port)) if kind == "udp" else self._streams.get((host, port, kind))
        )
        if channel is None or not channel.usable:
            try:
                async with asyncio.timeout_at(deadline):
                    channel = await self._open(host, port, kind)
            except TimeoutError:
                what = "socket" if kind == "udp" else f"{kind.upper()} connection"
                return self._result(target, _Failure("timeout", f"no {what} within {timeout:g}s"))
            except OSError as exc:
                return self._result(target, self._open_failure(exc, kind))
        request = self._request(channel, host, port, kind)
        started = time.perf_counter()
        outcome = await self._exchange(channel, request, deadline, timeout, retransmit=kind == "udp")
        return self._result(target, outcome, started)

    async def close(self) -> None:
        """Close every socket; probes still waiting end with ``send_error``."""
        self._closed = True
        for channel in [*self._endpoints.values(), *self._streams.values()]:
            channel.close()
        self._endpoints.clear()
        self._streams.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    # -- internals -----------------------------------------------------------------

    async def _open(self, host: str, port: int, kind: str) -> _Channel:
        """The socket or connection for (host, port, kind), made on first use and after any error."""
        key: tuple[Any, ...] = (host, port) if kind == "udp" else (host, port, kind)
        table = cast(dict[tuple[Any, ...], _Channel], self._endpoints if kind == "udp" else self._streams)
        async with self._locks.setdefault(key, asyncio.Lock()):
            channel = table.get(key)
            if channel is not None and channel.usable:
                return channel
            if channel is not None:
                channel.close()
                del table[key]
            loop = asyncio.get_running_loop()
            if kind == "udp":
                _, endpoint = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(self._report_unmatched), remote_addr=(host, port)
                )
                channel = endpoint
            else:
                tls = self._tls_context() if kind == "tls" else None
                _, connection = await loop.create_connection(
                    lambda: _Connection(self._report_unmatched, self._max_message),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
                channel = connection
            table[key] = channel
            return channel

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # verifies chain and host name
        return self._ssl_context

    @staticmethod
    def _open_failure(exc: OSError, kind: str) -> _Failure:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, ssl.SSLError):
            return _Failure("send_error", f"TLS handshake failed: {getattr(exc, 'reason', None) or detail}")
        if isinstance(exc, ConnectionRefusedError):
            return _Failure("refused" if kind != "udp" else "unreachable", detail)
        if exc.errno in STREAM_UNREACHABLE_ERRNOS:
            return _Failure("unreachable", detail)
        return _Failure("send_error", detail)  # name resolution, bad address, reset in handshake

    def _close_idle(self, now: float) -> None:
        """Close sockets no probe has used for a long time, so reloads do not leak them.

        Runs at most a few times per ``IDLE_CLOSE_S``, not on every probe: with
        thousands of targets a sweep per probe would cost more than the probing.
        """
        self._next_sweep = now + IDLE_CLOSE_S / 8
        cutoff = now - IDLE_CLOSE_S
        for table in (self._endpoints, self._streams):
            channels = cast(dict[tuple[Any, ...], _Channel], table)
            for key, channel in list(channels.items()):
                lock = self._locks.get(key)
                busy = channel.pending or (lock is not None and lock.locked())
                if not busy and channel.last_used < cutoff:
                    channel.close()
                    del channels[key]
                    self._locks.pop(key, None)

    def _request(self, channel: _Channel, host: str, port: int, kind: str) -> OptionsRequest:
        self._cseq = self._cseq % MAX_CSEQ + 1
        local_host, local_port = channel.local_address()
        return build_options(
            host, port, local_host=local_host, local_port=local_port, cseq=self._cseq, transport=kind
        )

    @staticmethod
    async def _exchange(
        channel: _Channel, request: OptionsRequest, deadline: float, timeout: float, *, retransmit: bool
    ) -> _Outcome:
        """Send, retransmit on timer E (UDP only), and wait for a final reply until the deadline."""
        txn = channel.begin(request)
        try:
            channel.send(txn)
            if not txn.future.done():
                txn.arm(deadline, timeout, retransmit)
            return await txn.future
        finally:
            txn.disarm()
            channel.end(txn)

    def _result(self, target: str, outcome: _Outcome, started: float | None = None) -> ProbeResult:
        """Turn what happened into the one result type; 408 is never success."""
        now = self._clock()
        if isinstance(outcome, _Failure):
            return ProbeResult(target, False, now, None, None, outcome.reason, outcome.detail)
        rtt = outcome.received - started if started is not None else None
        code = cast(int, outcome.message.code)
        ok = code != 408 and self._accept(code)
        reason = "ok" if ok else "bad_code"
        return ProbeResult(target, ok, now, rtt, code, reason, outcome.message.status)

    def _report_unmatched(self, word: str) -> None:
        try:
            self._on_unmatched(word)
        except Exception:  # a metrics bug must not break reception
            log.exception("on_unmatched callback failed")
