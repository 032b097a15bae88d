"""The witness: a third vantage point that says whether *it* can see the primary.

With two sites, the backup cannot tell "the primary is dead" from "my link
to the primary is cut". ``hotsite witness`` runs at a third place (the
carrier edge, a cloud VM), probes the primary itself with the same probes and
the same rise/fall health model as the daemon, and answers ``GET /vote``:

    {"version": 1, "witness": "edge-1", "primary_alive": true | false | null,
     "since": <unix>, "checked_at": <unix>, "age_s": <seconds>,
     "evidence": [{"target": ..., "state": ..., "reason": ..., "detail": ...}]}

``primary_alive`` is true when any target is judged up (the witness sees the
primary), false only when every target is judged down, null otherwise
(before the first judgement, or while the evidence is still undecided).

``age_s`` is how long ago the last probe round finished, measured on the
witness's own monotonic clock. The appliance judges freshness by it, not by
comparing ``checked_at`` with its own wall clock: two machines' wall clocks
disagree (NTP down at a DR site is exactly when this matters), an elapsed
time does not. ``checked_at`` and ``since`` are for people.

Three parts, each usable alone:

* pure cores: :func:`fold_round` (probe results -> :class:`WitnessView`),
  :func:`render_vote` (view -> the JSON document), :func:`interpret`
  (HTTP status + body -> :class:`~failover.quorum.Vote`);
* :class:`WitnessAgent`: the probe loop and ``/vote``, ``/metrics`` on the bounded
  server of :mod:`appliance.httpd` (head bounded and authenticated before
  anything else, idle connections evicted oldest first so they cannot starve
  voters). A bearer token and TLS are required unless ``allow_unauthenticated``
  / ``allow_plain_http`` say otherwise. ``GET /vote?nonce=N`` echoes ``N`` in
  the document: the voter refuses an answer without its own nonce, so a
  recorded vote cannot be replayed;
* :class:`HttpWitnessVoter`: the appliance's client, a :class:`~failover.quorum.Voter`;
  :func:`voter_from_config` picks it or :class:`~failover.quorum.NullVoter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import secrets
import socket
import ssl
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, Field, ValidationError, model_validator

from appliance import httpd
from appliance.clock import Clock, SystemClock
from appliance.errors import ConfigError, StartupError
from appliance.fields import ListenAddress, ProbeSeconds, ProbeTimeout, Section, host_port
from appliance.logs import kv
from failover.quorum import NullVoter, Vote, Voter
from monitoring.health import TargetHealth, Thresholds, observe
from monitoring.prober import Prober
from monitoring.probes import kinds
from monitoring.probes.base import REASONS, ProbeResult
from monitoring.targets import Target, parse_url

if TYPE_CHECKING:
    from failover.settings import FailoverConfig as Config

log = logging.getLogger("hotsite.witness")

VERSION = 1
MAX_ANSWER_BYTES = 64 * 1024  # a vote is a few hundred bytes; anything huge is not a witness
MAX_DETAIL_CHARS = 300  # the witness's words end up in our logs and audit: keep them short
MAX_HEAD_BYTES = 8 * 1024  # request line + headers
READ_TIMEOUT_S = 5.0  # a client that sends nothing for this long gets 408
MAX_CONNECTIONS = 64  # not yet authenticated; over it the oldest idler is evicted (appliance.httpd)
MAX_NONCE_CHARS = 64
DEFAULT_MAX_AGE_S = 10.0
OUTCOMES = httpd.OUTCOMES
PRIMARY_STATES = ("unknown", "alive", "down")
TARGET_STATES = ("unknown", "up", "down")


# ---------------------------------------------------------------------------
# Settings (the agent's own small TOML file, or the command line)


def _target_url(value: str) -> str:
    target = parse_url(value)  # ValueError names what is wrong and what is expected
    if not kinds.get(target.kind).evidence:
        raise ValueError(f"{value!r}: a witness probes {kinds.url_labels(evidence_only=True)} targets")
    return value


TargetUrl = Annotated[str, AfterValidator(_target_url)]


class WitnessSettings(Section):
    """What ``hotsite witness`` reads from ``--config`` (top-level keys) or its options."""

    name: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$"
    )
    listen: ListenAddress
    primary: list[TargetUrl] = Field(min_length=1, max_length=16)
    interval_s: ProbeSeconds = 1.0
    timeout_s: ProbeTimeout = 0.8
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)
    token_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # TLS and a token by default: plain HTTP or an open /vote only when written here (warned at start).
    allow_plain_http: bool = False
    allow_unauthenticated: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"

    @model_validator(mode="after")
    def _consistent(self) -> WitnessSettings:
        if self.tls_cert_file is None and not self.allow_plain_http:
            raise ValueError(
                "tls_cert_file and tls_key_file are required (the witness serves HTTPS);"
                " set allow_plain_http = true (--allow-plain-http) to serve plain HTTP"
            )
        if self.token_file is None and not self.allow_unauthenticated:
            raise ValueError(
                "token_file is required (voters present a bearer token);"
                " set allow_unauthenticated = true (--allow-unauthenticated) to let anyone ask"
            )
        if self.timeout_s > self.interval_s:
            raise ValueError(f"timeout_s ({self.timeout_s}) must not exceed interval_s ({self.interval_s})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        if len(set(self.primary)) != len(self.primary):
            raise ValueError("primary: the same target URL is listed twice")
        return self

    def targets(self) -> list[Target]:
        return [parse_url(url, display_name(url)) for url in self.primary]

    def thresholds(self) -> Thresholds:
        return Thresholds(rise=self.rise, fall=self.fall)


def load_settings(path: Path | None, overrides: dict[str, Any]) -> WitnessSettings:
    """The TOML file (if any), then the command-line values on top; every mistake at once."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"witness config {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"witness config {path} cannot be read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}", [f"TOML syntax: {exc}"]) from None
    data.update({k: v for k, v in overrides.items() if v not in (None, (), [])})
    try:
        return WitnessSettings.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors(include_url=False)]
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the witness settings", problems) from None


def _describe(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key (known keys: {', '.join(WitnessSettings.model_fields)})"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    value = err.get("input")
    if isinstance(value, dict | list):
        return f"{where}: {message}"
    return f"{where}: {value!r}: {message}"


def read_token(path: Path) -> str:
    """A bearer token from its file: one line of visible ASCII, surrounding whitespace ignored."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"token file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"token file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"token file {path}: expected printable ASCII") from None
    if not token or any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise ConfigError(f"token file {path}: expected one non-empty word of printable ASCII")
    return token


def display_name(url: str) -> str:
    """The URL as shown in evidence and metric labels, without any ``user:password@``."""
    if "://" not in url:
        return url
    netloc = urlsplit(url).netloc
    return url.replace(netloc, netloc.rsplit("@", 1)[1], 1) if "@" in netloc else url


# ---------------------------------------------------------------------------
# Pure core of the agent: probe results -> what the witness believes


@dataclass(frozen=True, slots=True)
class WitnessView:
    """What the witness believes about the primary, and from which evidence."""

    healths: tuple[TargetHealth, ...]
    since: float  # unix time primary_alive took its current value (start time while unknown)
    primary_alive: bool | None = None
    checked_at: float | None = None  # unix time the last probe round finished
    checked_mono: float | None = None  # the same instant on the witness's monotonic clock
    rounds: int = 0


def new_view(targets: Iterable[Target], now_wall: float) -> WitnessView:
    return WitnessView(tuple(TargetHealth(t.name, t.kind) for t in targets), since=now_wall)


def primary_alive(healths: Iterable[TargetHealth]) -> bool | None:
    """True if any target is up; False only if every one is down; otherwise None."""
    states = [h.state for h in healths]
    if "up" in states:
        return True
    if states and all(s == "down" for s in states):
        return False
    return None


def fold_round(
    view: WitnessView, results: Sequence[ProbeResult], policy: Thresholds, *, now_wall: float, now_mono: float
) -> WitnessView:
    """Fold one round of probe results (any subset of the targets) into the view."""
    by_target = {r.target: r for r in results}
    unknown = set(by_target) - {h.target for h in view.healths}
    if unknown:
        raise ValueError(f"results for targets the witness does not probe: {sorted(unknown)}")
    healths = tuple(
        observe(h, by_target[h.target], policy) if h.target in by_target else h for h in view.healths
    )
    alive = primary_alive(healths)
    since = view.since if alive == view.primary_alive else now_wall
    return dataclasses.replace(
        view,
        healths=healths,
        primary_alive=alive,
        since=since,
        checked_at=now_wall,
        checked_mono=now_mono,
        rounds=view.rounds + 1,
    )


def render_vote(view: WitnessView, *, name: str, now_mono: float, nonce: str | None = None) -> dict[str, Any]:
    """The ``GET /vote`` document; ``nonce`` is the voter's, echoed so that a replay is refused."""
    age = None if view.checked_mono is None else max(0.0, now_mono - view.checked_mono)
    return {
        "version": VERSION,
        "nonce": nonce,
        "witness": name,
        "primary_alive": view.primary_alive,
        "since": view.since,
        "checked_at": view.checked_at,
        "age_s": age,
        "evidence": [
            {
                "target": h.target,
                "state": h.state,
                "reason": h.last.reason if h.last is not None else "not_probed",
                "detail": h.why,
            }
            for h in view.healths
        ],
    }


# ---------------------------------------------------------------------------
# Pure core of the voter: the witness's answer -> a Vote


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # JSON allows integers far beyond a float
        return None
    return number if math.isfinite(number) else None


def _clean(text: object, limit: int = MAX_DETAIL_CHARS) -> str:
    """Printable, bounded text from whatever the witness sent."""
    shown = "".join(c if c.isprintable() else "?" for c in str(text))
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _summary(evidence: object) -> str:
    if not isinstance(evidence, list):
        return ""
    items = []
    for item in evidence[:8]:
        if isinstance(item, dict):
            items.append(f"{_clean(item.get('target'), 80)} {_clean(item.get('state'), 10)}")
            reason = item.get("reason")
            if isinstance(reason, str) and reason != "ok":
                items[-1] += f" ({_clean(reason, 20)})"
    return "; ".join(items)


def interpret(
    status: int,
    body: bytes,
    *,
    max_age_s: float,
    rtt_s: float,
    received_mono: float,
    received_wall: float,
    source: str,
    nonce: str | None = None,
) -> Vote:
    """Judge one answer of a witness. Total: any status and any bytes give a Vote.

    With ``nonce`` (the voter's, sent with the request), an answer that does
    not echo exactly it is refused: it was made for another request, i.e.
    replayed.
    """

    def unknown(detail: str) -> Vote:
        return Vote(None, _clean(detail), received_mono, source)

    if status == 401:
        return unknown("witness refused our token (HTTP 401)")
    if status != 200:
        return unknown(f"witness answered HTTP {status}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return unknown("witness answer is not JSON")
    if not isinstance(doc, dict):
        return unknown("witness answer is not a JSON object")
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        return unknown(f"witness speaks version {_clean(version, 20)}, expected {VERSION}")
    name = doc.get("witness")
    if isinstance(name, str) and name:
        source = f"witness:{_clean(name, 64)}"
    if nonce is not None and doc.get("nonce") != nonce:
        return unknown("witness answer does not carry our request's nonce: replayed or forged, refused")
    if "primary_alive" not in doc:
        return unknown("witness answer has no primary_alive")
    alive = doc["primary_alive"]
    if alive is not None and type(alive) is not bool:
        return unknown(f"witness answer has an invalid primary_alive: {_clean(repr(alive), 20)}")
    raw_age = doc.get("age_s")
    age_s = _number(raw_age)
    checked_at = _number(doc.get("checked_at"))
    if raw_age is not None and (age_s is None or age_s < 0):
        return unknown(f"witness answer has an invalid age_s: {_clean(repr(raw_age), 20)}")
    if age_s is not None:
        age = age_s + max(rtt_s, 0.0)  # the answer aged on the way, too
    elif checked_at is not None:
        # A witness that does not say age_s: fall back to wall clocks, which may disagree.
        age = received_wall - checked_at
        if age < -max_age_s:
            return unknown(f"witness clock is more than {max_age_s:g}s ahead of ours; cannot judge freshness")
        age = max(age, 0.0)
    elif alive is None:
        return unknown("witness has not judged the primary yet")
    else:
        return unknown("witness answer says neither age_s nor checked_at")
    if alive is None:
        return unknown("witness cannot tell yet: " + (_summary(doc.get("evidence")) or "no evidence"))
    if age > max_age_s:
        return unknown(f"witness view is stale: older than {max_age_s:g}s")
    evidence = _summary(doc.get("evidence"))
    verdict = "sees the primary" if alive else "sees the primary down"
    # No age in the detail: it stays the same while the view does, so a poller can report changes only.
    detail = f"{source.removeprefix('witness:')} {verdict}" + (f": {evidence}" if evidence else "")
    return Vote(alive, _clean(detail), received_mono - age, source)


# ---------------------------------------------------------------------------
# The agent


class WitnessMetrics:
    """The agent's Prometheus metrics, on the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "hotsite_witness_requests_total",
            "HTTP requests by outcome (bad_request: garbage that was refused).",
            ["outcome"],
            registry=registry,
        )
        self.primary_state = Gauge(
            "hotsite_witness_primary_state",
            "What the witness believes of the primary (one series per state, 1 for the current).",
            ["state"],
            registry=registry,
        )
        self.primary_changes = Counter(
            "hotsite_witness_primary_changes_total",
            "Times the witness's belief about the primary changed.",
            registry=registry,
        )
        self.target_state = Gauge(
            "hotsite_witness_target_state",
            "Judged state of each probe target (one series per state, 1 for the current).",
            ["target", "state"],
            registry=registry,
        )
        self.probes = Counter(
            "hotsite_witness_probes_total",
            "Probes run, by result reason.",
            ["target", "reason"],
            registry=registry,
        )
        self.round_age = Gauge(
            "hotsite_witness_round_age_seconds",
            "Seconds since the last probe round finished (what /vote reports as age_s).",
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.set_primary(None)

    def set_primary(self, alive: bool | None) -> None:
        current = {None: "unknown", True: "alive", False: "down"}[alive]
        for state in PRIMARY_STATES:
            self.primary_state.labels(state=state).set(1 if state == current else 0)

    def set_target(self, target: str, state: str) -> None:
        for candidate in TARGET_STATES:
            self.target_state.labels(target=target, state=candidate).set(1 if candidate == state else 0)


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


# ---------------------------------------------------------------------------
# The appliance's side


class HttpWitnessVoter(Voter):
    """Asks a ``hotsite witness`` agent over HTTP(S) what it sees of the primary.

    Contract (:class:`~failover.quorum.Voter`): :meth:`vote` returns within
    ``timeout_s`` (plus scheduling noise) and never raises, except
    ``CancelledError`` when its caller is cancelled. An unreachable, slow,
    refusing, confused or stale witness gives ``Vote(None, detail)``. Stale
    means the witness's own ``age_s`` (its monotonic clock, plus our round
    trip) exceeds ``max_age_s``; wall clocks are compared only if an answer
    lacks ``age_s``. Set ``max_age_s`` above the witness's interval + timeout.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_age_s: float,
        clock: Clock,
        token: str | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"{url!r}: expected an http:// or https:// URL")
        if timeout_s <= 0 or max_age_s <= 0:
            raise ValueError("timeout_s and max_age_s must be > 0")
        self.url = url
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._source = f"witness:{urlsplit(url).netloc.rsplit('@', 1)[-1]}"
        headers = {"Accept": "application/json", "User-Agent": "hotsite"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            verify=verify, follow_redirects=False, headers=headers, timeout=timeout_s, trust_env=False
        )

    async def vote(self) -> Vote:
        started = self._clock.monotonic()
        nonce = secrets.token_urlsafe(16)
        try:
            async with asyncio.timeout(self.timeout_s):
                status, body = await self._fetch(nonce)
        except TimeoutError:
            return self._unknown(f"witness did not answer within {self.timeout_s:g}s")
        except httpx.TimeoutException:
            return self._unknown(f"witness did not answer within {self.timeout_s:g}s")
        except httpx.ConnectError as exc:
            return self._unknown(f"witness unreachable: {exc or type(exc).__name__}")
        except _TooLarge:
            return self._unknown(f"witness answer larger than {MAX_ANSWER_BYTES} bytes")
        except Exception as exc:  # the contract: never raise; say what happened instead
            return self._unknown(f"witness request failed: {type(exc).__name__}: {exc}")
        now = self._clock.monotonic()
        try:
            return interpret(
                status,
                body,
                max_age_s=self.max_age_s,
                rtt_s=now - started,
                received_mono=now,
                received_wall=self._clock.time(),
                source=self._source,
                nonce=nonce,
            )
        except Exception as exc:  # interpret is total by design; this is the contract's backstop
            return self._unknown(f"witness answer could not be judged: {type(exc).__name__}")

    async def _fetch(self, nonce: str) -> tuple[int, bytes]:
        async with self._client.stream("GET", self.url, params={"nonce": nonce}) as response:
            chunks, size = [], 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise _TooLarge
                chunks.append(chunk)
            return response.status_code, b"".join(chunks)

    def _unknown(self, detail: str) -> Vote:
        return Vote(None, _clean(detail), self._clock.monotonic(), self._source)

    async def close(self) -> None:
        await self._client.aclose()


class _TooLarge(Exception):
    pass


def voter_from_config(config: Config, *, clock: Clock | None = None) -> Voter:
    """The configured voter: :class:`HttpWitnessVoter`, or :class:`NullVoter` without a witness.

    Reads ``failover.witness`` and ``failover.witness_timeout_s``, and, when the
    schema has them, ``witness_token_file``, ``witness_ca_file`` and
    ``witness_max_age_s`` (default 10 s). Raises :class:`ConfigError` if the
    token or CA file cannot be read: better refused at start than a witness
    that silently never agrees.
    """
    section = config.failover
    clock = clock or SystemClock()
    if section.witness is None:
        return NullVoter(clock)
    token_file: Path | None = getattr(section, "witness_token_file", None)
    ca_file: Path | None = getattr(section, "witness_ca_file", None)
    max_age_s = float(getattr(section, "witness_max_age_s", DEFAULT_MAX_AGE_S))
    verify: bool | ssl.SSLContext = True
    if ca_file is not None:
        try:
            verify = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"failover.witness_ca_file: cannot load {ca_file}: {exc}") from None
    return HttpWitnessVoter(
        section.witness,
        timeout_s=section.witness_timeout_s,
        max_age_s=max_age_s,
        clock=clock,
        token=read_token(token_file) if token_file is not None else None,
        verify=verify,
    )
