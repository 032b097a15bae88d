"""The primary site's data for the lab's replication: a small CRM database, a writer, a config tree.

``create(db)`` makes a SQLite database in WAL mode like a call centre's CRM (customers and
their tickets, a few hundred rows); ``config_tree(directory)`` writes a few dialplan files.
Run as a script, this module is the *writer*: an application at the primary that commits one
transaction every ``--interval`` seconds (a ticket opened, its customer's record updated, now
and then a ticket closed), so the backup's replica always has something to follow and a cut
leaves commits behind (the data-loss window ``hotsite top`` shows). Stdlib only, so it runs
with the venv's python inside the primary's namespace; its command line names the database
under the lab's workdir, which is how the lab's cleanup finds it.
"""

from __future__ import annotations

import argparse
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path

CUSTOMERS = 300
TICKETS = 200
SUBJECTS = (
    "card blocked abroad",
    "disputed transfer",
    "mortgage statement missing",
    "new debit card",
    "online banking locked",
    "change of address",
)
SCHEMA = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    phone TEXT NOT NULL,
    tier TEXT NOT NULL,
    open_tickets INTEGER NOT NULL DEFAULT 0,
    last_contact REAL
);
CREATE TABLE tickets (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    subject TEXT NOT NULL,
    status TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL
);
CREATE INDEX tickets_open ON tickets(status, customer_id);
"""
DIALPLANS = {
    "extensions.conf": "[hotlines]\nexten => 95588,1,Goto(vip,s,1)\nexten => 95566,1,Goto(cards,s,1)\n",
    "queues.conf": "[vip]\nstrategy = rrmemory\ntimeout = 20\n\n[cards]\nstrategy = leastrecent\n",
    "ivr/vip.conf": "[vip]\nexten => s,1,Answer()\nsame => n,Queue(vip)\n",
    "ivr/cards.conf": "[cards]\nexten => s,1,Answer()\nsame => n,Queue(cards)\n",
}


def connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None, timeout=5.0)  # busy timeout above the agent's 50 ms
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def create(db: Path, *, customers: int = CUSTOMERS, tickets: int = TICKETS, seed: int = 19) -> None:
    """A fresh CRM database in WAL mode (replaces one left at ``db``)."""
    for leftover in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        leftover.unlink(missing_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    conn = connect(db)
    try:
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO customers (id, name, phone, tier) VALUES (?, ?, ?, ?)",
            [
                (i, f"Customer {i:04d}", f"+86138{i:08d}", rnd.choice(("retail", "retail", "vip")))
                for i in range(1, customers + 1)
            ],
        )
        now = time.time()
        for _ in range(tickets):
            _open_ticket(conn, rnd, now - rnd.uniform(0, 30 * 86400), customers)
        conn.execute("COMMIT")
    finally:
        conn.close()


def config_tree(directory: Path) -> None:
    """The primary's dialplan files (a files stream serves this directory)."""
    for name, text in DIALPLANS.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _open_ticket(conn: sqlite3.Connection, rnd: random.Random, at: float, customers: int) -> None:
    customer = rnd.randint(1, customers)
    conn.execute(
        "INSERT INTO tickets (customer_id, subject, status, opened_at) VALUES (?, ?, 'open', ?)",
        (customer, rnd.choice(SUBJECTS), at),
    )
    conn.execute(
        "UPDATE customers SET open_tickets = open_tickets + 1, last_contact = ? WHERE id = ?",
        (at, customer),
    )


def write_once(conn: sqlite3.Connection, rnd: random.Random) -> None:
    """One transaction, as an agent's screen would commit it."""
    now = time.time()
    customers = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    try:
        _open_ticket(conn, rnd, now, customers)
        if rnd.random() < 0.3:  # an agent closes an old ticket
            row = conn.execute("SELECT id, customer_id FROM tickets WHERE status = 'open' LIMIT 1").fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE tickets SET status = 'closed', closed_at = ? WHERE id = ?", (now, row[0])
                )
                conn.execute("UPDATE customers SET open_tickets = open_tickets - 1 WHERE id = ?", (row[1],))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The lab primary's CRM writer: one commit per interval.")
    parser.add_argument("db", type=Path)
    parser.add_argument("--interval", type=float, default=0.7, help="Seconds between transactions.")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # close the database on the way out
    rnd = random.Random()
    conn = connect(args.db)
    commits = 0
    print(f"crm writer: one transaction every {args.interval:g}s into {args.db}", flush=True)
    try:
        while True:
            try:
                write_once(conn, rnd)
                commits += 1
                if commits % 100 == 1:
                    print(f"crm writer: {commits} transactions committed", flush=True)
            except sqlite3.OperationalError as exc:  # locked past the busy timeout: try again
                print(f"crm writer: {exc}; retrying", flush=True)
            time.sleep(args.interval)
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
