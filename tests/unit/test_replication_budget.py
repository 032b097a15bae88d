"""The replica's journal bound: a transaction over ``journal_limit_mb`` is refused whole, before the
database is touched, its half-written journal emptied; under the bound it applies as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import config
from appliance.errors import ConfigError
from appliance.replication.budget import MIB, JournalBudget, free_bytes, space_problems
from appliance.replication.checksum import PageHashes
from appliance.replication.position import Position
from appliance.replication.replica import BatchRejected, Replica, file_checksum
from appliance.replication.wal import Generation
from tests.support import configs

SIZE = 512
START = Position(Generation(1, 2), 0)


def seeded(tmp_path: Path, pages: int) -> Replica:
    r = Replica(tmp_path / "r.db", durable=False)
    r.open()
    r.seed_begin(SIZE, pages)
    hashes = PageHashes()
    content = [(p, bytes([p % 256]) * SIZE) for p in range(1, pages + 1)]
    r.seed_pages(content)
    for p, data in content:
        hashes.set(p, data)
    r.seed_end(START, hashes.checksum, 0.0)
    return r


def staged_header(r: Replica, db_pages: int) -> dict[str, object]:
    return {
        "kind": "tx",
        "prev": START.to_json(),
        "position": Position(Generation(1, 2), 9).to_json(),
        "page_size": SIZE,
        "db_pages": db_pages,
        "min_pages": db_pages,
        "checksum": None,
        "observed_at": 1.0,
    }


def test_a_staged_transaction_over_the_bound_is_refused_whole_and_its_journal_emptied(tmp_path: Path) -> None:
    r = seeded(tmp_path, 40)
    before = (r.position, r.checksum, file_checksum(r.path, SIZE))
    r.budget = JournalBudget(limit_bytes=20 * (SIZE + 4))
    r.stage_begin(staged_header(r, 40))
    r.stage_pages([(p, b"n" * SIZE) for p in range(1, 16)])  # 15 pages: within 20
    with pytest.raises(BatchRejected, match="journal_limit_mb = 0") as info:
        r.stage_pages([(p, b"n" * SIZE) for p in range(16, 31)])  # 30: over
    assert info.value.reason == "journal_limit"
    assert (r.position, r.checksum, file_checksum(r.path, SIZE)) == before
    assert all(p.stat().st_size <= 20 * (SIZE + 4) for p in r.dir.glob("journal-*"))
    r.close()
    again = Replica(tmp_path / "r.db", durable=False)  # recovery ignores the refused journal
    again.open()
    assert (again.position, again.checksum) == before[:2]
    # Within the bound, the same transaction applies.
    again.budget = JournalBudget(limit_bytes=64 * (SIZE + 4))
    again.stage_begin(staged_header(again, 40))
    again.stage_pages([(p, b"n" * SIZE) for p in range(1, 31)])
    want = PageHashes()
    for p in range(1, 41):
        want.set(p, b"n" * SIZE if p <= 30 else bytes([p % 256]) * SIZE)
    again.stage_commit(want.checksum)
    assert again.checksum == want.checksum == file_checksum(again.path, SIZE)
    assert again.status()["disk"]["journal_limit_bytes"] == 64 * (SIZE + 4)
    again.close()


@given(limit=st.integers(0, 1 << 40), journal=st.integers(0, 1 << 40), adding=st.integers(0, 1 << 30))
def test_the_bound_refuses_exactly_what_passes_it(limit: int, journal: int, adding: int) -> None:
    refused = JournalBudget(limit).refusal(journal, adding)
    assert (refused is not None) == (limit > 0 and journal + adding > limit)
    assert JournalBudget(limit).needs(journal) == (min(journal, limit) if limit else journal)


def test_journal_limit_mb_is_a_stream_setting() -> None:
    base = (
        configs.TWO_SITES
        + '[replication]\nsource_agent = "10.0.0.1"\ntls_cert_file = "/c"\ntls_key_file = "/k"\n'
        'tls_ca_file = "/ca"\n[replication.streams.c]\nkind = "sqlite"\nsource = "c"\nreplica = "/r/c.db"\n'
    )
    assert config.parse(base).replication.streams["c"].journal_limit_mb == 0
    assert (
        config.parse(base + "journal_limit_mb = 512\n").replication.streams["c"].journal_limit_mb * MIB
        == 512 * MIB
    )
    with pytest.raises(ConfigError) as info:
        config.parse(base + "journal_limit_mb = -1\n")
    assert any("journal_limit_mb" in p for p in info.value.problems)


def test_config_check_names_a_replica_without_room_for_its_largest_transaction(tmp_path: Path) -> None:
    replica = tmp_path / "c.db"
    replica.write_bytes(b"")
    assert space_problems({"c": (replica, 0)}) == []  # empty: needs nothing
    with open(replica, "wb") as f:  # sparse: as large as the filesystem's free space and more
        f.truncate((free_bytes(tmp_path) or 0) + 100 * MIB)
    (problem,) = space_problems({"c": (replica, 0)})
    assert problem.startswith("replication.streams.c.replica:") and "journal_limit_mb" in problem
    assert space_problems({"c": (replica, 1)}) == []  # a bound that fits
    assert space_problems({"c": (tmp_path / "absent.db", 0)}) == []
