"""Paging metrics, on a registry passed in. Labels are bounded: channel names come from the config,
results and events from fixed vocabularies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ACK_BUCKETS = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)


class PagingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pages = Counter(
            "hotsite_paging_pages_total",
            "Pages by channel and result (sent, failed, uncertain).",
            ["channel", "result"],
            registry=registry,
        )
        self.deferred = Counter(
            "hotsite_paging_deferred_total",
            "Pages held instead of sent now, by reason (rate_limit, night). Critical pages are never held.",
            ["reason"],
            registry=registry,
        )
        self.undelivered = Counter(
            "hotsite_paging_undelivered_total",
            "Pages that failed on every channel after the last attempt, by kind (trigger, resolve, ...).",
            ["kind"],
            registry=registry,
        )
        self.recovered = Counter(
            "hotsite_paging_recovered_total",
            "Pages found mid-send at start-up, by outcome (resent, uncertain, sent).",
            ["outcome"],
            registry=registry,
        )
        self.time_to_ack = Histogram(
            "hotsite_paging_time_to_ack_seconds",
            "Time from an incident opening to its acknowledgement.",
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "hotsite_paging_outbox_depth", "Pages queued or being sent.", registry=registry
        )
        self.incidents_open = Gauge(
            "hotsite_paging_incidents_open", "Active incidents by status.", ["status"], registry=registry
        )
        self.inbound = Counter(
            "hotsite_paging_inbound_sms_total",
            "Received texts by outcome (ack, status, not_understood, unknown_sender).",
            ["result"],
            registry=registry,
        )
        self.modem_up = Gauge(
            "hotsite_modem_up",
            "1 when the modem is initialised and answering.",
            ["channel"],
            registry=registry,
        )
        self.modem_signal = Gauge(
            "hotsite_modem_signal_dbm",
            "Received signal strength (AT+CSQ), dBm.",
            ["channel"],
            registry=registry,
        )
        self.modem_registered = Gauge(
            "hotsite_modem_registered",
            "1 when registered on the network (AT+CREG? stat 1 or 5).",
            ["channel"],
            registry=registry,
        )
        self.modem_events = Counter(
            "hotsite_modem_events_total",
            "Modem events (sent_part, timeout, cms_error, error, reset, inbound, report, bad_pdu).",
            ["channel", "event"],
            registry=registry,
        )
        self.unrecorded = Counter(
            "hotsite_paging_unrecorded_total",
            "Paging events the state store refused (disk full); their pages were sent from memory.",
            registry=registry,
        )
