"""The one client of Kamailio's JSON-RPC (``jsonrpcs``), over HTTP or its unix socket.

Monitoring reads calls in progress through it; the failover actuator
switches dispatcher sets and htables through it. Parameters are positional,
as Kamailio expects.

Two transports, one contract:

* HTTP (``xhttp`` + ``jsonrpcs`` transport 1): ``KamailioRpc(url=...)``.
* The datagram unix socket (``jsonrpcs`` transport 4, ``dgram_socket``):
  ``KamailioRpc(socket_path=...)``. Kamailio answers to the *sender's*
  address, so every call binds a fresh client socket in a private directory
  (mode 0711, socket 0666: a Kamailio running as its own user must be able
  to write to it; hotsite must be in the group of Kamailio's 0660 socket).
  A reply must fit one datagram (~64 KB; Kamailio drops larger ones): a
  timeout on this transport says so, and big reads belong on HTTP.

Contract: every call returns within ``timeout_s`` or raises
:class:`KamailioRpcError`, which names the method and says whether Kamailio
was unreachable or answered with an error. Nothing else escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from appliance.errors import HotsiteError

if TYPE_CHECKING:
    from appliance.core_settings import KamailioSection

# Kamailio's jsonrpcs datagram buffer (JSONRPC_DGRAM_BUF_SIZE); larger replies are not sent.
DGRAM_MAX = 65_457


class KamailioRpcError(HotsiteError):
    def __init__(self, method: str, message: str, *, unreachable: bool, stale: bool = False) -> None:
        super().__init__(f"Kamailio RPC {method}: {message}")
        self.method = method
        self.unreachable = unreachable
        self.stale = stale  # refused by Kamailio itself: the call's token is older than routing=>token


class KamailioRpc:
    def __init__(
        self,
        url: str | None = None,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        timeout_s: float = 2.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if (url is None) == (socket_path is None):
            raise ValueError("KamailioRpc needs exactly one of url or socket_path")
        self.url = url
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self._timeout = timeout_s
        self._client = (client or httpx.AsyncClient(trust_env=False)) if url is not None else None
        self._ids = itertools.count(1)
        self._client_dir: Path | None = None

    @classmethod
    def from_config(cls, section: KamailioSection) -> KamailioRpc | None:
        """HTTP when ``rpc_url`` is set, else the unix socket ``rpc_socket``; None when neither is."""
        if section.rpc_url:
            return cls(section.rpc_url, timeout_s=section.rpc_timeout_s)
        if section.rpc_socket:
            return cls(socket_path=section.rpc_socket, timeout_s=section.rpc_timeout_s)
        return None

    @property
    def where(self) -> str:
        return self.url or f"unix:{self.socket_path}"

    async def call(self, method: str, *params: Any, token: int | None = None) -> Any:
        """One JSON-RPC call; ``token``: a fenced write (HTTP header ``X-Hotsite-Token``).

        hotsite's generated config checks that header against ``routing=>token``
        under the htable's lock and answers 409 for an older one (raised here
        with ``stale``). The datagram socket has no headers: there only the
        Kamailio actuator's own checks guard a write.
        """
        request = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": next(self._ids)}
        if self.socket_path is not None:
            raw = await self._call_dgram(method, request)
            try:
                body = json.loads(raw)
            except ValueError:
                raise KamailioRpcError(method, "answer is not JSON", unreachable=False) from None
        else:
            body = await self._call_http(method, request, token)
        if not isinstance(body, dict):
            raise KamailioRpcError(method, "answer is not a JSON-RPC object", unreachable=False)
        if "error" in body:
            error = body["error"]
            text = error.get("message", error) if isinstance(error, dict) else error
            raise KamailioRpcError(method, f"error: {text}", unreachable=False)
        return body.get("result")

    async def _call_http(self, method: str, request: dict[str, Any], token: int | None = None) -> Any:
        assert self._client is not None and self.url is not None
        headers = {} if token is None else {"X-Hotsite-Token": str(token)}
        try:
            response = await self._client.post(self.url, json=request, headers=headers, timeout=self._timeout)
        except httpx.TimeoutException:
            raise KamailioRpcError(method, f"no answer within {self._timeout:g}s", unreachable=True) from None
        except httpx.HTTPError as exc:
            raise KamailioRpcError(method, f"cannot reach {self.url}: {exc}", unreachable=True) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 409 and token is not None:
            why = f"refused by Kamailio: token {token} {response.text.strip()}"
            raise KamailioRpcError(method, why, unreachable=False, stale=True)
        if response.status_code != 200:
            # Kamailio sends JSON-RPC errors with the error's code as HTTP status: keep its message.
            if isinstance(body, dict) and "error" in body:
                return body
            raise KamailioRpcError(method, f"HTTP {response.status_code}", unreachable=False)
        if body is None:
            raise KamailioRpcError(method, "answer is not JSON", unreachable=False)
        return body

    def _own_dir(self) -> Path:
        if self._client_dir is None or not self._client_dir.is_dir():
            self._client_dir = Path(tempfile.mkdtemp(prefix="hotsite-kamrpc-"))
            os.chmod(self._client_dir, 0o711)  # Kamailio (maybe another user) must reach our socket
        return self._client_dir

    async def _call_dgram(self, method: str, request: dict[str, Any]) -> bytes:
        """One request on a fresh, bound datagram socket: a late reply can never answer a later call."""
        assert self.socket_path is not None
        own = self._own_dir() / f"c{request['id']}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(FileNotFoundError):
                own.unlink()
            sock.bind(str(own))
            os.chmod(own, 0o666)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * DGRAM_MAX)
            try:
                sock.connect(str(self.socket_path))
                await loop.sock_sendall(sock, json.dumps(request).encode())
            except OSError as exc:
                raise KamailioRpcError(
                    method, f"cannot reach {self.where}: {exc.strerror or exc}", unreachable=True
                ) from None
            try:
                async with asyncio.timeout(self._timeout):
                    return await loop.sock_recv(sock, 4 * DGRAM_MAX)
            except TimeoutError:
                raise KamailioRpcError(
                    method,
                    f"no answer within {self._timeout:g}s on {self.where} (a reply over ~64 KB does not fit"
                    " one datagram and Kamailio drops it: use rpc_url for large answers)",
                    unreachable=True,
                ) from None
            except OSError as exc:
                raise KamailioRpcError(
                    method, f"cannot read from {self.where}: {exc.strerror or exc}", unreachable=True
                ) from None
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                own.unlink()

    async def profile_size(self, profile: str, value: str) -> int:
        """Dialogs (calls in progress) in a dialog profile with this value."""
        result = await self.call("dlg.profile_get_size", profile, value)
        if not isinstance(result, int) or isinstance(result, bool):
            raise KamailioRpcError("dlg.profile_get_size", f"unexpected answer {result!r}", unreachable=False)
        return result

    async def dispatcher_flags(self) -> dict[int, dict[str, str]]:
        """``dispatcher.list`` as {set id: {destination URI: FLAGS}} (e.g. ``"AP"``, ``"DX"``)."""
        result = await self.call("dispatcher.list")
        sets: dict[int, dict[str, str]] = {}
        try:
            for record in (result or {}).get("RECORDS") or []:
                entry = record["SET"]
                targets = sets.setdefault(int(entry["ID"]), {})
                for target in entry.get("TARGETS") or []:
                    dest = target["DEST"]
                    targets[str(dest["URI"])] = str(dest["FLAGS"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise KamailioRpcError(
                "dispatcher.list", f"unexpected answer {result!r:.200}", unreachable=False
            ) from None
        return sets

    async def htable_dump(self, table: str) -> dict[str, Any]:
        """Every key of an htable with its value (int or str)."""
        result = await self.call("htable.dump", table)
        items: dict[str, Any] = {}
        try:
            for entry in result or []:
                slots = entry.get("slot") or []
                for slot in slots if isinstance(slots, list) else [slots]:
                    items[str(slot["name"])] = slot["value"]
        except (AttributeError, KeyError, TypeError):
            raise KamailioRpcError(
                "htable.dump", f"unexpected answer {result!r:.200}", unreachable=False
            ) from None
        return items

    async def htable_get(self, table: str, key: str) -> Any:
        """One htable value, or None when the key does not exist."""
        try:
            result = await self.call("htable.get", table, key)
        except KamailioRpcError as exc:
            if not exc.unreachable and "doesn't exist" in exc.message:
                return None
            raise
        if isinstance(result, dict) and "item" in result:
            return result["item"].get("value")
        return result

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._client_dir is not None:
            shutil.rmtree(self._client_dir, ignore_errors=True)
            self._client_dir = None
