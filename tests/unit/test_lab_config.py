"""Lab building blocks that need no root: topology constants and the Kamailio config."""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config as appliance_config
from provisioning.lab import config as lab_config
from provisioning.lab import crm, kamailio
from provisioning.lab import replication as lab_repl
from provisioning.lab import topology as topo


def test_topology_is_consistent() -> None:
    names = [h.name for h in topo.HOSTS]
    assert len(set(names)) == len(names)
    for attr in ("netns_addr", "loopback_addr"):
        addrs = [getattr(h, attr) for h in topo.HOSTS]
        assert len(set(addrs)) == len(addrs)
    for h in topo.HOSTS:
        assert h.loopback_addr.startswith("127.")
        assert len(h.core_iface) <= 15 and len(h.namespace) <= 64
        assert h.namespace.startswith(topo.NS_PREFIX)
    assert topo.host("primary").ports() == {"sip": 5060, "http": 8080}
    with pytest.raises(KeyError, match="known"):
        topo.host("nope")


def test_dispatcher_list_keeps_per_call_failover_in_set_1() -> None:
    lines = [
        line.split()
        for line in kamailio.render_dispatcher_list("10.77.0.20", "10.77.0.30").splitlines()
        if not line.startswith("#")
    ]
    assert [(x[0], x[1], x[2], x[3]) for x in lines] == [
        ("1", "sip:10.77.0.20:5060", "0", "10"),  # the primary first...
        ("1", "sip:10.77.0.30:5060", "0", "0"),  # ...the backup when it does not answer
        ("2", "sip:10.77.0.30:5060", "0", "0"),
    ]


@pytest.mark.skipif(kamailio.find_binary() is None, reason="kamailio is not installed")
def test_generated_cfg_passes_kamailio_check(tmp_path: Path) -> None:
    module_dir = kamailio.find_module_dir()
    assert module_dir is not None
    assert kamailio.missing_modules(module_dir) == []
    dlist = tmp_path / "dispatcher.list"
    dlist.write_text(kamailio.render_dispatcher_list("127.0.0.1", "127.0.0.1"))
    cfg = tmp_path / "kamailio.cfg"
    text = kamailio.render_cfg(
        address="127.0.0.1",
        module_dir=module_dir,
        dispatcher_list=dlist,
        rpc_socket=tmp_path / "rpc.sock",
    )
    assert "ds_ping_reply_codes" not in text.replace("ds_ping_reply_codes deliberately", "")
    cfg.write_text(text)
    (tmp_path / "run").mkdir()
    binary = kamailio.find_binary()
    assert binary is not None and (shutil.which(binary) or Path(binary).exists())
    r = subprocess.run(
        [binary, "-c", "-f", str(cfg), "-Y", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_replication_pieces_validate_as_the_agent_and_the_appliance_read_them(tmp_path: Path) -> None:
    """`lab up --with-replication` without root: the CRM database, the agent's config (its own
    `--check`), and the appliance's [replication] section written from the lab's info."""

    repl = lab_repl.prepare(tmp_path, "10.77.0.20")
    db = Path(repl["streams"]["crm"]["path"])
    conn = sqlite3.connect(db, isolation_level=None)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == crm.CUSTOMERS
    assert conn.execute("SELECT count(*) FROM tickets").fetchone()[0] == crm.TICKETS
    crm.write_once(conn, random.Random(1))  # what the writer commits, one transaction at a time
    assert conn.execute("SELECT count(*) FROM tickets").fetchone()[0] == crm.TICKETS + 1
    conn.close()
    assert (Path(repl["streams"]["dialplans"]["path"]) / "ivr" / "vip.conf").is_file()
    check = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "source", "--config", repl["source_config"], "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and "ok (2 streams)" in check.stdout, check.stdout + check.stderr
    names = [cmd[0] for cmd in lab_repl.commands(repl)]
    assert names == ["source", "crm-writer"]
    assert all(any(str(tmp_path) in a for a in cmd) for _, cmd in lab_repl.commands(repl)), "found by down()"

    hosts = [
        {"name": n, "role": r, "address": a, "ports": {"sip": 5060, "http": 8080}}
        for n, r, a in [
            ("primary", "primary-sbc", "10.77.0.20"),
            ("backup", "backup-sbc", "10.77.0.30"),
            ("witness", "witness", "10.77.0.40"),
        ]
    ]
    info = {
        "mode": "netns",
        "workdir": str(tmp_path),
        "appliance": {"interface": "hs-appl"},
        "hosts": hosts,
        "kamailio": {
            "sip": "10.77.0.10:5060",
            "rpc_url": "http://10.77.0.10:5071/RPC",
            "dispatcher_list": str(tmp_path / "dispatcher.list"),
            "sets": {"primary": 1, "backup": 2},
        },
    }
    without = lab_config.render(info)
    assert "[replication" not in without  # the lab's default: the other lab tests see no streams
    path = tmp_path / "hotsite.toml"
    path.write_text(lab_config.render({**info, "replication": repl}))
    cfg = appliance_config.load(path)
    streams = cfg.replication.streams
    assert {n: s.kind for n, s in streams.items()} == {"crm": "sqlite", "dialplans": "files"}
    assert all(s.replica.is_relative_to(tmp_path / lab_config.REPLICA_DIR) for s in streams.values())
    assert cfg.replication.source_agent == "10.77.0.20:7450" and cfg.replication.server_name == "lab-source"
