"""The hook actuator: an external command or an HTTP webhook does the moving.

For what hotsite cannot drive itself: a carrier's redirect API, another PBX,
a load balancer. The contract a hook author writes against:

Command hooks (``command = ["/usr/local/bin/redirect", "--carrier", "x"]``),
run without a shell, in a process group of their own:

* **apply**: argv as configured. stdin is one JSON object
  ``{"action": "apply", "token": 7, "routing": {name, serving_site,
  default_set, hotlines, fenced_sets, active_sets}}``; the environment adds
  ``HOTSITE_ACTION=apply``, ``HOTSITE_ROUTING=<routing name>`` (``normal``,
  ``failover``, or ``failover-without:west`` when backup sites are lost too),
  ``HOTSITE_TOKEN=<token>``. Exit 0: applied. Any other exit: not applied;
  the last non-empty stderr line is the reason shown to the operator.
  Applying the same routing twice must be harmless (runbooks are re-run).
* **verify** (when ``verify = true``): argv + ``["--verify"]``, the same stdin
  with ``"action": "verify"`` and ``HOTSITE_ACTION=verify``. Exit 0: the world
  matches; exit 1: it does not, one difference per stdout line; anything
  else: the hook could not tell (an error, not a difference).
* **timeout** (``timeout_s``): the whole process group (the hook and any
  child it started) is killed with SIGKILL and the step fails. A hook that
  must clean up should bound its own work below ``timeout_s``.

Webhooks (``url = "https://…"``): ``POST`` of the same JSON object (plus
``"sent_at"``, Unix seconds), ``Content-Type: application/json``, headers
``X-Hotsite-Routing``, ``X-Hotsite-Token`` and, when ``secret_file`` is set,
``X-Hotsite-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes with
the file's content (trailing newline stripped) as key>``. 2xx: applied.
409: the receiver has obeyed a newer token (:class:`StaleToken`). Anything
else or no answer within ``timeout_s``: not applied. Verify posts
``"action": "verify"`` and expects 2xx with ``{"differences": ["…", …]}``.

With ``verify = false`` the hook declares it cannot read its world back:
``verify()`` returns no differences and the runbook trusts the apply result.

Tokens: the newest token obeyed is also kept in memory here, and refused
older ones never reach the hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from failover.actuators.base import Actuator, ActuatorError, StaleToken
from failover.routing import Routing

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept from a hook
KILL_WAIT_S = 2.0


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Hotsite-Signature`` value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class HookActuator(Actuator):
    def __init__(
        self,
        *,
        command: list[str] | None = None,
        url: str | None = None,
        secret_file: Path | None = None,
        timeout_s: float = 10.0,
        verify: bool = True,
        name: str = "hook",
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if bool(command) == bool(url):
            raise ValueError("HookActuator needs exactly one of command or url")
        self.command = list(command or [])
        self.url = url
        self.secret_file = secret_file
        self.timeout_s = timeout_s
        self.can_verify = verify
        self.name = name
        self.highest_token = 0
        self._client = client if client is not None else (httpx.AsyncClient(trust_env=False) if url else None)

    # ------------------------------------------------------------------ contract
    async def apply(self, routing: Routing, token: int) -> None:
        if token < self.highest_token:
            raise StaleToken(f"{self.name}: token {token} is older than {self.highest_token}, already obeyed")
        payload = {"action": "apply", "token": token, "routing": routing.to_json()}
        if self.command:
            code, _, err = await self._run(self.command, payload, routing, token)
            if code != 0:
                reason = _last_line(err) or "no message on stderr"
                raise ActuatorError(f"{self.name}: {self.command[0]} exited {code}: {reason}")
        else:
            await self._post(payload, routing, token)
        self.highest_token = max(self.highest_token, token)

    async def verify(self, routing: Routing) -> list[str]:
        if not self.can_verify:
            return []
        payload = {"action": "verify", "token": self.highest_token, "routing": routing.to_json()}
        if self.command:
            argv = [*self.command, "--verify"]
            code, out, err = await self._run(argv, payload, routing, self.highest_token)
            if code == 0:
                return []
            if code == 1:
                text = out.decode("utf-8", errors="replace")
                lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
                return lines or [f"{self.name}: the hook reports a difference (and printed none)"]
            reason = _last_line(err) or "no message on stderr"
            raise ActuatorError(f"{self.name}: {self.command[0]} --verify exited {code}: {reason}")
        answer = await self._post(payload, routing, self.highest_token)
        differences = answer.get("differences") if isinstance(answer, dict) else None
        if not isinstance(differences, list):
            raise ActuatorError(f'{self.name}: verify answer lacks a "differences" list: {answer!r:.200}')
        return [str(line) for line in differences]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------------ command
    async def _run(
        self, argv: list[str], payload: dict[str, Any], routing: Routing, token: int
    ) -> tuple[int, bytes, bytes]:
        env = dict(os.environ)
        env.update(
            HOTSITE_ACTION=str(payload["action"]), HOTSITE_ROUTING=routing.name, HOTSITE_TOKEN=str(token)
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group: a timeout kills its children too
            )
        except OSError as exc:
            raise ActuatorError(f"{self.name}: cannot run {argv[0]}: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await proc.communicate(json.dumps(payload).encode() + b"\n")
        except TimeoutError:
            await self._kill(proc)
            raise ActuatorError(
                f"{self.name}: {argv[0]} did not finish within {self.timeout_s:g}s (process group killed)"
            ) from None
        except BaseException:
            await self._kill(proc)  # cancelled: leave nothing running behind us
            raise
        assert proc.returncode is not None
        return proc.returncode, out[-OUTPUT_LIMIT:], err[-OUTPUT_LIMIT:]

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        """SIGKILL the whole group (the hook and anything it started) while its leader is unreaped."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT_S):
                await proc.wait()

    # ------------------------------------------------------------------ webhook
    def _secret(self) -> bytes | None:
        if self.secret_file is None:
            return None
        try:
            return self.secret_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            why = exc.strerror or exc
            raise ActuatorError(f"{self.name}: secret_file {self.secret_file}: {why}") from None

    async def _post(self, payload: dict[str, Any], routing: Routing, token: int) -> Any:
        assert self._client is not None and self.url is not None
        body = json.dumps({**payload, "sent_at": round(time.time(), 3)}).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Hotsite-Routing": routing.name,
            "X-Hotsite-Token": str(token),
        }
        secret = self._secret()
        if secret is not None:
            headers["X-Hotsite-Signature"] = sign(secret, body)
        action = payload["action"]
        try:
            response = await self._client.post(
                self.url, content=body, headers=headers, timeout=self.timeout_s
            )
        except httpx.TimeoutException:
            raise ActuatorError(
                f"{self.name}: {action}: no answer from {self.url} within {self.timeout_s:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise ActuatorError(f"{self.name}: {action}: cannot reach {self.url}: {exc}") from None
        if response.status_code == 409:
            raise StaleToken(f"{self.name}: {self.url} has obeyed a newer token than {token} (HTTP 409)")
        if not 200 <= response.status_code < 300:
            first = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
            raise ActuatorError(
                f"{self.name}: {action}: {self.url} answered HTTP {response.status_code} {first}".rstrip()
            )
        if action != "verify":
            return None
        try:
            return response.json()
        except ValueError:
            raise ActuatorError(f"{self.name}: verify answer from {self.url} is not JSON") from None
