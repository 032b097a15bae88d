"""SQLite stream under a random writer: the replica is always a committed source state.

A separate writer process runs random transactions (inserts, updates,
deletes, large blobs, schema changes, VACUUM, its own checkpoints including
TRUNCATE) and appends the whole-database checksum after every commit to a
file: the set of committed states. The agent and the replica run for real
(mutual TLS on loopback); some tests SIGKILL them mid-stream. After each
scenario the replica's checksum (recomputed from its file) is one of the
committed states and, after catch-up, the final one.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.replication.checksum import show
from appliance.replication.client import StreamStats
from appliance.replication.replica import Replica, file_checksum, logical_checksum
from tests.conftest import REPO, free_port
from tests.support import replication_rig

PY = sys.executable


# ---------------------------------------------------------------------------
# The writer (also run as a subprocess: python -m tests.integration.test_replication_consistency writer ...)


def writer(db: Path, out: Path, seconds: float, seed: int, rate: float = 200.0) -> None:
    rnd = random.Random(seed)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA wal_autocheckpoint=200")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS customers (id INTEGER PRIMARY KEY, name TEXT, phone TEXT, note BLOB)"
    )
    extra_tables: list[str] = []
    columns = 0
    with open(out, "a", buffering=1) as log:

        def committed() -> None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            image = conn.serialize()
            checksum = 0
            from appliance.replication.checksum import page_hash

            view = memoryview(image)
            for i in range(len(image) // page_size):
                checksum ^= page_hash(i + 1, view[i * page_size : (i + 1) * page_size])
            log.write(f"{checksum:016x}\n")

        committed()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            op = rnd.random()
            if op < 0.015:
                conn.execute("VACUUM")
            elif op < 0.04:
                mode = rnd.choice(["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
                conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
                time.sleep(1 / rate)
                continue
            elif op < 0.06:
                if extra_tables and rnd.random() < 0.4:
                    conn.execute(f"DROP TABLE {extra_tables.pop()}")
                elif rnd.random() < 0.5:
                    name = f"extra_{rnd.randrange(10**6)}"
                    conn.execute(f"CREATE TABLE {name} (k INTEGER PRIMARY KEY, v TEXT)")
                    conn.execute(f"INSERT INTO {name}(v) VALUES ('x'), ('y')")
                    extra_tables.append(name)
                else:
                    columns += 1
                    conn.execute(f"ALTER TABLE customers ADD COLUMN c{columns}_{rnd.randrange(1000)} TEXT")
            else:
                conn.execute("BEGIN IMMEDIATE")
                for _ in range(rnd.randint(1, 6)):
                    kind = rnd.random()
                    if kind < 0.5:
                        size = rnd.choice([0, 10, 100, 3000, 20000]) if rnd.random() > 0.03 else 300_000
                        conn.execute(
                            "INSERT INTO customers(name, phone, note) VALUES (?, ?, ?)",
                            (f"n{rnd.random()}", f"+86{rnd.randrange(10**10)}", rnd.randbytes(size)),
                        )
                    elif kind < 0.8:
                        conn.execute(
                            "UPDATE customers SET name = ?, note = ? WHERE id IN"
                            " (SELECT id FROM customers ORDER BY random() LIMIT 3)",
                            (f"u{rnd.random()}", rnd.randbytes(rnd.choice([5, 500, 5000]))),
                        )
                    else:
                        conn.execute(
                            "DELETE FROM customers WHERE id IN (SELECT id FROM customers ORDER BY random() LIMIT 4)"
                        )
                conn.execute("COMMIT")
            committed()
            time.sleep(1 / rate)
    conn.close()


# ---------------------------------------------------------------------------
# Replica runner (subprocess, so it can be SIGKILLed)


def replica_main(replica_path: Path, port: int, certs: Path) -> None:
    async def run() -> None:
        replica = Replica(replica_path)
        replica.open()
        client = replication_rig.sqlite_client("customers", replica, port, certs)
        await client.run()

    asyncio.run(run())


# ---------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    replication_rig.pki(d)
    return d


def committed(out: Path) -> list[int]:
    return [int(line, 16) for line in out.read_text().split() if len(line) == 16]


def agent_config(tmp_path: Path, db: Path, certs: Path, port: int) -> Path:
    path = tmp_path / "source.toml"
    path.write_text(f"""
[source]
listen = "127.0.0.1:{port}"
tls_cert_file = "{certs / "source.pem"}"
tls_key_file = "{certs / "source.key"}"
tls_ca_file = "{certs / "ca.pem"}"
allowed_clients = ["appliance"]
poll_interval_s = 0.01
heartbeat_s = 0.2

[streams.customers]
kind = "sqlite"
path = "{db}"
""")
    return path


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def settle(replica_path: Path, out: Path, timeout: float = 20.0) -> tuple[int, int]:
    """Wait until the replica file equals the final committed state; return (replica, final)."""
    deadline = time.monotonic() + timeout
    final = committed(out)[-1]
    page_size = 4096
    current = -1
    while time.monotonic() < deadline:
        if replica_path.exists():
            current = file_checksum(replica_path, page_size)
            if current == final:
                break
        time.sleep(0.2)
    return current, final


def start_writer(db: Path, out: Path, seconds: float, seed: int) -> subprocess.Popen[bytes]:
    proc = spawn(
        "-m",
        "tests.integration.test_replication_consistency",
        "writer",
        str(db),
        str(out),
        str(seconds),
        str(seed),
    )
    deadline = time.monotonic() + 10
    while not (out.exists() and committed(out)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


# ---------------------------------------------------------------------------
# Tests


@pytest.mark.slow
def test_random_writer_replica_is_always_a_committed_state(tmp_path: Path, certs: Path) -> None:
    db, out, rep_path = (
        tmp_path / "customers.db",
        tmp_path / "committed.txt",
        tmp_path / "replica" / "customers.db",
    )
    samples: list[int] = []

    async def scenario() -> StreamStats:
        agent = replication_rig.sqlite_agent(
            db, certs, stream="customers", allowed_clients=["appliance"], heartbeat_s=0.2
        )
        await agent.start()
        replica = Replica(rep_path)
        replica.open()
        client = replication_rig.sqlite_client("customers", replica, agent.port, certs)
        task = asyncio.create_task(client.run())
        proc = await asyncio.to_thread(start_writer, db, out, 5.0, 1)
        while proc.poll() is None:
            await asyncio.sleep(0.25)
            if replica.page_size:
                with replica.locked() as path:  # a reader's view: apply held off meanwhile
                    samples.append(file_checksum(path, replica.page_size))
        verify = await client.verify()
        assert verify["ok"], verify
        for _ in range(100):
            if replica.checksum == committed(out)[-1]:
                break
            await asyncio.sleep(0.1)
        task.cancel()
        await agent.stop()
        replica.close()
        return client.stats

    stats = asyncio.run(scenario())
    states = set(committed(out))
    assert len(states) > 100, "the writer should have committed plenty of transactions"
    assert samples and all(s in states for s in samples), [show(s) for s in samples if s not in states]
    assert file_checksum(rep_path, 4096) == committed(out)[-1] == logical_checksum(db)
    assert stats.transactions > 50 and stats.corrupt_messages == 0 and stats.checksum_mismatches == 0
    conn = sqlite3.connect(f"file:{rep_path}?mode=ro", uri=True)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


@pytest.mark.slow
def test_sigkill_agent_and_appliance_mid_stream(tmp_path: Path, certs: Path) -> None:
    db, out, rep_path = (
        tmp_path / "customers.db",
        tmp_path / "committed.txt",
        tmp_path / "replica" / "customers.db",
    )
    port = free_port()
    cfg = agent_config(tmp_path, db, certs, port)
    agent_args = ("-m", "appliance.cli.replication", "source", "-c", str(cfg))
    replica_args = (
        "-m",
        "tests.integration.test_replication_consistency",
        "replica",
        str(rep_path),
        str(port),
        str(certs),
    )
    w = start_writer(db, out, 6.0, 2)
    agent = spawn(*agent_args)
    replica = spawn(*replica_args)
    observed: list[int] = []
    try:
        time.sleep(1.5)
        kill(agent)  # SIGKILL the source agent mid-stream
        time.sleep(0.5)
        agent = spawn(*agent_args)
        time.sleep(1.5)
        _wait_seeded(rep_path)  # on a loaded machine the restarts take a while: kill mid-stream, not before
        kill(replica)  # SIGKILL the appliance mid-apply
        observed.append(_recovered_checksum(rep_path))
        replica = spawn(*replica_args)
        time.sleep(1.0)
        kill(replica)
        observed.append(_recovered_checksum(rep_path))
        replica = spawn(*replica_args)
        w.wait(30)
        current, final = settle(rep_path, out)
        assert current == final, f"replica {show(current)} never reached the final state {show(final)}"
    finally:
        for p in (w, agent, replica):
            kill(p)
    states = set(committed(out))
    assert all(o in states for o in observed), (
        "after a SIGKILL the recovered replica must be a committed state"
    )
    assert file_checksum(rep_path, 4096) == logical_checksum(db)


def _wait_seeded(rep_path: Path, timeout: float = 20.0) -> None:
    """Until the replica has a journal (it was seeded), so that a kill lands mid-stream."""
    deadline = time.monotonic() + timeout
    journals = Path(str(rep_path) + ".hotsite")
    while not any(journals.glob("journal-*")):
        assert time.monotonic() < deadline, "the replica was never seeded"
        time.sleep(0.05)


def _recovered_checksum(rep_path: Path) -> int:
    """What a restarted appliance sees: open (redo the journal if needed), checksum the file."""
    r = Replica(rep_path)
    for _ in range(50):
        try:
            r.open()
            break
        except Exception:
            time.sleep(0.05)
    try:
        return r.full_checksum()
    finally:
        r.close()


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "replica":
        replica_main(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
