"""E-mail through a real SMTP server (aiosmtpd, STARTTLS, AUTH) and webhooks through a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from appliance import config
from appliance.paging import settings
from appliance.paging.channel import Message, NullChannel, send_with_fallback
from appliance.paging.incidents import Ack, Clear, Event, Raise
from appliance.paging.oncall import Contact
from appliance.paging.smtp import SmtpChannel
from appliance.paging.webhook import WebhookChannel, WebhookReceiver, alertmanager_events
from tests.conftest import free_port
from tests.support import configs

ZHANG = Contact("Zhang Wei", phone="+8613800138000", email="zw@example.com")
BASE = '\n[appliance]\nname = "dr1"\n' + configs.two_sites("10.0.0.1", "10.0.0.2")

# A real Alertmanager 0.27 webhook body (two alerts, one firing, one resolved).
ALERTMANAGER_BODY = {
    "receiver": "hotsite",
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "DiskFull", "instance": "acd-1:9100", "severity": "critical"},
            "annotations": {"summary": "disk / on acd-1 is 97% full"},
            "startsAt": "2026-03-02T01:58:11.514Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=disk",
            "fingerprint": "5f0c3a1b2d4e6f70",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "HighLoad", "instance": "cti-2:9100", "severity": "warning"},
            "annotations": {"description": "load above 20"},
            "startsAt": "2026-03-02T01:40:00Z",
            "endsAt": "2026-03-02T01:57:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=load",
            "fingerprint": "0a1b2c3d4e5f6789",
        },
    ],
    "groupLabels": {"alertname": "DiskFull"},
    "commonLabels": {"alertname": "DiskFull"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "version": "4",
    "groupKey": '{}:{alertname="DiskFull"}',
    "truncatedAlerts": 0,
}


# ---------------------------------------------------------------------------
# SMTP


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.reply = "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope)
        return self.reply


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == b"hotsite"
        and auth_data.password == b"s3cret"
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server(tls: tuple[Path, Path]) -> Iterator[tuple[Inbox, int]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls)
    inbox, port = Inbox(), free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    )
    controller.start()
    yield inbox, port
    controller.stop()


def smtp_channel(tmp_path: Path, port: int, ca: Path, password: str = "s3cret") -> SmtpChannel:
    secret = tmp_path / "smtp-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    cfg = config.parse(
        BASE
        + f"""
[channels.email]
type = "smtp"
host = "127.0.0.1"
port = {port}
username = "hotsite"
password_file = "{secret}"
from_addr = "hotsite@dr1.example.com"
ca_file = "{ca}"
timeout_s = 5
"""
    )
    channel = settings.build_channels(cfg)["email"]
    assert isinstance(channel, SmtpChannel)
    return channel


def test_smtp_starttls_auth_and_refusals(
    tmp_path: Path, smtp_server: tuple[Inbox, int], tls: tuple[Path, Path]
) -> None:
    inbox, port = smtp_server
    channel = smtp_channel(tmp_path, port, tls[0])
    message = Message(
        ZHANG,
        "[dr1] #3 CRITICAL: primary site down. Reply ACK 3",
        subject="[dr1] #3 primary down",
        incident=3,
        dedup_key="3:trigger:r0:s0:Zhang Wei",
    )
    delivery = asyncio.run(channel.send(message))
    assert delivery.sent, delivery
    (envelope,) = inbox.messages
    assert envelope.rcpt_tos == ["zw@example.com"] and envelope.mail_from == "hotsite@dr1.example.com"
    body = envelope.content.decode()
    assert "Subject: [dr1] #3 primary down" in body and "Reply ACK 3" in body
    assert "X-Hotsite-Page: 3:trigger:r0:s0:Zhang Wei" in body
    inbox.reply = "451 4.3.0 try again later"
    delivery = asyncio.run(channel.send(message))
    assert delivery.result == "failed" and delivery.retryable and "451" in delivery.detail
    inbox.reply = "550 5.1.1 no such user"
    delivery = asyncio.run(channel.send(message))
    assert delivery.result == "failed" and not delivery.retryable
    wrong = smtp_channel(tmp_path, port, tls[0], password="wrong")
    delivery = asyncio.run(wrong.send(message))
    assert delivery.result == "failed" and not delivery.retryable and "login refused" in delivery.detail
    assert not asyncio.run(channel.send(Message(Contact("No Mail", phone="+8613800000000"), "x"))).sent


def test_smtp_refuses_to_send_a_password_without_starttls(tmp_path: Path, tls: tuple[Path, Path]) -> None:
    inbox, port = Inbox(), free_port()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=port, auth_require_tls=False, authenticator=authenticator
    )
    controller.start()
    try:
        delivery = asyncio.run(smtp_channel(tmp_path, port, tls[0]).send(Message(ZHANG, "x")))
    finally:
        controller.stop()
    assert (
        delivery.result == "failed"
        and "does not offer STARTTLS" in delivery.detail
        and not delivery.retryable
    )
    assert inbox.messages == []


# ---------------------------------------------------------------------------
# Webhooks


class Receiver:
    """A local HTTP server answering with scripted statuses, recording every request."""

    def __init__(self) -> None:
        self.statuses: list[tuple[int, dict[str, str]]] = []
        self.requests: list[tuple[dict[str, str], Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), json.loads(body)))
                status, headers = outer.statuses.pop(0) if outer.statuses else (202, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/enqueue"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def pagerduty(tmp_path: Path, url: str) -> WebhookChannel:
    key = tmp_path / "pd-key"
    key.write_text("R0UT1NGKEY\n")
    cfg = config.parse(
        BASE
        + f"""
[channels.pager]
type = "webhook"
url = "{url}"
format = "pagerduty"
secret_file = "{key}"
retries = 3
timeout_s = 2
"""
    )
    channel = settings.build_channels(cfg)["pager"]
    assert isinstance(channel, WebhookChannel)
    channel.backoff_s = 0.01
    return channel


def test_pagerduty_events_v2_retries_429_and_5xx_never_400(tmp_path: Path, receiver: Receiver) -> None:
    channel = pagerduty(tmp_path, receiver.url)
    message = Message(
        ZHANG, "primary site down", incident=7, severity="critical", dedup_key="7:trigger:r0:s0:Z"
    )

    async def body() -> None:
        await channel.start()
        try:
            receiver.statuses = [(429, {"Retry-After": "0"}), (503, {}), (202, {})]
            assert (await channel.send(message)).sent
            assert len(receiver.requests) == 3
            headers, event = receiver.requests[-1]
            assert event["routing_key"] == "R0UT1NGKEY" and event["event_action"] == "trigger"
            assert event["dedup_key"] == "hotsite-dr1-7"
            assert event["payload"]["severity"] == "critical" and event["payload"]["source"] == "dr1"
            assert event["payload"]["summary"] == "primary site down"
            receiver.statuses = [(400, {})]
            delivery = await channel.send(message)
            assert delivery.result == "failed" and not delivery.retryable and len(receiver.requests) == 4
            receiver.statuses = [(500, {})] * 4
            delivery = await channel.send(message)
            assert delivery.result == "failed" and delivery.retryable and len(receiver.requests) == 8
            resolve = Message(ZHANG, "RESOLVED", incident=7, kind="resolve", dedup_key="7:resolve:Z")
            assert (await channel.send(resolve)).sent
            assert receiver.requests[-1][1]["event_action"] == "resolve"
            assert receiver.requests[-1][1]["dedup_key"] == "hotsite-dr1-7"
        finally:
            await channel.stop()

    asyncio.run(body())


def test_generic_json_and_alertmanager_formats(receiver: Receiver) -> None:
    generic = WebhookChannel("hook", receiver.url, "json", secret="tok", backoff_s=0.01)
    am = WebhookChannel("am", receiver.url, "alertmanager", backoff_s=0.01)
    message = Message(ZHANG, "trunk a down", incident=4, severity="error", dedup_key="4:trigger:r0:s0:Z")
    assert asyncio.run(generic.send(message)).sent
    headers, body = receiver.requests[-1]
    assert headers["Authorization"] == "Bearer tok" and headers["Idempotency-Key"] == "4:trigger:r0:s0:Z"
    assert body["incident"] == 4 and body["text"] == "trunk a down" and body["contact"] == "Zhang Wei"
    assert asyncio.run(am.send(message)).sent
    body = receiver.requests[-1][1]
    assert body["version"] == "4" and body["status"] == "firing"
    assert alertmanager_events(body)[0] == Raise(
        "am:4:trigger:r0:s0:Z", "HotsitePage: trunk a down", "error", "am:hotsite:4", source="alertmanager"
    )


def test_fallback_to_the_next_channel() -> None:
    down, up = NullChannel("sms", result="failed"), NullChannel("email")
    delivery, used, tried = asyncio.run(send_with_fallback([down, up], Message(ZHANG, "x")))
    assert (
        delivery.sent
        and used == "email"
        and tried == ["sms: failed null channel sms", "email: sent null channel email"]
    )
    maybe = NullChannel("sms", result="uncertain")
    delivery, used, _ = asyncio.run(
        send_with_fallback([maybe, NullChannel("email", result="failed")], Message(ZHANG, "x"))
    )
    assert delivery.result == "uncertain" and used == "sms"


def test_inbound_alertmanager_receiver_and_ack_webhook() -> None:
    assert alertmanager_events(ALERTMANAGER_BODY) == [
        Raise(
            "am:5f0c3a1b2d4e6f70",
            "DiskFull: disk / on acd-1 is 97% full (acd-1:9100)",
            "critical",
            'am:{}:{alertname="DiskFull"}',
            source="alertmanager",
        ),
        Clear("am:0a1b2c3d4e5f6789", source="alertmanager"),
    ]
    with pytest.raises(ValueError, match="alerts"):
        alertmanager_events({"status": "firing"})
    got: list[tuple[Event, str]] = []

    async def on_events(events: list[Event], via: str) -> None:
        got.extend((e, via) for e in events)

    async def body() -> None:
        server = WebhookReceiver("127.0.0.1", 0, on_events, token="t0ken")
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            async with httpx.AsyncClient() as client:
                auth = {"Authorization": "Bearer t0ken"}
                r = await client.post(base + "/alertmanager", json=ALERTMANAGER_BODY, headers=auth)
                assert r.status_code == 200 and r.json() == {"accepted": 2}
                r = await client.post(base + "/alertmanager", json=ALERTMANAGER_BODY)
                assert r.status_code == 401
                r = await client.post(base + "/alertmanager", content=b"{not json", headers=auth)
                assert r.status_code == 400
                r = await client.post(base + "/ack/12", json={"actor": "noc"}, headers=auth)
                assert r.status_code == 200
                r = await client.post(base + "/nope", json={}, headers=auth)
                assert r.status_code == 404
        finally:
            await server.stop()

    asyncio.run(body())
    assert [via for _, via in got] == ["alertmanager", "alertmanager", "webhook"]
    assert got[2][0] == Ack("12", "webhook:alertmanager", "webhook")  # the token's name, not the body's
