"""The control API: newline-delimited JSON over a unix socket.

The CLI is a thin client of this API; it never opens the state database
itself. One request per connection: ``{"method": "status", "params": {}}``
answered by ``{"ok": true, "result": …}`` or ``{"ok": false, "error": "…"}``.

Why a unix socket: file permissions are the access control (mode 0660, the
group from ``appliance.socket_group``), and the kernel tells us who is
calling (``SO_PEERCRED``), so every change made through the API is recorded
in the audit log with the real user, not a name the client claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ApiError, DaemonNotRunning, StartupError
from appliance.logs import kv

log = logging.getLogger(f"hotsite.{__name__}")

SOCKET_NAME = "hotsite.sock"
MAX_REQUEST_BYTES = 64 * 1024
CLIENT_TIMEOUT_S = 10.0
MAX_REPLY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is on the other end of the socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups (SO_PEERGROUPS), for roles

    @property
    def actor(self) -> str:
        try:
            user = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            user = "?"
        return f"uid={self.uid}({user})"

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "actor": self.actor}


Handler = Callable[[Caller, dict[str, Any]], Awaitable[Any]]


class RequestError(Exception):
    """Raised by a handler for a bad request; the message goes back to the caller."""


class ApiServer:
    """Serves registered handlers on ``runtime_dir/hotsite.sock``.

    Garbage on the socket (not JSON, too long, unknown method) is answered
    with an error and counted via ``on_bad_request``; it never reaches a
    handler and never stops the server.
    """

    def __init__(
        self,
        runtime_dir: Path,
        handlers: dict[str, Handler],
        *,
        group: str | None = None,
        on_bad_request: Callable[[str], None] = lambda reason: None,
        authorize: Callable[[Caller, str], str | None] | None = None,
    ) -> None:
        self.path = runtime_dir / SOCKET_NAME
        self._runtime_dir = runtime_dir
        self._handlers = handlers
        self._group = group
        self._on_bad_request = on_bad_request
        self._authorize = authorize
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            created = not self._runtime_dir.exists()
            self._runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            if created:  # the daemon's umask is 077; CLI users must reach the socket inside
                os.chmod(self._runtime_dir, 0o755)
        except OSError as exc:
            raise StartupError(
                f"runtime directory {self._runtime_dir} cannot be created: {exc.strerror}"
            ) from None
        _remove_stale_socket(self.path)
        old_umask = os.umask(0o117)  # the socket is born 0660: never a window where it is world-writable
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise StartupError(f"control socket {self.path} cannot be created: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o660)
        if self._group:
            try:
                os.chown(self.path, -1, grp.getgrnam(self._group).gr_gid)
            except (KeyError, OSError) as exc:
                raise StartupError(f"appliance.socket_group {self._group!r}: {exc}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            caller = _peer(writer)
            reply = await self._answer(caller, reader)
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, caller: Caller, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            return self._bad("too_long", f"request longer than {MAX_REQUEST_BYTES} bytes")
        except TimeoutError:
            return self._bad("timeout", "no request received in time")
        try:
            request = json.loads(line)
            method = request["method"]
            params = request.get("params") or {}
            if not isinstance(method, str) or not isinstance(params, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return self._bad("malformed", 'expected one JSON line {"method": "...", "params": {...}}')
        if _too_deep(params):
            return self._bad("malformed", f"params nested deeper than {MAX_PARAM_DEPTH} levels")
        handler = self._handlers.get(method)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return self._bad("unknown_method", f"unknown method {method!r} (known: {known[:2000]})")
        refusal = self._authorize(caller, method) if self._authorize else None
        if refusal is not None:
            log.warning("control request refused", extra=kv(method=method, actor=caller.actor))
            self._on_bad_request("forbidden")
            return {"ok": False, "error": refusal}
        try:
            result = await handler(caller, params)
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            # A parameter of the wrong type or shape: the caller's mistake, said plainly, no traceback.
            log.warning("bad control request parameters", extra=kv(method=method, error=repr(exc)[:200]))
            self._on_bad_request("bad_params")
            why = str(exc)[:200] or type(exc).__name__
            return {"ok": False, "error": f"bad parameters for {method!r}: {why}"}
        except Exception:
            log.exception("control API handler failed", extra=kv(method=method))
            return {"ok": False, "error": f"internal error in {method}; see the daemon's log"}
        return {"ok": True, "result": result}

    def _bad(self, reason: str, message: str) -> dict[str, Any]:
        self._on_bad_request(reason)
        log.warning("bad control request", extra=kv(reason=reason))
        return {"ok": False, "error": message}


MAX_PARAM_DEPTH = 8
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+


def _too_deep(value: Any, limit: int = MAX_PARAM_DEPTH) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def _peer(writer: asyncio.StreamWriter) -> Caller:
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock, uid, gid))


def _peer_groups(sock: socket.socket, uid: int, gid: int) -> tuple[int, ...]:
    """The peer's supplementary groups as the kernel has them; the group database as a fallback."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:
        try:
            return tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except (KeyError, OSError):
            return ()


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a crashed daemon; refuse if a live one answers on it."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise StartupError(f"control socket {path} exists and cannot be checked: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError(f"another hotsite daemon is already answering on {path}")


# ---------------------------------------------------------------------------
# Client


def call(
    runtime_dir: Path, method: str, params: dict[str, Any] | None = None, timeout: float = CLIENT_TIMEOUT_S
) -> Any:
    """Call the daemon and return the result; raise DaemonNotRunning or ApiError."""
    path = runtime_dir / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"the hotsite daemon is not running (no answer on {path});"
                " start it with 'systemctl start hotsite' or 'hotsite run'"
            ) from None
        except PermissionError:
            raise DaemonNotRunning(
                f"permission denied on {path}: run as root or as a member of the socket's group"
            ) from None
        except BlockingIOError:  # EAGAIN: the socket's backlog is full
            raise ApiError(f"the daemon is too busy to accept a connection on {path}; try again") from None
        sock.sendall(json.dumps({"method": method, "params": params or {}}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) <= MAX_REPLY_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ApiError(f"the daemon did not answer {method!r} within {timeout:.0f} s") from None
    except OSError as exc:
        raise ApiError(f"talking to the daemon on {path} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise ApiError(f"the daemon sent an unreadable reply to {method!r}") from None
    if not reply.get("ok"):
        raise ApiError(reply.get("error", "unknown error"))
    return reply.get("result")
