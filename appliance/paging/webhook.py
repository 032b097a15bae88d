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

from appliance.errors import StartupError
from appliance.httpd import BoundedHttpServer, Limits, Request, Response, bearer, json_response
from appliance.logs import kv
from appliance.paging.channel import Channel, Delivery, Message
from appliance.paging.incidents import Ack, Clear, Event, Raise
from appliance.paging.oncall import SEVERITIES, Contact

log = logging.getLogger(f"hotsite.{__name__}")
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
    """``POST /alertmanager`` (alerts) and ``POST /ack/<id>`` (acknowledge) on a bounded server.

    Contract: each request gets one reply and the connection closes. The head
    is bounded and the bearer token checked before any body is read
    (:mod:`appliance.httpd`: 8 KiB head, 5 s to send it, idlers evicted
    oldest first); bodies over 1 MiB, bad JSON or a wrong token get 4xx and
    never reach ``on_events``. An acknowledgement is recorded under
    ``webhook:<token_name>`` (the name configured with the token), never a
    name the request claims. Without a token the receiver starts only if
    ``allow_unauthenticated`` is set, and then never accepts an ACK.
    """

    def __init__(
        self,
        host: str,
        port: int,
        on_events: Callable[[list[Event], str], Awaitable[None]],
        token: str | None = None,
        *,
        token_name: str = "alertmanager",
        allow_unauthenticated: bool = False,
        limits: Limits | None = None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        if token is None and not allow_unauthenticated:
            raise StartupError(
                "paging.alertmanager_listen needs paging.alertmanager_token_file (or"
                " paging.alertmanager_allow_unauthenticated = true, which lets anyone who reaches it page)"
            )
        if token is not None and not token:
            raise StartupError("paging.alertmanager_token_file is empty")
        self.host, self.port = host, port
        self.on_events = on_events
        self.token = token
        self.token_name = token_name
        self._server = BoundedHttpServer(
            host,
            port,
            self._handle,
            authenticate=self._authenticate,
            limits=limits or Limits(max_body=MAX_BODY),
            on_outcome=on_outcome,
            name="alertmanager",
        )

    async def start(self) -> None:
        try:
            await self._server.start()
        except OSError as exc:
            raise StartupError(
                f"paging.alertmanager_listen {self.host}:{self.port} cannot be opened: {exc.strerror}"
            ) from None
        self.port = self._server.port
        if self.token is None:
            log.warning(
                "Alertmanager receiver accepts alerts WITHOUT authentication"
                " (paging.alertmanager_allow_unauthenticated = true)",
                extra=kv(listen=f"{self.host}:{self.port}"),
            )

    async def stop(self) -> None:
        await self._server.stop()

    def _authenticate(self, request: Request) -> str | Response | None:
        if request.method != "POST":
            return Response(405, b"POST only\n", headers={"Allow": "POST"})
        if request.path != "/alertmanager" and not request.path.startswith("/ack/"):
            return Response(404, f"no such endpoint {request.path[:80]}\n".encode())
        if self.token is None:
            return (
                "anonymous"
                if request.path == "/alertmanager"
                else Response(403, b"acknowledging by webhook needs paging.alertmanager_token_file\n")
            )
        given = bearer(request.headers.get("authorization", ""))
        # compare_digest loops over the caller's bytes: the time says nothing about the token.
        if not hmac.compare_digest(self.token.encode(), given):
            return Response(401, b"bad or missing bearer token\n", headers={"WWW-Authenticate": "Bearer"})
        return self.token_name

    async def _handle(self, request: Request, identity: str) -> Response:
        if request.path == "/alertmanager":
            try:
                events = alertmanager_events(json.loads(request.body))
            except (ValueError, RecursionError, AttributeError, TypeError) as exc:
                log.warning("bad Alertmanager webhook", extra=kv(error=str(exc)[:200]))
                return json_response(400, {"error": str(exc)[:200]})
            await self.on_events(events, "alertmanager")
            return json_response(200, {"accepted": len(events)})
        incident = request.path[len("/ack/") :]
        if not incident.isdigit() or len(incident) > 12:
            return json_response(400, {"error": "expected /ack/<incident number>"})
        # The actor is who holds the token, whatever the body says: the audit log must not lie.
        await self.on_events([Ack(incident, f"webhook:{identity}", "webhook")], "webhook")
        return json_response(200, {"ack": incident, "actor": f"webhook:{identity}"})
