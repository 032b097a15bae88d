"""The source agent (``hotsite source``): serves streams from the primary over mutual TLS.

One connection per stream and replica. The replica says where it is
(HELLO: position, checksum, page hashes); the agent answers "seed" (no
state: the whole database), "resume" (the WAL still holds everything after
that position: only the pages those frames changed) or "resnapshot" (the
position is gone, e.g. the WAL was restarted while nobody followed it:
only pages whose hash differs). Then it streams whole committed
transactions as they appear, with heartbeats while idle.

The agent is read-only towards what it serves. It keeps no state of its
own: the replica's position is the only position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.logs import kv
from appliance.replication import protocol
from appliance.replication.checksum import show, unpack_hashes
from appliance.replication.follower import ResnapshotNeeded, SourceError, SqliteFollower
from appliance.replication.position import Batch, Position
from appliance.replication.protocol import Msg, ProtocolError, Sender
from appliance.replication.tls import peer_names

log = logging.getLogger(__name__)

SEED_CHUNK_PAGES = 256
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ServedStream:
    name: str
    kind: str  # "sqlite" | "files"
    path: Path
    exclude: tuple[str, ...] = ()


class SourceAgent:
    """Serves ``streams`` on ``host:port``; ``start`` binds (port 0 picks a free one), ``stop`` closes."""

    def __init__(
        self,
        streams: list[ServedStream],
        *,
        ssl_context: ssl.SSLContext | None,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_clients: list[str] | None = None,
        poll_interval_s: float = 0.01,
        heartbeat_s: float = 0.5,
        rescan_s: float = 30.0,
        watch: bool = True,
        bandwidth_limit_bytes_s: int = 0,
        checkpoint_frames: int = 1000,
        restart_frames: int = 4000,
        checkpoint_busy_ms: int = 50,
        clock: Callable[[], float] = time.time,
        corrupt: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.streams = {s.name: s for s in streams}
        self._ssl = ssl_context
        self.host = host
        self.port = port
        self._allowed = set(allowed_clients or [])
        self.poll_interval_s = poll_interval_s
        self.heartbeat_s = heartbeat_s
        self.rescan_s = rescan_s
        self.watch = watch  # inotify for file trees (else a stat comparison every 0.2 s)
        self.file_scans = 0  # scans of file trees, all sessions (tests: no scan without a change)
        self.bandwidth_limit = bandwidth_limit_bytes_s
        self.checkpoint_frames = checkpoint_frames
        self.restart_frames = restart_frames
        self.checkpoint_busy_ms = checkpoint_busy_ms
        self.followers: set[SqliteFollower] = set()  # live sessions' followers (tests, status)
        self._clock = clock
        self.corrupt = corrupt  # test hook: alters messages after their CRC was computed
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sessions = 0

    def find(self, requested: str) -> ServedStream | None:
        if requested in self.streams:
            return self.streams[requested]
        return next((s for s in self.streams.values() if str(s.path) == requested), None)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "source agent listening", extra=kv(host=self.host, port=self.port, streams=len(self.streams))
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        try:
            names = peer_names(writer.get_extra_info("peercert"))
            if self._allowed and not names & self._allowed:
                log.warning("client certificate not allowed", extra=kv(peer=peer, names=sorted(names)))
                return
            hello = await asyncio.wait_for(protocol.read_message(reader), HANDSHAKE_TIMEOUT_S)
            if hello.kind != Msg.HELLO:
                raise ProtocolError("expected HELLO", "malformed")
            stream = self.find(str(hello.header.get("stream", "")))
            compression = str(hello.header.get("compression", "none"))
            if compression not in protocol.compressions():
                compression = "zlib" if compression == "zstd" else "none"
            rate = int(hello.header.get("rate_bytes_s") or 0)
            if self.bandwidth_limit:
                rate = min(rate, self.bandwidth_limit) if rate else self.bandwidth_limit
            sender = Sender(writer, compression, rate, self.corrupt)
            if stream is None:
                await sender.send(
                    Msg.ERROR,
                    {
                        "error": f"no stream {hello.header.get('stream')!r} here",
                        "known": sorted(self.streams),
                    },
                )
                return
            self.sessions += 1
            if stream.kind == "sqlite":
                await self._serve_sqlite(stream, hello, reader, sender)
            else:
                from appliance.replication.files import serve_files

                await serve_files(self, stream, hello, reader, sender)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as exc:
            log.info("replica disconnected", extra=kv(peer=peer, reason=type(exc).__name__))
        except ProtocolError as exc:
            log.warning("bad message from replica", extra=kv(peer=peer, reason=exc.reason))
        except asyncio.CancelledError:
            pass  # agent stopping: end this connection quietly
        except SourceError as exc:
            log.error("stream cannot be served", extra=kv(peer=peer, error=exc.message))
            with contextlib.suppress(Exception):
                writer.write(protocol.encode(Msg.ERROR, {"error": exc.message}))
                await writer.drain()
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _serve_sqlite(
        self, stream: ServedStream, hello: protocol.Message, reader: asyncio.StreamReader, sender: Sender
    ) -> None:
        follower = SqliteFollower(
            stream.path,
            clock=self._clock,
            checkpoint_frames=self.checkpoint_frames,
            restart_frames=self.restart_frames,
            checkpoint_busy_ms=self.checkpoint_busy_ms,
        )
        await asyncio.to_thread(follower.open)
        self.followers.add(follower)
        inbox: asyncio.Queue[protocol.Message] = asyncio.Queue()
        reader_task = asyncio.create_task(_pump(reader, inbox))
        try:
            await self._handshake(follower, stream, hello, sender)
            await self._stream(follower, stream, sender, inbox, reader_task)
        finally:
            reader_task.cancel()
            with contextlib.suppress(BaseException):
                await reader_task
            self.followers.discard(follower)
            await asyncio.to_thread(follower.close)

    async def _handshake(
        self, follower: SqliteFollower, stream: ServedStream, hello: protocol.Message, sender: Sender
    ) -> None:
        h = hello.header
        position = Position.from_json(h["position"]) if h.get("position") else None
        now = self._clock()
        if position is None:
            await sender.send(
                Msg.WELCOME, {"mode": "seed", "source_time": now, "compression": sender.compression}
            )
            pos, page_size, db_pages, pages = await asyncio.to_thread(follower.read_state)
            await sender.send(
                Msg.SEED_BEGIN, {"page_size": page_size, "db_pages": db_pages, "position": pos.to_json()}
            )
            while True:
                chunk = await asyncio.to_thread(_take, pages, SEED_CHUNK_PAGES)
                if not chunk:
                    break
                await sender.send(Msg.SEED_PAGES, {"n": len(chunk)}, protocol.pages_body(chunk))
            await sender.send(
                Msg.SEED_END,
                {
                    "position": pos.to_json(),
                    "checksum": show(follower.hashes.checksum),
                    "observed_at": follower.last_current_at,
                },
            )
            log.info("seeded replica", extra=kv(stream=stream.name, pages=db_pages, position=str(pos)))
            return
        if h.get("resync"):
            why: str | None = "the replica asked for a resync (after a refused batch or a demotion)"
        else:
            why = await asyncio.to_thread(follower.resumable, position)
        mode = "resume" if why is None else "resnapshot"
        await sender.send(
            Msg.WELCOME, {"mode": mode, "reason": why, "source_time": now, "compression": sender.compression}
        )
        replica_hashes = unpack_hashes(hello.body)
        replica_pages = int(h.get("db_pages") or 0)
        batch = await asyncio.to_thread(
            self._catch_up, follower, position, mode, replica_hashes, replica_pages
        )
        await sender.send(Msg.BATCH, batch.header(), protocol.pages_body(sorted(batch.pages.items())))
        log.info(
            f"replica {mode}",
            extra=kv(
                stream=stream.name,
                since=str(position),
                to=str(batch.position),
                pages=len(batch.pages),
                reason=why or "",
            ),
        )

    @staticmethod
    def _catch_up(
        follower: SqliteFollower,
        since: Position,
        mode: str,
        replica_hashes: dict[int, int],
        replica_pages: int,
    ) -> Batch:
        """One batch from the replica's state to the newest commit (both read under the same hold)."""
        pos, page_size, db_pages, pages = follower.read_state()
        if mode == "resume":
            changed, smallest, frames = follower.changed_pages(since, pos.frame)
            kept = {p: d for p, d in pages if p in changed}
            min_pages = min(x for x in (smallest, replica_pages, db_pages) if x is not None)
            return Batch(
                "tx",
                since,
                pos,
                page_size,
                db_pages,
                min_pages,
                follower.hashes.checksum,
                follower.last_current_at,
                transactions=0,
                frames=frames,
                pages=kept,
            )
        kept = {}
        for pgno, data in pages:
            if replica_hashes.get(pgno) != follower.hashes.hashes[pgno]:
                kept[pgno] = data
        return Batch(
            "resync",
            None,
            pos,
            page_size,
            db_pages,
            db_pages,
            follower.hashes.checksum,
            follower.last_current_at,
            transactions=0,
            pages=kept,
        )

    async def _stream(
        self,
        follower: SqliteFollower,
        stream: ServedStream,
        sender: Sender,
        inbox: asyncio.Queue[protocol.Message],
        reader_task: asyncio.Task[None],
    ) -> None:
        last_sent = time.monotonic()
        verify_at: Position | None = None
        while not reader_task.done():
            while not inbox.empty():
                msg = inbox.get_nowait()
                if msg.kind == Msg.VERIFY:
                    pos, checksum = await asyncio.to_thread(follower.full_checksum)
                    verify_at = pos
                    await sender.send(
                        Msg.VERIFY_RESULT,
                        {"position": pos.to_json(), "checksum": show(checksum), "computed_at": self._clock()},
                    )
                elif msg.kind == Msg.NAK:
                    log.warning("replica refused a batch", extra=kv(stream=stream.name, **msg.header))
                    return
            try:
                batch = await asyncio.to_thread(follower.poll, verify_at)
            except ResnapshotNeeded as exc:
                log.warning(
                    "continuity lost; the replica will resnapshot", extra=kv(stream=stream.name, why=str(exc))
                )
                await sender.send(Msg.ERROR, {"error": str(exc), "resnapshot": True})
                return
            if (
                verify_at is not None
                and follower.position is not None
                and (
                    follower.position.generation != verify_at.generation
                    or follower.position.frame >= verify_at.frame
                )
            ):
                verify_at = None
            if batch is not None:
                await sender.send(Msg.BATCH, batch.header(), protocol.pages_body(sorted(batch.pages.items())))
                last_sent = time.monotonic()
                continue
            if time.monotonic() - last_sent >= self.heartbeat_s:
                assert follower.announced is not None
                await sender.send(
                    Msg.HEARTBEAT,
                    {
                        "position": follower.announced.to_json(),
                        "observed_at": follower.last_current_at,
                        "source_time": self._clock(),
                    },
                )
                last_sent = time.monotonic()
            await asyncio.sleep(self.poll_interval_s)


async def _pump(reader: asyncio.StreamReader, inbox: asyncio.Queue[protocol.Message]) -> None:
    """Read the replica's messages (verify requests, NAKs) until it hangs up."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ProtocolError, ssl.SSLError):
        while True:
            await inbox.put(await protocol.read_message(reader))


def _take(pages: Any, n: int) -> list[tuple[int, bytes]]:
    out = []
    for item in pages:
        out.append(item)
        if len(out) >= n:
            break
    return out
