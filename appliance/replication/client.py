"""The appliance side of a SQLite stream: connect to the source agent, apply, reconnect.

Contract: ``run()`` loops until cancelled, reconnecting with backoff
(0.2 s doubling to 5 s; at once after a corrupt message, which is the
re-request). Everything received is verified before it is applied:
message CRC (protocol), continuity and whole-database checksum (replica).
A session that sees anything wrong ends, and the next one starts from
the replica's durable position. Blocking file work runs in threads; while
one batch is applied the next ones are received and merged, up to
``max_buffered_bytes`` held at once (then reading waits). A batch sent in
chunks is staged on disk by the replica and committed whole at its end; a
session that ends half-way leaves the replica untouched. Silence from the
source for ``idle_timeout_s`` (it sends heartbeats when idle) ends the
session: a partition drops packets and closes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.logs import kv
from appliance.replication import protocol
from appliance.replication.checksum import show
from appliance.replication.position import Batch, Position, merge
from appliance.replication.protocol import Msg, ProtocolError
from appliance.replication.replica import BatchRejected, PromotedError, Replica, ReplicaStorageError
from appliance.replication.tasks import cancel_and_wait
from appliance.replication.tls import explain_handshake_error

log = logging.getLogger(f"hotsite.{__name__}")


class SourceSilent(TimeoutError):
    """Nothing arrived from the source agent for the idle timeout: the path is presumed dead."""


class SourceRefused(OSError):
    """The source agent answered with an error (a database not in WAL mode, an unknown stream):
    not a link failure, and it will not go away by reconnecting, so it is logged at ERROR."""


class ClosedAfterHandshake(ConnectionError):
    """The source agent hung up after the TLS handshake, before answering HELLO.

    With TLS 1.3 the client's handshake completes before the server checks
    the client certificate, so this is how a refused certificate looks here.
    """

    reason = "CLOSED_AFTER_HANDSHAKE"


MAX_MERGE_BYTES = 32 * 1024 * 1024
DISK_ROOM_BYTES = 4 * 1024 * 1024  # free space on the replica's disk that clears a "disk full"
MAX_BUFFERED_BYTES = MAX_MERGE_BYTES


@dataclass(slots=True)
class StreamStats:
    """What status and metrics show about one stream (updated by the client)."""

    connected: bool = False
    mode: str = ""
    bytes_received: int = 0
    frames: int = 0
    transactions: int = 0
    batches: int = 0
    pages: int = 0
    checksum_mismatches: int = 0
    corrupt_messages: int = 0
    resnapshots: int = 0
    seeds: int = 0
    sessions: int = 0
    clock_offset_s: float = 0.0
    current_at: float | None = None  # source time at which the replica was known to be the newest state
    pending_frames: int = 0
    page_size: int = 0
    last_error: str = ""
    last_verify: dict[str, Any] = field(default_factory=dict)
    seed_progress: tuple[int, int] = (0, 0)
    chunked_batches: int = 0  # batches received in chunks (staged on disk, committed whole)
    buffered_peak_bytes: int = 0  # the most message bytes ever held between receiving and applying
    idle_timeouts: int = 0  # sessions ended because the source went silent (a partition)
    malformed_messages: int = 0  # messages refused by their schema or limits (the session restarts)
    session_failures: int = 0  # sessions ended by an unexpected error (a bug): logged, then retried
    refused_files: int = 0  # files a change set named that the filesystem refused (the rest applied)
    last_error_at: float | None = None  # wall-clock time of last_error
    storage_error: str = ""  # the replica's own disk refusing writes (full, I/O error); "" when fine
    disk_full: bool = False
    storage_errors: int = 0
    # When the source was last heard (time.monotonic()): a partition closes nothing, so a session
    # stays "connected" until idle_timeout_s of silence; status shows the silence before that.
    last_heard: float | None = None

    def heard(self, wire_bytes: int) -> None:
        """A message arrived from the source agent."""
        self.bytes_received += wire_bytes
        self.last_heard = time.monotonic()

    def silent_s(self, now: float) -> float | None:
        """Seconds since the source was last heard in a connected session (None when not connected)."""
        if not self.connected or self.last_heard is None:
            return None
        return max(0.0, now - self.last_heard)

    def note_error(self, message: str) -> None:
        """The error status shows, with when it happened (so a stale one can be told apart)."""
        self.last_error = message
        self.last_error_at = time.time()

    def lag_s(self, local_now: float) -> float | None:
        if self.current_at is None:
            return None
        return max(0.0, local_now + self.clock_offset_s - self.current_at)

    def lag_bytes(self) -> int:
        return self.pending_frames * (24 + self.page_size) if self.page_size else 0


class SqliteStreamClient:
    def __init__(
        self,
        name: str,
        source: str,
        replica: Replica,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        server_name: str | None = None,
        compression: str = "zlib",
        rate_bytes_s: int = 0,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None,
        on_applied: Callable[[Batch], None] | None = None,
        max_message: int = protocol.MAX_MESSAGE,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
        keepalive_s: float = 1.0,
        idle_timeout_s: float = 15.0,
        tls_identity: str = "",
    ) -> None:
        self.name = name
        self._tls_identity = tls_identity or "this end's certificate and CA as configured"
        self.source = source
        self.replica = replica
        self.host, self.port = host, port
        self._ssl = ssl_context
        self._server_name = server_name or host
        self.compression = compression
        self.rate = rate_bytes_s
        self._clock = clock
        self._on_event = on_event
        self._on_applied = on_applied
        self.stats = StreamStats()
        self._writer: asyncio.StreamWriter | None = None
        self._verify_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._pending_verify: dict[str, Any] | None = None
        self._paused = asyncio.Event()
        self._paused.set()
        self.max_message = max_message
        # Received but not yet applied, in bytes: the reader waits above the bound, so memory
        # stays bounded whatever the source sends (a seed, a resnapshot, a huge transaction).
        self.max_buffered_bytes = max_buffered_bytes
        self._buffered = 0
        self._drained = asyncio.Event()
        # Liveness both ways: we send a keepalive every keepalive_s (the agent ends a session
        # it has not heard from, releasing its hold on the WAL); the agent sends heartbeats
        # when idle, so idle_timeout_s of silence means the path is dead (a partition drops
        # packets and closes nothing): end the session and reconnect.
        self.keepalive_s = keepalive_s
        self.idle_timeout_s = idle_timeout_s
        self.verify_progress: dict[str, Any] = {}  # what a running verify is doing (for the CLI)

    # -- public -----------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.2
        fast_retries = 0
        while True:
            await self._paused.wait()
            retry_now = False
            try:
                await self._session()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except PromotedError as exc:
                self.stats.note_error(exc.message)
                log.warning("replica promoted; not replicating", extra=kv(stream=self.name, why=exc.message))
                self._paused.clear()
                continue
            except ReplicaStorageError as exc:
                self._storage_failed(exc)
            except ProtocolError as exc:
                self.stats.corrupt_messages += exc.reason == "crc"
                self.stats.malformed_messages += exc.reason != "crc"
                self.stats.note_error(exc.message)
                log.warning(
                    "corrupt message; re-requesting from our position",
                    extra=kv(stream=self.name, reason=exc.reason, error=exc.message[:300]),
                )
                retry_now = True
            except BatchRejected as exc:
                self.stats.note_error(exc.message)
                # Next session: compare page hashes, do not trust our position; but a batch over the
                # journal bound was refused with the replica's state and position intact.
                self.replica.needs_resync = self.replica.needs_resync or exc.reason != "journal_limit"
                if exc.reason == "checksum":
                    self.stats.checksum_mismatches += 1
                    self._on_event(
                        "replication.checksum_mismatch", {"stream": self.name, "error": exc.message}
                    )
                log.warning("batch refused", extra=kv(stream=self.name, reason=exc.reason, error=exc.message))
                retry_now = exc.reason != "journal_limit"  # (it would be refused again at once)
            except SourceRefused as exc:
                self.stats.note_error(str(exc))
                log.error("source agent refused the stream", extra=kv(stream=self.name, error=str(exc)))
            except (ssl.SSLError, ClosedAfterHandshake) as exc:
                self._tls_failed(exc)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.stats.idle_timeouts += isinstance(exc, SourceSilent)
                self.stats.note_error(f"{type(exc).__name__}: {exc}")
                log.info("link to source down", extra=kv(stream=self.name, error=self.stats.last_error))
            except Exception as exc:  # a bug must not end replication silently: counted, logged, retried
                self.stats.session_failures += 1
                self.stats.note_error(f"{type(exc).__name__}: {exc}")
                log.exception("replication session failed; starting a new one", extra=kv(stream=self.name))
            finally:
                self.stats.connected = False
                self._writer = None
                await asyncio.to_thread(self.replica.stage_abort)  # a half-received batch is dropped
            fast_retries = fast_retries + 1 if retry_now else 0
            if not retry_now or fast_retries > 3:  # never a hot loop, even if every session fails at once
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _tls_failed(self, exc: OSError) -> None:
        """A handshake refused either way: which certificate, which CA, which name (ERROR once)."""
        text = explain_handshake_error(
            exc,
            peer=f"the source agent at {self.host}:{self.port}",
            identity=self._tls_identity,
            expected_name=self._server_name,
        )
        level = logging.ERROR if text != self.stats.last_error else logging.INFO
        self.stats.note_error(text)
        log.log(level, "TLS handshake with the source agent failed", extra=kv(stream=self.name, error=text))

    def _storage_failed(self, exc: ReplicaStorageError) -> None:
        """The replica's disk refused: say so loudly, keep the stream alive, retry with backoff."""
        first = not self.stats.storage_error
        self.stats.storage_error = exc.message
        self.stats.disk_full = exc.disk_full
        self.stats.storage_errors += 1
        self.stats.note_error(exc.message)
        log.error(
            "replica storage failing; will retry",
            extra=kv(stream=self.name, disk_full=exc.disk_full, error=exc.message),
        )
        if first:
            try:
                self._on_event("replication.storage_error", {"stream": self.name, "error": exc.message})
            except Exception:  # the event store may be on the full disk too: the stream goes on
                log.exception("storage error could not be recorded", extra=kv(stream=self.name))

    def _storage_recovered(self) -> None:
        """A write succeeded: clear the storage error, but a full disk only once it has room again.

        Pages rewritten in place need no new blocks, so one batch can succeed on a
        full disk and the next fail: the alarm must not flap with them.
        """
        if not self.stats.storage_error:
            return
        if self.stats.disk_full:
            try:
                if shutil.disk_usage(self.replica.path.parent).free < DISK_ROOM_BYTES:
                    return
            except OSError:
                return
        self.stats.storage_error, self.stats.disk_full = "", False
        log.warning("replica storage writable again", extra=kv(stream=self.name))

    async def verify(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask the source for its checksum (from its files) at a position; compare when we reach it.

        No fixed limit by default: hashing a large database takes as long as
        reading it; :attr:`verify_progress` says how far it is for a caller
        that reports progress and bounds the wait itself.
        """
        if self._writer is None:
            raise ConnectionError("not connected to the source agent")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._verify_waiters.append(fut)
        self.verify_progress = {"phase": "asking the source for its checksum", "started_at": self._clock()}
        self._writer.write(protocol.encode(Msg.VERIFY, {}))
        await self._writer.drain()
        async with asyncio.timeout(timeout):
            return await fut

    def pause(self) -> None:
        self._paused.clear()
        if self._writer is not None:
            self._writer.close()

    def resume(self) -> None:
        self._paused.set()

    # -- session ------------------------------------------------------------

    async def _session(self) -> None:
        replica = self.replica
        await asyncio.to_thread(replica.ensure_recovered)  # after a failed write: redo, verify again
        if replica.promotion is not None:
            raise PromotedError(f"replica {replica.path} is promoted")
        # asyncio.timeout throughout, not wait_for (see _pump): a stop must never be swallowed.
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._ssl, server_hostname=self._server_name if self._ssl else None
            )
        self._writer = writer
        try:
            t0 = self._clock()
            hello: dict[str, Any] = {
                "stream": self.source,
                "position": None if replica.position is None else replica.position.to_json(),
                "checksum": show(replica.checksum),
                "db_pages": replica.hashes.db_pages,
                "compression": self.compression,
                "rate_bytes_s": self.rate,
                "resync": replica.needs_resync,
                "keepalive_s": self.keepalive_s,
            }
            body = replica.hashes.packed() if replica.position is not None else b""
            writer.write(protocol.encode(Msg.HELLO, hello, body, self.compression))
            await writer.drain()
            try:
                async with asyncio.timeout(30):
                    welcome = await protocol.read_message(reader, self.max_message)
            except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
                if self._ssl is None:
                    raise
                raise ClosedAfterHandshake(str(exc)) from exc
            t1 = self._clock()
            if welcome.kind == Msg.ERROR:
                raise SourceRefused(f"source agent refused: {welcome.header.get('error')}")
            if welcome.kind != Msg.WELCOME:
                raise ProtocolError("expected WELCOME", "malformed")
            self.stats.clock_offset_s = float(welcome.header["source_time"]) - (t0 + t1) / 2
            mode = str(welcome.header["mode"])
            self.stats.mode = mode
            self.stats.connected = True
            self.stats.last_heard = time.monotonic()
            self.stats.sessions += 1
            self.stats.last_error = ""  # only the current error is shown
            self.stats.last_error_at = None
            replica.needs_resync = False
            if mode == "resnapshot":
                self.stats.resnapshots += 1
                self._on_event(
                    "replication.resnapshot", {"stream": self.name, "reason": welcome.header.get("reason")}
                )
            log.info(
                "connected to source",
                extra=kv(stream=self.name, mode=mode, reason=welcome.header.get("reason") or ""),
            )
            queue: asyncio.Queue[protocol.Message | BaseException] = asyncio.Queue(maxsize=256)
            self._buffered = 0
            pump = asyncio.create_task(self._pump(reader, queue))
            keepalive = asyncio.create_task(self._keepalive(writer))
            try:
                await self._consume(queue)
            finally:
                await cancel_and_wait(pump, keepalive)  # a stop of run() aimed at us is re-raised
        finally:
            writer.close()
            try:
                async with asyncio.timeout(1):  # (a stop landing here must end run(), not the session)
                    await writer.wait_closed()
            except Exception:  # a black-holed path never acknowledges: drop it without a goodbye
                writer.transport.abort()

    async def _keepalive(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await asyncio.sleep(self.keepalive_s)
                writer.write(protocol.encode(Msg.KEEPALIVE, {}))

    async def _pump(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[protocol.Message | BaseException]
    ) -> None:
        try:
            while True:
                while self._buffered > 0 and self._buffered >= self.max_buffered_bytes:
                    self._drained.clear()
                    await self._drained.wait()
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that lands
                    # as a message completes, and this pump then never ends: the session awaits it
                    # (after a refused batch, or when the stream stops), never retries or stops.
                    async with asyncio.timeout(self.idle_timeout_s):
                        msg = await protocol.read_message(reader, self.max_message)
                except TimeoutError:
                    raise SourceSilent(
                        f"nothing from the source agent for {self.idle_timeout_s:g} s: the path is presumed"
                        " dead (partition?); reconnecting"
                    ) from None
                self.stats.heard(msg.wire_bytes)
                self._buffered += _held(msg)
                self.stats.buffered_peak_bytes = max(self.stats.buffered_peak_bytes, self._buffered)
                await queue.put(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it in order
            await queue.put(exc)

    def _release(self, *msgs: protocol.Message) -> None:
        self._buffered -= sum(_held(m) for m in msgs)
        self._drained.set()

    async def _consume(self, queue: asyncio.Queue[protocol.Message | BaseException]) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            taken = [item]
            try:
                await self._handle(item, queue, taken)
            except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
                # A header field missing or of the wrong type (a mode of 2**40, a string for a
                # number): the message is malformed, the session ends and the next one resumes.
                raise ProtocolError(
                    f"message kind {item.kind} has a missing or invalid header field: {exc!r}", "malformed"
                ) from None
            finally:
                self._release(*taken)

    async def _handle(
        self,
        msg: protocol.Message,
        queue: asyncio.Queue[protocol.Message | BaseException],
        taken: list[protocol.Message],
    ) -> None:
        """Act on one message (``taken``: the messages consumed, for the buffer accounting)."""
        replica = self.replica
        h = msg.header
        if msg.kind == Msg.BATCH:
            batches = [self._batch(msg)]
            size = len(msg.body)
            # Merge what already arrived: one journal write and fsync for many transactions.
            while (
                not queue.empty()
                and size < MAX_MERGE_BYTES
                and batches[-1].kind == "tx"
                and not self._verify_target(batches[-1].position)
            ):
                nxt = queue.get_nowait()
                if (
                    isinstance(nxt, protocol.Message)
                    and nxt.kind == Msg.BATCH
                    and nxt.header.get("kind") == "tx"
                ):
                    taken.append(nxt)
                    batches.append(self._batch(nxt))
                    size += len(nxt.body)
                    continue
                await self._put_back(queue, nxt)
                break
            batch = merge(batches) if len(batches) > 1 and batches[0].kind == "tx" else batches[0]
            await asyncio.to_thread(replica.apply, batch)
            self._applied(batch)
            await self._check_verify()
        elif msg.kind == Msg.BATCH_BEGIN:
            await asyncio.to_thread(replica.stage_begin, h)
            self.stats.chunked_batches += 1
        elif msg.kind == Msg.BATCH_PAGES:
            # Parsed in the worker thread too: in the event loop it held up the reads (and TLS) of
            # the next chunks for as long as it took to split and sort a MiB of pages.
            await asyncio.to_thread(_stage_chunk, replica, msg.body)
        elif msg.kind == Msg.BATCH_END:
            batch = await asyncio.to_thread(
                replica.stage_commit, int(h["checksum"], 16), float(h["observed_at"])
            )
            self._applied(batch)
            await self._check_verify()
        elif msg.kind == Msg.HEARTBEAT:
            if replica.position is not None and Position.from_json(h["position"]) == replica.position:
                self.stats.current_at = float(h["observed_at"])
                self.stats.pending_frames = 0
        elif msg.kind == Msg.SEED_BEGIN:
            self.stats.seeds += 1
            self.stats.seed_progress = (0, int(h["db_pages"]))
            await asyncio.to_thread(replica.seed_begin, int(h["page_size"]), int(h["db_pages"]))
            self.stats.page_size = int(h["page_size"])
        elif msg.kind == Msg.SEED_PAGES:
            pages = protocol.parse_pages(msg.body, self.stats.page_size)
            await asyncio.to_thread(replica.seed_pages, sorted(pages.items()))
            done, total = self.stats.seed_progress
            self.stats.seed_progress = (done + len(pages), total)
        elif msg.kind == Msg.SEED_END:
            await asyncio.to_thread(
                replica.seed_end,
                Position.from_json(h["position"]),
                int(h["checksum"], 16),
                float(h["observed_at"]),
            )
            self.stats.current_at = float(h["observed_at"])
            self._storage_recovered()
            self._on_event("replication.seeded", {"stream": self.name, "pages": self.stats.seed_progress[1]})
            await self._check_verify()
        elif msg.kind == Msg.VERIFY_RESULT:
            self._pending_verify = h
            target = Position.from_json(h["position"])
            self.verify_progress.update(phase=f"waiting for the replica to reach {target}")
            await self._check_verify()
        elif msg.kind == Msg.ERROR:
            raise SourceRefused(f"source agent: {h.get('error')}")

    @staticmethod
    async def _put_back(queue: asyncio.Queue[protocol.Message | BaseException], item: Any) -> None:
        # Re-insert at the front: drain, then put back in order.
        rest = [item]
        while not queue.empty():
            rest.append(queue.get_nowait())
        for x in rest:
            queue.put_nowait(x)

    def _batch(self, msg: protocol.Message) -> Batch:
        page_size = int(msg.header["page_size"])
        return Batch.from_header(msg.header, protocol.parse_pages(msg.body, page_size) if msg.body else {})

    def _applied(self, batch: Batch) -> None:
        s = self.stats
        self._storage_recovered()
        s.batches += 1
        s.transactions += batch.transactions
        s.frames += batch.frames
        s.pages += batch.pages_total
        s.page_size = batch.page_size
        s.pending_frames = batch.pending_frames
        if batch.pending_frames == 0:
            s.current_at = batch.observed_at
        if self._on_applied is not None:
            self._on_applied(batch)

    def _verify_target(self, position: Position) -> bool:
        """True at the position a pending verify compares at: never merge past it (a merge that
        crossed it into the next WAL generation would never stop there, and the verify would hang)."""
        h = self._pending_verify
        return h is not None and Position.from_json(h["position"]) == position

    def _hashed(self, done: int, total: int) -> None:
        self.verify_progress["hashed_pages"] = [done, total]

    async def _check_verify(self) -> None:
        h = self._pending_verify
        if h is None or self.replica.position is None:
            return
        target = Position.from_json(h["position"])
        if (
            target.generation == self.replica.position.generation
            and self.replica.position.frame > target.frame
        ):
            result = {"ok": False, "error": "replica moved past the verify position; try again"}
        elif self.replica.position != target:
            return
        else:
            self.verify_progress.update(phase=f"hashing the replica file at {target}", hashed_pages=[0, 0])
            # In a thread: apply waits (this consumer awaits it), the event loop keeps answering.
            replica_full = await asyncio.to_thread(self.replica.full_checksum, self._hashed)
            source = int(h["checksum"], 16)
            result = {
                "ok": source == replica_full == self.replica.checksum,
                "position": str(target),
                "source_checksum": show(source),
                "replica_checksum": show(replica_full),
                "replica_rolling_checksum": show(self.replica.checksum),
                "at": self._clock(),
            }
            if not result["ok"]:
                self.stats.checksum_mismatches += 1
        self._pending_verify = None
        self.stats.last_verify = result
        for fut in self._verify_waiters:
            if not fut.done():
                fut.set_result(result)
        self._verify_waiters.clear()


def _held(msg: protocol.Message) -> int:
    """Bytes a received message holds until it is applied."""
    return len(msg.body) + 256


def _stage_chunk(replica: Replica, body: bytes) -> int:
    """Parse one BATCH_PAGES body and stage its pages (blocking: run in a worker thread)."""
    return replica.stage_pages(sorted(protocol.parse_pages(body, replica.staged_page_size).items()))
