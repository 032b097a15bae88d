"""Webhook pages (generic JSON, PagerDuty Events API v2, Alertmanager's webhook format),
and the inbound receiver for Alertmanager alerts and acknowledgements.

Retries follow PagerDuty's rule, which is right for any webhook: 429 and 5xx
may succeed later (honour ``Retry-After``), any other 4xx never will. Every
request carries the page's dedup key (``Idempotency-Key``; PagerDuty's
``dedup_key``) so a retry after a lost reply does not open a second alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from appliance.logs import kv
from appliance.paging.channel import Channel, Delivery, Message
from appliance.paging.incidents import Ack, Clear, Event, Raise
from appliance.paging.oncall import SEVERITIES, Contact

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024


class WebhookChannel(Channel):
    kind = "webhook"

    def __init__(
        self,
        name: str,
        url: str,
        format: str = "json",
        *,
        secret: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        source: str = "hotsite",
    ) -> None:
        self.name = name
        self.url = url
        self.format = format
        self.secret = secret
        self.timeout_s = timeout_s
        self.send_timeout_s = timeout_s * (retries + 1) + backoff_s * 2**retries
        self.retries = retries
        self.backoff_s = backoff_s
        self.source = source
        self._client: httpx.AsyncClient | None = None

    def can_reach(self, contact: Contact) -> bool:
        return True

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout_s)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def body(self, message: Message) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC).isoformat()
        key = message.dedup_key or f"hotsite-{message.incident}"
        if self.format == "pagerduty":
            action = {"resolve": "resolve", "ack": "acknowledge"}.get(message.kind, "trigger")
            return {
                "routing_key": self.secret or "",
                "event_action": action,
                "dedup_key": f"hotsite-{self.source}-{message.incident}"[:255]
                if message.incident
                else key[:255],
                "payload": {
                    "summary": message.text[:1024],
                    "source": self.source,
                    "severity": message.severity if message.severity in SEVERITIES else "error",
                    "timestamp": now,
                    "component": "hotsite",
                    "custom_details": {"contact": message.contact.name, **message.details},
                },
            }
        if self.format == "alertmanager":
            status = "resolved" if message.kind == "resolve" else "firing"
            labels = {
                "alertname": "HotsitePage",
                "incident": str(message.incident),
                "site": self.source,
                "severity": message.severity,
                "contact": message.contact.name,
            }
            return {
                "version": "4",
                "groupKey": f"hotsite:{message.incident}",
                "truncatedAlerts": 0,
                "status": status,
                "receiver": self.name,
                "groupLabels": {"incident": str(message.incident)},
                "commonLabels": labels,
                "commonAnnotations": {"summary": message.text},
                "externalURL": "",
                "alerts": [
                    {
                        "status": status,
                        "labels": labels,
                        "annotations": {"summary": message.text},
                        "startsAt": now,
                        "endsAt": now if status == "resolved" else "0001-01-01T00:00:00Z",
                        "generatorURL": "",
                        "fingerprint": key,
                    }
                ],
            }
        return {
            "site": self.source,
            "incident": message.incident,
            "kind": message.kind,
            "severity": message.severity,
            "contact": message.contact.name,
            "text": message.text,
            "dedup_key": key,
            "at": now,
        }

    async def send(self, message: Message) -> Delivery:
        client = self._client or httpx.AsyncClient(timeout=self.timeout_s)
        headers = {"Idempotency-Key": message.dedup_key} if message.dedup_key else {}
        if self.secret and self.format != "pagerduty":
            headers["Authorization"] = f"Bearer {self.secret}"
        body = self.body(message)
        last = ""
        try:
            for attempt in range(self.retries + 1):
                wait = self.backoff_s * 2**attempt
                try:
                    response = await client.post(self.url, json=body, headers=headers)
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"[:200]
                else:
                    if 200 <= response.status_code < 300:
                        return Delivery("sent", f"HTTP {response.status_code}")
                    last = f"HTTP {response.status_code} {response.text[:120]!r}"
                    if response.status_code != 429 and response.status_code < 500:
                        return Delivery("failed", last, retryable=False)
                    with contextlib.suppress(KeyError, ValueError):
                        wait = min(60.0, float(response.headers["Retry-After"]))
                if attempt < self.retries:
                    await asyncio.sleep(wait)
        finally:
            if client is not self._client:
                await client.aclose()
        return Delivery("failed", f"{last} (after {self.retries + 1} attempts)")


# ---------------------------------------------------------------------------
# Inbound: Alertmanager alerts become incidents; a token-protected ack endpoint


_AM_SEVERITY = {
    "critical": "critical",
    "page": "critical",
    "error": "error",
    "high": "error",
    "warning": "warning",
    "warn": "warning",
    "info": "info",
    "none": "info",
    "low": "info",
}


def alertmanager_events(body: Any) -> list[Event]:
    """Alertmanager webhook (version 4) body to Raise/Clear events; ValueError if it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("alerts"), list):
        raise ValueError("not an Alertmanager webhook body: no 'alerts' list")
    group = "am:" + str(body.get("groupKey", ""))[:200]
    events: list[Event] = []
    for alert in body["alerts"]:
        if not isinstance(alert, dict):
            raise ValueError("an alert is not an object")
        labels = alert.get("labels") or {}
        annotations = alert.get("annotations") or {}
        fingerprint = alert.get("fingerprint") or json.dumps(labels, sort_keys=True)
        key = f"am:{fingerprint}"[:200]
        if alert.get("status") == "resolved":
            events.append(Clear(key, source="alertmanager"))
            continue
        name = str(labels.get("alertname", "alert"))
        summary = str(annotations.get("summary") or annotations.get("description") or name)
        instance = labels.get("instance")
        text = f"{name}: {summary}" if summary != name else name
        if instance:
            text += f" ({instance})"
        severity = _AM_SEVERITY.get(str(labels.get("severity", "")).lower(), "error")
        events.append(Raise(key, text[:300], severity, group, source="alertmanager"))  # type: ignore[arg-type]
    return events


class WebhookReceiver:
    """A small HTTP/1.1 server: ``POST /alertmanager`` (alerts) and ``POST /ack/<id>`` (acknowledge).

    Contract: each request gets one reply and the connection closes; bodies over
    1 MiB, bad JSON or a wrong bearer token get 4xx and never reach ``on_events``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        on_events: Callable[[list[Event], str], Awaitable[None]],
        token: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.on_events = on_events
        self.token = token
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                status, reply = await self._handle(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            status, reply = 400, {"error": "bad request"}
        data = json.dumps(reply).encode()
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        request = (await reader.readline()).decode("latin-1").split()
        headers: dict[str, str] = {}
        while True:
            line = (await reader.readline()).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(request) < 2 or request[0] != "POST":
            return 405, {"error": "POST only"}
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY:
            return 413, {"error": "body too large"}
        if self.token is not None:
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 401, {"error": "bad or missing bearer token"}
        body = await reader.readexactly(length)
        path = request[1]
        if path == "/alertmanager":
            try:
                events = alertmanager_events(json.loads(body))
            except ValueError as exc:
                log.warning("bad Alertmanager webhook", extra=kv(error=str(exc)))
                return 400, {"error": str(exc)}
            await self.on_events(events, "alertmanager")
            return 200, {"accepted": len(events)}
        if path.startswith("/ack/"):
            if self.token is None:
                return 403, {"error": "acknowledging by webhook needs paging.alertmanager_token_file"}
            try:
                actor = str(json.loads(body or b"{}").get("actor", "webhook"))[:80]
            except (ValueError, AttributeError):
                return 400, {"error": "body must be a JSON object"}
            await self.on_events([Ack(path[len("/ack/") :], actor, "webhook")], "webhook")
            return 200, {"ack": path[len("/ack/") :]}
        return 404, {"error": f"no such endpoint {path}"}
