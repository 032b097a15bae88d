"""Replication benchmarks: RPO under load over a 20 ms link, apply rate, source overhead.

Run: .venv/bin/python -m tests.benchmarks.bench_replication [--seconds 8]
Prints figures side by side with the named peers. Not part of `make test`.

- RPO: a writer process commits single-row transactions at 1,000 and 5,000/s,
  each row carrying its commit time; the replica, behind a proxy that delays
  every byte by 20 ms each way, records when each row became visible in its
  file. RPO of a row = visible - committed. Target p99 < 1 s (Litestream's
  default sync interval is 1 s).
- Catch-up apply rate: N transactions committed while the replica is
  disconnected, then the time to apply them, next to a plain local SQLite
  insert of the same rows (one transaction each) in the same run.
- Source overhead and WAL size: the writer at 1,000 and 5,000 tx/s and flat
  out, alone, with an agent following its WAL and a replica applying, and
  alone again (the peer is the same writer without replication, same run);
  the WAL's largest size during each run. Flat out, the writer alone varies
  by several percent from one run to the next on this machine, so it is run
  in --rounds interleaved rounds and the median is reported. Target: < 10% slower.
- Initial seeding: a database of --seed-mb MB (1024 by default; pass 256 on
  a slow machine) seeded over the 20 ms link (TLS, zlib), side by side with
  the sqlite3 CLI's ``.backup`` plus a copy of the result through the same
  delayed link (plain TCP) and a local ``cp``; with the growth of this
  process's resident memory during the seed (must stay bounded).
- Issue 15 (--only-issue15): its application workload (customer rows, ~300 KB
  blobs in a tenth of the transactions, deletes, a TRUNCATE checkpoint after 1%
  of them, a VACUUM every --vacuum-every) at 20 tx/s and flat out over the
  20 ms link: RPO p50/p99/max of the inserted rows, resnapshots (target 0).
  Then, on a database of --vacuum-mb MB: a VACUUM that moves every page, time
  until the replica is equal again beside copying the file over the same link
  (target within 2x); and a resync after an outage in which a tenth of the
  pages changed, beside a full resnapshot (a new replica seeded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.replication.certs import issue, make_ca
from appliance.replication.client import SqliteStreamClient
from appliance.replication.position import Position
from appliance.replication.replica import Replica, logical_checksum
from appliance.replication.source import ServedStream, SourceAgent
from appliance.replication.tls import client_context, server_context
from appliance.replication.wal import WalFile

DELAY_S = 0.020


def _writer(db: str, rate: float, seconds: float, result: mp.Queue) -> None:  # type: ignore[type-arg]
    """Single-row transactions at ``rate``/s (0: as fast as possible); puts (tx/s, p50, p99 commit seconds)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, ts REAL, payload TEXT)")
    n = 0
    lat: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        if rate and n >= (now - start) * rate:
            time.sleep(0.0005)
            continue
        t0 = time.perf_counter()
        conn.execute("INSERT INTO t (ts, payload) VALUES (?, ?)", (time.time(), "customer record " * 8))
        lat.append(time.perf_counter() - t0)
        n += 1
    lat.sort()
    wal = Path(db + "-wal")
    wal_mb = wal.stat().st_size / 1e6 if wal.exists() else 0.0
    result.put((n / (time.perf_counter() - start), lat[len(lat) // 2], lat[int(len(lat) * 0.99)], wal_mb))
    conn.close()


async def _delay_proxy(
    target_port: int, host: str = "127.0.0.1", delay_s: float = DELAY_S
) -> asyncio.AbstractServer:
    """A TCP proxy on 127.0.0.1 that delays every byte by ``delay_s`` each way (no netem here).

    It closes a side only when the other closes: a path that drops packets stalls it, it
    does not end it, as a real partition would not.
    """

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def out() -> None:
            while True:
                due, data = await q.get()
                if not data:
                    w.close()
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                w.write(data)
                await w.drain()

        task = asyncio.create_task(out())
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                q.put_nowait((time.monotonic() + delay_s, data))
        q.put_nowait((0, b""))
        with contextlib.suppress(Exception):
            await task

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(host, target_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.certs = work / "tls"
        make_ca(self.certs)
        issue(self.certs, "source", hosts=["127.0.0.1"], server=True)
        issue(self.certs, "appliance", hosts=[], server=False)

    def agent(self, db: Path) -> SourceAgent:
        c = self.certs
        return SourceAgent(
            [ServedStream("db", "sqlite", db)],
            heartbeat_s=0.2,
            poll_interval_s=0.005,
            ssl_context=server_context(c / "source.pem", c / "source.key", c / "ca.pem"),
        )

    def client(self, replica: Replica, port: int, **kw: object) -> SqliteStreamClient:
        c = self.certs
        return SqliteStreamClient(
            "db",
            "db",
            replica,
            host="127.0.0.1",
            port=port,
            server_name="source",
            ssl_context=client_context(c / "appliance.pem", c / "appliance.key", c / "ca.pem"),
            **kw,
        )  # type: ignore[arg-type]


async def rpo(bench: Bench, rate: float, seconds: float) -> dict[str, float]:
    d = bench.work / f"rpo{int(rate)}"
    d.mkdir()
    db = d / "src.db"
    init = sqlite3.connect(db, isolation_level=None)
    init.execute("PRAGMA journal_mode=WAL")
    init.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, ts REAL, payload TEXT)")
    init.close()
    agent = bench.agent(db)
    await agent.start()
    proxy = await _delay_proxy(agent.port)
    replica = Replica(d / "rep.db")
    replica.open()
    samples: list[float] = []
    seen = {"max": 0}

    def on_applied(_batch: object) -> None:
        now = time.time()
        conn = sqlite3.connect(f"file:{replica.path}?immutable=1", uri=True)
        try:
            rows = conn.execute("SELECT id, ts FROM t WHERE id > ?", (seen["max"],)).fetchall()
        except sqlite3.Error:
            rows = []
        conn.close()
        for rid, ts in rows:
            samples.append(now - ts)
            seen["max"] = max(seen["max"], rid)

    client = bench.client(replica, proxy.sockets[0].getsockname()[1], on_applied=on_applied)
    task = asyncio.create_task(client.run())
    await asyncio.sleep(1.0)
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=_writer, args=(str(db), rate, seconds, q))
    p.start()
    await asyncio.to_thread(p.join)
    achieved = q.get()[0]
    wal_bytes = (d / "src.db-wal").stat().st_size
    await asyncio.sleep(1.5)
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    proxy.close()
    await agent.stop()
    replica.close()
    samples.sort()
    return {
        "rate": achieved,
        "rows": len(samples),
        "p50": statistics.median(samples),
        "p99": samples[int(len(samples) * 0.99) - 1],
        "max": samples[-1],
        "bytes": client.stats.bytes_received,
        "wal_mb": wal_bytes / 1e6,
    }


async def catch_up(bench: Bench, n: int) -> dict[str, float]:
    d = bench.work / "catchup"
    d.mkdir()
    db = d / "src.db"
    src = sqlite3.connect(db, isolation_level=None)
    src.execute("PRAGMA journal_mode=WAL")
    src.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, ts REAL, payload TEXT)")
    agent = bench.agent(db)
    await agent.start()
    replica = Replica(d / "rep.db")
    replica.open()
    client = bench.client(replica, agent.port)
    task = asyncio.create_task(client.run())
    await asyncio.sleep(0.5)
    # Streaming apply: the source commits as fast as it can, one row per transaction.
    src.execute("PRAGMA synchronous=NORMAL")
    rows = [(time.time(), "customer record " * 8) for _ in range(n)]
    t0 = time.perf_counter()
    for r in rows:
        src.execute("INSERT INTO t (ts, payload) VALUES (?, ?)", r)
    source_s = time.perf_counter() - t0
    target = n
    while True:
        with replica.locked():  # never read the replica file while a batch is being written
            c = sqlite3.connect(f"file:{replica.path}?immutable=1", uri=True)
            try:
                got = c.execute("SELECT count(*) FROM t").fetchone()[0]
            except sqlite3.Error:
                got = 0
            c.close()
        if got >= target:
            break
        await asyncio.sleep(0.01)
    stream_s = time.perf_counter() - t0
    streamed_tx = client.stats.transactions
    # Catch-up after a disconnection: n more transactions, then reconnect.
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    for r in rows:
        src.execute("INSERT INTO t (ts, payload) VALUES (?, ?)", r)
    t1 = time.perf_counter()
    client = bench.client(replica, agent.port)
    task = asyncio.create_task(client.run())
    while (
        replica.position is None
        or client.stats.sessions == 0
        or replica.applied_at is None
        or replica.applied_at < time.time() - (time.perf_counter() - t1)
    ):
        await asyncio.sleep(0.005)
    catchup_s = time.perf_counter() - t1
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    await agent.stop()
    replica.close()
    src.close()
    # The peer: a plain local SQLite insert of the same rows, one transaction each.
    peers = {}
    for sync in ("FULL", "NORMAL"):
        p = d / f"plain-{sync}.db"
        c = sqlite3.connect(p, isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute(f"PRAGMA synchronous={sync}")
        c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, ts REAL, payload TEXT)")
        t2 = time.perf_counter()
        for r in rows:
            c.execute("INSERT INTO t (ts, payload) VALUES (?, ?)", r)
        peers[sync] = n / (time.perf_counter() - t2)
        c.close()
    return {
        "n": n,
        "source_tx_s": n / source_s,
        "stream_tx_s": n / stream_s,
        "streamed_tx": streamed_tx,
        "catchup_tx_s": n / catchup_s,
        "catchup_s": catchup_s,
        "plain_full": peers["FULL"],
        "plain_normal": peers["NORMAL"],
    }


def _replica_process(rep: str, port: int, certs: str, cpus: set[int] | None, stop: mp.Event) -> None:  # type: ignore[type-arg]
    """The appliance side in its own process (as it is in production: another machine)."""
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def run() -> None:
        c = Path(certs)
        replica = Replica(Path(rep))
        replica.open()
        client = SqliteStreamClient(
            "db",
            "db",
            replica,
            host="127.0.0.1",
            port=port,
            server_name="source",
            ssl_context=client_context(c / "appliance.pem", c / "appliance.key", c / "ca.pem"),
        )
        task = asyncio.create_task(client.run())
        while not stop.is_set():
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        replica.close()

    asyncio.run(run())


OVERHEAD_MODES = {
    # mode: (replicated, writer CPUs, agent + replica CPUs)
    "alone": (False, None, None),
    "replicated": (True, None, None),
    "alone-pinned": (False, {0}, None),
    "replicated-pinned": (True, {0}, {1}),
    "alone2": (False, None, None),
}


async def overhead(bench: Bench, seconds: float, rate: float) -> dict[str, tuple[float, ...]]:
    """The writer alone and replicated, side by side in the same run.

    The agent runs in this process and the replica in its own (as in production, where the
    replica is on another machine). "pinned": the writer alone on CPU 0, the agent and the
    replica sharing CPU 1 (the machine has two cores), so they cannot take the writer's core.
    """
    results: dict[str, tuple[float, ...]] = {}
    everything = os.sched_getaffinity(0)
    for mode, (replicated, writer_cpus, others) in OVERHEAD_MODES.items():
        d = bench.work / f"ovh-{mode}-{int(rate)}"
        d.mkdir()
        db = d / "src.db"
        init = sqlite3.connect(db, isolation_level=None)
        init.execute("PRAGMA journal_mode=WAL")
        init.close()
        os.sched_setaffinity(0, others or everything)  # threads started from now on inherit it
        agent = rep = None
        stop = mp.Event()
        if replicated:
            agent = bench.agent(db)
            await agent.start()
            rep = mp.Process(
                target=_replica_process, args=(str(d / "rep.db"), agent.port, str(bench.certs), others, stop)
            )
            rep.start()
            await asyncio.sleep(1.0)
        q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        p = mp.Process(target=_writer, args=(str(db), rate, seconds, q))
        p.start()
        os.sched_setaffinity(p.pid, writer_cpus or everything)
        wal = Path(str(db) + "-wal")
        biggest = 0
        while p.is_alive():
            with contextlib.suppress(FileNotFoundError):
                biggest = max(biggest, wal.stat().st_size)
            await asyncio.sleep(0.02)
        p.join()
        restarts = sum(f.restarts for f in agent.followers) if agent is not None else 0
        hold = max((f.restart_hold_s for f in agent.followers), default=0.0) if agent is not None else 0.0
        held = (
            sum(getattr(f, "restart_hold_total_s", 0.0) for f in agent.followers)
            if agent is not None
            else 0.0
        )
        followers = agent.followers if agent is not None else set()
        windows = sum(f.window_restarts for f in followers)
        tails = sum(f.tail_frames for f in followers)
        resnapshots = agent.continuity_lost if agent is not None else 0
        results[mode] = (*q.get(), biggest / 1e6, restarts, hold, held, windows, tails, resnapshots)
        stop.set()
        if rep is not None:
            await asyncio.to_thread(rep.join, 10)
        if agent is not None:
            await agent.stop()
        os.sched_setaffinity(0, everything)
        shutil.rmtree(d, ignore_errors=True)
    return results


def _make_db(path: Path, mb: int) -> None:
    """Customer-like rows (text that compresses about 3:1, like real records) up to ``mb`` MB."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, notes TEXT)")
    row = 2000
    batch = 2000
    target = mb * 1_000_000
    n = 0
    while n * row < target:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO customers (name, notes) VALUES (?, ?)",
            (
                (f"customer {n + i}", os.urandom(row // 3).hex()[: row // 3] + "account history " * 80)
                for i in range(batch)
            ),
        )
        conn.execute("COMMIT")
        n += batch
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _send_through(path: Path) -> float:
    """Copy ``path`` through the delayed link (plain TCP) to a file; seconds until it is all written."""
    done = asyncio.get_running_loop().create_future()
    dest = path.with_name(path.name + ".copy")

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with open(dest, "wb") as out:
            while data := await r.read(1 << 20):
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        w.close()
        done.set_result(None)

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    proxy = await _delay_proxy(server.sockets[0].getsockname()[1])
    t0 = time.perf_counter()
    _r, w = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            w.write(chunk)
            await w.drain()
    w.close()
    await done
    seconds = time.perf_counter() - t0
    proxy.close()
    server.close()
    dest.unlink()
    return seconds


async def seeding(bench: Bench, mb: int) -> dict[str, float]:
    d = bench.work / "seed"
    d.mkdir()
    db = d / "src.db"
    t0 = time.perf_counter()
    _make_db(db, mb)
    made_s = time.perf_counter() - t0
    size = db.stat().st_size
    agent = bench.agent(db)
    await agent.start()
    proxy = await _delay_proxy(agent.port)
    replica = Replica(d / "rep.db")
    replica.open()
    base_rss = _rss_mb()
    peak = base_rss
    client = bench.client(replica, proxy.sockets[0].getsockname()[1])
    t1 = time.perf_counter()
    task = asyncio.create_task(client.run())
    while replica.position is None:
        peak = max(peak, _rss_mb())
        await asyncio.sleep(0.05)
    seed_s = time.perf_counter() - t1
    seed_rss = peak - base_rss
    seed_wire = client.stats.bytes_received
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # the WAL keeps the outage's frames (for the resume)
    conn.execute(
        "UPDATE customers SET name = 'first ' || name WHERE id = 1"
    )  # the replica enters a WAL generation
    while replica.checksum != logical_checksum(db):
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    ok = replica.full_checksum() == logical_checksum(db)
    # Resume after an outage during which every page changed: one batch as large as the database,
    # sent in chunks and staged on disk (it used to be built whole, and over 256 MB it could not be sent).
    conn.execute("UPDATE customers SET name = name || '!'")  # kept open: closing the last connection
    want = logical_checksum(db)
    base_rss = peak = _rss_mb()
    client = bench.client(replica, proxy.sockets[0].getsockname()[1])
    t4 = time.perf_counter()
    task = asyncio.create_task(client.run())
    while replica.checksum != want or client.stats.batches == 0:
        peak = max(peak, _rss_mb())
        await asyncio.sleep(0.05)
    resume_s = time.perf_counter() - t4
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    await agent.stop()
    proxy.close()
    conn.close()  # would checkpoint and delete the WAL, and the resume above would be a resnapshot
    resumed_ok = replica.full_checksum() == want and client.stats.mode == "resume"
    replica.close()
    (d / "rep.db").unlink()
    shutil.rmtree(d / "rep.db.hotsite", ignore_errors=True)
    # The peer: sqlite3 .backup (online backup API) then the copy.
    backup = d / "backup.db"
    t2 = time.perf_counter()
    subprocess.run(["sqlite3", str(db), f".backup '{backup}'"], check=True)
    backup_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    shutil.copyfile(backup, d / "copy.db")
    with open(d / "copy.db", "rb+") as f:
        os.fsync(f.fileno())
    cp_s = time.perf_counter() - t3
    (d / "copy.db").unlink()
    link_s = await _send_through(backup)
    shutil.rmtree(d, ignore_errors=True)
    return {
        "mb": size / 1e6,
        "made_s": made_s,
        "seed_s": seed_s,
        "ok": float(ok),
        "rss_growth": seed_rss,
        "wire_mb": seed_wire / 1e6,
        "backup_s": backup_s,
        "cp_s": cp_s,
        "link_s": link_s,
        "resume_s": resume_s,
        "resume_ok": float(resumed_ok),
        "resume_rss": peak - base_rss,
        "resume_pages": client.stats.pages,
        "resume_wire_mb": client.stats.bytes_received / 1e6,
        "resume_buffered_mb": getattr(client.stats, "buffered_peak_bytes", float("nan")) / 1e6,
    }


BLOB = 300_000


def _crm_writer(
    db: str, rate: float, transactions: int, vacuum_every: int, seed: int, result: mp.Queue
) -> None:  # type: ignore[type-arg]
    """Issue 15's workload: customer rows, a ~300 KB blob in one transaction in ten, deletes of the
    oldest rows, a TRUNCATE checkpoint after 1% of transactions, a VACUUM every ``vacuum_every``.
    Every insert carries its commit time (``ts``). Puts (tx/s, TRUNCATEs, VACUUMs, VACUUM seconds)."""
    import random

    rnd = random.Random(seed)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    truncates = vacuums = 0
    vacuum_s = 0.0
    start = time.perf_counter()
    for n in range(1, transactions + 1):
        if rate:
            ahead = start + n / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        conn.execute("BEGIN IMMEDIATE")
        kind = rnd.random()
        if kind < 0.6:
            note = rnd.randbytes(BLOB) if kind < 0.1 else rnd.randbytes(200)
            conn.execute(
                "INSERT INTO customers (name, ts, note) VALUES (?, ?, ?)", (f"c{n}", time.time(), note)
            )
        elif kind < 0.85:
            conn.execute(
                "UPDATE customers SET name = ? WHERE id = (SELECT max(id) - ? FROM customers)",
                (f"u{n}", rnd.randrange(50)),
            )
        else:
            conn.execute("DELETE FROM customers WHERE id IN (SELECT id FROM customers ORDER BY id LIMIT 6)")
        conn.execute("COMMIT")
        if n % vacuum_every == 0:
            t0 = time.perf_counter()
            conn.execute("VACUUM")
            vacuum_s += time.perf_counter() - t0
            vacuums += 1
        elif rnd.random() < 0.01:
            truncates += conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    result.put((transactions / (time.perf_counter() - start), truncates, vacuums, vacuum_s))
    conn.close()


async def blob_vacuum_rpo(
    bench: Bench, rate: float, transactions: int, vacuum_every: int
) -> dict[str, float]:
    """RPO of issue 15's workload over the 20 ms link; resnapshots and sessions (none may end)."""
    d = bench.work / f"blobs{int(rate)}"
    d.mkdir()
    db = d / "src.db"
    init = sqlite3.connect(db, isolation_level=None)
    init.execute("PRAGMA journal_mode=WAL")
    init.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, ts REAL, note BLOB)")
    init.executemany(
        "INSERT INTO customers (name, ts, note) VALUES (?, 0, ?)",
        ((f"s{i}", bytes(200)) for i in range(2000)),
    )
    init.close()
    agent = bench.agent(db)
    await agent.start()
    proxy = await _delay_proxy(agent.port)
    replica = Replica(d / "rep.db")
    replica.open()
    samples: list[float] = []
    seen = {"max": 0}

    def on_applied(_batch: object) -> None:
        now = time.time()
        conn = sqlite3.connect(f"file:{replica.path}?immutable=1", uri=True)
        try:
            rows = conn.execute(
                "SELECT id, ts FROM customers WHERE id > ? AND ts > 0", (seen["max"],)
            ).fetchall()
        except sqlite3.Error:
            rows = []
        conn.close()
        for rid, ts in rows:
            samples.append(now - ts)
            seen["max"] = max(seen["max"], rid)

    client = bench.client(replica, proxy.sockets[0].getsockname()[1], on_applied=on_applied)
    task = asyncio.create_task(client.run())
    while replica.position is None:
        await asyncio.sleep(0.05)
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=_crm_writer, args=(str(db), rate, transactions, vacuum_every, 15, q))
    p.start()
    await asyncio.to_thread(p.join)
    achieved, truncates, vacuums, vacuum_s = q.get()
    want = logical_checksum(db)
    deadline = time.monotonic() + 120
    while replica.checksum != want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    equal = replica.checksum == want
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    proxy.close()
    await agent.stop()
    replica.close()
    shutil.rmtree(d, ignore_errors=True)
    samples.sort()
    return {
        "rate": achieved,
        "rows": len(samples),
        "p50": statistics.median(samples),
        "p99": samples[int(len(samples) * 0.99) - 1],
        "max": samples[-1],
        "truncates": truncates,
        "vacuums": vacuums,
        "vacuum_s": vacuum_s,
        "resnapshots": client.stats.resnapshots,
        "continuity_lost": agent.continuity_lost,
        "sessions": client.stats.sessions,
        "equal": float(equal),
        "wire_mb": client.stats.bytes_received / 1e6,
    }


_PEAK = {"rss": 0.0}


async def _until_equal(replica: Replica, db: Path, timeout: float = 600) -> float:
    """Seconds until the replica has the source's checksum (from now); the peak RSS in _PEAK."""
    t0 = time.perf_counter()
    want = logical_checksum(db)
    while replica.checksum != want:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("replica never caught up")
        _PEAK["rss"] = max(_PEAK["rss"], _rss_mb())
        await asyncio.sleep(0.02)
    return time.perf_counter() - t0


async def _until_at_source(replica: Replica, db: Path, timeout: float = 600) -> float:
    """Seconds until the replica is at the source's WAL position of now (nothing committed meanwhile),
    then its checksum checked against the source file's. The source's checksum is computed after the
    clock stops: computed first, in this process, it read and hashed the whole file right as the
    catch-up began, taking the GIL from the agent and the replica (0.3 s of a 62 MB VACUUM's)."""
    t0 = time.perf_counter()
    wal = WalFile(db)
    try:
        _header, mx, generation = wal.state()
    finally:
        wal.close()
    target = Position(generation, mx)
    while replica.position != target:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"replica never reached {target} (at {replica.position})")
        _PEAK["rss"] = max(_PEAK["rss"], _rss_mb())
        await asyncio.sleep(0.005)
    seconds = time.perf_counter() - t0
    if replica.checksum != logical_checksum(db):
        raise AssertionError(f"replica at {target} but its checksum differs from the source's")
    return seconds


async def _accounted(client: SqliteStreamClient, replica: Replica, applied0: int, batches0: int) -> None:
    """Wait until the client has counted every batch the replica applied since ``applied0`` /
    ``batches0``: its counters move just after the apply returns, a moment after the checksum the
    bench waits for is visible (reading them at once gave 0 pages for a whole VACUUM)."""
    deadline = time.monotonic() + 10
    while client.stats.batches - batches0 < replica.batches_applied - applied0:
        if time.monotonic() > deadline:
            raise TimeoutError("the client never counted the batches the replica applied")
        await asyncio.sleep(0.005)


async def _copy_through_tls(bench: Bench, path: Path) -> float:
    """Copy ``path`` over the same kind of link as a stream: mutual TLS (the stream's certificates)
    through the 20 ms delay proxy, written and fsynced at the far end; seconds until it is all there."""
    c = bench.certs
    done = asyncio.get_running_loop().create_future()
    dest = path.with_name(path.name + ".copy")

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with open(dest, "wb") as out:
            while data := await r.read(1 << 20):
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        w.close()
        done.set_result(None)

    server = await asyncio.start_server(
        sink, "127.0.0.1", 0, ssl=server_context(c / "source.pem", c / "source.key", c / "ca.pem")
    )
    proxy = await _delay_proxy(server.sockets[0].getsockname()[1])
    t0 = time.perf_counter()
    _r, w = await asyncio.open_connection(
        "127.0.0.1",
        proxy.sockets[0].getsockname()[1],
        ssl=client_context(c / "appliance.pem", c / "appliance.key", c / "ca.pem"),
        server_hostname="source",
    )
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            w.write(chunk)
            await w.drain()
    w.close()
    await done
    seconds = time.perf_counter() - t0
    proxy.close()
    server.close()
    dest.unlink()
    return seconds


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


async def vacuum_and_resync(bench: Bench, mb: int, resync: bool = True) -> dict[str, Any]:
    """After a VACUUM that moves every page, and after an outage that changed a tenth of the pages:
    the time to be equal again over the 20 ms link, beside copying the file over the same link
    (TLS, delay proxy) in the same run, and a full resnapshot (a new replica seeded)."""
    d = bench.work / f"vacuum{mb}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    db = d / "src.db"
    _make_db(db, mb)
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)  # used from worker threads
    conn.execute("PRAGMA busy_timeout = 5000")
    rows = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
    agent = bench.agent(db)
    await agent.start()
    proxy = await _delay_proxy(agent.port)
    port = proxy.sockets[0].getsockname()[1]
    full_s = full_mb = 0.0
    if resync:
        fresh = Replica(d / "full.db")
        fresh.open()
        client = bench.client(fresh, port)
        t0 = time.perf_counter()
        task = asyncio.create_task(client.run())
        full_s = time.perf_counter() - t0 + await _until_equal(fresh, db)
        full_mb = client.stats.bytes_received / 1e6
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        fresh.close()
    replica = Replica(d / "rep.db")
    replica.open()
    client = bench.client(replica, port)
    task = asyncio.create_task(client.run())
    await _until_equal(replica, db)
    # A VACUUM that moves every page: a row in 20 deleted first (the pages after the first hole shift).
    await asyncio.to_thread(conn.execute, "DELETE FROM customers WHERE id % 20 = 7")
    await _until_equal(replica, db)
    await _accounted(client, replica, 0, 0)
    pages0, wire0 = client.stats.pages, client.stats.bytes_received
    applied0, batches0 = replica.batches_applied, client.stats.batches
    # (getattr: the same bench also runs against older code, for before/after figures)
    src0, rep0 = dict(getattr(agent, "chunk_timings", {})), dict(getattr(replica, "timings", {}))
    rss0 = _PEAK["rss"] = _rss_mb()
    t1 = time.perf_counter()
    await asyncio.to_thread(conn.execute, "VACUUM")
    committed = time.perf_counter()
    vacuum_local_s = committed - t1
    vacuum_s = vacuum_local_s + await _until_at_source(replica, db)
    await _accounted(client, replica, applied0, batches0)
    vacuum_pages, vacuum_mb = client.stats.pages - pages0, (client.stats.bytes_received - wire0) / 1e6
    vacuum_rss = _PEAK["rss"] - rss0
    marks = {k: v - committed for k, v in getattr(replica, "stage_marks", {}).items()}
    marks.update({f"source_{k}": v - committed for k, v in getattr(agent, "chunk_marks", {}).items()})
    stages = {
        **{f"source_{k}": v for k, v in _delta(getattr(agent, "chunk_timings", {}), src0).items()},
        **{f"replica_{k}": v for k, v in _delta(getattr(replica, "timings", {}), rep0).items()},
    }
    db_pages = replica.hashes.db_pages
    size_mb = db.stat().st_size / 1e6
    copy_s = await _copy_through_tls(bench, db)
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    resync_s = resync_pages = resync_mb = 0.0
    mode = ""
    if resync:
        # The backup down while a tenth of the pages change (rows are ~2 KB: one row in 20 is a page in
        # 10), with TRUNCATE checkpoints: its position is gone, the catch-up is a resync by page hashes.
        def change_a_tenth() -> None:
            for i, rid in enumerate(range(1, rows + 1, 20)):
                conn.execute("UPDATE customers SET name = name || '*' WHERE id = ?", (rid,))
                if i % 500 == 0:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await asyncio.to_thread(change_a_tenth)
        client = bench.client(replica, port)
        applied0 = replica.batches_applied
        t2 = time.perf_counter()
        task = asyncio.create_task(client.run())
        resync_s = time.perf_counter() - t2 + await _until_equal(replica, db)
        await _accounted(client, replica, applied0, 0)
        resync_pages, resync_mb, mode = (
            client.stats.pages,
            client.stats.bytes_received / 1e6,
            client.stats.mode,
        )
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    await agent.stop()
    proxy.close()
    replica.close()
    conn.close()
    shutil.rmtree(d, ignore_errors=True)
    return {
        "mb": size_mb,
        "db_pages": db_pages,
        "full_s": full_s,
        "full_mb": full_mb,
        "vacuum_s": vacuum_s,
        "vacuum_local_s": vacuum_local_s,
        "vacuum_pages": vacuum_pages,
        "vacuum_rss": vacuum_rss,
        "vacuum_mb": vacuum_mb,
        "copy_s": copy_s,
        "marks": marks,
        "stages": stages,
        "resync_s": resync_s,
        "resync_pages": resync_pages,
        "resync_mb": resync_mb,
        "resync_mode": mode,
    }


def _vacuum_figures(bench: Bench, mb: int, runs: int, resync: bool) -> dict[str, Any]:
    """``runs`` VACUUM catch-ups beside a copy of the file in the same run; each printed, the median last."""
    print(
        f"VACUUM moving every page of a {mb} MB database, link delayed {DELAY_S * 1000:.0f} ms each way, TLS:"
    )
    results = []
    for i in range(runs):
        v = asyncio.run(vacuum_and_resync(bench, mb, resync=resync and i == 0))
        after = v["vacuum_s"] - v["vacuum_local_s"]
        v["after"], v["ratio"] = after, after / v["copy_s"]
        results.append(v)
        m, st, nan = v["marks"], v["stages"], float("nan")
        print(
            f"  run {i + 1}: caught up {after:.2f} s after the VACUUM committed (it took {v['vacuum_local_s']:.1f} s"
            f" at the source), copying the {v['mb']:.0f} MB file over the same link (TLS, proxy) {v['copy_s']:.2f} s:"
            f" {v['ratio']:.2f}x [target <= 2x]; {v['vacuum_pages']:.0f} of {v['db_pages']:.0f} pages,"
            f" {v['vacuum_mb']:.0f} MB on the wire; RSS +{v['vacuum_rss']:.0f} MB"
        )
        print(
            f"    after the commit: agent's poll from {m.get('source_poll', float('nan')):.2f} s to"
            f" {m.get('source_polled', float('nan')):.2f} s, batch begun at the replica {m.get('begin', float('nan')):.2f} s, last chunk"
            f" in {m.get('end', float('nan')):.2f} s, committed {m.get('committed', float('nan')):.2f} s;"
            f" agent (worker thread): read+hash {st.get('source_read', nan):.2f} s, encode {st.get('source_encode', nan):.2f} s,"
            f" link waited for chunks {st.get('source_wait_ready', nan):.2f} s, sending {st.get('source_send', nan):.2f} s;"
            f" replica: staging {st.get('replica_stage', nan):.2f} s, commit {st.get('replica_commit', nan):.2f} s (journaled: writing"
            f" pages {st.get('replica_write', nan):.2f} s, fsync of the file {st.get('replica_fsync', nan):.2f} s; new file: completing"
            f" and fsync {st.get('replica_new_file', nan):.2f} s, hashes recorded"
            f" {st.get('replica_record', nan):.2f} s, journal {st.get('replica_journal', nan):.2f} s, renames"
            f" {st.get('replica_rename', nan):.2f} s)"
        )
    ratios = sorted(v["ratio"] for v in results)
    afters = sorted(v["after"] for v in results)
    copies = sorted(v["copy_s"] for v in results)
    print(
        f"  median of {runs}: catch-up {statistics.median(afters):.2f} s, copy {statistics.median(copies):.2f} s,"
        f" ratio {statistics.median(ratios):.2f}x (from {ratios[0]:.2f}x to {ratios[-1]:.2f}x)   [target <= 2x]"
    )
    return results[0]


def issue15(bench: Bench, args: argparse.Namespace) -> None:
    print(
        f"Issue 15 workload (rows, 300 KB blobs in 10% of transactions, deletes, TRUNCATE at 1%, a VACUUM every"
        f" {args.vacuum_every}), link delayed {DELAY_S * 1000:.0f} ms each way:"
    )
    for rate in () if args.skip_blobs else (20.0, 0.0):
        n = args.blob_tx if rate == 0 else int(args.blob_seconds * rate)
        r = asyncio.run(blob_vacuum_rpo(bench, rate, n, args.vacuum_every))
        label = f"{rate:.0f} tx/s" if rate else "flat out"
        print(
            f"  {label:>9} ({n} tx, achieved {r['rate']:.0f} tx/s; {r['truncates']:.0f} TRUNCATEs, {r['vacuums']:.0f}"
            f" VACUUMs taking {r['vacuum_s']:.1f} s at the source): rows {r['rows']:.0f}, RPO p50"
            f" {r['p50'] * 1000:.0f} ms p99 {r['p99'] * 1000:.0f} ms max {r['max'] * 1000:.0f} ms; resnapshots"
            f" {r['resnapshots']:.0f}, continuity lost {r['continuity_lost']:.0f}, sessions {r['sessions']:.0f};"
            f" {r['wire_mb']:.0f} MB on the wire; replica {'equal' if r['equal'] else 'DIFFERENT'}"
            "   [targets: p99 < 1 s at 20 tx/s; 0 resnapshots]"
        )
    v: dict[str, Any] = {}
    for i, mb in enumerate(int(x) for x in str(args.vacuum_mb).split(",")):
        r = _vacuum_figures(bench, mb, args.vacuum_runs, resync=i == 0 and not args.skip_resync)
        v = v or r
    if args.skip_resync:
        return
    print(
        f"Resync after an outage in which a tenth of the pages changed (TRUNCATEs: the position is gone):"
        f" {v['resync_s']:.1f} s ({v['resync_mode']}), {v['resync_pages']:.0f} pages, {v['resync_mb']:.1f} MB on the"
        f" wire; a full resnapshot (new replica): {v['full_s']:.1f} s, {v['full_mb']:.0f} MB"
    )


def again(o: dict[str, tuple[float, ...]], base: str) -> str:
    return f" / {o['alone2'][0]:.0f} alone again" if base == "alone" else ""


def baseline(o: dict[str, tuple[float, ...]], base: str) -> float:
    """The writer alone: unpinned, the mean of its runs before and after the replicated one."""
    return (o[base][0] + o["alone2"][0]) / 2 if base == "alone" else o[base][0]


def overhead_line(label: str, base: str, other: str, o: dict[str, tuple[float, ...]]) -> str:
    return (
        f"  {label:>12} {other:>17}: throughput {o[base][0]:.0f} alone / {o[other][0]:.0f} replicated"
        f"{again(o, base)} tx/s ({100 * (1 - o[other][0] / baseline(o, base)):+.1f}% slower); commit p50"
        f" {o[base][1] * 1e6:.0f} / {o[other][1] * 1e6:.0f} us,"
        f" p99 {o[base][2] * 1e6:.0f} / {o[other][2] * 1e6:.0f} us;"
        f" WAL largest {o[base][4]:.1f} / {o[other][4]:.1f} MB,"
        f" WAL restarted by the application in a window {o[other][8]:.0f} times"
        f" ({o[other][9]:.0f} frames read after the restart), by the agent"
        f" {o[other][5]:.0f} times (writers held off at most {o[other][6] * 1000:.1f} ms,"
        f" {o[other][7] * 1000:.0f} ms in all); resnapshots {o[other][10]:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--catchup-rows", type=int, default=20000)
    parser.add_argument("--seed-mb", type=int, default=1024, help="0 skips the seeding benchmark")
    parser.add_argument("--skip-rpo", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--only-overhead", action="store_true", help="just the source overhead figures")
    parser.add_argument("--rounds", type=int, default=5, help="flat-out overhead rounds (median reported)")
    parser.add_argument("--only-issue15", action="store_true", help="just the blob/VACUUM/resync figures")
    parser.add_argument("--skip-issue15", action="store_true")
    parser.add_argument("--skip-blobs", action="store_true", help="issue 15: only the VACUUM/resync figures")
    parser.add_argument(
        "--blob-seconds", type=float, default=60.0, help="issue 15 workload at 20 tx/s: seconds"
    )
    parser.add_argument("--blob-tx", type=int, default=3000, help="issue 15 workload flat out: transactions")
    parser.add_argument("--vacuum-every", type=int, default=300, help="a VACUUM every N transactions")
    parser.add_argument(
        "--vacuum-mb", default="64,256", help="database sizes (MB, comma-separated) for the VACUUM figures"
    )
    parser.add_argument(
        "--vacuum-runs", type=int, default=3, help="VACUUM catch-ups per size (median printed)"
    )
    parser.add_argument("--skip-resync", action="store_true", help="issue 15: no resync/resnapshot figures")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-replication-"))
    try:
        bench = Bench(work)
        print(
            f"RPO over a link delayed {DELAY_S * 1000:.0f} ms each way (TLS, zlib), writer in its own process"
        )
        if args.only_overhead:
            args.skip_rpo, args.catchup_rows, args.seed_mb, args.skip_issue15 = True, 0, 0, True
        if args.only_issue15:
            issue15(bench, args)
            return
        for rate in () if args.skip_rpo else (1000, 5000):
            r = asyncio.run(rpo(bench, rate, args.seconds))
            print(
                f"  target {rate:>5} tx/s (achieved {r['rate']:7.0f}): rows {r['rows']:6d}  RPO p50 {r['p50'] * 1000:7.1f} ms"
                f"  p99 {r['p99'] * 1000:7.1f} ms  max {r['max'] * 1000:7.1f} ms"
                f"  WAL at end {r['wal_mb']:.1f} MB   [target p99 < 1000 ms]"
            )
        c = asyncio.run(catch_up(bench, args.catchup_rows)) if args.catchup_rows else None
        if c is not None:
            print(f"Apply rate, {c['n']} single-row transactions (same rows, same run):")
            print(f"  source committed at           {c['source_tx_s']:9.0f} tx/s")
            print(
                f"  replica streaming apply       {c['stream_tx_s']:9.0f} tx/s (source commit start -> all visible)"
            )
            print(
                f"  replica catch-up after outage {c['catchup_tx_s']:9.0f} tx/s ({c['catchup_s'] * 1000:.0f} ms)"
            )
            print(
                f"  plain local SQLite insert     {c['plain_full']:9.0f} tx/s synchronous=FULL,"
                f" {c['plain_normal']:.0f} tx/s NORMAL   [target: replica >= half]"
            )
        if not args.skip_overhead:
            print("Source overhead and WAL size (writer, agent, replica each in its own process; same run):")
            for rate in (1000, 5000, 0):
                rounds = args.rounds if rate == 0 else 1
                runs = [asyncio.run(overhead(bench, args.seconds / 2, rate)) for _ in range(rounds)]
                label = f"at {rate} tx/s" if rate else "flat out"
                for base, other in (("alone", "replicated"), ("alone-pinned", "replicated-pinned")):
                    for o in runs:
                        print(overhead_line(label, base, other, o))
                    if rounds > 1:
                        slower = sorted(100 * (1 - o[other][0] / baseline(o, base)) for o in runs)
                        print(
                            f"  {label:>12} {other:>17}: median of {rounds} rounds {statistics.median(slower):+.1f}%"
                            f" slower (from {slower[0]:+.1f}% to {slower[-1]:+.1f}%)   [target < 10%]"
                        )
            print("  (pinned: the writer alone on CPU 0, agent and replica sharing CPU 1)")
        if args.seed_mb:
            s = asyncio.run(seeding(bench, args.seed_mb))
            print(
                f"Initial seeding of a {s['mb']:.0f} MB database (made in {s['made_s']:.1f} s), link delayed"
                f" {DELAY_S * 1000:.0f} ms each way:"
            )
            print(
                f"  hotsite seed (TLS, zlib, checksummed)   {s['seed_s']:7.1f} s  {s['mb'] / s['seed_s']:6.1f} MB/s"
                f"  ({s['wire_mb']:.0f} MB on the wire; replica checksum {'equal' if s['ok'] else 'DIFFERENT'};"
                f" resident memory grew {s['rss_growth']:.0f} MB)"
            )
            print(
                f"  sqlite3 .backup + copy over the link   {s['backup_s'] + s['link_s']:7.1f} s"
                f"  {s['mb'] / (s['backup_s'] + s['link_s']):6.1f} MB/s  (.backup {s['backup_s']:.1f} s,"
                f" plain TCP copy {s['link_s']:.1f} s)"
            )
            print(
                f"  sqlite3 .backup + local cp             {s['backup_s'] + s['cp_s']:7.1f} s"
                f"  {s['mb'] / (s['backup_s'] + s['cp_s']):6.1f} MB/s"
            )
            print(
                f"Resume after every page changed during an outage (one batch of {s['resume_pages']:.0f} pages,"
                f" sent in chunks, staged on disk): {s['resume_s']:.1f} s, {s['resume_wire_mb']:.0f} MB on the wire,"
                f" replica {'equal' if s['resume_ok'] else 'DIFFERENT or not a resume'}; resident memory grew"
                f" {s['resume_rss']:.0f} MB, at most {s['resume_buffered_mb']:.1f} MB held between receiving and"
                " applying"
            )
        if not args.skip_issue15:
            issue15(bench, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
