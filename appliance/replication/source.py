"""The source agent (``hotsite source``): serves streams from the primary over mutual TLS.

One connection per stream and replica. The replica says where it is
(HELLO: position, checksum, page hashes); the agent answers "seed" (no
state: the whole database), "resume" (the WAL still holds everything after
that position: only the pages those frames changed) or "resnapshot" (the
position is gone, e.g. the WAL was restarted while nobody followed it:
only pages whose hash differs). Then it streams whole committed
transactions as they appear, with heartbeats while idle.

Memory is bounded whatever the size of the database: a seed, a resume, a
resnapshot or a transaction larger than one message is read from the
source's files while being sent, one chunk at a time (BATCH_BEGIN,
BATCH_PAGES..., BATCH_END), never built whole. A replica that announces
keepalives and falls silent for ``peer_timeout_s`` is presumed cut off (a
partition closes nothing): its session ends, letting go of its guard,
which would otherwise pin the application's WAL.

What a replica sends is bounded and checked before use: its HELLO within
``max_hello_bytes`` once inflated, anything after it within
``protocol.MAX_CONTROL``, every field by ``validate.py``; a replica that takes
nothing we send for ``peer_timeout_s`` has its session ended too
(``PeerStalled``), releasing its guard (REPLICATION.md, "What the replica
trusts").

The agent is read-only towards what it serves. The replica's position is
the only position; what the agent keeps, in memory, is a follower per
database stream that goes on following the WAL between sessions (a
"standing" follower: the same guard, windows and restarts, shipping to
nobody), so its per-page hashes stay those of the newest commit. A replica
that comes back after an outage then gets the pages whose hash differs from
the hashes it sent, and only those pages are read: the source database is
read whole once per agent start (the first session), never per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.logs import kv
from appliance.replication import protocol, validate
from appliance.replication.checksum import show
from appliance.replication.files.serve import serve_files
from appliance.replication.follower import ResnapshotNeeded, SourceError, SqliteFollower
from appliance.replication.position import Batch, Position
from appliance.replication.protocol import Msg, PeerStalled, ProtocolError, Sender
from appliance.replication.tasks import cancel_and_wait
from appliance.replication.tls import explain_handshake_error, peer_names

log = logging.getLogger(f"hotsite.{__name__}")

HANDSHAKE_TIMEOUT_S = 10.0
# How a session ends when the replica or the path goes away (a reset, a peer that stopped taking
# bytes): nothing is wrong with the follower.
LINK_ERRORS = (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError)


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
        checkpoint_frames: int = 2000,
        restart_frames: int = 1000,
        checkpoint_busy_ms: int = 50,
        clock: Callable[[], float] = time.time,
        corrupt: Callable[[bytes], bytes] | None = None,
        max_message: int = protocol.MAX_MESSAGE,
        peer_timeout_s: float = 15.0,
        max_hello_bytes: int = protocol.MAX_HELLO,
    ) -> None:
        self.streams = {s.name: s for s in streams}
        self._ssl = ssl_context
        self.host = host
        self.port = port
        self._allowed = set(allowed_clients or [])
        self.tls_identity = "the agent's certificate and CA as configured"  # set by the CLI (files)
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
        self.tls_failures = 0
        self.max_message = max_message  # the largest message either end accepts (tests lower it)
        self.peer_timeout_s = peer_timeout_s  # silence from a replica that sends keepalives: dead path
        self.chunked_batches = 0  # batches sent in chunks, all sessions (tests)
        # Seconds spent per stage of chunked sends, all sessions (the benchmark's breakdown): reading
        # and hashing pages, encoding (compressing), the link waiting for a chunk, the link's sends.
        self.chunk_timings: dict[str, float] = dict.fromkeys(("read", "encode", "wait_ready", "send"), 0.0)
        self.chunk_marks: dict[str, float] = {}  # perf_counter at the last large batch's poll / its end
        self.continuity_lost = 0  # sessions ended because the WAL lost continuity (a resnapshot follows)
        self.largest_body = 0  # the most page bytes one message carried, all sessions (tests)
        self.max_hello = max_hello_bytes  # the largest HELLO read from a replica, decompressed
        self.bad_messages = 0  # sessions ended by a message that failed its limits or schema
        self.stalled_sessions = 0  # sessions ended because the replica took nothing for peer_timeout_s
        # A follower per sqlite stream kept between sessions (see the module docstring).
        self.standing: dict[str, SqliteFollower] = {}
        self._standing_tasks: dict[str, asyncio.Task[None]] = {}

    def source_time(self) -> float:
        """This source's clock: what its messages carry as the time they observed (files streams too)."""
        return self._clock()

    def find(self, requested: str) -> ServedStream | None:
        if requested in self.streams:
            return self.streams[requested]
        return next((s for s in self.streams.values() if str(s.path) == requested), None)

    async def start(self) -> None:
        # TLS is started in _serve, not by the server: a refused handshake is then ours to log
        # (asyncio's own server drops it silently below debug level).
        self._server = await asyncio.start_server(self._accepted, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "source agent listening", extra=kv(host=self.host, port=self.port, streams=len(self.streams))
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        server, self._server = self._server, None  # no follower stands from now on
        for name in list(self.standing):
            follower = await self._take_standing(name)
            if follower is not None:
                await asyncio.to_thread(follower.close)
        self._server = server
        await cancel_and_wait(*self._tasks)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    def _accepted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Coroutine[Any, Any, None]:
        """Called as the connection is made: stop reading before the ClientHello arrives.

        Otherwise the reader may buffer the ClientHello before ``start_tls`` puts the
        TLS layer in place, and the handshake never completes (``start_tls`` resumes).
        """
        if self._ssl is not None and isinstance(writer.transport, asyncio.ReadTransport):
            writer.transport.pause_reading()
        return self._serve(reader, writer)

    async def _start_tls(self, writer: asyncio.StreamWriter, peer: Any) -> bool:
        """The TLS handshake with a replica; a refusal is logged at WARNING with what was wrong."""
        if self._ssl is None:
            return True
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):  # not wait_for: see _pump
                await writer.start_tls(self._ssl)
            return True
        except ssl.SSLError as exc:
            self.tls_failures += 1
            text = explain_handshake_error(
                exc, peer=f"replica {peer}", identity=self.tls_identity, expected_name=None
            )
            log.warning("TLS handshake with a replica failed", extra=kv(peer=peer, error=text))
            writer.transport.abort()
            return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        sender: Sender | None = None
        try:
            if not await self._start_tls(writer, peer):
                return
            names = peer_names(writer.get_extra_info("peercert"))
            if self._allowed and not names & self._allowed:
                why = (
                    f"client certificate names {sorted(names)} are not in this agent's allowed_clients"
                    f" {sorted(self._allowed)}"
                )
                log.warning("client certificate not allowed", extra=kv(peer=peer, error=why))
                writer.write(protocol.encode(Msg.ERROR, {"error": why}))  # the replica logs it at ERROR
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await writer.drain()
                return
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):  # not wait_for: see _pump
                hello = await protocol.read_message(reader, self.max_hello, protocol.MAX_HELLO_HEADER)
            if hello.kind != Msg.HELLO:
                raise ProtocolError("expected HELLO", "malformed")
            name, compression, rate = validate.hello_common(hello.header)
            stream = self.find(name)
            if compression not in protocol.compressions():
                compression = "zlib" if compression == "zstd" else "none"
            if self.bandwidth_limit:
                rate = min(rate, self.bandwidth_limit) if rate else self.bandwidth_limit
            sender = Sender(writer, compression, rate, self.corrupt, self.max_message, self.peer_timeout_s)
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
                await serve_files(self, stream, hello, reader, sender)
        except PeerStalled as exc:
            self.stalled_sessions += 1
            log.warning("replica not reading; its session ends", extra=kv(peer=peer, error=str(exc)))
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as exc:
            log.info("replica disconnected", extra=kv(peer=peer, reason=type(exc).__name__, error=str(exc)))
        except ProtocolError as exc:
            self.bad_messages += 1
            log.warning(
                "bad message from replica", extra=kv(peer=peer, reason=exc.reason, error=exc.message[:300])
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            self.bad_messages += 1
            log.warning(
                "bad message from replica", extra=kv(peer=peer, reason="malformed", error=repr(exc)[:300])
            )
        except asyncio.CancelledError:
            pass  # agent stopping: end this connection quietly
        except SourceError as exc:
            log.error("stream cannot be served", extra=kv(peer=peer, error=exc.message))
            with contextlib.suppress(Exception):
                writer.write(protocol.encode(Msg.ERROR, {"error": exc.message}))
                await writer.drain()
        finally:
            self._tasks.discard(task)
            if sender is not None:
                self.largest_body = max(self.largest_body, sender.largest_body)
            writer.close()
            try:
                async with asyncio.timeout(1):
                    await writer.wait_closed()
            except Exception:  # a black-holed path never acknowledges: drop it without a goodbye
                writer.transport.abort()

    async def _serve_sqlite(
        self, stream: ServedStream, hello: protocol.Message, reader: asyncio.StreamReader, sender: Sender
    ) -> None:
        follower = await self._take_standing(stream.name)
        if follower is None:
            follower = SqliteFollower(
                stream.path,
                clock=self._clock,
                checkpoint_frames=self.checkpoint_frames,
                restart_frames=self.restart_frames,
                checkpoint_busy_ms=self.checkpoint_busy_ms,
            )
            await asyncio.to_thread(follower.open)
        self.followers.add(follower)
        healthy = False
        inbox: asyncio.Queue[protocol.Message] = asyncio.Queue()
        # A replica that announces keepalives is presumed gone after peer_timeout_s of silence
        # (a partition that drops packets closes nothing): the session ends and lets go of its
        # guard, which would otherwise pin the application's WAL until TCP gave up.
        silent_after = self.peer_timeout_s if hello.header.get("keepalive_s") else None
        reader_task = asyncio.create_task(_pump(reader, inbox, silent_after, protocol.MAX_CONTROL))
        work = asyncio.create_task(
            self._serve_sqlite_work(follower, stream, hello, sender, inbox, reader_task)
        )
        try:
            await asyncio.wait({reader_task, work}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                # The replica hung up or went silent while we were sending (maybe blocked on a full
                # socket buffer): stop sending. The rest of what it sent is of no use now.
                work.cancel()
            # Said whether or not the work saw it first: the streaming loop also ends on the
            # reader's end, and may do so in the same turn of the loop.
            if _ended(reader_task) == "silent":
                log.warning(
                    "replica silent; ending its session",
                    extra=kv(stream=stream.name, seconds=silent_after),
                )
            await asyncio.wait({work})  # (awaiting it directly would take a stop of ours for its end)
            failure = None if work.cancelled() else work.exception()
            # The replica going away or the path failing says nothing against the follower: it stands,
            # so the next session catches up from its hashes (a resume, not a resnapshot).
            healthy = failure is None or isinstance(failure, LINK_ERRORS)
            if failure is not None:
                raise failure
        finally:
            try:
                await cancel_and_wait(work, reader_task)  # the agent's stop, if it lands now, is re-raised
            finally:
                self.followers.discard(follower)
                if not (healthy and self._stand(stream.name, follower)):
                    await asyncio.to_thread(follower.close)

    def _stand(self, name: str, follower: SqliteFollower) -> bool:
        """Keep ``follower`` following between sessions; False if it cannot be (then close it)."""
        if name in self.standing or not follower.has_state() or self._server is None:
            return False
        self.standing[name] = follower
        self._standing_tasks[name] = asyncio.create_task(self._follow_standing(name, follower))
        return True

    async def _follow_standing(self, name: str, follower: SqliteFollower) -> None:
        """Poll a follower no replica is attached to: its guard keeps the WAL moving (windows,
        restarts) and its hashes current. Continuity lost: it is dropped (the next session reads
        the database whole, as after a start)."""
        try:
            while True:
                await asyncio.to_thread(_drain, follower)
                await asyncio.sleep(self.poll_interval_s)
        except (ResnapshotNeeded, SourceError, OSError) as exc:
            log.warning("standing follower dropped", extra=kv(stream=name, error=str(exc)))
            if self.standing.get(name) is follower:
                del self.standing[name]
                self._standing_tasks.pop(name, None)
            await asyncio.to_thread(follower.close)

    async def _take_standing(self, name: str) -> SqliteFollower | None:
        follower = self.standing.pop(name, None)
        task = self._standing_tasks.pop(name, None)
        if task is not None:
            try:
                await cancel_and_wait(task)
            except asyncio.CancelledError:  # our caller is stopping: nobody takes the follower
                if follower is not None:
                    await asyncio.to_thread(follower.close)
                raise
        if follower is not None and follower.closed:
            return None  # it was being dropped (continuity lost) as it was taken
        return follower

    async def _serve_sqlite_work(
        self,
        follower: SqliteFollower,
        stream: ServedStream,
        hello: protocol.Message,
        sender: Sender,
        inbox: asyncio.Queue[protocol.Message],
        reader_task: asyncio.Task[str],
    ) -> None:
        await self._handshake(follower, stream, hello, sender)
        await self._stream(follower, stream, sender, inbox, reader_task)

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
            await _send_chunks(
                sender, Msg.SEED_PAGES, pages, protocol.chunk_pages(page_size, self.max_message)
            )
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
        elif await asyncio.to_thread(follower.followed, position):
            why = None  # a state the follower passed: its hashes account for everything since
        else:
            why = await asyncio.to_thread(follower.resumable, position)
        mode = "resume" if why is None else "resnapshot"
        await sender.send(
            Msg.WELCOME, {"mode": mode, "reason": why, "source_time": now, "compression": sender.compression}
        )
        replica_hashes = hello.body
        replica_pages = int(h.get("db_pages") or 0)
        if await asyncio.to_thread(follower.has_state):
            batch = await asyncio.to_thread(
                _differing, follower, position, mode, replica_hashes, replica_pages
            )
        else:
            batch = await asyncio.to_thread(
                self._catch_up, follower, position, mode, replica_hashes, replica_pages
            )
        await self._send_batch(sender, batch)
        log.info(
            f"replica {mode}",
            extra=kv(
                stream=stream.name,
                since=str(position),
                to=str(batch.position),
                pages=batch.pages_total,
                reason=why or "",
            ),
        )

    @staticmethod
    def _catch_up(
        follower: SqliteFollower,
        since: Position,
        mode: str,
        replica_hashes: bytes,
        replica_pages: int,
    ) -> Batch:
        """One lazy batch from the replica's state to the newest commit (both read under the same hold).

        Only page numbers are kept: the pages are read, hashed and filtered
        while being sent (the follower's hash of every page, which streaming
        needs next, is complete once they all went by), so the checksum
        travels in BATCH_END.
        """
        pos, page_size, db_pages, pages = follower.read_state()
        if mode == "resume":
            changed, smallest, frames = follower.changed_pages(since, pos.frame)
            min_pages = min(x for x in (smallest, replica_pages, db_pages) if x is not None)

            def keep(pgno: int, _data: bytes) -> bool:
                return pgno in changed

            kind, prev, count = "tx", since, sum(1 for p in changed if p <= db_pages)
        else:
            frames, min_pages, kind, prev = 0, db_pages, "resync", None

            def keep(pgno: int, _data: bytes) -> bool:
                theirs = replica_hashes[(pgno - 1) * 8 : pgno * 8]
                return theirs != follower.hashes.hashes[pgno].to_bytes(8, "big")

            count = db_pages  # at most; the exact number is known at the end

        def read() -> Iterator[tuple[int, bytes]]:
            for pgno, data in pages:
                if keep(pgno, data):
                    yield pgno, data
            batch.checksum = follower.hashes.checksum  # every page was hashed on the way

        batch = Batch(
            kind,
            prev,
            pos,
            page_size,
            db_pages,
            min_pages,
            0,  # known once every page was read: sent in BATCH_END
            follower.last_current_at,
            transactions=0,
            frames=frames,
            page_count=count,
        )
        batch.page_reader = read
        return batch

    async def _send_batch(self, sender: Sender, batch: Batch) -> None:
        """One BATCH message if it fits a chunk, else BATCH_BEGIN, BATCH_PAGES..., BATCH_END.

        The chunked form never holds more than one chunk of pages: they are
        read from the source's files (in a worker thread) as they are sent.
        """
        per_chunk = protocol.chunk_pages(batch.page_size, sender.max_message)
        if batch.page_reader is None and len(batch.pages) <= per_chunk:
            await sender.send(Msg.BATCH, batch.header(), protocol.pages_body(batch.iter_pages()))
            return
        header = batch.header()
        # page_count: at most this many pages follow (the replica builds a new file for a batch that
        # rewrites most of the database instead of journaling every page).
        count = batch.page_count or len(batch.pages)
        await sender.send(Msg.BATCH_BEGIN, {**header, "checksum": None, "page_count": count})
        sent = await _send_chunks(sender, Msg.BATCH_PAGES, batch.iter_pages(), per_chunk, self.chunk_timings)
        self.chunked_batches += 1
        # Sent last: a resume's or resnapshot's checksum is known once every page was read.
        await sender.send(
            Msg.BATCH_END, {"checksum": show(batch.checksum), "pages": sent, "observed_at": batch.observed_at}
        )

    async def _stream(
        self,
        follower: SqliteFollower,
        stream: ServedStream,
        sender: Sender,
        inbox: asyncio.Queue[protocol.Message],
        reader_task: asyncio.Task[str],
    ) -> None:
        last_sent = time.monotonic()
        verify_at: Position | None = None
        while not reader_task.done():
            while not inbox.empty():
                msg = inbox.get_nowait()
                if msg.kind == Msg.VERIFY:
                    pos, checksum = await asyncio.to_thread(follower.verify_point)
                    verify_at = pos
                    await sender.send(
                        Msg.VERIFY_RESULT,
                        {"position": pos.to_json(), "checksum": show(checksum), "computed_at": self._clock()},
                    )
                elif msg.kind == Msg.NAK:
                    log.warning("replica refused a batch", extra=kv(stream=stream.name, **msg.header))
                    return
            try:
                polled = time.perf_counter()
                batch = await asyncio.to_thread(follower.poll, verify_at)
                if batch is not None and batch.page_reader is not None:
                    self.chunk_marks = {"poll": polled, "polled": time.perf_counter()}
            except ResnapshotNeeded as exc:
                self.continuity_lost += 1
                follower.broken = True  # its hashes no longer describe a state: never kept standing
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
                await self._send_batch(sender, batch)
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


def _ended(reader_task: asyncio.Task[str]) -> str | None:
    """How the replica's reader ended ("closed", "silent"), or None while it runs or if it failed."""
    if not reader_task.done() or reader_task.cancelled() or reader_task.exception() is not None:
        return None
    return reader_task.result()


async def _pump(
    reader: asyncio.StreamReader,
    inbox: asyncio.Queue[protocol.Message],
    silent_after: float | None = None,
    max_message: int = protocol.MAX_MESSAGE,
) -> str:
    """Read the replica's messages (verify requests, NAKs, keepalives) until it hangs up.

    Returns "closed", or "silent" when nothing came for ``silent_after`` seconds.
    """
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ProtocolError, ssl.SSLError):
        while True:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that lands as
                # a message completes; the session, which cancels and awaits this reader, would then
                # last as long as the replica keeps sending keepalives (and so would the agent's stop).
                async with asyncio.timeout(silent_after):
                    msg = await protocol.read_message(reader, max_message)
            except TimeoutError:
                return "silent"
            if msg.kind != Msg.KEEPALIVE:
                await inbox.put(msg)
    return "closed"


def _differing(
    follower: SqliteFollower, since: Position, mode: str, replica_hashes: bytes, replica_pages: int
) -> Batch:
    """From the replica's state to the newest commit, for a follower that kept its hashes.

    The pages sent are those whose hash differs from the one the replica
    sent (pages past its end have none): read from the source's files one
    at a time while being sent, and no other page is read. A "resume" keeps
    its position check (kind "tx" from ``since``); a resnapshot applies on
    any state. Either way the batch's checksum is the source's, known
    before any page is read, and the replica refuses the batch unless its
    own result has exactly that checksum.
    """
    pos, page_size, db_pages = follower.catch_up()
    ours = follower.hashes.hashes
    pgnos = [
        pgno
        for pgno in range(1, db_pages + 1)
        if replica_hashes[(pgno - 1) * 8 : pgno * 8] != ours.get(pgno, 0).to_bytes(8, "big")
    ]
    if mode == "resume":
        kind, prev, min_pages = "tx", since, min(replica_pages, db_pages)
    else:
        kind, prev, min_pages = "resync", None, db_pages
    batch = Batch(
        kind,
        prev,
        pos,
        page_size,
        db_pages,
        min_pages,
        follower.hashes.checksum,
        follower.last_current_at,
        transactions=0,
        page_count=len(pgnos),
    )
    batch.page_reader = lambda: follower.pages_at(pos, pgnos)
    return batch


def _drain(follower: SqliteFollower) -> None:
    """Follow to the newest commit, shipping to nobody (the hashes move all the same)."""
    while follower.poll() is not None:
        pass


async def _send_chunks(
    sender: Sender,
    kind: int,
    pages: Iterator[tuple[int, bytes]],
    per_chunk: int,
    timings: dict[str, float] | None = None,
) -> int:
    """Send ``pages`` as messages of ``per_chunk`` pages; how many pages went.

    Each chunk is read and compressed in a worker thread while the previous
    one is being sent: reading and compressing (zlib took 1.2 s of a 62 MB
    VACUUM's 3.7 s catch-up, run in the event loop between sends) overlap
    the link instead of stopping it. One chunk in flight at most: memory
    stays bounded by two chunks.

    Compression adapts to the link (zstd's ``--adapt`` idea): a chunk the
    link took before the next one was ready means the link waits for the
    compressor, so the next chunk goes uncompressed; a next chunk ready
    first means the link is the bottleneck, and it is compressed. On a
    link faster than zlib (~50 MB/s here) big batches go mostly as they are;
    on a slow WAN every chunk is compressed, as before.
    """

    spent = timings if timings is not None else dict.fromkeys(("read", "encode", "wait_ready", "send"), 0.0)

    def prepare(compress: bool) -> tuple[bytes, int] | None:
        t0 = time.perf_counter()
        chunk = _take(pages, per_chunk)
        t1 = time.perf_counter()
        spent["read"] += t1 - t0
        if not chunk:
            return None
        data = sender.prepare(kind, {"n": len(chunk)}, protocol.pages_body(chunk), compress)
        spent["encode"] += time.perf_counter() - t1
        return data, len(chunk)

    sent, compress = 0, True
    ahead = asyncio.ensure_future(asyncio.to_thread(prepare, compress))
    try:
        while True:
            t0 = time.perf_counter()
            item = await ahead
            t1 = time.perf_counter()
            spent["wait_ready"] += t1 - t0
            if item is None:
                break
            ahead = asyncio.ensure_future(asyncio.to_thread(prepare, compress))
            await sender.send_prepared(item[0])
            spent["send"] += time.perf_counter() - t1
            sent += item[1]
            compress = ahead.done()  # (decides the chunk after the one being prepared)
            sender.chunks_uncompressed += not compress
    finally:
        await cancel_and_wait(ahead)  # (the one prepared ahead, if the send failed: its error consumed)
    return sent


def _take(pages: Any, n: int) -> list[tuple[int, bytes]]:
    out = []
    for item in pages:
        out.append(item)
        if len(out) >= n:
            break
    return out
