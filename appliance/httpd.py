"""A small HTTP/1.1 server that bounds everything it reads before it authenticates.

Used by every TCP listener of hotsite that speaks HTTP: the Alertmanager
receiver (``appliance.paging.webhook``), the witness's ``/vote``
(``failover.witness``) and ``/metrics`` (``monitoring.metrics``). One request
per connection, then the connection closes: none of these needs keep-alive,
and it keeps the accounting simple.

What is guaranteed, whatever a client sends:

* the request head (request line and headers) is read into at most
  ``Limits.max_head`` bytes, at most ``Limits.max_headers`` header lines, and
  must be complete within ``Limits.head_timeout_s`` of the connection (a
  deadline, not a per-read timeout: a client trickling one byte a second does
  not keep it open longer); TLS, when configured, is negotiated inside that
  same deadline;
* authentication is decided on the head alone; the body is read only after,
  and only up to ``Limits.max_body`` bytes (``Content-Length`` only, no
  chunked uploads), within ``Limits.body_timeout_s``;
* connections not yet authenticated ("pending") are capped at
  ``Limits.max_pending`` overall and ``Limits.max_pending_per_peer`` per
  source address; a new connection over either cap evicts the **oldest**
  pending one. An idle attacker therefore cannot keep a legitimate client
  out: the newcomer's head arrives within a round trip, the idlers are the
  oldest and go first. Authenticated requests are capped separately
  (``Limits.max_active``; over it: 503), so pending ones never take their
  places;
* every outcome is counted through ``on_outcome`` (a fixed vocabulary,
  :data:`OUTCOMES`) and no client mistake is logged with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from appliance.logs import kv

log = logging.getLogger(f"hotsite.{__name__}")

OUTCOMES = (
    "ok",
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "too_large",
    "timeout",
    "overload",
    "evicted",
    "error",
)

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_STATUS_TEXT = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one listener accepts; the defaults suit a small JSON API on a LAN."""

    max_head: int = 8 * 1024
    max_headers: int = 64
    max_body: int = 1024 * 1024
    head_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    write_timeout_s: float = 5.0
    max_pending: int = 64
    max_pending_per_peer: int = 16
    max_active: int = 16


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request head (and, for the handler, its body)."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    peer: str = ""
    body: bytes = b""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    outcome: str = ""  # counted under this outcome; default derived from the status

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {_STATUS_TEXT.get(self.status, 'Error')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else self.body)


class BadRequest(ValueError):
    pass


def parse_head(head: bytes, *, max_headers: int = 64, peer: str = "") -> Request:
    """Parse an HTTP/1.x request head (up to and with the blank line); raise :class:`BadRequest`."""
    text = head.decode("latin-1")
    if not text.endswith("\r\n\r\n"):
        raise BadRequest("request head does not end with a blank line")
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("request line is not 'METHOD TARGET HTTP/1.x'")
    method, target, version = parts
    if not method or not set(method) <= _TOKEN_CHARS:
        raise BadRequest("bad method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest("unsupported HTTP version")
    if not target.startswith("/") or any(not 0x21 <= ord(c) <= 0x7E for c in target):
        raise BadRequest("bad request target")
    if len(lines) - 1 > max_headers:
        raise BadRequest(f"more than {max_headers} header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise BadRequest("bad header line")
        headers[name.lower()] = value.strip(" \t")
    path, _, query = target.partition("?")
    return Request(method, target, path, dict(parse_qsl(query)), headers, peer)


Authenticate = Callable[[Request], "str | Response | None"]
"""Head -> the identity's name (authenticated), or a Response to send instead (refused)."""
Handle = Callable[[Request, str], Awaitable[Response]]


class _TooLarge(Exception):
    pass


class BoundedHttpServer:
    """Serves ``handle(request, identity)`` for requests that ``authenticate`` accepts.

    ``authenticate`` sees the head only; it returns the caller's name, or a
    :class:`Response` (401/403/404/405...) that ends the exchange before any
    body is read. ``tls``, when given, is negotiated after the connection is
    counted as pending, so a client that never finishes its handshake is
    evictable like any other idler.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handle: Handle,
        *,
        authenticate: Authenticate,
        limits: Limits | None = None,
        tls: ssl.SSLContext | None = None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        name: str = "http",
    ) -> None:
        self.host, self.port = host, port
        self.limits = limits or Limits()
        self._handle = handle
        self._authenticate = authenticate
        self._tls = tls
        self._on_outcome = on_outcome
        self._name = name
        self._server: asyncio.Server | None = None
        self._pending: OrderedDict[asyncio.Task[None], tuple[str, asyncio.StreamWriter]] = OrderedDict()
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return self._active

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, limit=self.limits.max_head, reuse_address=True
            )
        except OSError as exc:  # asyncio rewords strerror; callers show the plain reason
            if exc.errno is None:
                raise
            raise OSError(exc.errno, os.strerror(exc.errno)) from None
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None

    # -- admission

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else "local"
        task = asyncio.create_task(self._serve(reader, writer, peer), name=f"{self._name}:{peer}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._pending[task] = (peer, writer)
        task.add_done_callback(lambda t: self._pending.pop(t, None))
        self._admit(peer)

    def _admit(self, peer: str) -> None:
        """Evict the oldest pending connection (of this peer first) while over a cap."""
        same = [t for t, (p, _) in self._pending.items() if p == peer]
        while len(same) > self.limits.max_pending_per_peer:
            self._evict(same.pop(0))
        while len(self._pending) > self.limits.max_pending:
            self._evict(next(iter(self._pending)))

    def _evict(self, task: asyncio.Task[None]) -> None:
        entry = self._pending.pop(task, None)
        if entry is not None:
            entry[1].close()  # a task cancelled before it ran would never close its transport
        task.cancel()
        self._on_outcome("evicted")

    # -- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        task = asyncio.current_task()
        response: Response | None = None
        head_only = False
        try:
            try:
                request, identity, response = await self._read_head(reader, writer, peer)
            except asyncio.CancelledError:
                return  # evicted or stopping: close without a word
            if request is not None and response is None:
                head_only = request.method == "HEAD"
                assert task is not None
                self._pending.pop(task, None)  # authenticated: no longer evictable
                response = await self._authenticated(reader, request, identity)
            if response is not None:
                self._on_outcome(response.outcome or _outcome(response.status))
                writer.write(response.encode(head_only=head_only))
                async with asyncio.timeout(self.limits.write_timeout_s):
                    await writer.drain()
        except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled after its request: nothing more to say
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # one connection's failure stays in that connection
            self._on_outcome("error")
            log.warning("http request failed", extra=kv(listener=self._name, error=repr(exc)))
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _read_head(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> tuple[Request | None, str, Response | None]:
        limits = self.limits
        try:
            async with asyncio.timeout(limits.head_timeout_s):
                if self._tls is not None:
                    await writer.start_tls(self._tls)
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, ValueError):
            return None, "", Response(431, b"request head too large\n", outcome="too_large")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                return None, "", Response(400, b"incomplete request\n", outcome="bad_request")
            self._on_outcome("bad_request")  # connected and closed (a TCP check)
            return None, "", None
        except TimeoutError:
            return None, "", Response(408, b"request not received in time\n", outcome="timeout")
        except (ssl.SSLError, ConnectionError):
            self._on_outcome("bad_request")
            return None, "", None
        try:
            request = parse_head(head, max_headers=limits.max_headers, peer=peer)
        except BadRequest as exc:
            return None, "", Response(400, f"bad request: {exc}\n".encode(), outcome="bad_request")
        verdict = self._authenticate(request)
        if isinstance(verdict, Response):
            return request, "", verdict
        if verdict is None:
            return request, "", Response(401, b"authentication required\n", outcome="unauthorized")
        return request, verdict, None

    async def _authenticated(self, reader: asyncio.StreamReader, request: Request, identity: str) -> Response:
        if self._active >= self.limits.max_active:
            return Response(503, b"busy, try again\n", headers={"Retry-After": "1"}, outcome="overload")
        self._active += 1
        try:
            try:
                body = await self._read_body(reader, request)
            except _TooLarge:
                return Response(413, b"body too large\n", outcome="too_large")
            except BadRequest as exc:
                return Response(400, f"bad request: {exc}\n".encode(), outcome="bad_request")
            except TimeoutError:
                return Response(408, b"body not received in time\n", outcome="timeout")
            return await self._handle(dataclasses.replace(request, body=body), identity)
        finally:
            self._active -= 1

    async def _read_body(self, reader: asyncio.StreamReader, request: Request) -> bytes:
        if "transfer-encoding" in request.headers:
            raise BadRequest("chunked bodies are not accepted; send Content-Length")
        text = request.headers.get("content-length", "0").strip()
        if not text.isdigit() or len(text) > 12:
            raise BadRequest("Content-Length must be a decimal number")
        length = int(text)
        if length > self.limits.max_body:
            raise _TooLarge
        if not length:
            return b""
        async with asyncio.timeout(self.limits.body_timeout_s):
            return await reader.readexactly(length)


def _outcome(status: int) -> str:
    return {
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        408: "timeout",
        413: "too_large",
        431: "too_large",
        503: "overload",
    }.get(status, "ok" if status < 400 else ("error" if status >= 500 else "bad_request"))


def bearer(header: str) -> bytes:
    """The credentials of an ``Authorization: Bearer <token>`` header ("" if another scheme)."""
    scheme, _, credentials = header.partition(" ")
    return credentials.strip().encode("latin-1") if scheme.lower() == "bearer" else b""


def json_response(status: int, doc: object) -> Response:
    import json

    return Response(status, json.dumps(doc).encode(), "application/json")
