"""etcd's v3 JSON gateway: one call with endpoint failover, TLS and authentication, in one time budget.

The documented HTTP form of the gRPC API that etcd 3.4 and 3.5 serve on their
client URLs, spoken with ``httpx``: what Patroni's etcd3 backend does, with no
gRPC/protobuf stack pinned to old versions (``etcd3`` pins protobuf 3), no
hand-written wire protocol.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from appliance.errors import ConfigError, HotsiteError
from appliance.secretfile import read_secret
from appliance.timeouts import cancelled_meanwhile

MAX_ANSWER_BYTES = 1024 * 1024
OPS = ("grant", "keepalive", "txn", "range", "put", "revoke", "members", "auth", "status")

if TYPE_CHECKING:
    from failover.settings import CoordinationSection

log = logging.getLogger("hotsite.failover.etcd")


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


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def unb64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8", errors="replace")


def as_int(value: Any, default: int = 0) -> int:
    """etcd's JSON gives int64 as strings and omits zero values."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def read_credentials(path: Path) -> tuple[str, str]:
    """``user:password`` from its file (:func:`appliance.secretfile.read_secret`: one line, trimmed)."""
    what = "coordination.credentials_file"
    text = read_secret(path, what, form="'user:password'")
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{what}: {path}: expected one line 'user:password'")
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
            cancelled_meanwhile()
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
                cancelled_meanwhile()
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
            code = as_int(doc.get("code"), -1)
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
        return as_int(doc.get("ID")), as_int(doc.get("TTL"))

    async def keepalive(self, lease_id: int) -> int:
        """The lease's TTL after renewal; 0 if etcd no longer knows it."""
        doc = await self.call("keepalive", "/v3/lease/keepalive", {"ID": str(lease_id)})
        result = doc.get("result")
        return as_int(result.get("TTL")) if isinstance(result, dict) else 0

    async def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdError):  # already gone is fine
            await self.call("revoke", "/v3/kv/lease/revoke", {"ID": str(lease_id)})

    async def create_if_absent(self, key: str, value: str, lease_id: int) -> tuple[bool, dict[str, Any]]:
        """Compare-create: (True, {revision}) if we created ``key``; else (False, the existing kv or {})."""
        k = b64(key)
        doc = await self.call(
            "txn",
            "/v3/kv/txn",
            {
                "compare": [{"target": "CREATE", "key": k, "create_revision": "0", "result": "EQUAL"}],
                "success": [{"request_put": {"key": k, "value": b64(value), "lease": str(lease_id)}}],
                "failure": [{"request_range": {"key": k}}],
            },
        )
        if doc.get("succeeded"):
            return True, {"create_revision": as_int(doc.get("header", {}).get("revision"))}
        responses = doc.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs") or []
        return False, kv_of(kvs[0]) if kvs else {}

    async def get(self, key: str) -> dict[str, Any]:
        doc = await self.call("range", "/v3/kv/range", {"key": b64(key)})
        kvs = doc.get("kvs") or []
        return kv_of(kvs[0]) if kvs else {}

    async def put(self, key: str, value: str, lease_id: int) -> int:
        """Write ``key`` attached to ``lease_id`` (it vanishes with the lease); returns the revision."""
        doc = await self.call(
            "put", "/v3/kv/put", {"key": b64(key), "value": b64(value), "lease": str(lease_id)}
        )
        return as_int(doc.get("header", {}).get("revision"))

    async def get_prefix(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every key under ``prefix`` with its kv (at most 1,000: one per appliance is plenty)."""
        raw = prefix.encode()
        end = raw[:-1] + bytes([raw[-1] + 1])
        doc = await self.call(
            "range",
            "/v3/kv/range",
            {"key": b64(prefix), "range_end": base64.b64encode(end).decode("ascii"), "limit": 1000},
        )
        return [(unb64(item.get("key", "")), kv_of(item)) for item in doc.get("kvs") or []]

    async def member_status(self, endpoint: str, timeout_s: float) -> dict[str, Any]:
        """One member's own status (``/v3/maintenance/status``), asked of that member only.

        Raises :class:`EtcdUnavailable` when it does not answer within ``timeout_s``.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                doc = await self._post(endpoint.rstrip("/"), "/v3/maintenance/status", {})
        except TimeoutError:
            cancelled_meanwhile()
            raise EtcdUnavailable(f"{endpoint}: no answer within {timeout_s:g}s") from None
        finally:
            self._observe("status", time.monotonic() - started)
        header = doc.get("header") or {}
        return {
            "member_id": str(header.get("member_id", "")),
            "leader": str(doc.get("leader", "0")),
            "raft_term": as_int(doc.get("raftTerm")),
            "db_size_bytes": as_int(doc.get("dbSize")),
            "errors": [str(e)[:200] for e in doc.get("errors") or []][:5],
        }

    async def members(self) -> list[str]:
        doc = await self.call("members", "/v3/cluster/member/list", {})
        return [str(m.get("name") or m.get("ID")) for m in doc.get("members") or []]

    async def close(self) -> None:
        await self._client.aclose()


def kv_of(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "create_revision": as_int(raw.get("create_revision")),
        "mod_revision": as_int(raw.get("mod_revision")),
        "lease": as_int(raw.get("lease")),
        "value": unb64(raw.get("value", "")),
    }


def holder_of(kv_: dict[str, Any]) -> str:
    try:
        doc = json.loads(kv_.get("value", ""))
        return str(doc.get("appliance", "?"))[:64] if isinstance(doc, dict) else "?"
    except ValueError:
        return "?"
