"""Pure and file-level parts of replication: config keys, wire format, rate limit, checksums, the
replica's journal after a crash, promotion decisions, snapshots."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import config
from appliance.errors import ConfigError
from appliance.replication import protocol
from appliance.replication.checksum import PageHashes, page_hash
from appliance.replication.follower import SourceError, SqliteFollower
from appliance.replication.position import Batch, Position, merge
from appliance.replication.promotion import data_loss_window, over_budget
from appliance.replication.replica import BatchRejected, Replica, file_checksum, logical_checksum
from appliance.replication.settings import load_source_config
from appliance.replication.snapshots import RestoreError, SnapshotStore, parse_time
from appliance.replication.wal import Generation
from tests.support import configs

BASE = configs.TWO_SITES
TLS = 'tls_cert_file = "/c"\ntls_key_file = "/k"\ntls_ca_file = "/ca"\n'
STREAM = '[replication.streams.customers]\nkind = "sqlite"\nsource = "customers"\nreplica = "/r/c.db"\n'


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            f'[replication]\nsource_agent = "10.0.0.1:99999"\n{TLS}{STREAM}',
            "replication.source_agent: '10.0.0.1:99999': port must be 1-65535",
        ),
        (
            f'[replication]\nsource_agent = "10.0.0.1"\n{STREAM}',
            "tls_cert_file, tls_key_file, tls_ca_file missing",
        ),
        (
            f'[replication]\nsource_agent = "a"\ncompression = "lz4"\n{TLS}',
            "replication.compression: 'lz4': expected 'none', 'zlib' or 'zstd'",
        ),
        (
            f"[replication]\nkeep_versions = -1\n{TLS}",
            "replication.keep_versions: -1: expected greater than or equal to 0",
        ),
        (f"[replication]\nbandwidth = 5\n{TLS}", "replication.bandwidth: unknown key"),
        (
            f'[replication]\nsource_agent = "a"\n{TLS}{STREAM}kind2 = 1\n',
            "replication.streams.customers.kind2: unknown key",
        ),
    ],
)
def test_replication_config_errors_name_key_value_expectation(extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(BASE + extra)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_replication_config_defaults() -> None:
    cfg = config.parse(BASE + f'[replication]\nsource_agent = "10.0.0.1"\n{TLS}{STREAM}')
    assert cfg.replication.source_agent == "10.0.0.1:7450"
    assert cfg.replication.compression == "zlib" and cfg.replication.keep_versions == 5
    assert cfg.replication.streams["customers"].rpo_budget_s == 5.0


def test_source_agent_config(tmp_path: Path) -> None:
    p = tmp_path / "source.toml"
    p.write_text(
        '[source]\ntls_cert_file = "/c"\ntls_key_file = "/k"\ntls_ca_file = "/ca"\npoll_s = 1\n'
        '[streams.db]\nkind = "sqlite"\npath = "/x"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_source_config(p)
    # Described as the appliance's config is: the keys known where the unknown one was found.
    [problem] = info.value.problems
    assert problem.startswith("source.poll_s: unknown key (known keys here: allowed_clients, ")
    assert " poll_interval_s, " in problem and problem.endswith(", watch)")
    p.write_text(
        '[source]\ntls_cert_file = "/c"\ntls_key_file = "/k"\ntls_ca_file = "/ca"\n'
        '[streams.db]\nkind = "sqlite"\npath = "/x"\n'
    )
    assert load_source_config(p).source.listen == "0.0.0.0:7450"


@pytest.mark.parametrize("compression", ["none", "zlib"])
def test_message_roundtrip_and_corruption_detected(compression: str) -> None:
    pages = [(1, b"a" * 4096), (7, bytes(range(256)) * 16)]
    data = protocol.encode(protocol.Msg.BATCH, {"x": 1}, protocol.pages_body(pages), compression)

    async def read(raw: bytes) -> protocol.Message:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await protocol.read_message(reader)

    msg = asyncio.run(read(data))
    assert msg.kind == protocol.Msg.BATCH and msg.header == {"x": 1}
    assert protocol.parse_pages(msg.body, 4096) == dict(pages)
    for i in (9, len(data) // 2, len(data) - 1):  # any flipped payload bit is caught by the CRC
        bad = data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]
        with pytest.raises(protocol.ProtocolError) as info:
            asyncio.run(read(bad))
        assert info.value.reason == "crc"


def test_rate_limiter_holds_the_configured_rate() -> None:
    now = [0.0]
    lim = protocol.RateLimiter(100_000, burst=10_000, clock=lambda: now[0])
    waited = 0.0
    for _ in range(50):
        d = lim.delay(10_000)
        waited += d
        now[0] += d
    # 500 kB at 100 kB/s, with one 10 kB burst free: about 4.9 s.
    assert 4.8 <= waited <= 5.0
    assert protocol.RateLimiter(0).delay(10**9) == 0


@given(
    st.lists(st.tuples(st.integers(1, 40), st.binary(min_size=8, max_size=8)), max_size=60),
    st.integers(0, 40),
)
def test_rolling_checksum_equals_recomputation(writes: list[tuple[int, bytes]], size: int) -> None:
    h = PageHashes()
    for pgno, data in writes:
        h.set(pgno, data)
    h.db_pages = max([p for p, _ in writes], default=0)
    preview = h.preview([], size)
    h.truncate(size)
    final: dict[int, bytes] = {}
    for pgno, data in writes:
        final[pgno] = data
    expected = 0
    for pgno, data in final.items():
        if pgno <= size:
            expected ^= page_hash(pgno, data)
    assert h.checksum == expected == preview


@given(st.floats(0, 1e6), st.floats(0, 100), st.floats(-5, 5))
def test_data_loss_window_is_never_negative_and_unknown_when_never_current(
    current: float, ahead: float, offset: float
) -> None:
    window = data_loss_window(current, current + ahead - offset, offset)
    assert window is not None and window == pytest.approx(ahead, abs=1e-6)
    assert data_loss_window(None, 1.0, 0.0) is None
    assert data_loss_window(current + 10, current, 0.0) == 0.0
    assert over_budget(None, 5.0) and over_budget(6.0, 5.0) and not over_budget(1.0, 5.0)


def _batch(
    prev: Position | None, frame: int, pages: dict[int, bytes], replica: Replica, db_pages: int
) -> Batch:
    pos = Position(Generation(1, 2), frame)
    b = Batch(
        "tx",
        prev,
        pos,
        512,
        db_pages,
        min(db_pages, replica.hashes.db_pages or db_pages),
        0,
        0.0,
        pages=pages,
    )
    b.checksum = replica._preview(b)
    return b


def test_replica_redoes_a_complete_journal_and_ignores_a_torn_one(tmp_path: Path) -> None:
    r = Replica(tmp_path / "r.db")
    r.open()
    r.seed_begin(512, 2)
    r.seed_pages([(1, b"1" * 512), (2, b"2" * 512)])
    seed_hashes = PageHashes()
    seed_hashes.set(1, b"1" * 512)
    seed_hashes.set(2, b"2" * 512)
    r.seed_end(Position(Generation(1, 2), 0), seed_hashes.checksum, 0.0)
    b1 = _batch(r.position, 3, {2: b"x" * 512, 3: b"3" * 512}, r, 3)
    r.apply(b1)
    after_b1 = file_checksum(r.path, 512)
    # A batch out of order or with a wrong checksum is refused and changes nothing.
    with pytest.raises(BatchRejected):
        r.apply(_batch(Position(Generation(1, 2), 99), 5, {1: b"z" * 512}, r, 3))
    bad = _batch(r.position, 5, {1: b"z" * 512}, r, 3)
    bad.checksum ^= 1
    with pytest.raises(BatchRejected, match="checksum"):
        r.apply(bad)
    assert file_checksum(r.path, 512) == after_b1
    # Crash after the journal of b2 was written but before the database was touched: redo on open.
    b2 = _batch(r.position, 6, {1: b"y" * 512}, r, 3)
    r._write_journal({**b2.header(), "applied_at": 1.0, "promoted": None}, sorted(b2.pages.items()))
    r.close()
    r2 = Replica(tmp_path / "r.db")
    r2.open()
    assert r2.position == b2.position and r2.checksum == b2.checksum == file_checksum(r2.path, 512)
    # A torn journal (crash while writing it) is ignored: the state stays at b2.
    b3 = _batch(r2.position, 7, {1: b"w" * 512}, r2, 3)
    r2._write_journal({**b3.header(), "applied_at": 1.0, "promoted": None}, sorted(b3.pages.items()))
    path = r2._journal_path(r2.seq)
    path.write_bytes(path.read_bytes()[:-100])
    r2.close()
    r3 = Replica(tmp_path / "r.db")
    r3.open()
    assert r3.position == b2.position and file_checksum(r3.path, 512) == b2.checksum
    with pytest.raises(Exception, match="another process"):
        Replica(tmp_path / "r.db").open()
    r3.close()


def test_merge_keeps_the_last_state_and_the_smallest_size() -> None:
    g = Generation(1, 1)
    a = Batch("tx", Position(g, 0), Position(g, 2), 512, 10, 8, 1, 1.0, 1, 2, 0, {9: b"a", 2: b"b"})
    b = Batch("tx", Position(g, 2), Position(g, 4), 512, 8, 8, 2, 2.0, 1, 2, 0, {2: b"c"})
    m = merge([a, b])
    assert m.prev == Position(g, 0) and m.position == Position(g, 4) and m.min_pages == 8
    assert m.pages == {2: b"c"} and m.checksum == 2 and m.transactions == 2


def test_follower_refuses_a_database_not_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(SourceError, match="journal_mode=delete"):
        SqliteFollower(db).open()
    with pytest.raises(SourceError, match="does not exist"):
        SqliteFollower(tmp_path / "nope.db").open()


def test_snapshots_keep_n_and_restore_at_time(tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    r = Replica(tmp_path / "rep.db")
    r.open()
    data = db.read_bytes()
    r.seed_begin(4096, len(data) // 4096)
    pages = [(i + 1, data[i * 4096 : (i + 1) * 4096]) for i in range(len(data) // 4096)]
    r.seed_pages(pages)
    r.seed_end(Position(Generation(1, 1), 0), r._seed_hashes.checksum if r._seed_hashes else 0, 0.0)
    store = SnapshotStore(tmp_path / "snaps", keep=2)
    for t in (100.0, 200.0, 300.0):
        store.take(r, now=t)
    assert [s.taken_at for s in store.list()] == [200.0, 300.0]
    out = store.restore(250.0, tmp_path / "restored.db")
    assert out.taken_at == 200.0 and logical_checksum(tmp_path / "restored.db") == r.checksum
    with pytest.raises(RestoreError, match="no snapshot"):
        store.restore(150.0, tmp_path / "x.db")
    with pytest.raises(RestoreError, match="exists"):
        store.restore(300.0, tmp_path / "restored.db")
    assert parse_time("2026-05-01T08:00:00+00:00") == 1777622400.0
    r.close()


@pytest.mark.parametrize("compression", ["none", "zlib"])
def test_receiver_refuses_messages_over_its_limit_before_and_after_inflating(compression: str) -> None:
    limit = 100_000
    body = bytes(200_000)  # zeros: 200 kB that deflate to a few hundred bytes

    async def read(raw: bytes) -> protocol.Message:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await protocol.read_message(reader, limit)

    with pytest.raises(protocol.ProtocolError) as info:
        asyncio.run(read(protocol.encode(protocol.Msg.BATCH, {}, body, compression)))
    assert info.value.reason == "too_long"
    small = asyncio.run(read(protocol.encode(protocol.Msg.BATCH, {}, body[:1000], compression)))
    assert small.body == body[:1000]


def test_chunks_fit_the_receivers_limit() -> None:
    for limit in (128 * 1024, 1024 * 1024, protocol.MAX_MESSAGE):
        n = protocol.chunk_pages(4096, limit)
        assert n >= 1 and n * (4 + 4096) + protocol.HEADER_ROOM <= limit
