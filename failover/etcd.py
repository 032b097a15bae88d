"""Coordination through etcd: one leader per routing domain, fencing tokens from etcd revisions.

Past one appliance, "which appliance may move routing" must live in a proven
consensus store, not in code of our own. Each appliance holds a **session
lease** (etcd v3 lease, ``ttl_s``) and tries to create the leader key
``/hotsite/<domain>/leader`` under it with a transaction that succeeds only if
the key does not exist (compare ``create_revision == 0``). The one that
created it is the leader until its lease expires or it revokes it; the key's
``create_revision`` is the **fencing token** handed to the actuators.
The pure lease state and its timing rules are in :mod:`failover.lease`.

The client: etcd's v3 JSON gateway (``/v3/kv/txn``, ``/v3/lease/grant``…),
the documented HTTP form of the gRPC API that etcd 3.4 and 3.5 serve on
their client URLs, spoken with ``httpx`` (already a dependency). This is what
Patroni's own etcd3 backend does: no gRPC/protobuf stack pinned to old
versions (``etcd3`` pins protobuf 3), no hand-written wire protocol.

Pieces, each usable alone:

* :class:`Gateway`: one JSON call with endpoint failover, TLS, authentication;
  raises :class:`EtcdUnavailable` (nothing clear came back) or :class:`EtcdError`.
* :class:`EtcdLease`: the election loop for one domain; :meth:`~EtcdLease.leadership`
  never raises and answers from memory.
* :class:`EtcdVoter`: the :class:`~failover.quorum.Voter` face: only the leader
  passes on its inner voter's word; everyone else votes "unknown" and says why.
* :class:`Fence` and :class:`FencedActuator`: every ``apply`` first checks the
  lease, swaps the engine's epoch for the etcd token, and is cut off when the
  lease view would expire. A new leader re-reads the real routing once before
  its first action (``on_takeover``).
* :class:`EtcdCoordination`: the wiring object for the daemon.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.errors import ConfigError, HotsiteError
from appliance.logs import kv
from failover import lease as core
from failover.actuators.base import Actuator, ActuatorError, StaleToken
from failover.peers import PeerViews
from failover.quorum import NullVoter, Vote, Voter
from failover.routing import Routing

if TYPE_CHECKING:
    from failover.settings import CoordinationSection
    from failover.settings import FailoverConfig as Config

log = logging.getLogger("hotsite.etcd")

MAX_ANSWER_BYTES = 1024 * 1024
MIN_MEMBERS_FOR_AUTO = 3
TAKEOVER_RETRY_S = 1.0  # a takeover that could not fence every actuator is retried this often
OPS = ("grant", "keepalive", "txn", "range", "put", "revoke", "members", "auth", "status")
ETCD_EXPIRY_SWEEP_S = 0.5  # etcd's lessor revokes expired leases on this period
HEALTH_INTERVAL_S = 10.0  # how often every member is asked for its own status


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME: like monotonic, but it also counts a suspended machine.

    A lease view must age while the appliance (or its VM) is suspended, or a
    resumed former leader would believe its lease still fresh.
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class EtcdError(HotsiteError):
    """etcd answered, and the answer was an error (one line: etcd's own message)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint gave a clear answer in time (unreachable, timed out, no quorum)."""


class NotLeader(ActuatorError):
    """An actuator call was refused: this appliance does not hold the lease (or cannot tell)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8", errors="replace")


def _int(value: Any, default: int = 0) -> int:
    """etcd's JSON gives int64 as strings and omits zero values."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------------------------------
# The config check


def problems(config: Config) -> list[str]:
    """Cross checks of ``[coordination]`` the schema cannot make alone (``hotsite config check``)."""
    section = getattr(config, "coordination", None)
    if section is None or section.backend != "etcd":
        return []
    found = []
    if config.failover.policy == "auto" and len(section.endpoints) < MIN_MEMBERS_FOR_AUTO:
        found.append(
            f"coordination.endpoints: {len(section.endpoints)} etcd member(s) but failover.policy is 'auto':"
            f" automatic failover needs a cluster of at least {MIN_MEMBERS_FOR_AUTO} members"
            " (a majority that survives the loss of one site); list every member, or use policy 'confirm'"
        )
    for name, actuator in config.actuators.items():
        need = min(float(getattr(actuator, "timeout_s", 5.0)), config.failover.step_timeout_s)
        problem = core.apply_bound_problem(section.ttl_s, need)
        if problem:
            found.append(
                f"actuators.{name}.timeout_s: {problem} with coordination.ttl_s {section.ttl_s};"
                f" lower timeout_s (or failover.step_timeout_s) or raise coordination.ttl_s"
            )
    tls_files = section.ca_file or section.cert_file
    plain = [url for url in section.endpoints if url.lower().startswith("http://")]
    if tls_files and plain:
        found.append(f"coordination.endpoints: TLS files are given but {plain[0]!r} is plain http://")
    return found


def takeover_bound_s(section: CoordinationSection) -> float:
    """The longest a standby waits for the lease when the lost site held the lease *and* etcd's raft leader.

    The majority first notices the raft leader is gone and elects a new one
    (one to two election timeouts, randomised, plus a vote round); the new raft
    leader then extends every lease by one election timeout (etcd's lessor
    ``Promote``), so the old leader's lease outlives the cut by up to
    TTL + 3 election timeouts; etcd removes expired leases every 0.5 s, and the
    standby takes the key at its next retry (one request).
    """
    election = section.etcd_election_ms / 1000
    return section.ttl_s + 3 * election + ETCD_EXPIRY_SWEEP_S + section.retry_s + section.request_timeout_s


def warnings(config: Config) -> list[str]:
    """What ``hotsite config check`` says about ``[coordination]`` without refusing it."""
    section = getattr(config, "coordination", None)
    if section is None or section.backend != "etcd":
        return []
    bound = takeover_bound_s(section)
    return [
        f"coordination: a takeover can take up to {bound:.1f}s, not ttl_s ({section.ttl_s}s), when the lost"
        " site held both the lease and etcd's raft leader: etcd elects a new raft leader (up to"
        f" 2 x etcd_election_ms {section.etcd_election_ms}) and then extends every lease by one"
        " election timeout (failover/MULTISITE.md, Timings)"
    ]


def read_credentials(path: Path) -> tuple[str, str]:
    """``user:password`` from its file (one line; surrounding whitespace ignored)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"coordination.credentials_file: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"coordination.credentials_file: {path} cannot be read: {exc.strerror}") from None
    user, sep, password = text.partition(":")
    if not sep or not user or not password or "\n" in text:
        raise ConfigError(f"coordination.credentials_file: {path}: expected one line 'user:password'")
    return user, password


def tls_context(section: CoordinationSection) -> ssl.SSLContext | bool:
    if section.ca_file is None and section.cert_file is None:
        return True
    try:
        context = ssl.create_default_context(cafile=str(section.ca_file) if section.ca_file else None)
        if section.cert_file is not None and section.key_file is not None:
            context.load_cert_chain(section.cert_file, section.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"coordination: cannot load the TLS files: {exc}") from None
    return context


# ---------------------------------------------------------------------------------------
# The gateway client


class Gateway:
    """JSON calls to etcd's v3 gateway, trying each endpoint in turn within one time budget.

    Contract: :meth:`call` returns etcd's JSON answer or raises :class:`EtcdError`
    (etcd refused: bad request, lease not found…) or :class:`EtcdUnavailable`
    (no clear answer from any endpoint within ``timeout_s``). Nothing else escapes
    except ``CancelledError``. The endpoint that answered last is tried first
    next time.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float = 1.0,
        verify: ssl.SSLContext | bool = True,
        credentials: tuple[str, str] | None = None,
        observe: Callable[[str, float], None] = lambda op, seconds: None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = timeout_s
        self._credentials = credentials
        self._auth_token: str | None = None
        self._current = 0
        self._observe = observe
        self._client = httpx.AsyncClient(verify=verify, timeout=timeout_s, trust_env=False)

    async def call(self, op: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._call(path, body)
        except TimeoutError:
            _cancelled_meanwhile()
            raise EtcdUnavailable(f"no etcd answer to {path} within {self.timeout_s:g}s") from None
        finally:
            self._observe(op, time.monotonic() - started)

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The last endpoint that answered gets half the budget, the others share the rest.

        A member cut off by a partition does not refuse connections, it black-holes
        them: given the whole budget, it would starve the members that could answer.
        """
        errors = []
        n = len(self.endpoints)
        start = self._current
        deadline = time.monotonic() + self.timeout_s
        for i in range(n):
            index = (start + i) % n
            endpoint = self.endpoints[index]
            left = deadline - time.monotonic()
            share = left / 2 if i == 0 and n > 1 else left / (n - i)
            try:
                async with asyncio.timeout(share):
                    answer = await self._post(endpoint, path, body)
            except TimeoutError:
                _cancelled_meanwhile()
                errors.append(f"{endpoint}: no answer within {share:.2g}s")
                continue
            except EtcdUnavailable as exc:
                errors.append(f"{endpoint}: {exc}")
                continue
            self._current = index
            return answer
        self._current = (start + 1) % len(self.endpoints)  # next time, begin elsewhere
        raise EtcdUnavailable("; ".join(errors))

    async def _post(self, endpoint: str, path: str, body: dict[str, Any], retry_auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._credentials is not None and path != "/v3/auth/authenticate":
            if self._auth_token is None:
                await self._authenticate(endpoint)
            assert self._auth_token is not None
            headers["Authorization"] = self._auth_token
        try:
            response = await self._client.post(endpoint + path, content=json.dumps(body), headers=headers)
        except httpx.HTTPError as exc:
            raise EtcdUnavailable(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            ) from None
        if len(response.content) > MAX_ANSWER_BYTES:
            raise EtcdUnavailable(f"answer larger than {MAX_ANSWER_BYTES} bytes")
        try:
            doc = response.json()
        except ValueError:
            raise EtcdUnavailable(f"HTTP {response.status_code}, not JSON") from None
        if not isinstance(doc, dict):
            raise EtcdUnavailable("answer is not a JSON object")
        if "error" in doc or response.status_code != 200:
            message = str(doc.get("message") or doc.get("error") or f"HTTP {response.status_code}")
            code = _int(doc.get("code"), -1)
            if code == 16 and retry_auth and self._credentials is not None:  # token expired: log in again
                self._auth_token = None
                return await self._post(endpoint, path, body, retry_auth=False)
            # 14 unavailable, 4 deadline, "no leader" / "timed out": the member cannot answer for the cluster.
            if (
                code in (4, 14)
                or "timed out" in message
                or "no leader" in message
                or response.status_code >= 500
            ):
                raise EtcdUnavailable(message[:300])
            raise EtcdError(message[:300], code)
        return doc

    async def _authenticate(self, endpoint: str) -> None:
        assert self._credentials is not None
        user, password = self._credentials
        doc = await self._post(endpoint, "/v3/auth/authenticate", {"name": user, "password": password})
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdError("etcd authentication gave no token")
        self._auth_token = token

    # -- the few calls the lease needs ------------------------------------------------

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        doc = await self.call("grant", "/v3/lease/grant", {"TTL": ttl_s, "ID": 0})
        return _int(doc.get("ID")), _int(doc.get("TTL"))

    async def keepalive(self, lease_id: int) -> int:
        """The lease's TTL after renewal; 0 if etcd no longer knows it."""
        doc = await self.call("keepalive", "/v3/lease/keepalive", {"ID": str(lease_id)})
        result = doc.get("result")
        return _int(result.get("TTL")) if isinstance(result, dict) else 0

    async def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdError):  # already gone is fine
            await self.call("revoke", "/v3/kv/lease/revoke", {"ID": str(lease_id)})

    async def create_if_absent(self, key: str, value: str, lease_id: int) -> tuple[bool, dict[str, Any]]:
        """Compare-create: (True, {revision}) if we created ``key``; else (False, the existing kv or {})."""
        k = _b64(key)
        doc = await self.call(
            "txn",
            "/v3/kv/txn",
            {
                "compare": [{"target": "CREATE", "key": k, "create_revision": "0", "result": "EQUAL"}],
                "success": [{"request_put": {"key": k, "value": _b64(value), "lease": str(lease_id)}}],
                "failure": [{"request_range": {"key": k}}],
            },
        )
        if doc.get("succeeded"):
            return True, {"create_revision": _int(doc.get("header", {}).get("revision"))}
        responses = doc.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs") or []
        return False, _kv(kvs[0]) if kvs else {}

    async def get(self, key: str) -> dict[str, Any]:
        doc = await self.call("range", "/v3/kv/range", {"key": _b64(key)})
        kvs = doc.get("kvs") or []
        return _kv(kvs[0]) if kvs else {}

    async def put(self, key: str, value: str, lease_id: int) -> int:
        """Write ``key`` attached to ``lease_id`` (it vanishes with the lease); returns the revision."""
        doc = await self.call(
            "put", "/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease_id)}
        )
        return _int(doc.get("header", {}).get("revision"))

    async def get_prefix(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every key under ``prefix`` with its kv (at most 1,000: one per appliance is plenty)."""
        raw = prefix.encode()
        end = raw[:-1] + bytes([raw[-1] + 1])
        doc = await self.call(
            "range",
            "/v3/kv/range",
            {"key": _b64(prefix), "range_end": base64.b64encode(end).decode("ascii"), "limit": 1000},
        )
        return [(_unb64(item.get("key", "")), _kv(item)) for item in doc.get("kvs") or []]

    async def member_status(self, endpoint: str, timeout_s: float) -> dict[str, Any]:
        """One member's own status (``/v3/maintenance/status``), asked of that member only.

        Raises :class:`EtcdUnavailable` when it does not answer within ``timeout_s``.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                doc = await self._post(endpoint.rstrip("/"), "/v3/maintenance/status", {})
        except TimeoutError:
            _cancelled_meanwhile()
            raise EtcdUnavailable(f"{endpoint}: no answer within {timeout_s:g}s") from None
        finally:
            self._observe("status", time.monotonic() - started)
        header = doc.get("header") or {}
        return {
            "member_id": str(header.get("member_id", "")),
            "leader": str(doc.get("leader", "0")),
            "raft_term": _int(doc.get("raftTerm")),
            "db_size_bytes": _int(doc.get("dbSize")),
            "errors": [str(e)[:200] for e in doc.get("errors") or []][:5],
        }

    async def members(self) -> list[str]:
        doc = await self.call("members", "/v3/cluster/member/list", {})
        return [str(m.get("name") or m.get("ID")) for m in doc.get("members") or []]

    async def close(self) -> None:
        await self._client.aclose()


def _kv(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "create_revision": _int(raw.get("create_revision")),
        "mod_revision": _int(raw.get("mod_revision")),
        "lease": _int(raw.get("lease")),
        "value": _unb64(raw.get("value", "")),
    }


def _holder(kv_: dict[str, Any]) -> str:
    try:
        doc = json.loads(kv_.get("value", ""))
        return str(doc.get("appliance", "?"))[:64] if isinstance(doc, dict) else "?"
    except ValueError:
        return "?"


# ---------------------------------------------------------------------------------------
# The election loop


class EtcdLease:
    """Holds or waits for the leader key of one routing domain.

    Contract: :meth:`leadership` and :meth:`may_act` answer from memory, never
    raise, never block. :meth:`run` loops until cancelled: a leader renews its
    lease every ``ttl_s / 3`` and re-reads the key; a standby tries the
    compare-create every ``retry_s``. Any unclear answer demotes at once
    (role "unknown"); a clear "the key is someone else's" demotes to "follower".
    A starting appliance is never leader until etcd says so: a former leader
    that comes back starts passive.
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        domain: str,
        appliance: str,
        ttl_s: int = 10,
        retry_s: float = 0.5,
        site: str = "",
        clock: Callable[[], float] = boottime,
        prefix: str = "/hotsite",
    ) -> None:
        self.gateway = gateway
        self.key = f"{prefix}/{domain}/leader"
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.margin_s = core.default_margin(ttl_s)
        self.site = site
        self._clock = clock
        self.state = core.LeaseState(domain=domain, me=appliance, since=clock())
        self.changed = asyncio.Event()  # set whenever the role or token changes
        self._listeners: list[Callable[[core.LeaseState], None]] = []
        self._last_renew = -1e18
        self._cycle_lock = asyncio.Lock()
        self.refreshes = 0  # renewals made because an apply needed more of the lease than was left

    # -- views ---------------------------------------------------------------------------
    def now(self) -> float:
        return self._clock()

    def may_act(self) -> bool:
        return core.may_act(self.state, self._clock())

    def leadership(self) -> core.LeaseState:
        """The current view, demoted to "unknown" if the lease view ran out since the last cycle."""
        state, now = self.state, self._clock()
        if state.role == "leader" and now >= state.valid_until:
            return core.unreachable(state, "lease view expired before it could be renewed", now)
        return state

    def on_change(self, listener: Callable[[core.LeaseState], None]) -> None:
        self._listeners.append(listener)

    def _set(self, new: core.LeaseState) -> None:
        old, self.state = self.state, new
        if (old.role, old.token) != (new.role, new.token):
            level = logging.WARNING if old.role == "leader" or new.role == "unknown" else logging.INFO
            log.log(
                level,
                "coordination role changed",
                extra=kv(domain=new.domain, role=new.role, was=old.role, token=new.token, detail=new.detail),
            )
            self.changed.set()
            for listener in self._listeners:
                try:
                    listener(new)
                except Exception:  # a listener's bug must not stop the election loop
                    log.exception("coordination listener failed")

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self.cycle()
            # cycle() turns every failure into "unreachable", and a cancellation that
            # lands while httpx is mid-request can come back as an error instead: never
            # let that keep a cancelled loop alive (a stop would wait for it forever).
            _cancelled_meanwhile()
            leader = self.state.role == "leader"
            await asyncio.sleep(self.ttl_s / 3 if leader else self.retry_s)

    async def refresh(self) -> None:
        """Renew now (a leader: keep-alive, then read the key back), for an action the view is too short for.

        Never raises (like :meth:`cycle`); the new view is in :meth:`leadership`.
        """
        self.refreshes += 1
        await self.cycle()

    async def cycle(self) -> None:
        """One round: get or renew the session lease, then take or check the leader key."""
        async with self._cycle_lock:  # the loop and a refresh never interleave their requests
            await self._guarded_cycle()

    async def _guarded_cycle(self) -> None:
        try:
            await self._cycle()
        except EtcdError as exc:
            self._set(core.unreachable(self.state, str(exc), self._clock()))
        except Exception as exc:  # the contract: the loop survives anything and demotes
            log.exception("coordination cycle failed")
            self._set(core.unreachable(self.state, f"{type(exc).__name__}: {exc}", self._clock()))

    async def _cycle(self) -> None:
        now = self._clock()
        if self.state.lease_id is None:
            new_id, ttl = await self.gateway.grant(self.ttl_s)
            self._last_renew = now
            self._set(core.granted(self.state, new_id, ttl, sent_at=now, margin_s=self.margin_s))
        elif (
            self.state.role != "follower"
            or now - self._last_renew >= self.ttl_s / 3
            or now >= self.state.valid_until - self.ttl_s / 3
        ):
            ttl = await self.gateway.keepalive(self.state.lease_id)
            self._last_renew = now
            self._set(core.renewed(self.state, ttl, sent_at=now, margin_s=self.margin_s, now=self._clock()))
            if self.state.lease_id is None:  # expired on the server: a new one next cycle
                return
        lease_id = self.state.lease_id
        assert lease_id is not None
        value = json.dumps({"appliance": self.state.me, "site": self.site, "lease": lease_id})
        created, found = await self.gateway.create_if_absent(self.key, value, lease_id)
        now = self._clock()
        if created or found and found["lease"] == lease_id:
            self._set(core.acquired(self.state, found["create_revision"], now=now))
        elif found:
            self._set(core.held_by(self.state, _holder(found), found["create_revision"], now=now))
        else:  # deleted between compare and read: nobody; try again next cycle
            self._set(core.held_by(self.state, None, None, now=now))

    async def release(self) -> None:
        """Clean stop: revoke the lease so a standby takes over at once, not after the TTL."""
        lease_id = self.state.lease_id
        self._set(core.released(self.state, self._clock()))
        if lease_id is not None:
            with contextlib.suppress(EtcdError):
                await self.gateway.revoke(lease_id)


# ---------------------------------------------------------------------------------------
# The Voter face


class EtcdVoter(Voter):
    """Only the leader's vote counts: a standby or an appliance cut from etcd votes "unknown".

    ``inner`` is what the leader believes about the primary (the witness, or
    :class:`~failover.quorum.NullVoter`). Contract of :class:`Voter`: never raises.
    """

    def __init__(
        self,
        lease: EtcdLease,
        inner: Voter | None = None,
        *,
        members_ok: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.lease = lease
        self.inner = inner or NullVoter()
        self.timeout_s = self.inner.timeout_s
        self._members_ok = members_ok

    async def vote(self) -> Vote:
        try:
            state = self.lease.leadership()
            at = self.lease.now()
            if state.role != "leader":
                return Vote(None, f"etcd: {state.detail}", at, "etcd")
            problem = self._members_ok()
            if problem:
                return Vote(None, f"etcd: {problem}", at, "etcd")
            vote = await self.inner.vote()
            if not self.lease.may_act():  # the lease ran out while we asked
                return Vote(None, "etcd: leadership lapsed during the vote", at, "etcd")
            return Vote(
                vote.primary_alive, f"leader (token {state.token}); {vote.detail}", vote.at, vote.source
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Vote(None, f"etcd voter failed: {type(exc).__name__}", 0.0, "etcd")

    async def close(self) -> None:
        await self.inner.close()


# ---------------------------------------------------------------------------------------
# Fencing at the actuators


# Called with (observed routing, token) once a new leader has fenced the actuators and
# re-read the real routing. It may return (or resolve to) the engine's epoch after adopting
# what it found: decisions taken at an older epoch are then never carried out by this appliance.
Takeover = Callable[[str, int], Awaitable[int | None] | int | None]


class Fence:
    """The gate every actuator call of this appliance passes.

    * refuses (:class:`NotLeader`) unless the lease is held and fresh;
    * once per new token, before the first action, **takes over**: presents the
      token to every actuator (``fence``), so the world refuses anything older
      from then on, *then* reads the real routing back (``verify`` against each
      known routing) and hands the result to ``on_takeover(observed, token)``.
      Fencing first means a former leader's write that a pause held in flight
      cannot land after (or during) the re-read: the re-read sees a world that
      no older leader can change any more. A takeover that cannot fence every
      actuator is not complete: nothing is acted on, and it is tried again;
    * returns the token (the leader key's create revision) and the time left.
    """

    def __init__(
        self,
        lease: EtcdLease,
        routings: Callable[[], dict[str, Routing]],
        *,
        on_takeover: Takeover | None = None,
        record: Callable[[str, str, dict[str, Any]], None] = lambda kind, message, data: None,
        step_timeout_s: float | None = None,
    ) -> None:
        self.lease = lease
        self.step_timeout_s = step_timeout_s
        self.routings = routings
        self.on_takeover = on_takeover
        self.record = record
        self.actuators: list[Actuator] = []
        self.verified_token: int | None = None
        self.fenced_token: int | None = None
        self.observed: str | None = None
        self.fence_error: str | None = None  # why the last takeover could not fence, for the status
        self.min_epoch = 0  # engine decisions older than the last takeover are refused
        self._lock = asyncio.Lock()

    def need_s(self, actuator: Actuator) -> float:
        """How much of the lease an apply of ``actuator`` may use: its timeout (or the runbook step's)."""
        if actuator.local_only:
            return 0.0
        if self.step_timeout_s is None:
            return actuator.timeout_s
        return min(actuator.timeout_s, self.step_timeout_s)

    async def admit(self, need_s: float = 0.0) -> tuple[int, float]:
        """The token and the time left, for an action that may take ``need_s``; else NotLeader.

        An action starts only on a fresh lease: one whose view outlasts ``need_s``
        (:func:`failover.lease.may_apply`). When less is left, the lease is renewed
        first; if the renewal fails or still leaves too little, nothing is done.
        """
        state = self.lease.leadership()
        if not self.lease.may_act() or state.token is None:
            raise NotLeader(f"not acting: {state.detail}")
        if state.token != self.verified_token:
            async with self._lock:
                if state.token != self.verified_token:
                    await self.take_over(state.token)
        if not core.may_apply(self.lease.leadership(), self.lease.now(), need_s):
            await self.lease.refresh()
        state = self.lease.leadership()
        if not self.lease.may_act() or state.token is None or state.token != self.verified_token:
            raise NotLeader(f"not acting: leadership changed while taking over or renewing ({state.detail})")
        left = state.valid_until - self.lease.now()
        if not core.may_apply(state, self.lease.now(), need_s):
            why = f"the lease view has {left:.2f}s left after a renewal, an apply may take {need_s:g}s"
            raise NotLeader(f"not acting: {why}")
        return state.token, left

    async def take_over(self, token: int) -> str:
        """Fence every actuator with ``token``, then re-read the routing; NotLeader if fencing fails."""
        await self.fence_all(token)
        return await self.reverify(token)

    async def fence_all(self, token: int) -> None:
        """Present ``token`` to every actuator: from now on the world refuses older ones."""
        for actuator in self.actuators:
            try:
                async with asyncio.timeout(actuator.timeout_s):
                    await actuator.fence(token)
            except (ActuatorError, TimeoutError) as exc:
                _cancelled_meanwhile()
                stale = isinstance(exc, StaleToken)
                why = str(exc) or f"{actuator.name}: fence took longer than {actuator.timeout_s:g}s"
                self.fence_error = why
                log.warning(
                    "takeover: cannot fence", extra=kv(token=token, actuator=actuator.name, error=why)
                )
                self.record(
                    "coordination.fence_failed",
                    f"leader with token {token} could not fence {actuator.name}: {why}",
                    {"token": token, "actuator": actuator.name, "error": why, "stale": stale},
                )
                prefix = "a newer leader already fenced" if stale else "cannot fence"
                raise NotLeader(f"not acting: {prefix} {actuator.name}: {why}") from None
        self.fenced_token = token
        self.fence_error = None
        self.record(
            "coordination.fenced",
            f"leader with token {token} fenced {len(self.actuators)} actuator(s)",
            {"token": token, "actuators": [a.name for a in self.actuators]},
        )

    async def reverify(self, token: int) -> str:
        """Which known routing the real world holds: a name, "mixed" or "unreadable"."""
        observed = "mixed"
        try:
            for name, routing in self.routings().items():
                differences: list[str] = []
                for actuator in self.actuators:
                    async with asyncio.timeout(actuator.timeout_s):
                        differences += await actuator.verify(routing)
                if not differences:
                    observed = name
                    break
        except (ActuatorError, TimeoutError) as exc:
            observed = "unreadable"
            log.warning("takeover: cannot read the real routing", extra=kv(error=str(exc)))
        self.observed = observed
        self.record(
            "coordination.takeover",
            f"leader with token {token}: the real routing is {observed}",
            {"token": token, "observed": observed},
        )
        log.warning("takeover: re-read the real routing", extra=kv(token=token, observed=observed))
        if self.on_takeover is not None:
            result = self.on_takeover(observed, token)
            if inspect.isawaitable(result):
                try:
                    async with asyncio.timeout(self.lease.ttl_s):
                        result = await result
                except TimeoutError:
                    _cancelled_meanwhile()
                    why = f"the engine did not take the takeover within {self.lease.ttl_s}s"
                    raise NotLeader(f"not acting: {why}") from None
            if isinstance(result, int):
                self.min_epoch = max(self.min_epoch, result)
        self.verified_token = token
        return observed

    def wrap(self, actuators: Sequence[Actuator]) -> list[Actuator]:
        self.actuators = list(actuators)
        return [FencedActuator(a, self) for a in actuators]


class FencedActuator(Actuator):
    """An actuator that acts only for the lease holder, with the lease's token, within the lease.

    ``apply``/``rollback``: the engine's epoch is replaced by the etcd token
    (a later leader always has a larger one); the call is cancelled when the
    lease view would expire (:class:`ActuatorError`); a call decided at an
    engine epoch older than this appliance's last takeover is refused
    (:class:`NotLeader`). ``verify`` only reads and is passed through for anyone.
    """

    def __init__(self, inner: Actuator, gate: Fence) -> None:
        self.inner = inner
        self.gate = gate
        self.name = inner.name
        self.timeout_s = inner.timeout_s
        self.last_token: int | None = None

    async def apply(self, routing: Routing, token: int) -> None:
        fencing_token, left = await self.gate.admit(self.gate.need_s(self.inner))
        if token < self.gate.min_epoch:
            # Decided before this appliance took over and re-read the real routing (a reconcile
            # or runbook that was already under way): the engine decides again from what is.
            raise NotLeader(
                f"{self.name}: not carried out: decided at epoch {token}, before this appliance took"
                f" over and re-read the routing (epoch {self.gate.min_epoch})"
            )
        try:
            async with asyncio.timeout(left):
                await self.inner.apply(routing, fencing_token)
        except TimeoutError:
            _cancelled_meanwhile()
            raise ActuatorError(
                f"{self.name}: stopped: the lease view expired during the call (token {fencing_token})"
            ) from None
        self.last_token = fencing_token

    async def verify(self, routing: Routing) -> list[str]:
        return await self.inner.verify(routing)

    async def fence(self, token: int) -> None:
        """Fence the inner actuator with the lease's token (the engine's epoch is not a fencing token)."""
        fencing_token, _ = await self.gate.admit()
        await self.inner.fence(fencing_token)

    async def close(self) -> None:
        await self.inner.close()


# ---------------------------------------------------------------------------------------
# The daemon's wiring object


def _cancelled_meanwhile() -> None:
    """A timeout and a cancellation can land together; the cancellation must win.

    Otherwise it comes back as an ordinary error, a retry loop swallows it, and
    whoever cancelled (a stop, a shutdown) waits forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class CoordinationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "hotsite_coordination_leader", "1 while this appliance holds the lease", registry=registry
        )
        self.reachable = Gauge(
            "hotsite_coordination_reachable", "1 while etcd answers clearly", registry=registry
        )
        self.token = Gauge("hotsite_coordination_token", "Fencing token held (0: none)", registry=registry)
        self.members = Gauge(
            "hotsite_coordination_members", "etcd cluster members last listed", registry=registry
        )
        self.changes = Counter(
            "hotsite_coordination_role_changes_total", "Role changes", ["role"], registry=registry
        )
        self.member_up = Gauge(
            "hotsite_coordination_etcd_member_up",
            "1 while this etcd member answers its status with a raft leader and no alarm",
            ["endpoint"],
            registry=registry,
        )
        self.healthy = Gauge(
            "hotsite_coordination_etcd_members_healthy",
            "etcd members that answered healthy at the last check",
            registry=registry,
        )
        self.has_leader = Gauge(
            "hotsite_coordination_etcd_has_leader",
            "1 while a healthy member names a raft leader",
            registry=registry,
        )
        self.latency = Histogram(
            "hotsite_coordination_request_seconds",
            "etcd gateway round trips",
            ["op"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )

    def observe(self, op: str, seconds: float) -> None:
        self.latency.labels(op=op if op in OPS else "other").observe(seconds)

    def update(self, state: core.LeaseState) -> None:
        self.leader.set(1 if state.role == "leader" else 0)
        self.reachable.set(1 if state.reachable else 0)
        self.token.set(state.token or 0)
        self.changes.labels(role=state.role).inc()


class EtcdCoordination:
    """Everything the daemon needs for ``[coordination] backend = "etcd"``."""

    def __init__(
        self,
        section: CoordinationSection,
        *,
        appliance: str,
        site: str = "",
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = boottime,
    ) -> None:
        self.section = section
        self.metrics = CoordinationMetrics(registry or CollectorRegistry())
        credentials = read_credentials(section.credentials_file) if section.credentials_file else None
        self.gateway = Gateway(
            section.endpoints,
            timeout_s=section.request_timeout_s,
            verify=tls_context(section),
            credentials=credentials,
            observe=self.metrics.observe,
        )
        self.lease = EtcdLease(
            self.gateway,
            domain=section.domain,
            appliance=appliance,
            ttl_s=section.ttl_s,
            retry_s=section.retry_s,
            site=site,
            clock=clock,
        )
        self.lease.on_change(self.metrics.update)
        self.members: list[str] | None = None
        self.health: dict[str, Any] | None = None  # the last health check of every member
        self.peers: PeerViews | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def members_problem(self) -> str | None:
        if self.members is None:
            return None  # not listed yet: the config check already counted the endpoints
        if len(self.members) < MIN_MEMBERS_FOR_AUTO:
            return (
                f"the etcd cluster has {len(self.members)} member(s): no automatic failover with fewer than 3"
            )
        return None

    def peer_views(self, verdicts: Callable[[], dict[str, str]]) -> PeerViews:
        """This appliance's published site verdicts and the other appliances' (run it as a task)."""
        self.peers = PeerViews(
            self.gateway,
            self.lease,
            domain=self.section.domain,
            appliance=self.lease.state.me,
            site=self.lease.site,
            verdicts=verdicts,
            interval_s=self.section.views_interval_s,
            clock=self.lease.now,
        )
        return self.peers

    def voter(self, inner: Voter | None = None) -> EtcdVoter:
        return EtcdVoter(self.lease, inner, members_ok=self.members_problem)

    def fence(
        self,
        actuators: Sequence[Actuator],
        routings: Callable[[], dict[str, Routing]],
        *,
        on_takeover: Takeover | None = None,
        record: Callable[[str, str, dict[str, Any]], None] = lambda kind, message, data: None,
        step_timeout_s: float | None = None,
    ) -> list[Actuator]:
        self._fence = Fence(
            self.lease, routings, on_takeover=on_takeover, record=record, step_timeout_s=step_timeout_s
        )
        return self._fence.wrap(actuators)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.lease.run(), name="etcd-lease"),
            asyncio.create_task(self._watch_members(), name="etcd-members"),
            asyncio.create_task(self._watch_health(), name="etcd-health"),
        ]
        if hasattr(self, "_fence"):
            self._tasks.append(asyncio.create_task(self._takeovers(), name="etcd-takeover"))

    async def run(self) -> None:
        """For the daemon's supervisor: start, run until cancelled, then release the lease."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _watch_members(self) -> None:
        while True:
            with contextlib.suppress(EtcdError):
                self.members = await self.gateway.members()
                self.metrics.members.set(len(self.members))
            await asyncio.sleep(60.0)

    async def _watch_health(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def check_health(self) -> dict[str, Any]:
        """Ask every member for its own status; the summary is in the status and the metrics.

        A member is healthy when it answers, names a raft leader and reports no
        alarm. Fewer healthy members than a majority: the cluster cannot elect
        or renew (no automatic failover); one down: one more loss stops it.
        """
        endpoints = [str(e).rstrip("/") for e in self.section.endpoints]
        answers = await asyncio.gather(
            *(self.gateway.member_status(e, self.section.request_timeout_s) for e in endpoints),
            return_exceptions=True,
        )
        members = []
        for endpoint, answer in zip(endpoints, answers, strict=True):
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            if isinstance(answer, BaseException):
                members.append({"endpoint": endpoint, "healthy": False, "error": str(answer)[:200]})
                continue
            ok = answer["leader"] not in ("", "0") and not answer["errors"]
            is_leader = answer["leader"] == answer["member_id"]
            members.append({"endpoint": endpoint, "healthy": ok, **answer, "is_leader": is_leader})
        self.health = _health_summary(members, self.lease.now())
        for member in members:
            self.metrics.member_up.labels(endpoint=member["endpoint"]).set(1 if member["healthy"] else 0)
        self.metrics.healthy.set(self.health["healthy"])
        self.metrics.has_leader.set(1 if self.health["raft_leader"] else 0)
        return self.health

    async def _takeovers(self) -> None:
        """Fence and re-read as soon as we become leader, not at the first action.

        A takeover that could not fence (an actuator unreachable) is tried again
        every second while this appliance leads: until it succeeds nothing is acted on.
        """
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TAKEOVER_RETRY_S):
                    await self.lease.changed.wait()
            self.lease.changed.clear()
            state = self.lease.leadership()
            if state.role == "leader" and state.token != self._fence.verified_token:
                with contextlib.suppress(NotLeader):
                    await self._fence.admit()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.section.request_timeout_s * 2):
                await self.lease.release()
        await self.gateway.close()

    def view(self) -> dict[str, Any]:
        data = self.lease.leadership().to_json(self.lease.now())
        data["backend"] = "etcd"
        data["members"] = self.members
        data["ttl_s"] = self.lease.ttl_s
        gate = getattr(self, "_fence", None)
        data["observed_routing"] = getattr(gate, "observed", None)
        data["fenced_token"] = getattr(gate, "fenced_token", None)
        data["fence_error"] = getattr(gate, "fence_error", None)
        data["peers"] = self.peers.view() if self.peers else None
        data["etcd_health"] = self.health
        return data

    def handlers(self) -> dict[str, Callable[[Any, dict[str, Any]], Awaitable[Any]]]:
        async def status(caller: Any, params: dict[str, Any]) -> Any:
            return self.view()

        return {"coordination.status": status}


def _health_summary(members: list[dict[str, Any]], now: float) -> dict[str, Any]:
    healthy = [m for m in members if m["healthy"]]
    leaders = {m["leader"] for m in healthy}
    majority = len(members) // 2 + 1
    problem = None
    if len(healthy) < majority:
        problem = f"{len(healthy)} of {len(members)} etcd members healthy: no majority, no leader election"
    elif len(healthy) == majority and len(members) > 1:
        problem = f"{len(healthy)} of {len(members)} etcd members healthy: one more loss stops coordination"
    elif len(leaders) > 1:
        problem = "etcd members name different raft leaders (an election under way)"
    return {
        "checked_at": round(now, 3),
        "healthy": len(healthy),
        "total": len(members),
        "raft_leader": next((m["endpoint"] for m in healthy if m.get("is_leader")), None),
        "problem": problem,
        "members": members,
    }


async def adopt_routing(service: Any, observed: str, token: int) -> int:
    """``on_takeover`` for the daemon: make a new leader's engine start from the real routing.

    The engine decides (event :class:`~failover.engine.TookOver`; it stays the
    only writer of its state): it follows "normal" or a failover routing, and
    goes to ``held`` when the routing was mixed or unreadable. The engine's new
    epoch is returned: whatever this appliance had decided before (a reconcile
    under way, a runbook started while it stood by) is refused by the fence and
    its result ignored as stale.
    """
    from failover.engine import TookOver
    from failover.plans import lost_from_name

    lost = lost_from_name(observed)
    routing = "normal" if observed == "normal" else "failover" if lost is not None else "unknown"
    outcome = await service.ask(TookOver(routing, token, observed, lost or ()))  # type: ignore[arg-type]
    log.warning(outcome.decision, extra=kv(token=token, observed=observed, epoch=outcome.state.epoch))
    return int(outcome.state.epoch)
