"""Fixed-block deltas: which blocks of a large file changed, how they travel, how the replica rebuilds it."""

from __future__ import annotations

import hashlib
import logging

from appliance.replication import protocol
from appliance.replication.protocol import ProtocolError

log = logging.getLogger("hotsite.appliance.replication.files")


DELTA_MIN = 1024 * 1024  # smaller files always go whole
BLOCK = 64 * 1024
READ_CHUNK = 16 * BLOCK  # what one read takes from a file being hashed or copied


def block_digests(data: bytes, block: int = BLOCK) -> list[str]:
    """Hashes of ``data``'s fixed-size blocks (the last one may be short)."""
    view = memoryview(data)
    return [
        hashlib.blake2b(view[i : i + block], digest_size=16).hexdigest() for i in range(0, len(data), block)
    ]


def changed_blocks(new: list[str], old: list[str]) -> list[int]:
    """Indices of the new version's blocks that the old version does not have at the same place."""
    return [i for i, d in enumerate(new) if i >= len(old) or old[i] != d]


class BlockHasher:
    """:func:`block_digests` fed a piece at a time, whatever the pieces' sizes."""

    def __init__(self, block: int = BLOCK) -> None:
        self.block = block
        self.digests: list[str] = []
        self._current = hashlib.blake2b(digest_size=16)
        self._filled = 0

    def update(self, data: bytes) -> None:
        view, pos = memoryview(data), 0
        while pos < len(view):
            take = min(self.block - self._filled, len(view) - pos)
            self._current.update(view[pos : pos + take])
            self._filled += take
            pos += take
            if self._filled == self.block:
                self._flush()

    def _flush(self) -> None:
        self.digests.append(self._current.hexdigest())
        self._current = hashlib.blake2b(digest_size=16)
        self._filled = 0

    def result(self) -> list[str]:
        if self._filled:
            self._flush()
        return self.digests


def delta_layout(size: int, block: int, indices: list[int], body_len: int) -> dict[int, int]:
    """Block index -> where its bytes start in a delta body; ProtocolError if they do not fit."""
    if block <= 0 or size < 0:
        raise ProtocolError(f"delta of {size} bytes in blocks of {block} is malformed", "malformed")
    layout: dict[int, int] = {}
    offset = 0
    for i in indices:
        length = min(block, size - i * block)
        if i < 0 or length <= 0 or offset + length > body_len:
            raise ProtocolError(f"delta block {i} does not fit a file of {size} bytes", "malformed")
        layout[i] = offset
        offset += length
    if offset != body_len:
        raise ProtocolError(f"delta carries {body_len - offset} bytes beyond its blocks", "malformed")
    return layout


def apply_delta(base: bytes, size: int, block: int, indices: list[int], body: bytes) -> bytes:
    """The new content: ``base`` cut or padded to ``size``, with the sent blocks written in."""
    out = bytearray(base[:size].ljust(size, b"\0"))
    for i, offset in delta_layout(size, block, indices, len(body)).items():
        length = min(block, size - i * block)
        out[i * block : i * block + length] = body[offset : offset + length]
    return bytes(out)


def plan_send(
    size: int, changed: list[int] | None, max_message: int, block: int = BLOCK, parts: bool = True
) -> str:
    """How a file travels: "delta", "data" (whole, one message) or "chunked" (FILE_BEGIN...FILE_END).

    ``changed`` is the blocks that differ from the replica's version (None: it has none). A delta
    pays when its blocks are at most half the file, and is possible only if they fit one message
    (the block list rides in the JSON header: 16 bytes an index is generous). A replica that
    did not say ``file_parts`` in its HELLO (an older version) gets every whole file as one message.
    """
    if changed is not None and size >= DELTA_MIN:
        body = len(changed) * block
        if body * 2 <= size and body + 16 * len(changed) + protocol.HEADER_ROOM <= max_message:
            return "delta"
    return "data" if size <= protocol.file_chunk_bytes(max_message) or not parts else "chunked"
