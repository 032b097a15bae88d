"""``/metrics`` on a bounded server in one thread of its own, with optional TLS and basic auth.

Why not ``prometheus_client.start_http_server``: it is a ThreadingHTTPServer
with no read timeout, one thread per connection, so 500 idle connections are
500 threads in the process that runs failover. Here one thread runs an event
loop with :class:`appliance.httpd.BoundedHttpServer`: the head is bounded and
must arrive within 5 s, idle connections beyond the cap are evicted oldest
first, at most :data:`MAX_ACTIVE` scrapes are rendered at once. Its own
thread keeps ``/metrics`` answering even while the daemon's loop is busy.

Authentication follows the Prometheus exporter-toolkit's web config:
``basic_auth_users`` maps a user name to a **bcrypt hash** of the password
(``htpasswd -nBC 10 user``), and TLS is served when ``tls_cert_file`` and
``tls_key_file`` are given. A verified password is cached (by its SHA-256)
so that a scrape every 15 s does not pay bcrypt each time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ssl
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from appliance import httpd
from appliance.errors import ConfigError, StartupError

MAX_ACTIVE = 4
LIMITS = httpd.Limits(max_body=0, max_pending=64, max_pending_per_peer=16, max_active=MAX_ACTIVE)


class BasicAuth:
    """user -> bcrypt hash; ``check`` is constant time in the password and caches successes."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = {name: hashed.encode() for name, hashed in users.items()}
        self._good: set[bytes] = set()

    def check(self, header: str) -> str | None:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        hashed = self.users.get(user)
        if not sep or hashed is None:
            return None
        key = hashlib.sha256(user.encode() + b"\0" + password.encode() + b"\0" + hashed).digest()
        if any(hmac.compare_digest(key, good) for good in self._good):
            return user
        import bcrypt

        try:
            ok = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            return None
        if ok:
            self._good.add(key)
        return user if ok else None


class MetricsServer:
    """The thread and its loop; ``shutdown`` + ``server_close`` like the socketserver it replaces."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        auth: BasicAuth | None = None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.registry = registry
        self.auth = auth
        self._loop = asyncio.new_event_loop()
        self._server = httpd.BoundedHttpServer(
            host,
            port,
            self._handle,
            authenticate=self._authenticate,
            limits=LIMITS,
            tls=tls,
            on_outcome=on_outcome,
            name="metrics",
        )
        self._thread = threading.Thread(target=self._loop.run_forever, name="metrics-http", daemon=True)

    @property
    def server_address(self) -> tuple[str, int]:
        return self._server.host, self._server.port

    def start(self) -> None:
        """Bind in the server's own thread (the caller may be inside a running loop); OSError if not."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(10)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            raise

    def _authenticate(self, request: httpd.Request) -> str | httpd.Response | None:
        if request.method not in ("GET", "HEAD"):
            return httpd.Response(405, b"GET only\n", headers={"Allow": "GET, HEAD"})
        if self.auth is None:
            return "anonymous"
        user = self.auth.check(request.headers.get("authorization", ""))
        if user is None:
            challenge = {"WWW-Authenticate": 'Basic realm="hotsite"'}
            return httpd.Response(401, b"unauthorized\n", headers=challenge)
        return user

    async def _handle(self, request: httpd.Request, identity: str) -> httpd.Response:
        if request.path not in ("/metrics", "/"):
            return httpd.Response(404, b"try /metrics\n")
        body = await asyncio.to_thread(generate_latest, self.registry)
        return httpd.Response(200, body, CONTENT_TYPE_LATEST)

    def shutdown(self) -> None:
        if not self._loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def server_close(self) -> None:
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()


def tls_context(cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext | None:
    if cert_file is None or key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"metrics.tls_cert_file / tls_key_file: cannot load {cert_file}: {exc}") from None
    return context


def serve(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
    basic_auth_users: Mapping[str, str] | None = None,
    on_outcome: Callable[[str], None] = lambda outcome: None,
) -> MetricsServer:
    server = MetricsServer(
        registry,
        host,
        port,
        tls=tls_context(tls_cert_file, tls_key_file),
        auth=BasicAuth(basic_auth_users) if basic_auth_users else None,
        on_outcome=on_outcome,
    )
    try:
        server.start()
    except OSError as exc:
        raise StartupError(f"metrics listener {host}:{port} cannot be opened: {exc.strerror}") from None
    return server
