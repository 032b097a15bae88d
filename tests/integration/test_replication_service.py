"""ReplicationService as the daemon wires it: store, metrics, API handlers, promotion, failback guard."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from appliance.api import Caller, RequestError
from appliance.replication.metrics import ReplicationMetrics
from appliance.replication.replica import logical_checksum
from appliance.replication.service import ReplicationService
from appliance.replication.source import ServedStream, SourceAgent
from appliance.store import Store
from tests.support import replication_rig

CALLER = Caller(pid=1, uid=0, gid=0)


def test_service_status_metrics_verify_promote_failback(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db = tmp_path / "customers.db"
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, name TEXT)")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "routing.tbl").write_text("vip 1\n")

    async def scenario() -> None:
        agent = SourceAgent(
            [ServedStream("customers", "sqlite", db), ServedStream("etc", "files", tmp_path / "etc")],
            heartbeat_s=0.1,
            ssl_context=replication_rig.server_ctx(certs),
        )
        await agent.start()
        section = replication_rig.section(
            agent.port,
            certs,
            {
                "streams": {
                    "customers": {
                        "kind": "sqlite",
                        "source": "customers",
                        "replica": str(tmp_path / "rep" / "c.db"),
                        "rpo_budget_s": 2,
                        "snapshot_interval_s": 1,
                    },
                    "etc": {"kind": "files", "source": "etc", "replica": str(tmp_path / "rep" / "etc")},
                },
            },
        )
        store = Store.open(
            tmp_path / "state",
            components={
                "core": __import__("appliance.migrations", fromlist=["CORE"]).CORE,
                "replication": __import__("appliance.replication.schema", fromlist=["MIGRATIONS"]).MIGRATIONS,
            },
        )
        registry = CollectorRegistry()
        service = ReplicationService(section, store=store, metrics=ReplicationMetrics(registry))
        await service.start()
        handlers = service.handlers()
        await asyncio.sleep(0.5)  # seeded; what follows streams as transactions
        for i in range(50):
            app.execute("INSERT INTO c(name) VALUES (?)", (f"customer {i}",))
        await asyncio.sleep(1.5)
        await service.tick()
        status = await handlers["replication.status"](CALLER, {})
        by_name = {s["name"]: s for s in status["streams"]}
        assert by_name["customers"]["connected"] and not by_name["customers"]["over_budget"]
        assert by_name["customers"]["lag_s"] < 1.0
        assert (tmp_path / "rep" / "etc" / "routing.tbl").read_text() == "vip 1\n"
        assert service.readiness() == []
        verify = await handlers["replication.verify"](CALLER, {"stream": "customers"})
        assert verify["ok"] and verify["source_checksum"] == verify["replica_checksum"]
        transactions = registry.get_sample_value(
            "hotsite_replication_transactions_total", {"stream": "customers"}
        )
        assert transactions is not None and transactions >= 50
        lag = registry.get_sample_value("hotsite_replication_lag_seconds", {"stream": "customers"})
        assert lag is not None and lag < 1.0
        assert store.query("SELECT position FROM replication_positions WHERE stream = 'customers'")[0][0]
        assert store.query("SELECT count(*) FROM replication_snapshots")[0][0] >= 1
        with pytest.raises(RequestError, match="unknown stream"):
            await handlers["replication.verify"](CALLER, {"stream": "nope"})
        # Failover: promote, the loss window is reported, the copy is writable and equal to the source.
        promoted = await handlers["replication.promote"](CALLER, {"stream": "customers"})
        assert promoted["data_loss_window_s"] is not None and promoted["data_loss_window_s"] < 2.0
        assert logical_checksum(Path(promoted["path"])) == logical_checksum(db)
        assert service.failback_check("customers") is not None
        w = sqlite3.connect(promoted["path"], isolation_level=None)
        w.execute("INSERT INTO c(name) VALUES ('taken at the backup')")
        w.close()
        assert "backup has written" in (service.failback_check("customers") or "")
        # The promoted copy is the live database now: its "lag" behind a source it no longer
        # follows is no incident (it paged after every failover).
        for i in range(5):
            app.execute("INSERT INTO c(name) VALUES (?)", (f"late {i}",))
        await asyncio.sleep(2.5)  # past the 2 s budget
        await service.tick()
        status = await handlers["replication.status"](CALLER, {})
        promoted_view = next(s for s in status["streams"] if s["name"] == "customers")
        assert promoted_view["promoted"] and not promoted_view["over_budget"], promoted_view
        assert service.readiness() == []
        assert registry.get_sample_value("hotsite_replication_over_budget", {"stream": "customers"}) == 0
        with pytest.raises(RequestError, match="refusing to resume"):
            await handlers["replication.demote"](CALLER, {"stream": "customers"})
        await service.stop()
        await agent.stop()
        store.close()

    asyncio.run(scenario())
