"""A wrong certificate on either side gives a clear error on both sides: which certificate, which
CA, which name. Real TLS between a real source agent and the replication service."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from appliance.config import ReplicationSection
from appliance.replication.certs import issue, make_ca
from appliance.replication.service import ReplicationService
from tests.support import replication_rig


def _section(
    port: int, cert: Path, key: Path, ca: Path, server_name: str, replica: Path
) -> ReplicationSection:
    return ReplicationSection.model_validate(
        {
            "source_agent": f"127.0.0.1:{port}",
            "server_name": server_name,
            "tls_cert_file": str(cert),
            "tls_key_file": str(key),
            "tls_ca_file": str(ca),
            "streams": {"customers": {"kind": "sqlite", "source": "customers", "replica": str(replica)}},
        }
    )


@pytest.mark.parametrize("case", ["client_from_another_ca", "wrong_server_name", "client_not_allowed"])
def test_a_refused_handshake_says_why_on_both_sides(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    good, rogue = tmp_path / "good", tmp_path / "rogue"
    make_ca(good)
    make_ca(rogue, name="someone else's CA")
    issue(good, "source", hosts=["127.0.0.1"], server=True)
    issue(good, "appliance", hosts=[], server=False)
    issue(good, "intruder", hosts=[], server=False)
    issue(rogue, "appliance", hosts=[], server=False)
    db = tmp_path / "customers.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE c (x)")
    conn.close()
    client_dir = rogue if case == "client_from_another_ca" else good
    client = "intruder" if case == "client_not_allowed" else "appliance"
    server_name = "not-the-source" if case == "wrong_server_name" else "source"

    async def scenario() -> tuple[str, int]:
        agent = replication_rig.sqlite_agent(db, good, stream="customers", allowed_clients=["appliance"])
        await agent.start()
        section = _section(
            agent.port,
            client_dir / f"{client}.pem",
            client_dir / f"{client}.key",
            good / "ca.pem",
            server_name,
            tmp_path / "rep" / "c.db",
        )
        service = ReplicationService(section)
        await service.start()
        error = ""
        for _ in range(100):
            await asyncio.sleep(0.1)
            error = service.status()[0]["last_error"]
            if error and "Connect call failed" not in error:
                break
        failures = agent.tls_failures
        await service.stop()
        await agent.stop()
        return error, failures

    with caplog.at_level(logging.INFO):
        error, failures = asyncio.run(scenario())
    server_side = " ".join(
        str(getattr(r, "kv", {}).get("error", ""))
        for r in caplog.records
        if r.name.endswith("replication.source")
    )
    client_errors = [
        r for r in caplog.records if r.name.endswith("replication.client") and r.levelno >= logging.ERROR
    ]
    logged = [(r.name, r.getMessage(), getattr(r, "kv", {})) for r in caplog.records]
    assert client_errors, f"the replica did not log the refusal at ERROR: {error!r} {logged}"
    if case == "client_from_another_ca":
        assert "TLS handshake with the source agent" in error and str(rogue / "appliance.pem") in error
        assert str(good / "ca.pem") in error and "someone else's CA" in error
        assert failures >= 1 and "TLS handshake with replica" in server_side
        assert "not signed by the CA this end trusts" in server_side or "certificate" in server_side
    elif case == "wrong_server_name":
        assert "'not-the-source'" in error and str(good / "appliance.pem") in error
    else:
        assert "allowed_clients" in error and "intruder" in error
        assert "allowed_clients" in server_side
