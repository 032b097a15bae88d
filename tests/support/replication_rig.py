"""The replication tests' one PKI and TLS set-up, instead of the same lines in every file.

Every replication test runs the real agent and client over real mutual TLS: a CA, a
server certificate for "source" and a client certificate for "appliance", and the two
contexts made from them. A test that needs another name (a stranger, a rogue CA) issues
it beside these with :func:`appliance.replication.certs.issue`.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.config import ReplicationSection
from appliance.replication.certs import issue, make_ca
from appliance.replication.client import SqliteStreamClient
from appliance.replication.replica import Replica
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
