"""The source's end of a files stream: scan, send what the replica lacks, commit with the manifest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from appliance.logs import kv
from appliance.replication import protocol, validate
from appliance.replication.files.delta import BLOCK, DELTA_MIN, block_digests, changed_blocks, plan_send
from appliance.replication.files.scan import (
    ChunkedRead,
    Digest,
    Entry,
    TreeScanner,
    digest_stable,
    read_blocks,
    read_stable,
)
from appliance.replication.files.watch import make_watcher
from appliance.replication.protocol import Msg, Sender

if TYPE_CHECKING:
    from appliance.replication.source import ServedStream

log = logging.getLogger("hotsite.appliance.replication.files")


class FilesSource(Protocol):
    """What serving a files stream needs of the source agent (``SourceAgent``), and nothing more.

    Its settings, its clock (what WELCOME, manifests and heartbeats carry as the
    source's time) and the scan counter it reports; nothing of its private state.
    """

    watch: bool
    poll_interval_s: float
    rescan_s: float
    heartbeat_s: float
    file_scans: int

    def source_time(self) -> float: ...


async def serve_files(
    agent: FilesSource,
    stream: ServedStream,
    hello: protocol.Message,
    reader: asyncio.StreamReader,
    sender: Sender,
) -> None:
    if not stream.path.is_dir():
        await sender.send(Msg.ERROR, {"error": f"{stream.path} is not a directory"})
        return
    scanner = TreeScanner(stream.path, stream.exclude)
    # The contents the replica has; rel -> (sha256, block hashes) of its version of each large file.
    have, known = validate.files_hello(hello.header)
    parts = bool(hello.header.get("file_parts"))  # the replica understands FILE_BEGIN...FILE_END
    await sender.send(Msg.WELCOME, {"mode": "files", "source_time": agent.source_time()})
    sent_manifest: dict[str, Entry] | None = None
    last_full = time.monotonic()
    last_sent = time.monotonic()
    closed = asyncio.create_task(_wait_closed(reader))
    watcher = make_watcher(stream.path, agent.watch, agent.poll_interval_s)
    try:
        while not closed.done():
            full = time.monotonic() - last_full >= agent.rescan_s
            manifest = await asyncio.to_thread(scanner.scan, full)
            agent.file_scans += 1
            if full:
                last_full = time.monotonic()
            if manifest != sent_manifest:
                complete = True
                for rel, entry in manifest.items():
                    if entry.sha256 in have:
                        continue
                    if not await _send_content(sender, stream.path, rel, entry, known, parts):
                        complete = False  # changed under us: the next scan ships the new content
                        scanner.forget(rel)
                        break
                    have.add(entry.sha256)
                if complete:
                    await sender.send(
                        Msg.FILES_MANIFEST,
                        {
                            "files": {r: [e.sha256, e.mode, e.size] for r, e in manifest.items()},
                            "observed_at": agent.source_time(),
                        },
                    )
                    sent_manifest = manifest
                    last_sent = time.monotonic()
                else:
                    await asyncio.sleep(0.2)  # let the writer finish; then scan again
                    continue
            # Sleep until a change, the next heartbeat or the next full rescan, whichever comes first.
            while not closed.done():
                now = time.monotonic()
                rescan_in = last_full + agent.rescan_s - now
                heartbeat_in = last_sent + agent.heartbeat_s - now
                if rescan_in <= 0:
                    break
                if heartbeat_in <= 0:
                    await sender.send(Msg.HEARTBEAT, {"observed_at": agent.source_time()})
                    last_sent = time.monotonic()
                    continue
                if await watcher.wait(min(rescan_in, heartbeat_in)):
                    break
    finally:
        watcher.close()
        closed.cancel()


async def _send_content(
    sender: Sender,
    root: Path,
    rel: str,
    entry: Entry,
    known: dict[str, tuple[str, list[str]]],
    parts: bool = True,
) -> bool:
    """Send one file's content the cheapest bounded way (:func:`plan_send`).

    False if the file is no longer the scanned version (nothing was staged at the replica: the
    next scan ships the new content). ``known`` learns what the replica will have for ``rel``
    once this change set commits, for the next delta.
    """
    path = root / rel
    base = known.get(rel) if entry.size >= DELTA_MIN else None
    digest: Digest | None = None
    changed: list[int] | None = None
    if base is not None:
        digest = await asyncio.to_thread(digest_stable, path, True)
        if digest is None or digest.sha256 != entry.sha256 or digest.blocks is None:
            return False
        changed = changed_blocks(digest.blocks, base[1])
    how = plan_send(entry.size, changed, sender.max_message, parts=parts)
    blocks: list[str] | None
    if how == "delta" and base is not None and digest is not None and changed is not None:
        blocks = await _send_delta(sender, path, rel, entry, base[0], digest, changed)
    elif how == "data":
        blocks = await _send_data(sender, path, entry)
    else:
        blocks = await _send_chunked(sender, path, entry)
    if blocks is None:
        return False
    if entry.size >= DELTA_MIN:
        known[rel] = (entry.sha256, blocks)
    return True


async def _send_data(sender: Sender, path: Path, entry: Entry) -> list[str] | None:
    """FILE_DATA: the whole file in one message (it fits one chunk)."""
    got = await asyncio.to_thread(read_stable, path)
    if got is None or hashlib.sha256(got[0]).hexdigest() != entry.sha256:
        return None
    await sender.send(Msg.FILE_DATA, {"sha256": entry.sha256}, got[0])
    return block_digests(got[0]) if entry.size >= DELTA_MIN else []


async def _send_delta(
    sender: Sender, path: Path, rel: str, entry: Entry, base: str, digest: Digest, changed: list[int]
) -> list[str] | None:
    """FILE_DELTA: the blocks that differ from the replica's version ``base``, in one message."""
    body = await asyncio.to_thread(read_blocks, path, changed, digest.key)
    if body is None:
        return None
    header = {"sha256": entry.sha256, "path": rel, "base": base, "size": entry.size, "block": BLOCK}
    await sender.send(Msg.FILE_DELTA, {**header, "blocks": changed}, body)
    return digest.blocks


async def _send_chunked(sender: Sender, path: Path, entry: Entry) -> list[str] | None:
    """FILE_BEGIN, FILE_PART..., FILE_END: one chunk in memory at a time; FILE_ABORT if it moved."""
    try:
        reading = await asyncio.to_thread(ChunkedRead, path, entry.size >= DELTA_MIN)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    chunk = protocol.file_chunk_bytes(sender.max_message)
    try:
        await sender.send(Msg.FILE_BEGIN, {"sha256": entry.sha256, "size": entry.size})
        while reading.offset < entry.size:
            offset = reading.offset
            data = await asyncio.to_thread(reading.read, min(chunk, entry.size - offset))
            if not data or not reading.held():
                break
            await sender.send(Msg.FILE_PART, {"offset": offset}, data)
        if await asyncio.to_thread(reading.intact, entry.sha256, entry.size):
            await sender.send(Msg.FILE_END, {"sha256": entry.sha256})
            return reading.blocks()
        await sender.send(Msg.FILE_ABORT, {"sha256": entry.sha256, "reason": "changed while being read"})
        log.info("file changed while being sent; it goes again", extra=kv(path=path, sent=reading.offset))
        return None
    finally:
        reading.close()


async def _wait_closed(reader: asyncio.StreamReader) -> None:
    """Returns when the replica hangs up, or sends anything beyond the small control messages."""
    with contextlib.suppress(Exception):
        while await protocol.read_message(reader, protocol.MAX_CONTROL):
            pass
