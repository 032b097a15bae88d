"""SIP messages for the OPTIONS probe: build a request, parse what comes back.

Only what a keep-alive prober needs, but that part strictly per RFC 3261:
the reply we parse comes from the network and decides whether a bank's phone
lines are considered alive, so every malformed input must end in exactly one
exception type, :class:`SipParseError`, and never in an ``IndexError`` or a
``UnicodeDecodeError`` that would escape the probe as a bug.

Nothing here does I/O; :mod:`monitoring.probes.sip` owns the sockets.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from appliance import __version__

USER_AGENT = f"hotsite/{__version__}"
BRANCH_MAGIC = "z9hG4bK"  # RFC 3261 8.1.1.7: marks a branch as globally unique
MAX_CSEQ = 2**31 - 1  # RFC 3261 8.1.1.5: the sequence number is below 2**31

# RFC 3261 7.3.3 and the IANA registry: one-letter forms of common headers.
COMPACT_FORMS: dict[str, str] = {
    "v": "via",
    "i": "call-id",
    "f": "from",
    "t": "to",
    "l": "content-length",
    "m": "contact",
    "c": "content-type",
    "e": "content-encoding",
    "k": "supported",
    "s": "subject",
    "o": "event",
    "r": "refer-to",
    "u": "allow-events",
    "x": "session-expires",
}
# A response without these cannot be matched to a transaction (RFC 3261 8.2.6.2).
REQUIRED_HEADERS = ("via", "from", "to", "call-id", "cseq")
SINGLE_HEADERS = ("from", "to", "call-id", "cseq", "content-length")

_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_TOKEN_RE = re.compile(_TOKEN)
_STATUS_RE = re.compile(r"SIP/2\.0 ([1-6][0-9]{2})(?: (.*))?", re.IGNORECASE | re.DOTALL)
_REQUEST_RE = re.compile(rf"({_TOKEN}) (\S+) SIP/2\.0", re.IGNORECASE)
_HEADER_RE = re.compile(rf"({_TOKEN})[ \t]*:[ \t]*(.*)", re.DOTALL)
_VIA_RE = re.compile(
    rf"SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*({_TOKEN})[ \t]+([^;\s]+)[ \t]*((?:;.*)?)",
    re.IGNORECASE | re.DOTALL,
)
_CSEQ_RE = re.compile(rf"([0-9]{{1,10}})[ \t]+({_TOKEN})")
_DIGITS_RE = re.compile(r"[0-9]{1,10}")
_END_OF_HEADERS_RE = re.compile(rb"\r?\n\r?\n")
_LINE_END_RE = re.compile(r"\r?\n")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")
_SPACE_RE = re.compile(r"\s")


class SipParseError(ValueError):
    """The bytes are not a well-formed SIP message (the only error the parser raises)."""


@dataclass(frozen=True, slots=True)
class Via:
    """One Via value: how and where the request went, and its branch."""

    transport: str
    sent_by: str
    params: tuple[tuple[str, str | None], ...]

    @property
    def branch(self) -> str | None:
        """The transaction id (RFC 3261 17.1.3); ``None`` when absent."""
        for name, value in self.params:
            if name == "branch":
                return value
        return None


@dataclass(frozen=True, slots=True)
class SipMessage:
    """A parsed request or response; header names are stored lower-case and long-form."""

    method: str | None  # requests only
    uri: str | None  # requests only
    code: int | None  # responses only
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    vias: tuple[Via, ...]

    @property
    def is_response(self) -> bool:
        return self.code is not None

    def header(self, name: str) -> str | None:
        """The first value of a header, by any spelling of its name (case, compact form)."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Every occurrence of a header, in order."""
        key = canonical_name(name)
        return [value for hname, value in self.headers if hname == key]

    @property
    def call_id(self) -> str:
        return self.header("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, method); validated by the parser, so always present."""
        return parse_cseq(self.header("cseq") or "")

    @property
    def top_branch(self) -> str | None:
        return self.vias[0].branch if self.vias else None

    @property
    def status(self) -> str:
        """A short, printable status for logs: ``503 Service Unavailable``."""
        text = f"{self.code} {self.reason}" if self.is_response else f"{self.method} {self.uri}"
        return _UNPRINTABLE_RE.sub("?", text)[:80]


@dataclass(frozen=True, slots=True)
class OptionsRequest:
    """An OPTIONS request ready to send, with the ids a reply must echo."""

    uri: str
    branch: str
    call_id: str
    cseq: int
    from_tag: str
    data: bytes

    def matches(self, reply: SipMessage) -> bool:
        """True when ``reply`` answers this request (RFC 3261 17.1.3, plus Call-ID).

        The branch and Call-ID are random, so an off-path sender cannot guess
        them; checking all three keeps a stray or spoofed datagram, or a late
        reply to an earlier probe, from marking a target up.
        """
        return (
            reply.is_response
            and reply.top_branch == self.branch
            and reply.call_id == self.call_id
            and reply.cseq == (self.cseq, "OPTIONS")
        )


def canonical_name(name: str) -> str:
    """Lower-case long form of a header name: ``V`` and ``Via`` both give ``via``."""
    lower = name.lower()
    return COMPACT_FORMS.get(lower, lower)


def new_branch() -> str:
    """A branch that is RFC 3261 compliant and unguessable (96 random bits)."""
    return BRANCH_MAGIC + secrets.token_hex(12)


def _host_for_uri(host: str) -> str:
    """IPv6 literals need brackets in URIs and Via (RFC 3261 25.1)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def build_options(
    host: str,
    port: int,
    *,
    local_host: str,
    local_port: int,
    cseq: int = 1,
    transport: str = "UDP",
    branch: str | None = None,
    call_id: str | None = None,
    from_tag: str | None = None,
    user_agent: str = USER_AGENT,
    user: str | None = None,
) -> OptionsRequest:
    """Build the OPTIONS keep-alive a dispatcher would send (ids random unless given).

    ``transport`` is the Via token (UDP, TCP, TLS); for a stream transport the
    Request-URI also carries ``;transport=`` so a proxy answers on the same kind.
    """
    if not 0 < cseq <= MAX_CSEQ:
        raise ValueError(f"cseq must be in 1..{MAX_CSEQ}, got {cseq}")
    remote = f"{_host_for_uri(host)}:{port}"
    if user is not None:  # e.g. a test number, so a proxy routes the OPTIONS like a call to it
        remote = f"{user}@{remote}"
    local = f"{_host_for_uri(local_host)}:{local_port}"
    # One read of the kernel's random pool for all three ids (this is the probe's hot path).
    rand = secrets.token_hex(36)
    branch = branch or BRANCH_MAGIC + rand[:24]
    call_id = call_id or f"{rand[24:56]}@{_host_for_uri(local_host)}"
    from_tag = from_tag or rand[56:72]
    transport = transport.upper()
    uri = f"sip:{remote}" if transport == "UDP" else f"sip:{remote};transport={transport.lower()}"
    lines = [
        f"OPTIONS {uri} SIP/2.0",
        f"Via: SIP/2.0/{transport} {local};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:hotsite@{local}>;tag={from_tag}",
        f"To: <{uri}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} OPTIONS",
        f"Contact: <sip:hotsite@{local}>",
        "Accept: application/sdp",
        f"User-Agent: {user_agent}",
        "Content-Length: 0",
    ]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return OptionsRequest(uri, branch, call_id, cseq, from_tag, data)


def build_response(request: SipMessage, code: int, reason: str, *, to_tag: str = "") -> bytes:
    """A UAS reply to ``request`` (RFC 3261 8.2.6): for the lab's fake SBCs and tests."""
    lines = [f"SIP/2.0 {code} {reason}"]
    lines += [f"Via: {via}" for via in request.header_values("via")]
    to = request.header("to") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines += [
        f"From: {request.header('from') or ''}",
        f"To: {to}",
        f"Call-ID: {request.call_id}",
        f"CSeq: {request.header('cseq') or ''}",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_response(data: bytes) -> SipMessage:
    """Parse a SIP response; anything else (a request, garbage) is a :class:`SipParseError`."""
    message = parse_message(data)
    if not message.is_response:
        raise SipParseError("a request, not a response")
    return message


def parse_message(data: bytes) -> SipMessage:
    """Parse one SIP message from a datagram (RFC 3261 7 and 18.3)."""
    data = data.lstrip(b"\r\n")  # RFC 3261 7.5: ignore CRLFs before the start line
    match = _END_OF_HEADERS_RE.search(data)
    if match is None:
        raise SipParseError("no empty line after the headers")
    try:
        head = data[: match.start()].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError(f"headers are not UTF-8: {exc.reason}") from None
    lines = _LINE_END_RE.split(head)
    method, uri, code, reason = _parse_start_line(lines[0])
    headers = _parse_headers(lines[1:])
    _check_headers(headers)
    body = _body(data[match.end() :], headers)
    vias = tuple(
        parse_via(value) for name, value in headers if name == "via" for value in split_commas(value)
    )
    return SipMessage(method, uri, code, reason, headers, body, vias)


def _parse_start_line(line: str) -> tuple[str | None, str | None, int | None, str]:
    """Status-Line or Request-Line (RFC 3261 7.1, 7.2)."""
    status = _STATUS_RE.fullmatch(line)
    if status:
        return None, None, int(status.group(1)), (status.group(2) or "").strip()
    request = _REQUEST_RE.fullmatch(line)
    if request:
        return request.group(1), request.group(2), None, ""
    raise SipParseError(f"bad start line: {line[:40]!r}")


def _parse_headers(lines: list[str]) -> tuple[tuple[str, str], ...]:
    """Name/value pairs, with folded continuation lines joined (RFC 3261 7.3.1)."""
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not headers:
                raise SipParseError("continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        match = _HEADER_RE.fullmatch(line)
        if match is None:
            raise SipParseError(f"bad header line: {line[:40]!r}")
        headers.append((canonical_name(match.group(1)), match.group(2).strip()))
    return tuple(headers)


def _check_headers(headers: tuple[tuple[str, str], ...]) -> None:
    """The headers every message needs, once each, and well-formed."""
    counts: dict[str, int] = {}
    for name, value in headers:
        counts[name] = counts.get(name, 0) + 1
        if name == "call-id" and (not value or _SPACE_RE.search(value)):
            raise SipParseError("bad Call-ID")
        if name == "cseq":
            parse_cseq(value)
    for name in REQUIRED_HEADERS:
        if name not in counts:
            raise SipParseError(f"missing {name} header")
    for name in SINGLE_HEADERS:
        if counts.get(name, 0) > 1:
            raise SipParseError(f"more than one {name} header")


def _body(rest: bytes, headers: tuple[tuple[str, str], ...]) -> bytes:
    """The body: Content-Length bytes, or the rest of the datagram (RFC 3261 18.3)."""
    length = next((value for name, value in headers if name == "content-length"), None)
    if length is None:
        return rest
    if not _DIGITS_RE.fullmatch(length):
        raise SipParseError(f"bad Content-Length: {length[:20]!r}")
    if int(length) > len(rest):
        raise SipParseError("message truncated: shorter than its Content-Length")
    return rest[: int(length)]


def parse_cseq(value: str) -> tuple[int, str]:
    """``CSeq: 1 OPTIONS`` -> ``(1, "OPTIONS")`` (RFC 3261 20.16)."""
    match = _CSEQ_RE.fullmatch(value.strip())
    if match is None or int(match.group(1)) > MAX_CSEQ:
        raise SipParseError(f"bad CSeq: {value[:40]!r}")
    return int(match.group(1)), match.group(2)


def parse_via(value: str) -> Via:
    """One Via value: ``SIP/2.0/UDP host:port;branch=z9hG4bK...;rport`` (RFC 3261 20.42)."""
    match = _VIA_RE.fullmatch(value.strip())
    if match is None:
        raise SipParseError(f"bad Via: {value[:60]!r}")
    params: list[tuple[str, str | None]] = []
    for raw in match.group(3).split(";")[1:]:
        name, sep, param_value = raw.partition("=")
        name = name.strip().lower()
        if not _TOKEN_RE.fullmatch(name):
            raise SipParseError(f"bad Via parameter: {raw[:40]!r}")
        params.append((name, param_value.strip() if sep else None))
    return Via(match.group(1).upper(), match.group(2), tuple(params))


def split_commas(value: str) -> list[str]:
    """Split a header that may hold several values, ignoring commas inside quotes."""
    if '"' not in value:  # the usual case, and the probe's hot path: no quoting to honour
        return [part.strip() for part in value.split(",") if part.strip()]
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


# -- stream framing (TCP, TLS) ----------------------------------------------------

MAX_STREAM_MESSAGE = 65535  # bytes: Kamailio's own TCP read buffer; an OPTIONS reply is far smaller
_CONTENT_LENGTH_RE = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*([0-9]{1,10})[ \t]*\r?$", re.I | re.M)
_HEADERS_END = b"\r\n\r\n"


class SipFramingError(SipParseError):
    """The stream can no longer be cut into messages (oversized, no Content-Length): reset it."""


class StreamFramer:
    """Cuts a SIP byte stream into whole messages by Content-Length (RFC 3261 18.3).

    On a stream a message may arrive in pieces, or several in one read, so the
    framer buffers until a message is complete. Content-Length is mandatory on
    streams; without it, or past ``max_message`` bytes, the message boundaries
    are lost for good and the only safe thing is to drop the connection:
    :meth:`feed` then raises :class:`SipFramingError` and forgets the buffer.
    A message that frames correctly but does not parse is the caller's business
    (it is one bad message; the stream stays in step).

    CRLF keep-alives (RFC 5626 3.5.1) between messages are skipped; each
    double-CRLF "ping" is counted in :attr:`pings` so the caller can answer
    with a single CRLF "pong".
    """

    def __init__(self, max_message: int = MAX_STREAM_MESSAGE) -> None:
        if max_message < 64:
            raise ValueError(f"max_message must be >= 64 bytes, got {max_message}")
        self.max_message = max_message
        self.pings = 0
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every message it completed, in order."""
        buf = self._buffer
        buf += data
        messages: list[bytes] = []
        while buf:
            if buf[:1] == b"\r" or buf[:1] == b"\n":
                if not self._skip_keepalive(buf):
                    break  # a lone CR or CRLF: wait for the rest
                continue
            end = buf.find(_HEADERS_END, 0, self.max_message + len(_HEADERS_END))
            if end < 0:
                if len(buf) > self.max_message:
                    self._fail(f"no end of headers within {self.max_message} bytes")
                break
            head = bytes(buf[:end])
            match = _CONTENT_LENGTH_RE.search(head)
            if match is None:
                self._fail("a message on a stream without Content-Length")
            assert match is not None
            total = end + len(_HEADERS_END) + int(match.group(1))
            if total > self.max_message:
                self._fail(f"a {total}-byte message (cap {self.max_message})")
            if len(buf) < total:
                break
            messages.append(bytes(buf[:total]))
            del buf[:total]
        return messages

    def _skip_keepalive(self, buf: bytearray) -> bool:
        """Consume CR/LF bytes before a message; False while they may still become a ping."""
        if buf.startswith(b"\r\n\r\n"):
            self.pings += 1
            del buf[:4]
            return True
        if b"\r\n\r\n".startswith(bytes(buf[:4])):
            return False
        del buf[:1]  # a stray CR or LF (RFC 3261 7.5 lets a peer send CRLFs before a message)
        return True

    def _fail(self, why: str) -> None:
        self._buffer.clear()
        raise SipFramingError(why)
