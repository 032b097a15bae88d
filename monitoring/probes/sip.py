"""The SIP OPTIONS probe over UDP: is this trunk or SBC answering, and how fast?

Why it is built this way:

* One *connected* UDP socket per (host, port), reused across probes. Connected,
  because Linux then reports an ICMP port/host unreachable to that socket
  (``ECONNREFUSED`` in ``error_received``), so a dead SBC fails the probe at
  once instead of after the whole timeout; the kernel also drops datagrams
  from any other source address. Reused, so a hundred trunks probed every
  second do not churn sockets. A socket that saw an error is replaced.
* A reply counts only if its top Via branch, Call-ID and CSeq match the
  outstanding request. The branch and Call-ID are random, so a stray,
  spoofed or late datagram can never mark a target up; each ignored one is
  reported through ``on_unmatched`` with a bounded word for a metric.
* ``probe()`` never raises for network trouble and always returns within its
  timeout (plus scheduling jitter); it retransmits per RFC 3261 timer E
  (T1 = 500 ms, doubling, capped at T2 = 4 s) inside that timeout.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from monitoring.probes.base import ProbeResult
from monitoring.sip import (
    MAX_CSEQ,
    OptionsRequest,
    SipMessage,
    SipParseError,
    build_options,
    parse_response,
)

log = logging.getLogger(__name__)

T1 = 0.5  # RFC 3261 17.1.2.2: first retransmission interval
T2 = 4.0  # RFC 3261: cap on the retransmission interval
LATE_MEMORY = 256  # finished branches remembered per socket to tell "late" from "no_match"
IDLE_CLOSE_S = 600.0  # a socket unused this long belongs to a target removed by a reload
UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})


def default_accept(code: int) -> bool:
    """Any 2xx means alive, as Kamailio's dispatcher judges OPTIONS replies by default."""
    return 200 <= code < 300


@dataclass(frozen=True, slots=True)
class _Reply:
    message: SipMessage
    received: float  # time.perf_counter() when the datagram arrived


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    detail: str


_Outcome = _Reply | _Failure


class _Transaction:
    """One outstanding OPTIONS: what was sent and where its answer goes."""

    def __init__(self, request: OptionsRequest) -> None:
        self.request = request
        self.future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self.provisional: SipMessage | None = None

    def settle(self, outcome: _Outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


class _Endpoint(asyncio.DatagramProtocol):
    """A connected UDP socket to one (host, port) and the probes waiting on it."""

    def __init__(self, on_unmatched: Callable[[str], None]) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[str, _Transaction] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.broken = False
        self.last_used = 0.0  # event-loop time of the last probe begun
        self._on_unmatched = on_unmatched

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.last_used = asyncio.get_running_loop().time()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        received = time.perf_counter()
        if not data.strip(b"\r\n"):
            return  # a CRLF keep-alive (RFC 5626 3.5.1): legitimate, not a reply
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

    def error_received(self, exc: Exception) -> None:
        self.broken = True
        code = getattr(exc, "errno", None)
        reason = "unreachable" if code in UNREACHABLE_ERRNOS else "send_error"
        self._fail_all(_Failure(reason, str(exc) or type(exc).__name__))

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self._fail_all(_Failure("send_error", f"socket closed: {exc}" if exc else "socket closed"))

    # -- used by the probe -------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.broken and self.transport is not None and not self.transport.is_closing()

    def local_address(self) -> tuple[str, int]:
        assert self.transport is not None
        sockname = self.transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def begin(self, request: OptionsRequest) -> _Transaction:
        txn = _Transaction(request)
        self.last_used = asyncio.get_running_loop().time()
        self.pending[request.branch] = txn
        return txn

    def end(self, txn: _Transaction) -> None:
        """Forget a transaction, but remember its branch so a late reply is named as such."""
        self.pending.pop(txn.request.branch, None)
        self.finished[txn.request.branch] = None
        while len(self.finished) > LATE_MEMORY:
            self.finished.popitem(last=False)

    def send(self, txn: _Transaction) -> None:
        """Send or retransmit; asyncio routes a send failure to ``error_received``."""
        if self.transport is None or self.transport.is_closing():
            txn.settle(_Failure("send_error", "socket closed"))
            return
        self.transport.sendto(txn.request.data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail_all(self, failure: _Failure) -> None:
        for txn in list(self.pending.values()):
            txn.settle(failure)


class SipOptionsProbe:
    """Probes SIP targets with OPTIONS over UDP; one instance serves every target."""

    def __init__(
        self,
        *,
        accept: Callable[[int], bool] = default_accept,
        clock: Callable[[], float] = time.monotonic,
        on_unmatched: Callable[[str], None] | None = None,
    ) -> None:
        self._accept = accept
        self._clock = clock
        self._on_unmatched = on_unmatched or (lambda reason: None)
        self._endpoints: dict[tuple[str, int], _Endpoint] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._cseq = 0
        self._closed = False

    async def probe(self, target: str, host: str, port: int = 5060, *, timeout: float = 1.0) -> ProbeResult:
        """Send one OPTIONS (with retransmissions) and judge the final reply."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if self._closed:
            raise RuntimeError("SipOptionsProbe is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                endpoint = await self._endpoint(host, port)
        except TimeoutError:
            return self._result(target, _Failure("timeout", f"no socket within {timeout:g}s"))
        except OSError as exc:  # name resolution, no route, bad address
            return self._result(target, _Failure("send_error", str(exc) or type(exc).__name__))
        request = self._request(endpoint, host, port)
        started = time.perf_counter()
        outcome = await self._exchange(endpoint, request, deadline, timeout)
        return self._result(target, outcome, started)

    async def close(self) -> None:
        """Close every socket; probes still waiting end with ``send_error``."""
        self._closed = True
        for endpoint in self._endpoints.values():
            endpoint.close()
        self._endpoints.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    # -- internals -----------------------------------------------------------------

    async def _endpoint(self, host: str, port: int) -> _Endpoint:
        """The socket for (host, port), made on first use and after any error."""
        key = (host, port)
        self._close_idle(key)
        async with self._locks.setdefault(key, asyncio.Lock()):
            endpoint = self._endpoints.get(key)
            if endpoint is not None and endpoint.usable:
                return endpoint
            if endpoint is not None:
                endpoint.close()
            loop = asyncio.get_running_loop()
            _, endpoint = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self._report_unmatched), remote_addr=key
            )
            self._endpoints[key] = endpoint
            return endpoint

    def _close_idle(self, keep: tuple[str, int]) -> None:
        """Close sockets no probe has used for a long time, so reloads do not leak them."""
        cutoff = asyncio.get_running_loop().time() - IDLE_CLOSE_S
        for key, endpoint in list(self._endpoints.items()):
            lock = self._locks.get(key)
            busy = endpoint.pending or (lock is not None and lock.locked())
            if key != keep and not busy and endpoint.last_used < cutoff:
                endpoint.close()
                del self._endpoints[key]
                self._locks.pop(key, None)

    def _request(self, endpoint: _Endpoint, host: str, port: int) -> OptionsRequest:
        self._cseq = self._cseq % MAX_CSEQ + 1
        local_host, local_port = endpoint.local_address()
        return build_options(host, port, local_host=local_host, local_port=local_port, cseq=self._cseq)

    async def _exchange(
        self, endpoint: _Endpoint, request: OptionsRequest, deadline: float, timeout: float
    ) -> _Outcome:
        """Send, retransmit on timer E, and wait for a final reply until the deadline."""
        loop = asyncio.get_running_loop()
        txn = endpoint.begin(request)
        try:
            interval = T1
            endpoint.send(txn)
            while (remaining := deadline - loop.time()) > 0:
                done, _ = await asyncio.wait({txn.future}, timeout=min(interval, remaining))
                if done:
                    return txn.future.result()
                if deadline - loop.time() <= 0:
                    break
                interval = T2 if txn.provisional else min(interval * 2, T2)
                endpoint.send(txn)
            if txn.future.done():
                return txn.future.result()
            return _Failure("timeout", self._timeout_detail(txn, timeout))
        finally:
            endpoint.end(txn)

    @staticmethod
    def _timeout_detail(txn: _Transaction, timeout: float) -> str:
        if txn.provisional is not None:
            return f"only {txn.provisional.status} within {timeout:g}s"
        return f"no reply within {timeout:g}s"

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
