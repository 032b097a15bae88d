"""What a compromised primary or a hostile replica sends, over real mutual TLS.

:class:`HostileAgent` is a source agent that answers every session with a
script of messages the test chooses (and may change while the client
runs); everything else (certificates, sockets, the client under test) is
the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from appliance.replication import protocol
from appliance.replication.protocol import Msg
from tests.support.replication_rig import server_ctx


def raw_message(kind: int, header_json: bytes, body: bytes = b"") -> bytes:
    """A message whose JSON header is given as bytes (``encode`` cannot even build some of these)."""
    payload = struct.pack(">I", len(header_json)) + header_json + body
    return struct.pack(">IBI", len(payload), kind, zlib.crc32(payload)) + payload


def nested_header(depth: int = 100_000) -> bytes:
    return b'{"files":' + b"[" * depth + b"]" * depth + b',"observed_at":1}'


def file_data(content: bytes) -> tuple[bytes, str]:
    sha = hashlib.sha256(content).hexdigest()
    return protocol.encode(Msg.FILE_DATA, {"sha256": sha}, content), sha


def manifest(files: dict[str, tuple[bytes, int]]) -> list[bytes]:
    """FILE_DATA for each content, then the FILES_MANIFEST naming them (path -> (content, mode))."""
    out, entries = [], {}
    for rel, (content, mode) in files.items():
        data, sha = file_data(content)
        out.append(data)
        entries[rel] = [sha, mode, len(content)]
    out.append(protocol.encode(Msg.FILES_MANIFEST, {"files": entries, "observed_at": time.time()}))
    return out


class HostileAgent:
    """Serves ``script`` (raw messages) after the WELCOME of every session, then heartbeats."""

    def __init__(self, certs: Path, welcome: dict[str, Any] | None = None) -> None:
        self._ssl = server_ctx(certs)
        self.welcome = welcome or {"mode": "files"}
        self.script: list[bytes] = []
        self.sessions = 0
        self.hellos: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            hello = await protocol.read_message(reader)
            self.sessions += 1
            self.hellos.append(hello.header)
            welcome = {**self.welcome, "source_time": time.time()}
            writer.write(protocol.encode(Msg.WELCOME, welcome))
            for data in list(self.script):
                writer.write(data)
            await writer.drain()
            while True:
                await asyncio.sleep(0.2)
                writer.write(protocol.encode(Msg.HEARTBEAT, {"observed_at": time.time()}))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, OSError, protocol.ProtocolError):
            pass
        except asyncio.CancelledError:
            return  # stopping
        finally:
            self._tasks.discard(task)
            writer.close()


async def until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Wait for ``condition`` with a generous deadline (the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def cancel(task: asyncio.Task[Any] | Awaitable[Any]) -> None:
    if isinstance(task, asyncio.Task):
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


def listing(root: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    """Every path under ``root`` (symlinks not followed), except those under ``skip``."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into symlinks
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not any(p == s or s in p.parents for s in skip):
                out.add(str(p.relative_to(root)))
    return out


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()
