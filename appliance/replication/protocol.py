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

Neither end trusts the other's sizes: a message is refused before it is
read if its length exceeds the receiver's limit, decompressed at most to
that limit (a zlib or zstd bomb is refused, never inflated), and its JSON
header is refused if it is longer than ``max_header`` bytes or nested
deeper than ``MAX_JSON_DEPTH``. The agent reads a replica's HELLO within
``MAX_HELLO`` (its page hashes, its list of file contents) and everything
after it within ``MAX_CONTROL`` (keepalives, verify requests, NAKs).
"""

from __future__ import annotations

import asyncio
import io
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
MAX_MESSAGE = 64 * 1024 * 1024  # what a replica accepts from the agent (a manifest of ~500,000 files)
MAX_HELLO = 16 * 1024 * 1024  # a replica's HELLO: 8 bytes of hash a page (8 GiB of 4 KiB pages)
MAX_HELLO_HEADER = 16 * 1024 * 1024  # its JSON: the contents it has, its large files' block hashes
MAX_CONTROL = 64 * 1024  # anything else a replica sends: keepalives, verify requests, NAKs
MAX_JSON_DEPTH = 8  # the deepest header we send is 4 levels ({"blocks": {path: [sha, [digest...]]}})
FLAG_ZLIB = 0x40
FLAG_ZSTD = 0x80
TYPE_MASK = 0x3F
COMPRESS_MIN = 512
INFLATE_IN_THREAD = 64 * 1024  # compressed payloads at least this long are inflated in a worker thread


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


class PeerStalled(TimeoutError):
    """The peer has not taken what we sent for the send timeout: it is not reading (or is cut off)."""


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def decode_header(raw: bytes, max_header: int) -> dict[str, Any]:
    """The JSON header, refused if longer than ``max_header``, nested deeper than ``MAX_JSON_DEPTH``
    or not an object. The nesting is also what makes the C parser recurse: a header of 100,000
    ``[`` raises RecursionError, which would end the reading task for good if it escaped."""
    if len(raw) > max_header:
        raise ProtocolError(f"message header of {len(raw)} bytes exceeds the {max_header} limit", "too_long")
    try:
        header = json.loads(raw)
    except RecursionError:
        raise ProtocolError(
            f"message header nests deeper than {MAX_JSON_DEPTH} levels", "malformed"
        ) from None
    except ValueError as exc:
        raise ProtocolError(f"undecodable message header: {exc}", "malformed") from None
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object", "malformed")
    if json_depth(header) > MAX_JSON_DEPTH:
        raise ProtocolError(f"message header nests deeper than {MAX_JSON_DEPTH} levels", "malformed")
    return header


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


async def read_message(
    reader: asyncio.StreamReader, max_message: int = MAX_MESSAGE, max_header: int | None = None
) -> Message:
    """One message; raises ProtocolError for a corrupt or oversized one, IncompleteReadError at EOF.

    ``max_message`` bounds the payload both as sent and once decompressed; ``max_header`` (default:
    the same) bounds its JSON header. The header and the body are taken apart while reading or
    inflating, never copied out of a whole payload: the most a message can cost is its limit once
    (plus the compressed bytes, for a compressed one)."""
    raw = await reader.readexactly(_FRAME.size)
    length, kind, crc = _FRAME.unpack(raw)
    if length > max_message:
        raise ProtocolError(f"message of {length} bytes exceeds the {max_message} limit", "too_long")
    if length < _JSON.size:
        raise ProtocolError(f"message of {length} bytes has no header", "malformed")
    limit_header = max_message if max_header is None else max_header
    if kind & (FLAG_ZSTD | FLAG_ZLIB):
        payload = await reader.readexactly(length)
        if length >= INFLATE_IN_THREAD:
            # A chunk of pages: checked and inflated off the event loop (it took ~4 ms a MiB in
            # it, while the loop also had the TLS records and the next chunk to take in).
            head, body = await asyncio.to_thread(
                _checked_inflate, payload, kind, crc, max_message, limit_header
            )
        else:
            head, body = _checked_inflate(payload, kind, crc, max_message, limit_header)
    else:
        first = await reader.readexactly(_JSON.size)
        (hlen,) = _JSON.unpack(first)
        split = min(hlen, length - _JSON.size)  # nothing is believed before the CRC matched
        head = await reader.readexactly(split)
        body = await reader.readexactly(length - _JSON.size - split)
        if zlib.crc32(body, zlib.crc32(head, zlib.crc32(first))) != crc:
            raise ProtocolError("message CRC mismatch: corrupted in transit", "crc")
        if hlen > split:
            raise ProtocolError(f"message header of {hlen} bytes runs past the payload", "malformed")
        _check_header_length(hlen, limit_header)
    header = decode_header(head, limit_header)
    return Message(kind & TYPE_MASK, header, body, _FRAME.size + length)


def _checked_inflate(
    payload: bytes, kind: int, crc: int, max_message: int, limit_header: int
) -> tuple[bytes, bytes]:
    if zlib.crc32(payload) != crc:
        raise ProtocolError("message CRC mismatch: corrupted in transit", "crc")
    return _inflate(payload, kind, max_message, limit_header)


def _check_header_length(hlen: int, limit: int) -> None:
    if hlen > limit:
        raise ProtocolError(f"message header of {hlen} bytes exceeds the {limit} limit", "too_long")


def _inflate(payload: bytes, kind: int, limit: int, limit_header: int) -> tuple[bytes, bytes]:
    """(JSON header, body) of a compressed payload, inflated to at most ``limit`` bytes in all."""
    try:
        if kind & FLAG_ZSTD:
            if zstandard is None:
                raise ProtocolError("peer sent zstd but zstandard is not installed", "malformed")
            whole = _unzstd(payload, limit)
            (hlen,) = _JSON.unpack_from(whole)
            _check_header_length(hlen, limit_header)
            return whole[4 : 4 + hlen], whole[4 + hlen :]
        inflater = zlib.decompressobj()
        (hlen,) = _JSON.unpack(_inflate_exactly(inflater, payload, _JSON.size))
        _check_header_length(hlen, limit_header)
        if _JSON.size + hlen > limit:
            raise ProtocolError(f"message inflates beyond the {limit} limit", "too_long")
        head = _inflate_exactly(inflater, inflater.unconsumed_tail, hlen)
        return head, _inflate_body(inflater, limit - _JSON.size - hlen, limit)
    except ProtocolError:
        raise
    except (zlib.error, ValueError, struct.error) as exc:
        raise ProtocolError(f"undecodable message: {exc}", "malformed") from None
    except Exception as exc:  # zstandard.ZstdError, whichever version's module it comes from
        raise ProtocolError(f"undecodable message: {exc}", "malformed") from None


def _inflate_body(inflater: Any, room: int, limit: int) -> bytes:
    """The rest of the payload, inflated a chunk at a time: a bomb is refused once it passes
    ``room``, having cost at most that (one bytes object of ``room`` would be built in pieces
    anyway, and joined: a message within its limit costs up to twice its inflated size)."""
    pieces: list[bytes] = []
    data, total = inflater.unconsumed_tail, 0
    while not inflater.eof:
        piece = inflater.decompress(data, CHUNK_BYTES)
        data = inflater.unconsumed_tail
        total += len(piece)
        if total > room:
            raise ProtocolError(f"message inflates beyond the {limit} limit", "too_long")
        if not piece and not data:
            raise ProtocolError("compressed message is cut short", "malformed")
        pieces.append(piece)
    if data or inflater.unused_data:
        raise ProtocolError("compressed message has bytes after its end", "malformed")
    return b"".join(pieces)


def _inflate_exactly(inflater: Any, data: bytes, n: int) -> bytes:
    """The next ``n`` inflated bytes (``n`` > 0 or nothing: zlib reads a length of 0 as "no limit")."""
    out = inflater.decompress(data, n) if n else b""
    if len(out) != n:
        raise ProtocolError(f"compressed message ends before its {n}-byte part", "malformed")
    return out


def _unzstd(payload: bytes, limit: int) -> bytes:
    """Decompress a zstd payload reading at most ``limit + 1`` bytes out of it: ``decompress()``
    would trust the content size the frame declares."""
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as inflating:
        while len(out) <= limit:
            piece = inflating.read(min(CHUNK_BYTES, limit + 1 - len(out)))
            if not piece:
                break
            out += piece
    if len(out) > limit:
        raise ProtocolError(f"message inflates beyond the {limit} limit", "too_long")
    return bytes(out)


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
        send_timeout_s: float | None = None,
    ) -> None:
        self.writer = writer
        # A peer that takes nothing for this long is not reading: PeerStalled ends the session, so
        # a stuck replica cannot hold the agent (and the application's WAL) for longer than this.
        self.send_timeout_s = send_timeout_s
        self.compression = compression
        self.max_message = max_message
        self.largest_body = 0  # the most page bytes one message carried (tests: bounded memory)
        self.limiter = RateLimiter(rate_bytes_s)
        self.bytes_sent = 0
        self.chunks_uncompressed = 0  # chunks sent as they are: the link was faster than compressing
        self._corrupt = corrupt  # fault injection for tests: alters a message after its CRC was computed

    async def _drain(self) -> None:
        """Wait until the peer has taken what we wrote; PeerStalled if it took nothing at all for
        ``send_timeout_s`` (a slow link that keeps taking bytes is waited for, however slow)."""
        if self.send_timeout_s is None:
            await self.writer.drain()
            return
        transport = self.writer.transport
        pending = transport.get_write_buffer_size()
        while True:
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await self.writer.drain()
                return
            except TimeoutError:
                now = transport.get_write_buffer_size()
                if now >= pending:
                    raise PeerStalled(
                        f"the peer took nothing for {self.send_timeout_s:g} s: it is not reading"
                    ) from None
                pending = now

    def prepare(self, kind: int, header: dict[str, Any], body: bytes = b"", compress: bool = True) -> bytes:
        """The message as it goes on the wire (compressed unless ``compress`` is False): blocking,
        may run in a worker thread, so that the next chunk is compressed while this one is being
        sent (:meth:`send_prepared`)."""
        if len(body) + HEADER_ROOM > self.max_message:
            raise ProtocolError(
                f"refusing to send a message of {len(body)} body bytes: over the {self.max_message}"
                " limit (a bug: large batches must go in chunks)",
                "too_long",
            )
        self.largest_body = max(self.largest_body, len(body))
        data = encode(kind, header, body, self.compression if compress else "none")
        if self._corrupt is not None:
            data = self._corrupt(data)
        return data

    async def send(self, kind: int, header: dict[str, Any], body: bytes = b"") -> int:
        return await self.send_prepared(self.prepare(kind, header, body))

    async def send_prepared(self, data: bytes) -> int:
        wait = self.limiter.delay(len(data))
        if wait > 0:
            await asyncio.sleep(wait)
        self.writer.write(data)
        await self._drain()
        self.bytes_sent += len(data)
        return len(data)
