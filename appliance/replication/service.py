"""``ReplicationService``: the replication streams wired for the appliance daemon.

``Appliance`` calls ``start()``/``stop()``, registers ``handlers()`` on the
control API and ``ReplicationMetrics(registry)`` once; the failover engine
calls :meth:`promote` / :meth:`failback_check` / :meth:`readiness`.

No silent stops: every stream runs under a supervisor that restarts it with
backoff (1 s doubling to 30 s) after any failure, logged at ERROR with its
cause, counted (``hotsite_replication_task_failures_total``) and shown in
status. A replica that cannot be opened at start (its disk full, damaged
files) leaves the daemon running with that stream in error, retried the same
way. Events that cannot be recorded (the state store's disk full) are logged
and counted, never raised into a stream. Damage at rest, a failing disk and
a failing task are ``readiness`` problems, which the daemon raises as
incidents; status and ``top`` show them as the stream's current error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.api import Caller, Handler, RequestError
from appliance.clock import Clock, SystemClock
from appliance.fields import host_port
from appliance.logs import kv
from appliance.replication.budget import MIB, JournalBudget
from appliance.replication.client import SqliteStreamClient, StreamStats
from appliance.replication.files import FilesReplica, FilesStreamClient
from appliance.replication.metrics import ReplicationMetrics
from appliance.replication.promotion import data_loss_window, over_budget
from appliance.replication.replica import PromotedError, Replica, ReplicaError, ReplicaStorageError
from appliance.replication.replica_settings import ReplicationSection, StreamSection
from appliance.replication.snapshots import SnapshotStore
from appliance.replication.tls import client_context, describe_identity
from appliance.store import Store

log = logging.getLogger(f"hotsite.{__name__}")

_REPLICA_STATUS = ("position", "checksum", "promoted", "damaged", "recorded_checksum", "verified_at")


class _Stream:
    def __init__(self, name: str, section: StreamSection) -> None:
        self.name = name
        self.section = section
        self.replica: Replica | None = None
        self.files: FilesReplica | None = None
        self.client: SqliteStreamClient | FilesStreamClient | None = None
        self.task: asyncio.Task[None] | None = None
        self.snapshots: SnapshotStore | None = None
        self.last_snapshot = 0.0
        self.reported = StreamStats()  # what metrics already counted
        self.opened = False
        self.task_failures = 0
        self.reported_failures = 0
        self.task_error = ""  # why the task last failed (cleared once it runs a session again)
        self.sessions_at_failure = 0
        self.snapshot_error = ""
        self.position_error = ""  # why the position could not be recorded in the state store
        self.verify_task: asyncio.Task[dict[str, Any]] | None = None

    @property
    def stats(self) -> StreamStats:
        return self.client.stats if self.client is not None else StreamStats()


class ReplicationService:
    def __init__(
        self,
        config: ReplicationSection,
        *,
        store: Store | None = None,
        metrics: ReplicationMetrics | None = None,
        clock: Clock | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self._on_event = on_event
        self.streams: dict[str, _Stream] = {n: _Stream(n, s) for n, s in config.streams.items()}
        self._ticker: asyncio.Task[None] | None = None
        self.unrecorded_events = 0

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if not self.streams:
            return
        assert (
            cfg.source_agent and cfg.tls_cert_file and cfg.tls_key_file and cfg.tls_ca_file
        )  # config validated
        host, port = host_port(cfg.source_agent)
        ctx = client_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_ca_file)
        common: dict[str, Any] = {
            "host": host,
            "port": port,
            "ssl_context": ctx,
            "server_name": cfg.server_name or host,
            "compression": cfg.compression,
            "rate_bytes_s": cfg.bandwidth_limit_bytes_s,
        }
        for s in self.streams.values():
            sec = s.section
            if sec.kind == "sqlite":
                s.replica = Replica(sec.replica, clock=self.clock.time)
                s.replica.budget = JournalBudget(sec.journal_limit_mb * MIB)
                await self._open(s)
                s.snapshots = SnapshotStore(s.replica.dir / "snapshots", keep=cfg.keep_versions)
                s.client = SqliteStreamClient(
                    s.name,
                    sec.source,
                    s.replica,
                    clock=self.clock.time,
                    on_event=self._event,
                    tls_identity=describe_identity(cfg.tls_cert_file, cfg.tls_ca_file),
                    **common,
                )
            else:
                s.files = FilesReplica(
                    sec.replica,
                    keep=cfg.keep_versions,
                    post_change_command=sec.post_change_command,
                    clock=self.clock.time,
                    file_mode_mask=sec.file_mode_mask,
                )
                s.client = FilesStreamClient(s.name, sec.source, s.files, **common)
            s.task = asyncio.create_task(self._supervise(s), name=f"replication:{s.name}")
        self._ticker = asyncio.create_task(self._tick_forever(), name="replication:tick")
        log.info("replication started", extra=kv(streams=len(self.streams), source=cfg.source_agent))

    async def _open(self, s: _Stream) -> None:
        """Open (lock, recover, verify at rest) a replica; a failure is the stream's, not the daemon's."""
        assert s.replica is not None
        try:
            await asyncio.to_thread(s.replica.open)
            s.opened, s.task_error = True, ""
            if s.replica.damage:
                log.error("replica damaged at rest", extra=kv(stream=s.name, damage=s.replica.damage))
                self._event("replication.damaged", {"stream": s.name, "damage": s.replica.damage})
        except (ReplicaError, ReplicaStorageError) as exc:
            s.task_error = exc.message
            log.error("replica cannot be opened; retrying", extra=kv(stream=s.name, error=exc.message))

    async def _supervise(self, s: _Stream) -> None:
        """Run one stream for ever: whatever kills its client is logged, counted, shown and retried."""
        assert s.client is not None
        backoff = 1.0
        while True:
            try:
                if s.replica is not None and not s.opened:
                    await self._open(s)
                    if not s.opened:
                        raise ReplicaError(s.task_error)
                await s.client.run()
                return  # run() returns only when told to stop
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                s.task_failures += 1
                s.task_error = f"{type(exc).__name__}: {exc}"
                s.sessions_at_failure = s.stats.sessions
                log.error(
                    "replication stream failed; restarting",
                    exc_info=not isinstance(exc, ReplicaError),
                    extra=kv(stream=s.name, error=s.task_error, restart_in_s=backoff),
                )
                self._event("replication.task_failed", {"stream": s.name, "error": s.task_error})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def stop(self) -> None:
        tasks = [t for t in [self._ticker, *(s.task for s in self.streams.values())] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for s in self.streams.values():
            if s.replica is not None:
                with contextlib.suppress(Exception):  # a full disk must not stop the shutdown
                    self._record_position(s)
                s.replica.close()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.tick()
            except Exception:
                log.exception("replication housekeeping failed")

    async def tick(self) -> None:
        """Once a second: metrics, the durable position record, snapshots for point-in-time restore."""
        now = self.clock.time()
        for s in self.streams.values():
            self._update_metrics(s, now)
            if s.replica is not None and s.replica.position is not None:
                try:
                    self._record_position(s)
                    s.position_error = ""
                except Exception as exc:  # the state store's disk: shown, never fatal to a stream
                    level = logging.ERROR if str(exc) != s.position_error else logging.DEBUG  # once a second
                    s.position_error = str(exc)
                    log.log(level, "replica position not recorded", extra=kv(stream=s.name, error=str(exc)))
                interval = s.section.snapshot_interval_s
                if s.snapshots is not None and interval and now - s.last_snapshot >= interval:
                    await self._snapshot(s, now)

    async def _snapshot(self, s: _Stream, now: float) -> None:
        """A restore point of a verified state only; a failure leaves nothing behind and is shown."""
        assert s.snapshots is not None and s.replica is not None
        if not s.replica.verified:
            return
        try:
            snap = await asyncio.to_thread(s.snapshots.take, s.replica, now)
        except (OSError, ReplicaError) as exc:
            level = logging.ERROR if str(exc) != s.snapshot_error else logging.DEBUG  # not every interval
            s.snapshot_error = str(exc)
            log.log(level, "snapshot not taken", extra=kv(stream=s.name, error=s.snapshot_error))
            s.last_snapshot = now
            return
        s.last_snapshot, s.snapshot_error = now, ""
        if snap is not None and self.store is not None:
            try:
                with self.store.transaction() as conn:
                    conn.execute(
                        "INSERT INTO replication_snapshots (stream, path, position, taken_at)"
                        " VALUES (?, ?, ?, ?)",
                        (s.name, str(snap.path), snap.position, snap.taken_at),
                    )
            except Exception as exc:
                log.error("snapshot not recorded in the state store", extra=kv(stream=s.name, error=str(exc)))

    def _record_position(self, s: _Stream) -> None:
        if self.store is None or s.replica is None:
            return
        r = s.replica
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO replication_positions"
                " (stream, position, checksum, observed_at, applied_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (stream) DO UPDATE SET position = excluded.position,"
                " checksum = excluded.checksum, observed_at = excluded.observed_at,"
                " applied_at = excluded.applied_at, updated_at = excluded.updated_at",
                (
                    s.name,
                    None if r.position is None else str(r.position),
                    f"{r.checksum:016x}",
                    s.stats.current_at or r.observed_at,
                    r.applied_at,
                    self.clock.time(),
                ),
            )

    def _update_metrics(self, s: _Stream, now: float) -> None:
        m = self.metrics
        if m is None:
            return
        st, seen = s.stats, s.reported
        lag = st.lag_s(now)
        if lag is not None:
            m.lag_seconds.labels(stream=s.name).set(lag)
        m.lag_bytes.labels(stream=s.name).set(st.lag_bytes())
        m.connected.labels(stream=s.name).set(1 if st.connected else 0)
        m.over_budget.labels(stream=s.name).set(1 if _over_budget(s, lag) else 0)
        m.damaged.labels(stream=s.name).set(1 if s.replica is not None and s.replica.damage else 0)
        m.storage_error.labels(stream=s.name).set(1 if st.storage_error else 0)
        m.disk_full.labels(stream=s.name).set(1 if st.disk_full else 0)
        if s.task_failures > s.reported_failures:
            m.task_failures.labels(stream=s.name).inc(s.task_failures - s.reported_failures)
            s.reported_failures = s.task_failures
        for attr, counter in (
            ("bytes_received", m.received_bytes),
            ("frames", m.frames),
            ("transactions", m.transactions),
            ("checksum_mismatches", m.checksum_mismatches),
            ("corrupt_messages", m.corrupt_messages),
            ("malformed_messages", m.malformed_messages),
            ("resnapshots", m.resnapshots),
        ):
            delta = getattr(st, attr) - getattr(seen, attr)
            if delta > 0:
                counter.labels(stream=s.name).inc(delta)
                setattr(seen, attr, getattr(st, attr))

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        """Record an event; one that cannot be recorded (disk full) is logged and counted, never raised."""
        try:
            if self._on_event is not None:
                self._on_event(kind, data)
            elif self.store is not None:
                self.store.record(kind, subject=str(data.get("stream", "")), data=data)
        except Exception as exc:
            self.unrecorded_events += 1
            if self.metrics is not None:
                self.metrics.unrecorded_events.inc()
            log.error("replication event not recorded", extra=kv(event=kind, error=str(exc)))

    # -- for the failover engine ------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        now = self.clock.time()
        out = []
        for s in self.streams.values():
            st = s.stats
            if s.task_error and s.opened and st.sessions > s.sessions_at_failure:
                s.task_error = ""  # it ran a session since: only the current error is shown
            lag = st.lag_s(now)
            item: dict[str, Any] = {
                "name": s.name,
                "kind": s.section.kind,
                "source": s.section.source,
                "replica": str(s.section.replica),
                "connected": st.connected,
                # Seconds since the source was last heard: a cut closes nothing, so "connected" holds
                # for idle_timeout_s while the source is already silent (the agent heartbeats when idle).
                "silent_s": None if (quiet := st.silent_s(time.monotonic())) is None else round(quiet, 1),
                "link": _link(st.connected, quiet),
                "mode": st.mode,
                "lag_s": None if lag is None else round(lag, 3),
                "lag_bytes": st.lag_bytes(),
                "rpo_budget_s": s.section.rpo_budget_s,
                "over_budget": _over_budget(s, lag),
                "transactions": st.transactions,
                "bytes_received": st.bytes_received,
                "checksum_mismatches": st.checksum_mismatches,
                "resnapshots": st.resnapshots,
                "last_verify": st.last_verify,
                "last_error": st.last_error,
                "last_error_at": st.last_error_at,
                "malformed_messages": st.malformed_messages,
                "seed_progress": list(st.seed_progress),
                "storage_error": st.storage_error,
                "disk_full": st.disk_full,
                "task_failures": s.task_failures,
                "task_error": s.task_error,
                "snapshot_error": s.snapshot_error,
            }
            if s.replica is not None:
                r = s.replica.status()
                item.update({k: v for k, v in r.items() if k in _REPLICA_STATUS})
                item["seeded"] = s.replica.position is not None
            item["last_error"] = _current_error(item)
            out.append(item)
        return out

    def readiness(self) -> list[str]:
        """Problems that make the backup not ready to take over (for ``hotsite drill``); empty = ready.

        The daemon raises each as an incident (one per stream): lag over
        budget, damage at rest, the replica's disk failing, a failing task.
        """
        problems = []
        for x in self.status():
            where = f"replication stream {x['name']}"
            if x.get("damaged") and not x.get("promoted"):
                problems.append(f"{where}: replica DAMAGED at rest: {x['damaged']}")
            elif x.get("storage_error"):
                what = "DISK FULL" if x["disk_full"] else "disk failing"
                problems.append(f"{where}: {what}: {x['storage_error']}")
            elif x.get("task_error") and not x.get("connected"):
                problems.append(f"{where}: task failing ({x['task_failures']} restarts): {x['task_error']}")
            elif x["over_budget"]:
                problems.append(f"{where}: lag {x['lag_s']}s over budget {x['rpo_budget_s']}s")
        return problems

    async def promote(
        self, stream: str | None = None, reason: str = "failover", force_damaged: bool = False
    ) -> dict[str, dict[str, Any]]:
        """Stop apply on SQLite streams (all, or one), record the final position, report the loss window.

        Returns per stream: ``path`` (the writable copy), ``position``, ``checksum``,
        ``data_loss_window_s`` (None if it never knew it was current), ``damaged``
        (None, or how the file differs from the last verified state). A
        never-seeded replica is refused, a damaged one unless ``force_damaged``
        (:class:`RequestError`, the stream keeps replicating).
        """
        results: dict[str, dict[str, Any]] = {}
        for s in self._pick(stream):
            if s.replica is None:
                continue
            _promotable(s, force_damaged)
            if isinstance(s.client, SqliteStreamClient):
                s.client.pause()
            if s.task is not None:
                s.task.cancel()
                with contextlib.suppress(BaseException):
                    await s.task
                s.task = None
            st = s.stats
            window = data_loss_window(st.current_at, self.clock.time(), st.clock_offset_s)
            try:
                promotion = await asyncio.to_thread(s.replica.promote, window, reason, force_damaged)
            except (PromotedError, ReplicaStorageError) as exc:
                self._restart(s)
                raise RequestError(exc.message) from None
            self._event("replication.promoted", {"stream": s.name, **promotion.to_json()})
            results[s.name] = {
                "path": str(s.replica.path),
                **promotion.to_json(),
                "position": None if promotion.position is None else str(promotion.position),
                "recorded_checksum": s.replica.status()["recorded_checksum"],
                "verified": promotion.damaged is None,
            }
        return results

    def _restart(self, s: _Stream) -> None:
        if isinstance(s.client, SqliteStreamClient):
            s.client.resume()
        if s.task is None and s.client is not None:
            s.task = asyncio.create_task(self._supervise(s), name=f"replication:{s.name}")

    def sqlite_streams(self) -> list[str]:
        return [s.name for s in self.streams.values() if s.replica is not None]

    def is_promoted(self, stream: str) -> bool:
        s = self._pick(stream)[0]
        return s.replica is not None and s.replica.promotion is not None

    def local_changes(self, stream: str) -> str | None:
        """What the backup wrote to its promoted copy (None: nothing)."""
        s = self._pick(stream)[0]
        if s.replica is None or s.replica.promotion is None:
            return None
        return s.replica.local_changes()

    def failback_check(self, stream: str) -> str | None:
        """None if replication may resume into the stream; otherwise what must be done first."""
        s = self._pick(stream)[0]
        if s.replica is None or s.replica.promotion is None:
            return None
        return (
            s.replica.local_changes() or "promoted without local writes: 'hotsite replication demote' resumes"
        )

    async def demote(self, stream: str, discard_local_writes: bool = False) -> str | None:
        """Resume replication into a promoted replica (the proof is the replica's); returns the path
        of the restore point the backup's discarded writes were saved to, if any."""
        s = self._pick(stream)[0]
        if s.replica is None or s.client is None:
            raise RequestError(f"stream {stream!r} is not a SQLite stream")
        snapshots = s.snapshots

        def keep(image: bytes) -> Any:
            if snapshots is None:
                raise RequestError("no snapshot directory to save the backup's writes to")
            return snapshots.save(image, "backup-writes-before-demote")

        kept = await asyncio.to_thread(s.replica.demote, discard_local_writes, keep)
        self._restart(s)
        return None if kept is None else str(kept)

    def _pick(self, stream: str | None) -> list[_Stream]:
        if stream is None:
            return list(self.streams.values())
        if stream not in self.streams:
            raise RequestError(
                f"unknown stream {stream!r} (known: {', '.join(sorted(self.streams)) or 'none'})"
            )
        return [self.streams[stream]]

    # -- control API -------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        return {
            "replication.status": self._api_status,
            "replication.verify": self._api_verify,
            "replication.promote": self._api_promote,
            "replication.demote": self._api_demote,
            "replication.snapshots": self._api_snapshots,
        }

    async def _api_status(self, caller: Caller, params: dict[str, Any]) -> Any:
        return {"streams": self.status(), "source_agent": self.config.source_agent, "at": time.time()}

    async def _api_verify(self, caller: Caller, params: dict[str, Any]) -> Any:
        """Start (or join) a verify and wait up to ``wait_s`` (default 30) for its result.

        Still running then: ``{"pending": true, "progress": …}``; call again
        to keep waiting (the CLI does, printing the progress, with no fixed
        limit of its own but ``--timeout``).
        """
        s = self._pick(_stream_param(params))[0]
        client = s.client
        if not isinstance(client, SqliteStreamClient):
            raise RequestError("verify applies to SQLite streams")
        wait = params.get("wait_s", 30.0)
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 300:
            raise RequestError("wait_s must be a number of seconds from 0 to 300")
        if s.verify_task is None:
            s.verify_task = asyncio.create_task(client.verify(), name=f"replication verify:{s.name}")
        task = s.verify_task
        await asyncio.wait({task}, timeout=float(wait))
        if not task.done():
            return {"pending": True, "progress": dict(client.verify_progress)}
        s.verify_task = None
        try:
            return task.result()
        except (ConnectionError, TimeoutError, OSError) as exc:
            return {"ok": False, "error": f"cannot verify now: {exc or 'timed out'}"}

    async def _api_promote(self, caller: Caller, params: dict[str, Any]) -> Any:
        name = _stream_param(params)
        reason = f"{params.get('reason', 'operator')} by {caller.actor}"
        force = params.get("force_damaged", False)
        if not isinstance(force, bool):
            raise RequestError("force_damaged must be true or false")
        return (await self.promote(name, reason=reason, force_damaged=force))[name]

    async def _api_demote(self, caller: Caller, params: dict[str, Any]) -> Any:
        name = _stream_param(params)
        try:
            kept = await self.demote(name, bool(params.get("discard_local_writes")))
        except (PromotedError, ReplicaStorageError) as exc:
            raise RequestError(exc.message) from None
        self._event("replication.demoted", {"stream": name, "actor": caller.actor, "saved": kept})
        return {"stream": name, "replicating": True, "saved_local_copy": kept}

    async def _api_snapshots(self, caller: Caller, params: dict[str, Any]) -> Any:
        s = self._pick(_stream_param(params))[0]
        if s.snapshots is None:
            raise RequestError("snapshots apply to SQLite streams")
        return {
            "directory": str(s.snapshots.directory),
            "snapshots": [
                {"path": str(x.path), "taken_at": x.taken_at, "position": x.position}
                for x in s.snapshots.list()
            ],
        }


def _promotable(s: _Stream, force_damaged: bool) -> None:
    """Refuse before touching the stream: never seeded (always), damaged (unless forced)."""
    r = s.replica
    if r is None or r.promotion is not None:
        return
    if r.position is None:
        raise RequestError(
            f"refusing to promote {s.name}: the replica {r.path} was never seeded (it holds nothing of the"
            " primary's database); there is nothing to hand out"
        )
    if r.damage is not None and not force_damaged:
        raise RequestError(
            f"refusing to promote {s.name}: {r.damage}. It is not a state the primary committed. Let"
            " replication repair it (the source must be reachable), restore a snapshot"
            f" ('hotsite replication restore {s.name} --at TIME -o FILE'), or promote it as it is with"
            " --force-damaged"
        )


def _over_budget(s: _Stream, lag: float | None) -> bool:
    """Lag past the RPO budget, for a stream that follows its source: a promoted copy is the
    live database and follows nothing (its growing "lag" paged after every failover)."""
    if s.replica is not None and s.replica.promotion is not None:
        return False
    return over_budget(lag, s.section.rpo_budget_s)


def _current_error(item: dict[str, Any]) -> str:
    """The one error that holds now (damage first), for status and ``top``; "" when all is well."""
    if item.get("damaged") and not item.get("promoted"):
        return f"DAMAGED: {item['damaged']}"
    if item.get("storage_error"):
        return str(item["storage_error"])
    if item.get("task_error") and not item.get("connected"):
        return f"task failing: {item['task_error']}"
    if item.get("connected"):
        return ""
    return str(item.get("last_error") or "")


def _stream_param(params: dict[str, Any]) -> str:
    name = params.get("stream")
    if not isinstance(name, str) or not name:
        raise RequestError("stream must be a stream name")
    return name


def replica_paths(config: ReplicationSection) -> dict[str, Path]:
    return {n: s.replica for n, s in config.streams.items()}


# A source heartbeats every 0.5 s when idle (its heartbeat_s): this much silence in a connected
# session is worth showing long before the session's idle timeout (15 s) calls the link down.
QUIET_AFTER_S = 2.0


def _link(connected: bool, silent_s: float | None) -> str:
    """``up``, ``down``, or ``quiet``: connected, but nothing heard from the source for a while."""
    if not connected:
        return "down"
    return "quiet" if silent_s is not None and silent_s >= QUIET_AFTER_S else "up"
