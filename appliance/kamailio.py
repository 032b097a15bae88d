"""The one client of Kamailio's JSON-RPC (``jsonrpcs`` over ``xhttp``).

Monitoring reads calls in progress through it; the failover actuator will
switch dispatcher sets through it. Parameters are positional, as Kamailio
expects.

Contract: every call returns within ``timeout_s`` or raises
:class:`KamailioRpcError`, which names the method and says whether Kamailio
was unreachable or answered with an error. Nothing else escapes.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx

from appliance.errors import HotsiteError


class KamailioRpcError(HotsiteError):
    def __init__(self, method: str, message: str, *, unreachable: bool) -> None:
        super().__init__(f"Kamailio RPC {method}: {message}")
        self.method = method
        self.unreachable = unreachable


class KamailioRpc:
    def __init__(self, url: str, *, timeout_s: float = 2.0, client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self._timeout = timeout_s
        self._client = client or httpx.AsyncClient(trust_env=False)
        self._ids = itertools.count(1)

    async def call(self, method: str, *params: Any) -> Any:
        request = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": next(self._ids)}
        try:
            response = await self._client.post(self.url, json=request, timeout=self._timeout)
        except httpx.TimeoutException:
            raise KamailioRpcError(method, f"no answer within {self._timeout:g}s", unreachable=True) from None
        except httpx.HTTPError as exc:
            raise KamailioRpcError(method, f"cannot reach {self.url}: {exc}", unreachable=True) from None
        if response.status_code != 200:
            raise KamailioRpcError(method, f"HTTP {response.status_code}", unreachable=False)
        try:
            body = response.json()
        except ValueError:
            raise KamailioRpcError(method, "answer is not JSON", unreachable=False) from None
        if not isinstance(body, dict):
            raise KamailioRpcError(method, "answer is not a JSON-RPC object", unreachable=False)
        if "error" in body:
            error = body["error"]
            text = error.get("message", error) if isinstance(error, dict) else error
            raise KamailioRpcError(method, f"error: {text}", unreachable=False)
        return body.get("result")

    async def profile_size(self, profile: str, value: str) -> int:
        """Dialogs (calls in progress) in a dialog profile with this value."""
        result = await self.call("dlg.profile_get_size", profile, value)
        if not isinstance(result, int) or isinstance(result, bool):
            raise KamailioRpcError("dlg.profile_get_size", f"unexpected answer {result!r}", unreachable=False)
        return result

    async def close(self) -> None:
        await self._client.aclose()
