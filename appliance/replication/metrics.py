"""Replication metrics (per stream label; stream names come from the config, so labels are bounded)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ReplicationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag_seconds = Gauge(
            "hotsite_replication_lag_seconds",
            "Seconds since the replica last held the newest committed source state (source clock).",
            ["stream"],
            registry=registry,
        )
        self.lag_bytes = Gauge(
            "hotsite_replication_lag_bytes",
            "Bytes committed at the source not yet applied (last report).",
            ["stream"],
            registry=registry,
        )
        self.received_bytes = Counter(
            "hotsite_replication_received_bytes_total",
            "Bytes received from the source agent (on the wire).",
            ["stream"],
            registry=registry,
        )
        self.frames = Counter(
            "hotsite_replication_frames_total",
            "WAL frames applied.",
            ["stream"],
            registry=registry,
        )
        self.transactions = Counter(
            "hotsite_replication_transactions_total",
            "Source transactions applied.",
            ["stream"],
            registry=registry,
        )
        self.checksum_mismatches = Counter(
            "hotsite_replication_checksum_mismatches_total",
            "Batches refused or verifications failed because the whole-database checksums differed.",
            ["stream"],
            registry=registry,
        )
        self.corrupt_messages = Counter(
            "hotsite_replication_corrupt_messages_total",
            "Messages whose CRC failed (dropped, re-requested).",
            ["stream"],
            registry=registry,
        )
        self.malformed_messages = Counter(
            "hotsite_replication_malformed_messages_total",
            "Messages from the source refused by their limits or schema (unsafe path, mode, size,"
            " JSON depth): the session is restarted.",
            ["stream"],
            registry=registry,
        )
        self.resnapshots = Counter(
            "hotsite_replication_resnapshots_total",
            "Resyncs because the source no longer held the replica's position.",
            ["stream"],
            registry=registry,
        )
        self.connected = Gauge(
            "hotsite_replication_connected",
            "1 while the link to the source agent is up.",
            ["stream"],
            registry=registry,
        )
        self.over_budget = Gauge(
            "hotsite_replication_over_budget",
            "1 when the lag exceeds the stream's rpo_budget_s.",
            ["stream"],
            registry=registry,
        )
        self.damaged = Gauge(
            "hotsite_replication_damaged",
            "1 while the replica file differs from the state recorded when it was last verified.",
            ["stream"],
            registry=registry,
        )
        self.storage_error = Gauge(
            "hotsite_replication_storage_error",
            "1 while the replica's own disk refuses writes (full, read-only, I/O error).",
            ["stream"],
            registry=registry,
        )
        self.disk_full = Gauge(
            "hotsite_replication_disk_full",
            "1 while the replica's filesystem is full.",
            ["stream"],
            registry=registry,
        )
        self.task_failures = Counter(
            "hotsite_replication_task_failures_total",
            "Times a stream's task failed and was restarted by its supervisor.",
            ["stream"],
            registry=registry,
        )
        self.unrecorded_events = Counter(
            "hotsite_replication_unrecorded_events_total",
            "Replication events the state store could not record (its disk full): logged only.",
            registry=registry,
        )
        self.files = Counter(
            "hotsite_replication_files_applied_total",
            "Config files written or deleted at the replica.",
            ["stream", "change"],
            registry=registry,
        )
