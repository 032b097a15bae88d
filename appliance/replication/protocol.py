"""The wire format between the source agent and the appliance.

Every message: ``>IBI`` (payload length, type and flags, CRC-32 of the
payload as sent), then the payload: ``>I`` JSON length, the JSON header,
and an optional binary body (pages: ``>I`` page number + page bytes each).
TLS already authenticates and protects the bytes on the wire; the CRC is a
second line against what TLS cannot see (a bug or memory error on either
side, or a future plain transport). A message whose CRC does not match is
never decoded, let alone applied: the receiver drops the connection and
resumes from its own position, which re-requests everything after it.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from appliance.errors import HotsiteError

try:  # optional: the link compresses with zstd when both ends have it
    import zstandard
except ImportError:  # pragma: no cover - depends on the installation
    zstandard = None

_FRAME = struct.Struct(">IBI")
_JSON = struct.Struct(">I")
_PGNO = struct.Struct(">I")
MAX_MESSAGE = 256 * 1024 * 1024
FLAG_ZLIB = 0x40
FLAG_ZSTD = 0x80
TYPE_MASK = 0x3F
COMPRESS_MIN = 512


class Msg:
    HELLO = 1
    WELCOME = 2
    SEED_BEGIN = 3
    SEED_PAGES = 4
    SEED_END = 5
    BATCH = 6
    HEARTBEAT = 7
    VERIFY = 8
    VERIFY_RESULT = 9
    ERROR = 10
    FILES_MANIFEST = 11
    FILE_DATA = 12
    FILES_WANT = 13
    NAK = 14


def compressions() -> list[str]:
    return ["zstd", "zlib", "none"] if zstandard is not None else ["zlib", "none"]


class ProtocolError(HotsiteError):
    """The peer sent something that is not a valid message (bad CRC, too long, garbage)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode(kind: int, header: dict[str, Any], body: bytes = b"", compression: str = "none") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    payload = _JSON.pack(len(head)) + head + body
    flags = 0
    if compression != "none" and len(payload) >= COMPRESS_MIN:
        if compression == "zstd" and zstandard is not None:
            packed = zstandard.ZstdCompressor(level=3).compress(payload)
            flag = FLAG_ZSTD
        else:
            packed = zlib.compress(payload, 1)
            flag = FLAG_ZLIB
        if len(packed) < len(payload):
            payload, flags = packed, flag
    return _FRAME.pack(len(payload), kind | flags, zlib.crc32(payload)) + payload


def pages_body(pages: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(_PGNO.pack(p) + d for p, d in pages)


def parse_pages(body: bytes, page_size: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    step = 4 + page_size
    if page_size <= 0 or len(body) % step:
        raise ProtocolError(f"page body of {len(body)} bytes is not whole pages of {page_size}", "malformed")
    view = memoryview(body)
    for off in range(0, len(body), step):
        (pgno,) = _PGNO.unpack_from(body, off)
        out[pgno] = bytes(view[off + 4 : off + step])
    return out


class Message:
    __slots__ = ("kind", "header", "body", "wire_bytes")

    def __init__(self, kind: int, header: dict[str, Any], body: bytes, wire_bytes: int) -> None:
        self.kind = kind
        self.header = header
        self.body = body
        self.wire_bytes = wire_bytes


async def read_message(reader: asyncio.StreamReader) -> Message:
    """One message; raises ProtocolError for a corrupt one, IncompleteReadError at EOF."""
    raw = await reader.readexactly(_FRAME.size)
    length, kind, crc = _FRAME.unpack(raw)
    if length > MAX_MESSAGE:
        raise ProtocolError(f"message of {length} bytes exceeds the {MAX_MESSAGE} limit", "too_long")
    payload = await reader.readexactly(length)
    if zlib.crc32(payload) != crc:
        raise ProtocolError("message CRC mismatch: corrupted in transit", "crc")
    try:
        if kind & FLAG_ZSTD:
            if zstandard is None:
                raise ProtocolError("peer sent zstd but zstandard is not installed", "malformed")
            payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_MESSAGE)
        elif kind & FLAG_ZLIB:
            payload = zlib.decompress(payload)
        (hlen,) = _JSON.unpack_from(payload)
        header = json.loads(payload[4 : 4 + hlen])
    except (zlib.error, ValueError, struct.error) as exc:
        raise ProtocolError(f"undecodable message: {exc}", "malformed") from None
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object", "malformed")
    return Message(kind & TYPE_MASK, header, payload[4 + hlen :], _FRAME.size + length)


class RateLimiter:
    """A token bucket on bytes sent: ``rate`` bytes/s, bursts of up to ``burst`` bytes (0 = unlimited)."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst if burst is not None else max(rate * 0.1, 64 * 1024)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def delay(self, size: int) -> float:
        """Seconds to wait before sending ``size`` bytes (and take them from the bucket)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= size
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Sender:
    """Writes messages with compression, a bandwidth limit, and a byte counter."""

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        compression: str = "none",
        rate_bytes_s: float = 0,
        corrupt: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.writer = writer
        self.compression = compression
        self.limiter = RateLimiter(rate_bytes_s)
        self.bytes_sent = 0
        self._corrupt = corrupt  # fault injection for tests: alters a message after its CRC was computed

    async def send(self, kind: int, header: dict[str, Any], body: bytes = b"") -> int:
        data = encode(kind, header, body, self.compression)
        if self._corrupt is not None:
            data = self._corrupt(data)
        wait = self.limiter.delay(len(data))
        if wait > 0:
            await asyncio.sleep(wait)
        self.writer.write(data)
        await self.writer.drain()
        self.bytes_sent += len(data)
        return len(data)
