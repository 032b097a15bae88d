"""The replica's connection: connect, receive change sets, apply them, reconnect like the SQLite client."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from appliance.logs import kv
from appliance.replication import protocol, validate
from appliance.replication.files.replica import FilesReplica, StagedFile
from appliance.replication.protocol import Msg, ProtocolError
from appliance.timeouts import cancelled_meanwhile

log = logging.getLogger("hotsite.appliance.replication.files")


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
                cancelled_meanwhile()
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
        # asyncio.timeout throughout, never wait_for: the rule and its reason are appliance/timeouts.py.
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
            self.stats.last_heard = time.monotonic()
            self.stats.sessions += 1
            while True:
                async with asyncio.timeout(self.idle_timeout_s):
                    msg = await protocol.read_message(reader, self.max_message)
                self.stats.heard(msg.wire_bytes)
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
