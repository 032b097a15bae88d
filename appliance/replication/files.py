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

Replica side: contents are staged (write, fsync), then each file is put in
place by rename (atomic), with its mode; files gone at the source are
deleted; the replaced or deleted versions are kept (newest ``keep`` per
file) under ``<replica>.hotsite-versions``; an optional command runs after
each applied change set (argv, no shell), like csync2's action hooks.

Deltas: a file of ``DELTA_MIN`` bytes or more that the replica already has
an older version of (at the same path) is sent as the ``BLOCK``-sized blocks
whose hashes differ from that version's (the replica lists its large files'
block hashes when it connects; the agent remembers what it sent since), if
that is less than half the file; the replica rebuilds the new content from
its copy plus those blocks and checks its SHA-256 before staging it. Fixed
blocks, not rsync's rolling hash: in-place edits and appends (a routing
table, a log-like prompt index) travel as deltas; an insertion near the
start shifts every block and the file goes whole.
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
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.logs import kv
from appliance.replication import protocol
from appliance.replication.protocol import Msg, ProtocolError, Sender

if TYPE_CHECKING:
    from appliance.replication.source import ServedStream, SourceAgent

log = logging.getLogger(__name__)

STAGING = ".hotsite-staging"
DELTA_MIN = 1024 * 1024  # smaller files always go whole
BLOCK = 64 * 1024


def block_digests(data: bytes, block: int = BLOCK) -> list[str]:
    """Hashes of ``data``'s fixed-size blocks (the last one may be short)."""
    view = memoryview(data)
    return [
        hashlib.blake2b(view[i : i + block], digest_size=16).hexdigest() for i in range(0, len(data), block)
    ]


def changed_blocks(new: list[str], old: list[str]) -> list[int]:
    """Indices of the new version's blocks that the old version does not have at the same place."""
    return [i for i, d in enumerate(new) if i >= len(old) or old[i] != d]


def apply_delta(base: bytes, size: int, block: int, indices: list[int], body: bytes) -> bytes:
    """The new content: ``base`` cut or padded to ``size``, with the sent blocks written in."""
    out = bytearray(base[:size].ljust(size, b"\0"))
    offset = 0
    for i in indices:
        length = min(block, size - i * block)
        if length <= 0 or offset + length > len(body):
            raise ProtocolError(f"delta block {i} does not fit a file of {size} bytes", "malformed")
        out[i * block : i * block + length] = body[offset : offset + length]
        offset += length
    if offset != len(body):
        raise ProtocolError(f"delta carries {len(body) - offset} bytes beyond its blocks", "malformed")
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Entry:
    sha256: str
    mode: int
    size: int


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
                    read = read_stable(full_path)
                    if read is None:
                        continue  # changed while being read: next scan
                    data, key = read
                    entry = Entry(hashlib.sha256(data).hexdigest(), stat.S_IMODE(st.st_mode), len(data))
                manifest[rel] = entry
                seen[rel] = (key, entry)
        self._cache = seen
        return manifest

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
        try:
            event = await asyncio.wait_for(self._inotify.get(), max(timeout, 0.0))
        except TimeoutError:
            return False
        self._note(event)
        # Quiet period: a file written in pieces, or many files copied in, make one scan.
        until = time.monotonic() + self.MAX_DEBOUNCE_S
        while time.monotonic() < until:
            try:
                event = await asyncio.wait_for(self._inotify.get(), self.QUIET_S)
            except TimeoutError:
                break
            self._note(event)
        return True

    def close(self) -> None:
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
    have: set[str] = set(hello.header.get("have", []))
    # rel -> (sha256, block hashes) of the replica's version of each large file it has.
    known: dict[str, tuple[str, list[str]]] = {
        str(rel): (str(v[0]), [str(d) for d in v[1]])
        for rel, v in dict(hello.header.get("blocks") or {}).items()
    }
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
                    data = await asyncio.to_thread(scanner.read, rel, entry.sha256)
                    if data is None:
                        complete = False  # changed under us: the next scan ships the new content
                        break
                    await _send_content(sender, rel, entry, data, known)
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
    sender: Sender, rel: str, entry: Entry, data: bytes, known: dict[str, tuple[str, list[str]]]
) -> None:
    """FILE_DELTA against the replica's version of ``rel`` when that is much smaller, else FILE_DATA."""
    if entry.size < DELTA_MIN:
        await sender.send(Msg.FILE_DATA, {"sha256": entry.sha256}, data)
        return
    digests = await asyncio.to_thread(block_digests, data)
    base = known.get(rel)
    known[rel] = (entry.sha256, digests)  # what the replica will have once this change set commits
    indices = changed_blocks(digests, base[1]) if base is not None else []
    if base is None or len(indices) * BLOCK * 2 > len(data):
        await sender.send(Msg.FILE_DATA, {"sha256": entry.sha256}, data)
        return
    view = memoryview(data)
    body = b"".join(view[i * BLOCK : (i + 1) * BLOCK] for i in indices)
    header = {"sha256": entry.sha256, "path": rel, "base": base[0], "size": len(data), "block": BLOCK}
    await sender.send(Msg.FILE_DELTA, {**header, "blocks": indices}, body)


async def _wait_closed(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        while await protocol.read_message(reader):
            pass


class FilesReplica:
    """The backup's copy of a file tree; see the module docstring for the contract."""

    def __init__(
        self,
        root: Path,
        *,
        keep: int = 5,
        post_change_command: list[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.versions = Path(str(root) + ".hotsite-versions")
        self.staging = root / STAGING
        self.keep = keep
        self.command = post_change_command or []
        self._clock = clock
        self.applied_at: float | None = None
        self.observed_at: float | None = None
        self.last_command: dict[str, Any] = {}

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True, mode=0o700)

    def manifest(self) -> dict[str, str]:
        return {rel: e.sha256 for rel, e in TreeScanner(self.root).scan(full=True).items()}

    def have(self) -> set[str]:
        hashes = set(self.manifest().values())
        hashes.update(p.name for p in self.staging.iterdir()) if self.staging.exists() else None
        return hashes

    def block_map(self) -> dict[str, list[Any]]:
        """rel -> [sha256, block hashes] of each large file, for the agent to send deltas against."""
        out: dict[str, list[Any]] = {}
        for rel, entry in TreeScanner(self.root).scan(full=True).items():
            if entry.size >= DELTA_MIN:
                got = read_stable(self.root / rel)
                if got is not None:
                    out[rel] = [hashlib.sha256(got[0]).hexdigest(), block_digests(got[0])]
        return out

    def stage_delta(self, header: dict[str, Any], body: bytes) -> None:
        """Rebuild a file from our version of it plus the blocks sent; staged only if its hash matches."""
        rel, base = str(header["path"]), str(header["base"])
        _safe(rel)
        if len(base) != 64 or not all(c in "0123456789abcdef" for c in base):
            raise ProtocolError(f"delta base {base[:80]!r} is not a SHA-256", "malformed")
        staged = self.staging / base  # the base may itself be staged, not yet applied
        got = read_stable(staged) if staged.is_file() else read_stable(self.root / rel)
        if got is None or hashlib.sha256(got[0]).hexdigest() != base:
            raise ProtocolError(f"delta for {rel} is against a version we no longer have", "malformed")
        data = apply_delta(got[0], int(header["size"]), int(header["block"]), list(header["blocks"]), body)
        self.stage(str(header["sha256"]), data)

    def stage(self, sha256: str, data: bytes) -> None:
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
        """Make the tree equal ``files`` (path -> sha256, mode, size); return counts of changes."""
        current = {rel: e for rel, e in TreeScanner(self.root).scan(full=True).items()}
        by_hash = {e.sha256: rel for rel, e in current.items()}
        counts = {"written": 0, "deleted": 0, "mode": 0}
        for rel, (sha, mode, _size) in files.items():
            _safe(rel)
            dest = self.root / rel
            old = current.get(rel)
            if old is not None and old.sha256 == sha:
                if old.mode != mode:
                    os.chmod(dest, mode)
                    counts["mode"] += 1
                continue
            staged = self.staging / sha
            if not staged.exists() and sha in by_hash:  # a rename or copy: content already here
                data = (self.root / by_hash[sha]).read_bytes()
            elif staged.exists():
                data = staged.read_bytes()
            else:
                raise ProtocolError(f"content {sha[:12]} for {rel} never arrived", "malformed")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if old is not None:
                self._keep_version(rel)
            tmp = dest.with_name(f".{dest.name}.hotsite-tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            counts["written"] += 1
        for rel in current:
            if rel not in files:
                self._keep_version(rel)
                (self.root / rel).unlink(missing_ok=True)
                counts["deleted"] += 1
        dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        for p in self.staging.iterdir():
            p.unlink(missing_ok=True)
        self.applied_at = self._clock()
        if any(counts.values()) and self.command:
            self._run_command()
        return counts

    def _keep_version(self, rel: str) -> None:
        if self.keep <= 0:
            return
        src = self.root / rel
        dest = self.versions / f"{rel}.{self._clock():.6f}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.link(src, dest)
        old = sorted(dest.parent.glob(f"{Path(rel).name}.*"))
        for stale in old[: -self.keep]:
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


def _safe(rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].startswith(".hotsite")):
        raise ProtocolError(f"refusing unsafe path {rel!r} from the source", "malformed")


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

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._session()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except ProtocolError as exc:
                self.stats.corrupt_messages += exc.reason == "crc"
                self.stats.last_error = exc.message
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self.stats.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _session(self) -> None:
        await asyncio.to_thread(self.replica.open)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, ssl=self._ssl, server_hostname=self._server_name if self._ssl else None
            ),
            10,
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
                        "compression": self.compression,
                        "rate_bytes_s": self.rate,
                    },
                )
            )
            await writer.drain()
            welcome = await asyncio.wait_for(protocol.read_message(reader), 30)
            if welcome.kind != Msg.WELCOME:
                raise OSError(f"source agent refused: {welcome.header.get('error')}")
            self.stats.connected = True
            self.stats.sessions += 1
            while True:
                msg = await asyncio.wait_for(protocol.read_message(reader), self.idle_timeout_s)
                self.stats.bytes_received += msg.wire_bytes
                if msg.kind == Msg.FILE_DATA:
                    await asyncio.to_thread(self.replica.stage, msg.header["sha256"], msg.body)
                elif msg.kind == Msg.FILE_DELTA:
                    await asyncio.to_thread(self.replica.stage_delta, msg.header, msg.body)
                    self.deltas += 1
                elif msg.kind == Msg.FILES_MANIFEST:
                    files = {k: (v[0], int(v[1]), int(v[2])) for k, v in msg.header["files"].items()}
                    counts = await asyncio.to_thread(self.replica.apply, files)
                    self.change_sets += 1
                    self.stats.current_at = self.replica.observed_at = float(msg.header["observed_at"])
                    if self._on_applied is not None:
                        self._on_applied(counts)
                elif msg.kind == Msg.HEARTBEAT:
                    self.stats.current_at = float(msg.header["observed_at"])
                elif msg.kind == Msg.ERROR:
                    raise OSError(f"source agent: {msg.header.get('error')}")
        finally:
            writer.close()
