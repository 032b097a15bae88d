"""``hotsite witness``: the agent at the third place (the carrier edge), its probe loop and ``/vote``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import ssl
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from appliance import httpd
from appliance.clock import Clock, SystemClock
from appliance.errors import ConfigError, StartupError
from appliance.fields import host_port
from appliance.logs import kv
from failover.witness.metrics import WitnessMetrics
from failover.witness.settings import WitnessSettings, read_token
from failover.witness.vote import (
    MAX_NONCE_CHARS,
    fold_round,
    new_view,
    render_vote,
)
from monitoring.prober import Prober
from monitoring.probes.base import REASONS, ProbeResult
from monitoring.targets import Target

log = logging.getLogger("hotsite.failover.witness")

MAX_HEAD_BYTES = 8 * 1024  # request line + headers
READ_TIMEOUT_S = 5.0  # a client that sends nothing for this long gets 408
MAX_CONNECTIONS = 64  # not yet authenticated; over it the oldest idler is evicted (appliance.httpd)


# ---------------------------------------------------------------------------
# The agent


class WitnessAgent:
    """Probes the primary every ``interval_s`` and serves what it sees.

    Contract: :meth:`start` binds the listener (raising :class:`StartupError`
    if it cannot) and starts the probe loop; :meth:`stop` closes both within
    a second. No request, however malformed, stops the agent: each
    connection's failure stays in that connection and is counted.
    """

    def __init__(
        self,
        settings: WitnessSettings,
        *,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
        prober: Prober | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock or SystemClock()
        self._prober = prober or Prober(clock=self._clock.monotonic)
        self._targets = settings.targets()
        self._policy = settings.thresholds()
        self._token = read_token(settings.token_file).encode("ascii") if settings.token_file else None
        self._tls = _server_tls(settings) if settings.tls_cert_file else None
        self.metrics = WitnessMetrics(registry or CollectorRegistry())
        self.metrics.round_age.set_function(self._round_age)
        self.view = new_view(self._targets, self._clock.time())
        self._server: httpd.BoundedHttpServer | None = None
        self._loop_task: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> None:
        host, port = host_port(self.settings.listen)
        limits = httpd.Limits(
            max_head=MAX_HEAD_BYTES,
            max_body=0,
            head_timeout_s=READ_TIMEOUT_S,
            write_timeout_s=READ_TIMEOUT_S,
            max_pending=MAX_CONNECTIONS,
        )
        self._server = httpd.BoundedHttpServer(
            host,
            port,
            self._handle,
            authenticate=self._authenticate,
            limits=limits,
            tls=self._tls,
            on_outcome=lambda outcome: self.metrics.requests.labels(outcome=outcome).inc(),
            name="witness",
        )
        try:
            await self._server.start()
        except OSError as exc:
            raise StartupError(
                f"witness cannot listen on {self.settings.listen}: {exc.strerror or exc}"
            ) from None
        self._loop_task = asyncio.create_task(self._probe_loop(), name="witness-probes")
        log.info(
            "witness listening",
            extra=kv(
                name=self.settings.name,
                address=self.address_text,
                targets=",".join(t.name for t in self._targets),
                interval_s=self.settings.interval_s,
                tls=self._tls is not None,
                auth="bearer" if self._token is not None else "none",
            ),
        )
        if self._tls is None:
            log.warning("witness serves plain HTTP (allow_plain_http): votes can be read and forged")
        if self._token is None:
            log.warning("witness answers anyone (allow_unauthenticated): no bearer token is required")

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the witness is not listening")
        return self._server.host, self._server.port

    @property
    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.stop()
        await self._prober.close()
        log.info("witness stopped", extra=kv(name=self.settings.name))

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def vote_document(self, nonce: str | None = None) -> dict[str, Any]:
        return render_vote(self.view, name=self.settings.name, now_mono=self._clock.monotonic(), nonce=nonce)

    # -- probing

    async def _probe_loop(self) -> None:
        interval = self.settings.interval_s
        next_at = self._clock.monotonic()
        while True:
            results = await asyncio.gather(*(self._probe(t) for t in self._targets))
            self._fold(results)
            next_at += interval
            now = self._clock.monotonic()
            if next_at < now:  # a round overran (timeout > interval): start the next one now
                next_at = now
            await asyncio.sleep(next_at - now)

    async def _probe(self, target: Target) -> ProbeResult:
        timeout = self.settings.timeout_s
        try:
            # The probe honours its timeout; the extra second guards against one that does not.
            async with asyncio.timeout(timeout + 1.0):
                return await self._prober.probe(target, timeout)
        except TimeoutError:
            reason, detail = "timeout", f"probe overran {timeout:g}s"
        except Exception as exc:  # a probe bug must not stop the witness; it counts as a failure
            log.warning("witness probe failed", extra=kv(target=target.name, error=repr(exc)))
            reason, detail = "error", type(exc).__name__
        return ProbeResult(target.name, False, self._clock.monotonic(), None, None, reason, detail)

    def _fold(self, results: Sequence[ProbeResult]) -> None:
        before = self.view
        self.view = fold_round(
            before, results, self._policy, now_wall=self._clock.time(), now_mono=self._clock.monotonic()
        )
        for result in results:
            reason = result.reason if result.reason in REASONS else "error"
            self.metrics.probes.labels(target=result.target, reason=reason).inc()
        for old, new in zip(before.healths, self.view.healths, strict=True):
            self.metrics.set_target(new.target, new.state)
            if old.state != new.state:
                log.info(
                    "witness target state changed",
                    extra=kv(target=new.target, state=new.state, was=old.state, why=new.why),
                )
        if before.primary_alive != self.view.primary_alive:
            self.metrics.set_primary(self.view.primary_alive)
            self.metrics.primary_changes.inc()
            level = logging.WARNING if self.view.primary_alive is False else logging.INFO
            log.log(
                level,
                "witness view of the primary changed",
                extra=kv(
                    primary_alive=_json_word(self.view.primary_alive), was=_json_word(before.primary_alive)
                ),
            )

    def _round_age(self) -> float:
        if self.view.checked_mono is None:
            return math.nan
        return max(0.0, self._clock.monotonic() - self.view.checked_mono)

    # -- serving

    def _authenticate(self, request: httpd.Request) -> str | httpd.Response | None:
        """Decided on the head alone (appliance.httpd reads no body before this)."""
        head_only = request.method == "HEAD"
        if request.path not in ("/vote", "/metrics"):
            return httpd.Response(404, b"" if head_only else b"try /vote or /metrics\n")
        if request.method not in ("GET", "HEAD"):
            return httpd.Response(405, b"GET only\n", headers={"Allow": "GET, HEAD"})
        if not self._authorized(request.headers.get("authorization", "")):
            challenge = {"WWW-Authenticate": 'Bearer realm="hotsite-witness"'}
            return httpd.Response(401, b"bearer token required\n", headers=challenge)
        return "voter"

    async def _handle(self, request: httpd.Request, identity: str) -> httpd.Response:
        if request.path == "/metrics":
            return httpd.Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        nonce = request.query.get("nonce")
        if nonce is not None and (len(nonce) > MAX_NONCE_CHARS or not nonce.isprintable()):
            return httpd.Response(400, f"nonce: at most {MAX_NONCE_CHARS} printable characters\n".encode())
        body = json.dumps(self.vote_document(nonce), allow_nan=False).encode()
        return httpd.Response(200, body, "application/json")

    def _authorized(self, header: str) -> bool:
        if self._token is None:
            return True
        # Constant time: compare_digest loops over its second argument, the caller's bytes,
        # so the time taken tells nothing about the token, not even its length.
        return hmac.compare_digest(self._token, httpd.bearer(header))


def _json_word(value: bool | None) -> str:
    return json.dumps(value)


def _server_tls(settings: WitnessSettings) -> ssl.SSLContext:
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"witness TLS: cannot load {settings.tls_cert_file} / {settings.tls_key_file}: {exc}"
        ) from None
    return context
