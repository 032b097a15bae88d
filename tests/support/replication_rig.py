"""The replication tests' one rig: PKI, TLS contexts, agent, client, section, instead of copies.

Every replication test runs the real agent and client over real mutual TLS: a CA, a
server certificate for "source" and a client certificate for "appliance", and the two
contexts made from them. A test that needs another name (a stranger, a rogue CA) issues
it beside these with :func:`appliance.replication.certs.issue`. The agent, client and
``[replication]`` section helpers fill in what every test wrote the same way (loopback,
server name "source", those certificates) and pass the rest on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance.config import ReplicationSection
from appliance.replication.certs import issue, make_ca
from appliance.replication.client import SqliteStreamClient
from appliance.replication.replica import Replica
from appliance.replication.source import ServedStream, SourceAgent
from appliance.replication.tls import client_context, server_context


def pki(directory: Path, source_hosts: Sequence[str] = ("127.0.0.1",)) -> Path:
    """A CA, a server certificate for "source" (valid for ``source_hosts``) and a client one for "appliance"."""
    make_ca(directory)
    issue(directory, "source", hosts=list(source_hosts), server=True)
    issue(directory, "appliance", hosts=[], server=False)
    return directory


def server_ctx(certs: Path) -> ssl.SSLContext:
    """The source agent's side: its certificate, and the CA its clients must be issued by."""
    return server_context(certs / "source.pem", certs / "source.key", certs / "ca.pem")


def client_ctx(certs: Path) -> ssl.SSLContext:
    """The appliance's side: its client certificate, and the CA the source must be issued by."""
    return client_context(certs / "appliance.pem", certs / "appliance.key", certs / "ca.pem")


def sqlite_client(stream: str, replica: Replica, port: int, certs: Path, **kw: Any) -> SqliteStreamClient:
    """The appliance's client of ``stream`` on 127.0.0.1:``port``, over :func:`client_ctx`; ``kw`` as the client takes."""
    return SqliteStreamClient(
        stream,
        stream,
        replica,
        host="127.0.0.1",
        port=port,
        server_name="source",
        ssl_context=client_ctx(certs),
        **kw,
    )


def section(port: int, certs: Path, settings: dict[str, Any]) -> ReplicationSection:
    """The appliance's ``[replication]`` section for an agent on 127.0.0.1:``port`` with the
    :func:`pki` certificates, plus ``settings`` (its streams, keep_versions...)."""
    return ReplicationSection.model_validate(
        {
            "source_agent": f"127.0.0.1:{port}",
            "server_name": "source",
            "tls_cert_file": str(certs / "appliance.pem"),
            "tls_key_file": str(certs / "appliance.key"),
            "tls_ca_file": str(certs / "ca.pem"),
            **settings,
        }
    )


def sqlite_agent(db: Path, certs: Path, stream: str = "db", **kw: Any) -> SourceAgent:
    """A source agent serving the SQLite database ``db`` as ``stream``, over :func:`server_ctx`."""
    return SourceAgent([ServedStream(stream, "sqlite", db)], ssl_context=server_ctx(certs), **kw)


def blob_db(path: Path, rows: int, row_bytes: int) -> sqlite3.Connection:
    """A WAL database of ``rows`` customers, each a ``row_bytes`` note of one repeated byte
    (row i: i % 251); the connection is the application's, usable from any thread."""
    app = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("PRAGMA busy_timeout = 5000")
    app.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, note BLOB)")
    app.executemany(
        "INSERT INTO customers (note) VALUES (?)", ((bytes([i % 251]) * row_bytes,) for i in range(rows))
    )
    return app


async def until(condition: Callable[[], object], seconds: float, interval: float = 0.02) -> bool:
    """Whether ``condition()`` came true within ``seconds`` (looked at every ``interval``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(interval)
    return False
