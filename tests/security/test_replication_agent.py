"""A hostile or stuck replica (with a valid client certificate) against the source agent at the primary.

- A zlib bomb (a few hundred KB that inflate to 300 MB), as the HELLO and after it, against the real
  ``hotsite source`` process: its peak RSS stays within its documented per-message bound, and it
  still serves a real replica afterwards.
- A session that never reads (but keeps sending keepalives) while the application commits 20,000
  transactions: the agent ends it after ``peer_timeout_s`` without progress and lets go of its WAL
  guard, so the application's WAL stays bounded and its own TRUNCATE checkpoint succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

from appliance.replication import protocol
from appliance.replication.client import SqliteStreamClient
from appliance.replication.protocol import Msg
from appliance.replication.replica import Replica
from appliance.replication.source import ServedStream, SourceAgent
from tests.conftest import free_port
from tests.security.replication_support import cancel, until
from tests.support.replication_rig import client_ctx, pki, server_ctx

REPO = Path(__file__).resolve().parents[2]
HOTSITE = [sys.executable, "-c", "from appliance.cli.main import main; main()"]  # this checkout's code
MB = 1024 * 1024


def _bomb(kind: int, header: dict[str, object], inflated: int) -> bytes:
    """A message of type ``kind`` whose payload inflates to ``inflated`` bytes of zeros after the header."""
    head = json.dumps(header).encode()
    packer = zlib.compressobj(9)
    parts = [packer.compress(struct.pack(">I", len(head)) + head)]
    zeros = bytes(MB)
    parts += [packer.compress(zeros) for _ in range(inflated // MB)]
    payload = b"".join(parts) + packer.flush()
    return struct.pack(">IBI", len(payload), kind | protocol.FLAG_ZLIB, zlib.crc32(payload)) + payload


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) / 1024


def _tls_socket(certs: Path, port: int, rcvbuf: int | None = None) -> ssl.SSLSocket:
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(20)
    raw.connect(("127.0.0.1", port))
    return client_ctx(certs).wrap_socket(raw, server_hostname="source")


def _database(path: Path, rows: int = 200) -> sqlite3.Connection:
    app = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("PRAGMA busy_timeout=5000")
    app.execute("CREATE TABLE IF NOT EXISTS c (id INTEGER PRIMARY KEY, note BLOB)")
    app.executemany("INSERT INTO c (note) VALUES (?)", [(os.urandom(100),) for _ in range(rows)])
    return app


def test_zlib_bomb_does_not_blow_up_the_agent(tmp_path: Path) -> None:
    certs = pki(tmp_path / "tls")
    db = tmp_path / "customers.db"
    _database(db).close()
    port = free_port()
    config = tmp_path / "source.toml"
    config.write_text(
        f'[source]\nlisten = "127.0.0.1:{port}"\n'
        f'tls_cert_file = "{certs}/source.pem"\ntls_key_file = "{certs}/source.key"\n'
        f'tls_ca_file = "{certs}/ca.pem"\n'
        f'[streams.customers]\nkind = "sqlite"\npath = "{db}"\n'
    )
    hello_bomb = _bomb(Msg.HELLO, {"stream": "customers"}, 300 * MB)
    later_bomb = _bomb(Msg.KEEPALIVE, {}, 300 * MB)
    assert len(hello_bomb) < 400_000  # what the attacker sends
    agent = subprocess.Popen(
        [*HOTSITE, "source", "-c", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert agent.stderr is not None
        line = agent.stderr.readline()
        assert "source agent listening" in line, line
        threading.Thread(target=lambda: [None for _ in agent.stderr], daemon=True).start()  # type: ignore[union-attr]
        baseline = _peak_rss_mb(agent.pid)
        with _tls_socket(certs, port) as s, contextlib.suppress(ssl.SSLError, ConnectionError):
            s.sendall(hello_bomb)
            assert s.recv(1) == b"", "the agent ends the session"
        with _tls_socket(certs, port) as s, contextlib.suppress(ssl.SSLError, ConnectionError):
            s.sendall(protocol.encode(Msg.HELLO, {"stream": "customers", "keepalive_s": 1}))
            s.sendall(later_bomb)
            while s.recv(65536):  # the seed, then the end of the session
                pass
        assert agent.poll() is None, "the agent died"
        peak = _peak_rss_mb(agent.pid)
        grew = peak - baseline
        print(f"agent peak RSS {baseline:.0f} MB -> {peak:.0f} MB after two 300 MB zlib bombs")
        # The documented bound: a HELLO inflates to at most max_hello_bytes (16 MiB; a message within
        # its limit costs up to twice that, transiently); anything after it to MAX_CONTROL (64 KiB).
        # Before the bound the agent went from 50 to 327 MB.
        assert grew < 2 * protocol.MAX_HELLO / MB + 16, f"agent RSS grew by {grew:.0f} MB"
        # It still serves a real replica.
        asyncio.run(_seed_once(certs, port, tmp_path / "replica" / "customers.db"))
    finally:
        agent.terminate()
        agent.wait(10)


async def _seed_once(certs: Path, port: int, path: Path) -> None:
    replica = Replica(path)
    replica.open()
    client = SqliteStreamClient(
        "customers",
        "customers",
        replica,
        host="127.0.0.1",
        port=port,
        server_name="source",
        ssl_context=client_ctx(certs),
    )
    task = asyncio.create_task(client.run())
    try:
        await until(lambda: replica.position is not None, what="a seed from the agent")
    finally:
        await cancel(task)
        replica.close()


def test_a_session_that_never_reads_does_not_pin_the_wal(tmp_path: Path) -> None:
    certs = pki(tmp_path / "tls")
    db = tmp_path / "customers.db"
    app = _database(db)
    wal = Path(str(db) + "-wal")
    peak_wal = [0]
    written = [0]

    def write(n: int = 20_000) -> None:
        """The application: 20,000 transactions of about one page each, about 2,500 a second."""
        blob = os.urandom(3000)
        for i in range(n):
            app.execute("INSERT INTO c (note) VALUES (?)", (blob,))
            written[0] += 1
            if i % 10 == 0:
                peak_wal[0] = max(peak_wal[0], wal.stat().st_size)
                time.sleep(0.004)

    def never_read(port: int, stop: threading.Event) -> None:
        """Says HELLO (asking for keepalives to be watched), then sends keepalives and reads nothing."""
        with _tls_socket(certs, port, rcvbuf=4096) as s:
            s.sendall(protocol.encode(Msg.HELLO, {"stream": "customers", "keepalive_s": 0.5}))
            keepalive = protocol.encode(Msg.KEEPALIVE, {})
            while not stop.wait(0.5):
                try:
                    s.sendall(keepalive)
                except OSError:
                    return

    async def scenario() -> None:
        agent = SourceAgent(
            [ServedStream("customers", "sqlite", db)],
            ssl_context=server_ctx(certs),
            heartbeat_s=0.2,
            peer_timeout_s=2.0,
        )
        await agent.start()
        stop = threading.Event()
        stuck = threading.Thread(target=never_read, args=(agent.port, stop), daemon=True)
        stuck.start()
        try:
            await until(lambda: len(agent.followers) == 1, what="the stuck session's follower")
            writer = threading.Thread(target=write)
            writer.start()
            await asyncio.to_thread(writer.join)
            print(f"peak WAL {peak_wal[0] / MB:.1f} MB over {written[0]} transactions")
            # Without the bound the guard pinned every frame: ~4 KB a transaction, over 80 MB.
            assert peak_wal[0] < 40 * MB, f"the WAL grew to {peak_wal[0] / MB:.0f} MB"
            assert not agent.followers, "the stuck session's follower (and its WAL guard) is gone"
            # In a thread, as the application is another process: the agent's standing follower
            # (kept between sessions) makes way from its event loop while the checkpoint waits.
            busy, _log, _done = await asyncio.to_thread(
                lambda: app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            )
            assert busy == 0 and wal.stat().st_size == 0, "the application's own checkpoint completes"
            assert agent.stalled_sessions == 1
        finally:
            stop.set()
            await agent.stop()

    try:
        asyncio.run(scenario())
    finally:
        app.close()
