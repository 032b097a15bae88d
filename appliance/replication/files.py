"""Configuration-file streams: directories of dial plans, IVR and routing tables, prompts.

Source side: the tree is watched with inotify (:class:`InotifyWatcher`,
through ``asyncinotify``); an event (after a 30 ms quiet period, so a file
written in pieces is read once) triggers a cheap ``stat`` comparison of the
tree, and every ``rescan_s`` a full re-hash runs anyway, because watches
overflow (``IN_Q_OVERFLOW``) or cannot be added (``max_user_watches``):
then the watcher says "changed" and, if it cannot watch at all, falls back
to polling (:class:`PollingWatcher`, a ``stat`` comparison every 0.2 s,
also used with ``watch = false``). Files are content-hashed (SHA-256), and
a file that changed while it was read (size, mtime or inode moved) is read
again next time rather than shipped half-old. Only contents the replica
does not have are sent; a rename costs no transfer. A change set ends with
the whole manifest, which commits it.

Replica side: every path and mode is checked first (``validate.py``,
``safepath.py``: see REPLICATION.md, "What the replica trusts"); contents are
staged (write, fsync); files gone at the source are deleted, then each file is
put in place by rename (atomic), reached from a descriptor of the root without
following symlinks, with its mode masked by ``file_mode_mask``; the
replaced or deleted versions are kept (newest ``keep`` per file, matched
exactly) under ``<replica>.hotsite-versions``; an optional command runs
after each applied change set (argv, no shell), like csync2's action hooks.

Deltas: a file of ``DELTA_MIN`` bytes or more that the replica already has
an older version of (at the same path) is sent as the ``BLOCK``-sized blocks
whose hashes differ from that version's (the replica lists its large files'
block hashes when it connects; the agent remembers what it sent since), if
that is less than half the file; the replica rebuilds the new content from
its copy plus those blocks and checks its SHA-256 before staging it. Fixed
blocks, not rsync's rolling hash: in-place edits and appends (a routing
table, a log-like prompt index) travel as deltas; an insertion near the
start shifts every block and the file goes whole. A delta whose blocks
would not fit one message goes whole too.

Large files: a file that does not fit one message (``protocol.file_chunk_bytes``
of the receiver's limit, 1 MiB at most) travels as FILE_BEGIN {sha256, size},
FILE_PART bodies of one chunk each, FILE_END. The agent reads it a chunk at a
time, hashing as it goes, and sends FILE_ABORT instead of FILE_END if the
bytes it read are not the scanned version (the hash differs, or size or mtime
moved): the change set is then not committed and the next scan ships the new
content. The replica writes the parts to ``<sha256>.part`` in its staging
area, hashing as they come, and gives it its real name (which ``have``
announces and ``apply`` uses) only once it is whole and its SHA-256 is the
announced one; anything else is discarded (a cut session leaves a ``.part``
that the next session's ``open`` removes). Hashing, deltas, staging and
putting files in place all go a chunk at a time: neither end holds a whole
large file in memory.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import logging
import os
import re
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.logs import kv
from appliance.replication import protocol, validate
from appliance.replication.protocol import Msg, ProtocolError, Sender
from appliance.replication.safepath import Beneath, parse_relpath

if TYPE_CHECKING:
    from appliance.replication.source import ServedStream, SourceAgent

log = logging.getLogger(__name__)

STAGING = ".hotsite-staging"
DELTA_MIN = 1024 * 1024  # smaller files always go whole
BLOCK = 64 * 1024
READ_CHUNK = 16 * BLOCK  # what one read takes from a file being hashed or copied
DEFAULT_FILE_MODE_MASK = 0o7002  # never setuid, setgid, sticky or world-writable at the replica


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


@dataclass(frozen=True, slots=True)
class Entry:
    sha256: str
    mode: int
    size: int


@dataclass(frozen=True, slots=True)
class Digest:
    """A file's SHA-256 (and block hashes, if asked), read a chunk at a time, and the stat key it had."""

    sha256: str
    size: int
    key: tuple[int, int, int]
    blocks: list[str] | None = None


def digest_stable(path: Path, blocks: bool = False) -> Digest | None:
    """The file's hashes, only if its size, mtime and inode did not change while reading it."""
    hasher = hashlib.sha256()
    block_hasher = BlockHasher() if blocks else None
    size = 0
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            while chunk := f.read(READ_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
                if block_hasher is not None:
                    block_hasher.update(chunk)
        after = os.stat(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    key = (before.st_size, before.st_mtime_ns, before.st_ino)
    if (after.st_size, after.st_mtime_ns, after.st_ino) != key or size != before.st_size:
        return None
    return Digest(hasher.hexdigest(), size, key, block_hasher.result() if block_hasher else None)


class TreeScanner:
    """Manifest of a directory tree, re-hashing only files whose stat changed (or all, on rescan)."""

    def __init__(self, root: Path, exclude: tuple[str, ...] = ()) -> None:
        self.root = root
        self.exclude = exclude
        self._cache: dict[str, tuple[tuple[int, int, int], Entry]] = {}
        self.scans = 0
        self.full_scans = 0

    def scan(self, full: bool = False) -> dict[str, Entry]:
        self.scans += 1
        self.full_scans += full
        manifest: dict[str, Entry] = {}
        seen: dict[str, tuple[tuple[int, int, int], Entry]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".hotsite"))
            for name in sorted(filenames):
                if name.startswith(".hotsite"):  # ours (a replica's temporary files); never shipped
                    continue
                full_path = Path(dirpath) / name
                rel = str(full_path.relative_to(self.root))
                if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in self.exclude):
                    continue
                try:
                    st = full_path.lstat()
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                key = (st.st_size, st.st_mtime_ns, st.st_ino)
                cached = self._cache.get(rel)
                if cached is not None and cached[0] == key and not full:
                    entry = cached[1]
                else:
                    digest = digest_stable(full_path)
                    if digest is None:
                        continue  # changed while being read: next scan
                    key = digest.key
                    entry = Entry(digest.sha256, stat.S_IMODE(st.st_mode), digest.size)
                manifest[rel] = entry
                seen[rel] = (key, entry)
        self._cache = seen
        return manifest

    def forget(self, rel: str) -> None:
        """Hash ``rel`` again next scan: its scanned hash proved not to be its content (a scan that
        read it mid-write, within one mtime tick, keeps a stat key that would otherwise hide it)."""
        self._cache.pop(rel, None)

    def read(self, rel: str, sha256: str) -> bytes | None:
        got = read_stable(self.root / rel)
        if got is None or hashlib.sha256(got[0]).hexdigest() != sha256:
            return None
        return got[0]


def read_stable(path: Path) -> tuple[bytes, tuple[int, int, int]] | None:
    """The file's bytes, only if its size, mtime and inode did not change while reading it."""
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            data = f.read()
        after = os.stat(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    key = (before.st_size, before.st_mtime_ns, before.st_ino)
    if (after.st_size, after.st_mtime_ns, after.st_ino) != key or len(data) != before.st_size:
        return None
    return data, key


def read_blocks(path: Path, indices: list[int], key: tuple[int, int, int]) -> bytes | None:
    """The given ``BLOCK``s of the file, only if it is still the version with stat ``key``."""
    try:
        with open(path, "rb") as f:
            fd = f.fileno()
            if _stat_key(os.fstat(fd)) != key:
                return None
            body = b"".join(os.pread(fd, BLOCK, i * BLOCK) for i in indices)
            if _stat_key(os.fstat(fd)) != key:
                return None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    return body


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class ChunkedRead:
    """One pass over a file sent in parts: hashes what it hands out, and says whether that is the
    scanned version (by SHA-256, the final word; a size or mtime change ends it early)."""

    def __init__(self, path: Path, blocks: bool) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - a long read, closed by close()
        self._before = os.fstat(self._file.fileno())
        self._hasher = hashlib.sha256()
        self._blocks = BlockHasher() if blocks else None
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = self._file.read(n)
        self._hasher.update(data)
        if self._blocks is not None:
            self._blocks.update(data)
        self.offset += len(data)
        return data

    def held(self) -> bool:
        """False once the file's size or mtime moved since it was opened (a write under us)."""
        now = os.fstat(self._file.fileno())
        return (now.st_size, now.st_mtime_ns) == (self._before.st_size, self._before.st_mtime_ns)

    def intact(self, sha256: str, size: int) -> bool:
        return self.held() and self.offset == size and self._hasher.hexdigest() == sha256

    def blocks(self) -> list[str]:
        return self._blocks.result() if self._blocks is not None else []

    def close(self) -> None:
        self._file.close()


class ChangeWatcher(abc.ABC):
    """Says when a tree may have changed, so it is scanned then rather than on a timer.

    Contract: :meth:`wait` returns within ``timeout`` seconds (plus the
    quiet period): True if something in the tree may have changed since the
    last call (an event, an overflow, or a watcher that cannot know), False
    if the time ran out with no sign of change. It never raises for files or
    directories that vanish; a lost ability to watch turns into True
    (the caller scans), never into silence. :meth:`close` releases the
    kernel resources and may be called twice.
    """

    @abc.abstractmethod
    async def wait(self, timeout: float) -> bool: ...

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        pass


class PollingWatcher(ChangeWatcher):
    """The Null watcher: no notification, a ``stat`` comparison every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval

    async def wait(self, timeout: float) -> bool:
        await asyncio.sleep(min(self.interval, max(timeout, 0.0)))
        return True


class InotifyWatcher(ChangeWatcher):
    """inotify on every directory of the tree; new directories get watches as they appear.

    Raises ``OSError`` from the constructor if inotify cannot be had at all
    (the caller then polls). Past ``max_user_watches`` it watches what it
    could and reports "changed" on every call (polling in effect) while
    ``degraded`` says so.
    """

    QUIET_S = 0.03
    MAX_DEBOUNCE_S = 0.3

    def __init__(self, root: Path, skip: Callable[[str], bool] = lambda name: name.startswith(".hotsite")):
        from asyncinotify import Inotify, Mask

        self.root = root
        self._skip = skip
        self._mask = (
            Mask.CLOSE_WRITE
            | Mask.MODIFY
            | Mask.ATTRIB
            | Mask.CREATE
            | Mask.DELETE
            | Mask.MOVED_FROM
            | Mask.MOVED_TO
            | Mask.DELETE_SELF
            | Mask.MOVE_SELF
            | Mask.ONLYDIR
        )
        self._dir_flag = Mask.ISDIR
        self._created = Mask.CREATE | Mask.MOVED_TO
        self._inotify = Inotify()
        # Events are read by one task that is never cancelled mid-read and handed over through a
        # queue, whose get() may be cancelled safely: an Inotify.get() cancelled by a timeout just
        # after it read the kernel's events loses them (an edit then waited for the full rescan).
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self.degraded = False
        self.overflows = 0
        self.events = 0
        self._add_tree(root)

    def _add(self, path: Path) -> None:
        try:
            self._inotify.add_watch(path, self._mask)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                if not self.degraded:
                    log.warning("inotify watch limit reached; polling this tree", extra=kv(root=self.root))
                self.degraded = True
            # ENOENT / ENOTDIR: gone already; the scan sees that

    def _add_tree(self, top: Path) -> None:
        self._add(top)
        for dirpath, dirnames, _files in os.walk(top):
            dirnames[:] = [d for d in dirnames if not self._skip(d)]
            for d in dirnames:
                self._add(Path(dirpath) / d)

    def _note(self, event: Any) -> None:
        from asyncinotify import Mask

        self.events += 1
        if event.mask & Mask.Q_OVERFLOW:
            self.overflows += 1
            log.info("inotify queue overflowed; the tree is scanned", extra=kv(root=self.root))
            return
        is_new_dir = event.mask & self._dir_flag and event.mask & self._created
        if is_new_dir and event.path is not None and not self._skip(event.path.name):
            self._add_tree(event.path)

    async def wait(self, timeout: float) -> bool:
        if self.degraded:
            await asyncio.sleep(min(0.2, max(timeout, 0.0)))
            return True
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that lands just as
        # the awaited thing completes, and the session then outlives the agent's stop().
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                event = await self._queue.get()
        except TimeoutError:
            return False
        self._note(event)
        # Quiet period: a file written in pieces, or many files copied in, make one scan.
        until = time.monotonic() + self.MAX_DEBOUNCE_S
        while time.monotonic() < until:
            try:
                async with asyncio.timeout(self.QUIET_S):
                    event = await self._queue.get()
            except TimeoutError:
                break
            self._note(event)
        return True

    async def _read(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self._queue.put_nowait(await self._inotify.get())

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(OSError):
            self._inotify.close()


def make_watcher(root: Path, watch: bool, poll_s: float) -> ChangeWatcher:
    """inotify when asked for and possible, else polling (said once in the log)."""
    if watch:
        try:
            return InotifyWatcher(root)
        except (OSError, ImportError) as exc:
            log.warning("inotify unavailable; polling", extra=kv(root=root, error=str(exc)))
    return PollingWatcher(max(poll_s, 0.2))


async def serve_files(
    agent: SourceAgent,
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
    await sender.send(Msg.WELCOME, {"mode": "files", "source_time": agent._clock()})
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
                            "observed_at": agent._clock(),
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
                    await sender.send(Msg.HEARTBEAT, {"observed_at": agent._clock()})
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


class StagedFile:
    """A file arriving in parts: written to ``<staging>/<sha256>.part``, hashed as it comes.

    It takes its real name, the only one ``have`` announces and ``apply`` uses, once whole and
    matching its SHA-256; until then nothing of it is visible in the tree.
    """

    def __init__(self, staging: Path, sha256: str, size: int) -> None:
        self.sha256, self.size = sha256, size
        self.path = staging / sha256
        self.part = staging / f"{sha256}.part"
        self._file = open(self.part, "wb")  # noqa: SIM115 - written part by part, closed by finish/discard
        self._hasher = hashlib.sha256()
        self.written = 0

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.written or self.written + len(data) > self.size:
            raise ProtocolError(
                f"part at byte {offset} (+{len(data)}) of {self.sha256[:12]} does not follow byte"
                f" {self.written} of {self.size}",
                "malformed",
            )
        self._file.write(data)
        self._hasher.update(data)
        self.written += len(data)

    def finish(self) -> None:
        """Keep it (fsync, rename to its hash) if whole and matching; else discard it and raise."""
        got = self._hasher.hexdigest()
        if self.written != self.size or got != self.sha256:
            self.discard()
            raise ProtocolError(
                f"file {self.sha256[:12]} arrived as {self.written} of {self.size} bytes with SHA-256"
                f" {got[:12]}: discarded",
                "checksum",
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.part, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.part.unlink(missing_ok=True)


class FilesReplica:
    """The backup's copy of a file tree; see the module docstring for the contract."""

    def __init__(
        self,
        root: Path,
        *,
        keep: int = 5,
        post_change_command: list[str] | None = None,
        clock: Callable[[], float] = time.time,
        file_mode_mask: int = DEFAULT_FILE_MODE_MASK,
    ) -> None:
        self.root = root
        self.file_mode_mask = file_mode_mask  # mode bits never applied, whatever the source sends
        self.refused: dict[str, str] = {}  # path -> why the filesystem refused it, last change set
        self.versions = Path(str(root) + ".hotsite-versions")
        self.staging = root / STAGING
        self.keep = keep
        self.command = post_change_command or []
        self._clock = clock
        self.applied_at: float | None = None
        self.observed_at: float | None = None
        self.last_command: dict[str, Any] = {}

    def open(self) -> None:
        """Create the tree and staging area; drop what a cut session left half-written there."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True, mode=0o700)
        for p in self.staging.iterdir():
            if not _is_sha256(p.name):
                p.unlink(missing_ok=True)

    def manifest(self) -> dict[str, str]:
        return {rel: e.sha256 for rel, e in TreeScanner(self.root).scan(full=True).items()}

    def have(self) -> set[str]:
        hashes = set(self.manifest().values())
        if self.staging.exists():
            hashes.update(p.name for p in self.staging.iterdir() if _is_sha256(p.name))
        return hashes

    def block_map(self) -> dict[str, list[Any]]:
        """rel -> [sha256, block hashes] of each large file, for the agent to send deltas against."""
        out: dict[str, list[Any]] = {}
        for rel, entry in TreeScanner(self.root).scan(full=True).items():
            if entry.size >= DELTA_MIN:
                got = digest_stable(self.root / rel, blocks=True)
                if got is not None and got.blocks is not None:
                    out[rel] = [got.sha256, got.blocks]
        return out

    def begin(self, sha256: str, size: int) -> StagedFile:
        """A staging file for content arriving in parts (FILE_BEGIN)."""
        _check_sha256(sha256, "staged file")
        if size < 0:
            raise ProtocolError(f"file {sha256[:12]} announced with negative size {size}", "malformed")
        self.staging.mkdir(exist_ok=True, mode=0o700)
        return StagedFile(self.staging, sha256, size)

    def stage_delta(self, header: dict[str, Any], body: bytes) -> None:
        """Rebuild a file from our version of it plus the blocks sent, block by block into staging;
        kept only if the result's SHA-256 is the announced one."""
        parts, sha, base, size, block, indices = validate.delta(header)
        rel = "/".join(parts)
        layout = delta_layout(size, block, indices, len(body))
        staged = self.staging / base  # the base may itself be staged, not yet applied
        out = self.begin(sha, size)
        view = memoryview(body)
        try:
            with self._open_base(staged, parts) as f:
                for start in range(0, size, block):
                    length = min(block, size - start)
                    at = layout.get(start // block)
                    if at is not None:
                        out.write(start, bytes(view[at : at + length]))
                    else:
                        out.write(start, os.pread(f.fileno(), length, start).ljust(length, b"\0"))
            out.finish()
        except (OSError, ProtocolError):
            out.discard()
            raise ProtocolError(
                f"delta for {rel} does not rebuild {sha[:12]}: we no longer have version {base[:12]}",
                "malformed",
            ) from None
        except BaseException:
            out.discard()
            raise

    def _open_base(self, staged: Path, parts: tuple[str, ...]) -> Any:
        """Our version a delta applies to: staged, or in the tree (opened beneath the root)."""
        if staged.is_file():
            return open(staged, "rb")  # noqa: SIM115 - the caller's with closes it
        with Beneath(self.root) as tree:
            return os.fdopen(tree.open_read(parts), "rb")

    def stage(self, sha256: str, data: bytes) -> None:
        _check_sha256(sha256, "staged file")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ProtocolError(f"file content does not match its hash {sha256[:12]}", "checksum")
        path = self.staging / sha256
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def apply(self, files: dict[str, tuple[str, int, int]]) -> dict[str, int]:
        """Make the tree equal ``files`` (path -> sha256, mode, size); return counts of changes.

        Every path is checked (:func:`safepath.parse_relpath`) before anything is touched, and every
        file is reached from a descriptor of the root without following a symlink. Modes are masked
        with ``file_mode_mask``. Deletions go first, so a directory the source replaced by a file (or
        the reverse) is out of the way. A file the filesystem refuses (a name too long for it, say)
        is left out and reported in ``refused`` (path -> error); the rest is applied.
        """
        keep_bits = 0o7777 & ~self.file_mode_mask
        wanted = {rel: (validate.sha256(sha, rel), mode & keep_bits) for rel, (sha, mode, _) in files.items()}
        paths = {rel: parse_relpath(rel) for rel in wanted}
        current = TreeScanner(self.root).scan(full=True)
        counts = {"written": 0, "deleted": 0, "mode": 0, "same": 0}
        self.refused = {}
        self._stage_from_tree(files, current)
        for rel, (sha, _mode) in wanted.items():
            if not (rel in current and current[rel].sha256 == sha) and not (self.staging / sha).exists():
                raise ProtocolError(f"content {sha[:12]} for {rel[:200]} never arrived", "malformed")
        with Beneath(self.root) as tree:
            for rel in current:
                if rel not in wanted:
                    gone = parse_relpath(rel)
                    self._keep_version(tree, gone)
                    counts["deleted"] += tree.unlink(gone)
                    tree.prune_empty_dirs(gone)
            for rel, (sha, mode) in wanted.items():
                try:
                    counts[self._put(tree, paths[rel], sha, mode, current.get(rel))] += 1
                except OSError as exc:
                    if exc.errno not in _REFUSED_NAME:
                        raise  # the disk, not this name (full, read-only, I/O error): the session retries
                    self.refused[rel] = exc.strerror or str(exc)
                    log.warning(
                        "file not applied", extra=kv(root=self.root, path=rel[:300], error=self.refused[rel])
                    )
            os.fsync(tree.fd)
        for p in self.staging.iterdir():
            p.unlink(missing_ok=True)
        self.applied_at = self._clock()
        del counts["same"]
        if any(counts.values()) and self.command:
            self._run_command()
        return counts

    def _put(self, tree: Beneath, parts: tuple[str, ...], sha: str, mode: int, old: Entry | None) -> str:
        """One file of the manifest in place; which count it adds to ("written", "mode" or "same")."""
        if old is not None and old.sha256 == sha:
            if old.mode == mode:
                return "same"
            tree.chmod(parts, mode)
            return "mode"
        staged = self.staging / sha
        if old is not None:
            self._keep_version(tree, parts)
        with open(staged, "rb") as src:
            tree.install(src.fileno(), parts, mode)
        return "written"

    def _stage_from_tree(self, files: dict[str, tuple[str, int, int]], current: dict[str, Entry]) -> None:
        """Content that is already in the tree (a rename, a copy, a swap) is staged before anything
        is written: read from its old place while the change set is being applied, the second
        half of a swap would copy a file this change set had already overwritten. A hard link
        keeps the old content whatever is renamed over its path."""
        by_hash = {e.sha256: rel for rel, e in current.items()}
        with Beneath(self.root) as tree:
            for rel, (sha, _mode, _size) in files.items():
                staged = self.staging / sha
                unchanged = rel in current and current[rel].sha256 == sha
                if unchanged or staged.exists() or sha not in by_hash:
                    continue
                here = parse_relpath(by_hash[sha])
                if tree.link_out(here, str(staged)):
                    continue
                with contextlib.suppress(OSError), Beneath(self.staging) as staging:
                    fd = tree.open_read(here)
                    try:
                        staging.install(fd, (sha,), 0o600)
                    finally:
                        os.close(fd)

    def _keep_version(self, tree: Beneath, parts: tuple[str, ...]) -> None:
        """Hard-link the file at ``parts`` into the versions tree as ``<name>.<time>`` and keep the
        newest ``keep`` of that file (its own versions only: ``ivr`` is not ``ivr.conf``)."""
        if self.keep <= 0:
            return
        directory = self.versions.joinpath(*parts[:-1])
        stem = version_stem(parts[-1])
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tree.link_out(parts, str(directory / f"{stem}.{self._clock():.6f}"))
            mine = sorted(p for p in directory.iterdir() if is_version_of(p.name, stem))
        except OSError as exc:
            where = "/".join(parts)[:300]
            log.warning("version not kept", extra=kv(root=self.root, path=where, error=str(exc)))
            return
        for stale in mine[: -self.keep]:
            stale.unlink(missing_ok=True)

    def _run_command(self) -> None:
        started = time.monotonic()
        try:
            done = subprocess.run(self.command, cwd=self.root, capture_output=True, timeout=60, check=False)
            self.last_command = {"rc": done.returncode, "stderr": done.stderr.decode(errors="replace")[-500:]}
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.last_command = {"rc": None, "error": str(exc)}
        self.last_command["seconds"] = round(time.monotonic() - started, 3)
        level = logging.INFO if self.last_command.get("rc") == 0 else logging.WARNING
        log.log(level, "post-change command ran", extra=kv(root=self.root, **self.last_command))


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _check_sha256(value: str, what: str) -> None:
    """Content hashes name files in the staging area: anything else could be a path."""
    if not _is_sha256(value):
        raise ProtocolError(f"{what} hash {value[:80]!r} is not a SHA-256 (64 hex digits)", "malformed")


# What the filesystem says about one name (or what is at it), not about the disk as a whole.
_REFUSED_NAME = frozenset(
    {
        errno.ENAMETOOLONG,
        errno.EILSEQ,
        errno.EINVAL,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EPERM,
        errno.EACCES,
        errno.ENOTEMPTY,
        errno.EEXIST,
    }
)
_VERSION_TIME = re.compile(r"\.\d+\.\d{6}")
_NAME_MAX = 255


def version_stem(name: str) -> str:
    """What a kept version of ``name`` is called before its ``.<time>`` suffix: the name itself, or,
    if the suffix would not fit the filesystem's 255 bytes, a shortened name and a hash of it."""
    if len(os.fsencode(name)) + 18 <= _NAME_MAX:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.fsdecode(os.fsencode(name)[:200]) + "~" + digest


def is_version_of(candidate: str, stem: str) -> bool:
    """``candidate`` is ``<stem>.<seconds>.<microseconds>``: exactly, so ``ivr`` does not claim
    ``ivr.conf``'s versions (nor ``ivr.1``'s)."""
    return candidate.startswith(stem) and _VERSION_TIME.fullmatch(candidate, len(stem)) is not None


class FilesStreamClient:
    """Connects, receives change sets, applies them; same reconnect rules as the SQLite client."""

    def __init__(
        self,
        name: str,
        source: str,
        replica: FilesReplica,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        server_name: str | None = None,
        compression: str = "zlib",
        rate_bytes_s: int = 0,
        on_applied: Callable[[dict[str, int]], None] | None = None,
        idle_timeout_s: float = 15.0,
        max_message: int = protocol.MAX_MESSAGE,
    ) -> None:
        from appliance.replication.client import StreamStats

        # The agent sends a heartbeat every heartbeat_s when nothing changes: silence this long
        # means the path is dead (a partition closes nothing), so reconnect.
        self.idle_timeout_s = idle_timeout_s

        self.name, self.source, self.replica = name, source, replica
        self.host, self.port = host, port
        self._ssl = ssl_context
        self._server_name = server_name or host
        self.compression, self.rate = compression, rate_bytes_s
        self._on_applied = on_applied
        self.stats = StreamStats()
        self.change_sets = 0
        self.deltas = 0  # files received as deltas
        self.max_message = max_message  # the largest message accepted (tests lower it)
        self.chunked_files = 0  # files received in parts (FILE_BEGIN...FILE_END) and kept
        self.aborted_files = 0  # files the agent gave up mid-way (changed while read): discarded
        self.rejected_files = 0  # files received whole in parts whose SHA-256 did not match: discarded
        self._incoming: StagedFile | None = None  # the file arriving in parts, if any

    async def run(self) -> None:
        """Sessions until cancelled. Whatever a session ends with (a bad message, a bug, a full disk)
        is counted, logged and shown in ``stats.last_error``, and the next session starts after the
        backoff: this task never ends on its own."""
        backoff = 0.2
        while True:
            try:
                await self._session()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except ProtocolError as exc:
                self.stats.corrupt_messages += exc.reason == "crc"
                self.stats.malformed_messages += exc.reason != "crc"
                self.stats.note_error(exc.message)
                log.warning(
                    "bad message from the source",
                    extra=kv(stream=self.name, reason=exc.reason, error=exc.message[:300]),
                )
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as exc:
                self.stats.note_error(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug must not end replication silently: counted, logged, retried
                self.stats.session_failures += 1
                self.stats.note_error(f"{type(exc).__name__}: {exc}")
                log.exception("files session failed; starting a new one", extra=kv(stream=self.name))
            finally:
                self.stats.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _session(self) -> None:
        await asyncio.to_thread(self.replica.open)
        # asyncio.timeout throughout, not wait_for: 3.11's wait_for swallows a cancellation that lands
        # just as a message completes, and the client then never stops (seen: 1 run in ~10).
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._ssl, server_hostname=self._server_name if self._ssl else None
            )
        try:
            have = await asyncio.to_thread(self.replica.have)
            blocks = await asyncio.to_thread(self.replica.block_map)
            writer.write(
                protocol.encode(
                    Msg.HELLO,
                    {
                        "stream": self.source,
                        "kind": "files",
                        "have": sorted(have),
                        "blocks": blocks,
                        "file_parts": True,
                        "compression": self.compression,
                        "rate_bytes_s": self.rate,
                    },
                )
            )
            await writer.drain()
            async with asyncio.timeout(30):
                welcome = await protocol.read_message(reader, self.max_message)
            if welcome.kind != Msg.WELCOME:
                raise OSError(f"source agent refused: {welcome.header.get('error')}")
            self.stats.connected = True
            self.stats.sessions += 1
            while True:
                async with asyncio.timeout(self.idle_timeout_s):
                    msg = await protocol.read_message(reader, self.max_message)
                self.stats.bytes_received += msg.wire_bytes
                await self._dispatch(msg)
        finally:
            if self._incoming is not None:  # cut mid-file: nothing of it stays
                self._incoming.discard()
                self._incoming = None
            writer.close()

    async def _dispatch(self, msg: protocol.Message) -> None:
        """Hand ``msg`` to its handler; a header field missing or of the wrong type is a malformed
        message (counted, the session ends and the next one starts over), never a crash of the
        client's task."""
        try:
            if msg.kind in _PART_KINDS:
                await self._receive_part(msg)
            else:
                await self._receive(msg)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(
                f"message kind {msg.kind} has a missing or invalid header field: {exc!r}", "malformed"
            ) from None

    async def _receive(self, msg: protocol.Message) -> None:
        if self._incoming is not None:
            raise ProtocolError(
                f"message kind {msg.kind} while file {self._incoming.sha256[:12]} is arriving", "malformed"
            )
        if msg.kind == Msg.FILE_DATA:
            sha = validate.sha256(msg.header.get("sha256"), "file sha256")
            await asyncio.to_thread(self.replica.stage, sha, msg.body)
        elif msg.kind == Msg.FILE_DELTA:
            await asyncio.to_thread(self.replica.stage_delta, msg.header, msg.body)
            self.deltas += 1
        elif msg.kind == Msg.FILES_MANIFEST:
            files = validate.manifest(msg.header)
            observed_at = validate.number(msg.header, "observed_at")
            counts = await asyncio.to_thread(self.replica.apply, files)
            self.change_sets += 1
            self.stats.current_at = self.replica.observed_at = observed_at
            self._report_refused()
            if self._on_applied is not None:
                self._on_applied(counts)
        elif msg.kind == Msg.HEARTBEAT:
            self.stats.current_at = validate.number(msg.header, "observed_at")
        elif msg.kind == Msg.ERROR:
            raise OSError(f"source agent: {msg.header.get('error')}")

    def _report_refused(self) -> None:
        """Files of the last change set the filesystem refused: counted and shown, the rest applied."""
        refused = self.replica.refused
        if refused:
            self.stats.refused_files += len(refused)
            first = next(iter(refused.items()))
            self.stats.note_error(f"{len(refused)} file(s) not applied, e.g. {first[0][:120]!r}: {first[1]}")

    async def _receive_part(self, msg: protocol.Message) -> None:
        """FILE_BEGIN, FILE_PART, FILE_END, FILE_ABORT: a large file staged a part at a time."""
        if msg.kind == Msg.FILE_BEGIN:
            if self._incoming is not None:
                raise ProtocolError(f"FILE_BEGIN while {self._incoming.sha256[:12]} is arriving", "malformed")
            sha = validate.sha256(msg.header.get("sha256"), "file sha256")
            size = validate.integer(msg.header, "size", 0, validate.MAX_SIZE)
            self._incoming = await asyncio.to_thread(self.replica.begin, sha, size)
            return
        incoming = self._incoming
        if incoming is None:
            raise ProtocolError(f"file part (message kind {msg.kind}) without FILE_BEGIN", "malformed")
        if msg.kind == Msg.FILE_PART:
            offset = validate.integer(msg.header, "offset", 0, validate.MAX_SIZE)
            await asyncio.to_thread(incoming.write, offset, msg.body)
            return
        self._incoming = None
        if msg.kind == Msg.FILE_ABORT:
            await asyncio.to_thread(incoming.discard)
            self.aborted_files += 1
            log.info(
                "source gave up a file mid-way; discarded",
                extra=kv(stream=self.name, sha256=incoming.sha256[:12], reason=msg.header.get("reason")),
            )
            return
        try:
            if msg.header.get("sha256") != incoming.sha256:
                raise ProtocolError(f"FILE_END for another file than {incoming.sha256[:12]}", "malformed")
            await asyncio.to_thread(incoming.finish)
        except ProtocolError as exc:
            incoming.discard()
            self.rejected_files += 1
            log.warning("received file rejected", extra=kv(stream=self.name, error=exc.message))
            raise
        self.chunked_files += 1


_PART_KINDS = frozenset({Msg.FILE_BEGIN, Msg.FILE_PART, Msg.FILE_END, Msg.FILE_ABORT})
