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
- Source overhead: the writer's maximum throughput with and without an agent
  following its WAL and a replica applying.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from appliance.replication.certs import issue, make_ca
from appliance.replication.client import SqliteStreamClient
from appliance.replication.replica import Replica
from appliance.replication.source import ServedStream, SourceAgent
from appliance.replication.tls import client_context, server_context

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


async def _delay_proxy(target_port: int) -> asyncio.AbstractServer:
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
                q.put_nowait((time.monotonic() + DELAY_S, data))
        q.put_nowait((0, b""))
        with contextlib.suppress(Exception):
            await task

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", target_port)
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
        return SourceAgent([ServedStream("db", "sqlite", db)], heartbeat_s=0.2, poll_interval_s=0.005,
                           ssl_context=server_context(c / "source.pem", c / "source.key", c / "ca.pem"))

    def client(self, replica: Replica, port: int, **kw: object) -> SqliteStreamClient:
        c = self.certs
        return SqliteStreamClient("db", "db", replica, host="127.0.0.1", port=port, server_name="source",
                                  ssl_context=client_context(c / "appliance.pem", c / "appliance.key", c / "ca.pem"),
                                  **kw)  # type: ignore[arg-type]


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
        "rate": achieved, "rows": len(samples), "p50": statistics.median(samples),
        "p99": samples[int(len(samples) * 0.99) - 1], "max": samples[-1], "bytes": client.stats.bytes_received,
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
    while replica.position is None or client.stats.sessions == 0 or replica.applied_at is None \
            or replica.applied_at < time.time() - (time.perf_counter() - t1):
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
    return {"n": n, "source_tx_s": n / source_s, "stream_tx_s": n / stream_s, "streamed_tx": streamed_tx,
            "catchup_tx_s": n / catchup_s, "catchup_s": catchup_s, "plain_full": peers["FULL"],
            "plain_normal": peers["NORMAL"]}


async def overhead(bench: Bench, seconds: float, rate: float) -> dict[str, tuple[float, float, float, float]]:
    results = {}
    for mode in ("alone", "replicated", "alone2"):
        d = bench.work / f"ovh-{mode}-{int(rate)}"
        d.mkdir()
        db = d / "src.db"
        init = sqlite3.connect(db, isolation_level=None)
        init.execute("PRAGMA journal_mode=WAL")
        init.close()
        agent = replica = task = None
        if mode == "replicated":
            agent = bench.agent(db)
            await agent.start()
            replica = Replica(d / "rep.db")
            replica.open()
            task = asyncio.create_task(bench.client(replica, agent.port).run())
            await asyncio.sleep(0.5)
        q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        p = mp.Process(target=_writer, args=(str(db), rate, seconds, q))
        p.start()
        await asyncio.to_thread(p.join)
        results[mode] = q.get()
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if agent is not None:
            await agent.stop()
        if replica is not None:
            replica.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--catchup-rows", type=int, default=20000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-replication-"))
    try:
        bench = Bench(work)
        print(f"RPO over a link delayed {DELAY_S * 1000:.0f} ms each way (TLS, zlib), writer in its own process")
        for rate in (1000, 5000):
            r = asyncio.run(rpo(bench, rate, args.seconds))
            print(f"  target {rate:>5} tx/s (achieved {r['rate']:7.0f}): rows {r['rows']:6d}  RPO p50 {r['p50'] * 1000:7.1f} ms"
                  f"  p99 {r['p99'] * 1000:7.1f} ms  max {r['max'] * 1000:7.1f} ms"
                  f"  WAL at end {r['wal_mb']:.1f} MB   [target p99 < 1000 ms]")
        c = asyncio.run(catch_up(bench, args.catchup_rows))
        print(f"Apply rate, {c['n']} single-row transactions (same rows, same run):")
        print(f"  source committed at           {c['source_tx_s']:9.0f} tx/s")
        print(f"  replica streaming apply       {c['stream_tx_s']:9.0f} tx/s (source commit start -> all visible)")
        print(f"  replica catch-up after outage {c['catchup_tx_s']:9.0f} tx/s ({c['catchup_s'] * 1000:.0f} ms)")
        print(f"  plain local SQLite insert     {c['plain_full']:9.0f} tx/s synchronous=FULL,"
              f" {c['plain_normal']:.0f} tx/s NORMAL   [target: replica >= half]")
        print("Source overhead (writer in its own process; alone, replicated, alone again):")
        for rate in (1000, 0):
            o = asyncio.run(overhead(bench, args.seconds / 2, rate))
            alone = (o["alone"][0] + o["alone2"][0]) / 2
            label = f"at {rate} tx/s" if rate else "flat out"
            print(f"  {label:>12}: throughput {o['alone'][0]:.0f} / {o['replicated'][0]:.0f} / {o['alone2'][0]:.0f} tx/s"
                  f" ({100 * (1 - o['replicated'][0] / alone):+.1f}% slower); commit p50"
                  f" {o['alone'][1] * 1e6:.0f} / {o['replicated'][1] * 1e6:.0f} / {o['alone2'][1] * 1e6:.0f} us,"
                  f" p99 {o['alone'][2] * 1e6:.0f} / {o['replicated'][2] * 1e6:.0f} / {o['alone2'][2] * 1e6:.0f} us;"
                  f" WAL at end {o['alone'][3]:.1f} / {o['replicated'][3]:.1f} MB   [target < 10%]")
        print("Initial seeding of 1 GB vs sqlite3 .backup + copy: not run (not implemented in this benchmark)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
