"""The appliance side of a SQLite stream: connect to the source agent, apply, reconnect.

Contract: ``run()`` loops until cancelled, reconnecting with backoff
(0.2 s doubling to 5 s; at once after a corrupt message, which is the
re-request). Everything received is verified before it is applied:
message CRC (protocol), continuity and whole-database checksum (replica).
A session that sees anything wrong ends, and the next one starts from
the replica's durable position. Blocking file work runs in threads; while
one batch is applied the next ones are received and merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from appliance.replication.replica import BatchRejected, PromotedError, Replica

log = logging.getLogger(__name__)

MAX_MERGE_BYTES = 32 * 1024 * 1024


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
    ) -> None:
        self.name = name
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
                self.stats.last_error = exc.message
                log.warning("replica promoted; not replicating", extra=kv(stream=self.name))
                self._paused.clear()
                continue
            except ProtocolError as exc:
                self.stats.corrupt_messages += exc.reason == "crc"
                self.stats.last_error = exc.message
                log.warning(
                    "corrupt message; re-requesting from our position",
                    extra=kv(stream=self.name, reason=exc.reason),
                )
                retry_now = True
            except BatchRejected as exc:
                self.stats.last_error = exc.message
                self.replica.needs_resync = (
                    True  # next session: compare page hashes, do not trust our position
                )
                if exc.reason == "checksum":
                    self.stats.checksum_mismatches += 1
                    self._on_event(
                        "replication.checksum_mismatch", {"stream": self.name, "error": exc.message}
                    )
                log.warning("batch refused", extra=kv(stream=self.name, reason=exc.reason, error=exc.message))
                retry_now = True
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.info("link to source down", extra=kv(stream=self.name, error=self.stats.last_error))
            finally:
                self.stats.connected = False
                self._writer = None
            fast_retries = fast_retries + 1 if retry_now else 0
            if not retry_now or fast_retries > 3:  # never a hot loop, even if every session fails at once
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def verify(self, timeout: float = 30.0) -> dict[str, Any]:
        """Ask the source for its checksum (from its files) at a position; compare when we reach it."""
        if self._writer is None:
            raise ConnectionError("not connected to the source agent")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._verify_waiters.append(fut)
        self._writer.write(protocol.encode(Msg.VERIFY, {}))
        await self._writer.drain()
        return await asyncio.wait_for(fut, timeout)

    def pause(self) -> None:
        self._paused.clear()
        if self._writer is not None:
            self._writer.close()

    def resume(self) -> None:
        self._paused.set()

    # -- session ------------------------------------------------------------

    async def _session(self) -> None:
        replica = self.replica
        if replica.promotion is not None:
            raise PromotedError(f"replica {replica.path} is promoted")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, ssl=self._ssl, server_hostname=self._server_name if self._ssl else None
            ),
            10,
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
            }
            body = replica.hashes.packed() if replica.position is not None else b""
            writer.write(protocol.encode(Msg.HELLO, hello, body, self.compression))
            await writer.drain()
            welcome = await asyncio.wait_for(protocol.read_message(reader), 30)
            t1 = self._clock()
            if welcome.kind == Msg.ERROR:
                raise OSError(f"source agent refused: {welcome.header.get('error')}")
            if welcome.kind != Msg.WELCOME:
                raise ProtocolError("expected WELCOME", "malformed")
            self.stats.clock_offset_s = float(welcome.header["source_time"]) - (t0 + t1) / 2
            mode = str(welcome.header["mode"])
            self.stats.mode = mode
            self.stats.connected = True
            self.stats.sessions += 1
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
            pump = asyncio.create_task(self._pump(reader, queue))
            try:
                await self._consume(queue)
            finally:
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _pump(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[protocol.Message | BaseException]
    ) -> None:
        try:
            while True:
                msg = await protocol.read_message(reader)
                self.stats.bytes_received += msg.wire_bytes
                await queue.put(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it in order
            await queue.put(exc)

    async def _consume(self, queue: asyncio.Queue[protocol.Message | BaseException]) -> None:
        replica = self.replica
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            msg = item
            h = msg.header
            if msg.kind == Msg.BATCH:
                batches = [self._batch(msg)]
                size = len(msg.body)
                # Merge what already arrived: one journal write and fsync for many transactions.
                while not queue.empty() and size < MAX_MERGE_BYTES and batches[-1].kind == "tx":
                    nxt = queue.get_nowait()
                    if (
                        isinstance(nxt, protocol.Message)
                        and nxt.kind == Msg.BATCH
                        and nxt.header.get("kind") == "tx"
                    ):
                        batches.append(self._batch(nxt))
                        size += len(nxt.body)
                        continue
                    await self._put_back(queue, nxt)
                    break
                batch = merge(batches) if len(batches) > 1 and batches[0].kind == "tx" else batches[0]
                await asyncio.to_thread(replica.apply, batch)
                self._applied(batch)
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
                self._on_event(
                    "replication.seeded", {"stream": self.name, "pages": self.stats.seed_progress[1]}
                )
                self._check_verify()
            elif msg.kind == Msg.VERIFY_RESULT:
                self._pending_verify = h
                self._check_verify()
            elif msg.kind == Msg.ERROR:
                raise OSError(f"source agent: {h.get('error')}")

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
        s.batches += 1
        s.transactions += batch.transactions
        s.frames += batch.frames
        s.pages += len(batch.pages)
        s.page_size = batch.page_size
        s.pending_frames = batch.pending_frames
        if batch.pending_frames == 0:
            s.current_at = batch.observed_at
        if self._on_applied is not None:
            self._on_applied(batch)
        self._check_verify()

    def _check_verify(self) -> None:
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
            replica_full = self.replica.full_checksum()
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
