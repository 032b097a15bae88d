"""The hook actuator: an external command or an HTTP webhook does the moving.

For what hotsite cannot drive itself: a carrier's redirect API, another PBX,
a load balancer. The protocol a hook author writes against (stdin JSON, its
fields, the environment, exit codes and status codes, time limits and the
token rule) is the contract in ``failover/actuators/HOOKS.md``; the
reference hook that keeps it is ``tests/support/routing_world.py``. In short:

* **apply**: argv as configured, stdin ``{"action": "apply", "token", "routing"}``;
  exit 0 applied, exit 3 refused as stale (:class:`StaleToken`), anything
  else not applied (the last stderr line is the reason);
* **verify**: argv + ``--verify``; exit 0 matches, 1 differs (one line each
  on stdout), anything else "could not tell" (an error);
* **fence**: argv + ``--fence``, stdin ``{"action": "fence", "token"}``: the
  hook records the token as the newest obeyed and from then on refuses
  (exit 3) every apply with an older one, *checked when that apply commits*;
  exit 0 recorded, exit 3 a newer token is already recorded;
* webhooks: the same JSON ``POST``ed (plus ``"sent_at"``), 2xx done, 409
  stale, anything else or no answer within ``timeout_s`` failed.

A timeout kills the command's whole process group (SIGKILL). Tokens: the
newest token obeyed is also kept in memory here, and refused older ones
never reach the hook; but only the hook's own check stops a write that a
pause kept in flight across a takeover (see HOOKS.md, "Why the hook checks").
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

from appliance.errors import ConfigError
from appliance.secretfile import read_secret
from failover.actuators.base import Actuator, ActuatorError, StaleToken
from failover.routing import Routing

EXIT_DIFFERENT = 1  # verify: the world differs
EXIT_STALE = 3  # apply or fence: a newer token is already recorded
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
                kind = StaleToken if code == EXIT_STALE else ActuatorError
                raise kind(f"{self.name}: {self.command[0]} exited {code}: {reason}")
        else:
            await self._post(payload, routing, token)
        self.highest_token = max(self.highest_token, token)

    async def fence(self, token: int) -> None:
        if token < self.highest_token:
            raise StaleToken(f"{self.name}: fence: token {token} is older than {self.highest_token}")
        payload = {"action": "fence", "token": token}
        if self.command:
            code, _, err = await self._run([*self.command, "--fence"], payload, None, token)
            if code == EXIT_STALE:
                reason = _last_line(err) or "no message on stderr"
                raise StaleToken(f"{self.name}: fence {token}: the hook obeyed a newer token: {reason}")
            if code != 0:
                reason = _last_line(err) or "no message on stderr"
                raise ActuatorError(
                    f"{self.name}: {self.command[0]} --fence exited {code}: {reason}"
                    " (a hook must record the fence: failover/actuators/HOOKS.md)"
                )
        else:
            await self._post(payload, None, token)
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
            if code == EXIT_DIFFERENT:
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
        self, argv: list[str], payload: dict[str, Any], routing: Routing | None, token: int
    ) -> tuple[int, bytes, bytes]:
        env = dict(os.environ)
        env.update(HOTSITE_ACTION=str(payload["action"]), HOTSITE_TOKEN=str(token))
        if routing is not None:
            env["HOTSITE_ROUTING"] = routing.name
        else:
            env.pop("HOTSITE_ROUTING", None)
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
            return read_secret(self.secret_file, f"{self.name}: secret_file").encode()
        except ConfigError as exc:
            raise ActuatorError(exc.message) from None

    async def _post(self, payload: dict[str, Any], routing: Routing | None, token: int) -> Any:
        assert self._client is not None and self.url is not None
        body = json.dumps({**payload, "sent_at": round(time.time(), 3)}).encode()
        headers = {"Content-Type": "application/json", "X-Hotsite-Token": str(token)}
        if routing is not None:
            headers["X-Hotsite-Routing"] = routing.name
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
