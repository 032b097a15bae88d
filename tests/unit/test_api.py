"""The control API over a real unix socket: replies, errors, peer credentials, permissions."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from appliance import api
from appliance.api import ApiServer, Caller, RequestError
from appliance.errors import ApiError, DaemonNotRunning, StartupError


async def _echo(caller: Caller, params: dict[str, Any]) -> Any:
    return {"caller": caller.to_json(), "params": params}


async def _refuse(caller: Caller, params: dict[str, Any]) -> Any:
    raise RequestError("text must be 1-2000 characters")


async def _crash(caller: Caller, params: dict[str, Any]) -> Any:
    raise ZeroDivisionError


def _serve(tmp_path: Path, bad: list[str]) -> ApiServer:
    return ApiServer(tmp_path, {"echo": _echo, "refuse": _refuse, "crash": _crash}, on_bad_request=bad.append)


async def _call(tmp_path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    return await asyncio.to_thread(api.call, tmp_path, method, params)


async def _raw(path: Path, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(payload)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


def test_call_returns_result_with_kernel_reported_caller(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = _serve(tmp_path, [])
        await server.start()
        try:
            result = await _call(tmp_path, "echo", {"x": 1})
        finally:
            await server.close()
        assert result["params"] == {"x": 1}
        assert result["caller"]["uid"] == os.getuid()
        assert result["caller"]["pid"] == os.getpid()
        assert result["caller"]["actor"].startswith(f"uid={os.getuid()}(")

    asyncio.run(scenario())


def test_socket_is_0660_and_removed_on_close(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = _serve(tmp_path, [])
        await server.start()
        mode = stat.S_IMODE(os.stat(server.path).st_mode)
        assert mode == 0o660, oct(mode)
        await server.close()
        assert not server.path.exists()

    asyncio.run(scenario())


def test_errors_reach_the_client_and_garbage_is_counted(tmp_path: Path) -> None:
    bad: list[str] = []

    async def scenario() -> None:
        server = _serve(tmp_path, bad)
        await server.start()
        try:
            with pytest.raises(ApiError, match="text must be 1-2000 characters"):
                await _call(tmp_path, "refuse")
            with pytest.raises(ApiError, match="internal error in crash"):
                await _call(tmp_path, "crash")
            with pytest.raises(ApiError, match=r"unknown method 'nope' \(known: crash, echo, refuse\)"):
                await _call(tmp_path, "nope")
            assert b'"ok": false' in await _raw(server.path, b"\xff\xfe not json\n")
            assert b'"ok": false' in await _raw(server.path, b'{"method": 5}\n')
            assert b"longer than" in await _raw(server.path, b"x" * (api.MAX_REQUEST_BYTES + 10))
            # The server still serves after all that.
            assert (await _call(tmp_path, "echo"))["params"] == {}
        finally:
            await server.close()

    asyncio.run(scenario())
    assert bad == ["unknown_method", "malformed", "malformed", "too_long"]


def test_no_daemon_is_said_plainly(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="the hotsite daemon is not running"):
        api.call(tmp_path, "status")


def test_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / api.SOCKET_NAME))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves

    async def scenario() -> None:
        first = _serve(tmp_path, [])
        await first.start()
        try:
            with pytest.raises(StartupError, match="already answering"):
                await _serve(tmp_path, []).start()
        finally:
            await first.close()

    asyncio.run(scenario())
