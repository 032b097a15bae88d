"""The wire format between the source agent and the appliance.

Every message: ``>IBI`` (payload length, type and flags, CRC-32 of the
payload as sent), then the payload: ``>I`` JSON length, the JSON header,
and an optional binary body (pages: ``>I`` page number + page bytes each).
No message may exceed the receiver's limit (``MAX_MESSAGE``, lowered in
tests), before or after decompression: anything larger than one chunk
(a resume, a resnapshot, a transaction larger than ``chunk_pages``) goes
as BATCH_BEGIN, BATCH_PAGES..., BATCH_END, which the replica stages on
disk and commits whole at the end, so neither end holds a whole batch.
A config file larger than one chunk goes the same way: FILE_BEGIN,
FILE_PART..., FILE_END (or FILE_ABORT if it changed while being read).
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
    BATCH_BEGIN = 15  # header of a batch too large for one message (no pages)
    BATCH_PAGES = 16  # pages of it, ascending page numbers, each message within the limit
    BATCH_END = 17  # its checksum: the replica commits the staged batch only if it matches
    KEEPALIVE = 18  # replica to agent while connected: proves the path still carries bytes
    FILE_DELTA = 19  # a large file as the blocks that differ from the replica's version of it
    FILE_BEGIN = 20  # a file too large for one message: {sha256, size}; its FILE_PART bodies follow
    FILE_PART = 21  # its next bytes ({offset}), each body within file_chunk_bytes(the receiver's limit)
    FILE_END = 22  # {sha256}: the replica keeps the staged file only if its SHA-256 is that
    FILE_ABORT = 23  # {sha256, reason}: it changed while being read; the replica discards what it staged


CHUNK_BYTES = 1024 * 1024  # page data per BATCH_PAGES / SEED_PAGES message, at most (as seeds always were)
HEADER_ROOM = 64 * 1024  # room for the framing and JSON header of a message


def chunk_pages(page_size: int, max_message: int = MAX_MESSAGE) -> int:
    """Pages per chunk message: within ``CHUNK_BYTES`` and the receiver's ``max_message``."""
    room = min(CHUNK_BYTES, max_message - HEADER_ROOM)
    return max(1, room // (4 + page_size))


def file_chunk_bytes(max_message: int = MAX_MESSAGE) -> int:
    """File bytes per FILE_PART message, at most: within ``CHUNK_BYTES`` and the receiver's limit."""
    return max(1, min(CHUNK_BYTES, max_message - HEADER_ROOM))


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


async def read_message(reader: asyncio.StreamReader, max_message: int = MAX_MESSAGE) -> Message:
    """One message; raises ProtocolError for a corrupt or oversized one, IncompleteReadError at EOF."""
    raw = await reader.readexactly(_FRAME.size)
    length, kind, crc = _FRAME.unpack(raw)
    if length > max_message:
        raise ProtocolError(f"message of {length} bytes exceeds the {max_message} limit", "too_long")
    payload = await reader.readexactly(length)
    if zlib.crc32(payload) != crc:
        raise ProtocolError("message CRC mismatch: corrupted in transit", "crc")
    try:
        if kind & FLAG_ZSTD:
            if zstandard is None:
                raise ProtocolError("peer sent zstd but zstandard is not installed", "malformed")
            payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=max_message)
        elif kind & FLAG_ZLIB:
            inflater = zlib.decompressobj()
            payload = inflater.decompress(payload, max_message)
            if inflater.unconsumed_tail:
                raise ProtocolError(f"message inflates beyond the {max_message} limit", "too_long")
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
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.writer = writer
        self.compression = compression
        self.max_message = max_message
        self.largest_body = 0  # the most page bytes one message carried (tests: bounded memory)
        self.limiter = RateLimiter(rate_bytes_s)
        self.bytes_sent = 0
        self._corrupt = corrupt  # fault injection for tests: alters a message after its CRC was computed

    async def send(self, kind: int, header: dict[str, Any], body: bytes = b"") -> int:
        if len(body) + HEADER_ROOM > self.max_message:
            raise ProtocolError(
                f"refusing to send a message of {len(body)} body bytes: over the {self.max_message}"
                " limit (a bug: large batches must go in chunks)",
                "too_long",
            )
        self.largest_body = max(self.largest_body, len(body))
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
