"""The Kamailio actuator's pure parts: list-file flags, routing sanity, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from failover.actuators.kamailio import (
    FLAG_DISABLED,
    FLAG_PROBING,
    fenced_destinations,
    list_entries,
    rewrite_list,
    routing_problems,
    wanted_flags,
    write_atomically,
)
from failover.routing import Routing

LIST = """\
# hotsite dispatcher list: setid uri flags priority attrs
1 sip:10.77.0.20:5060 0 0 name=primary
1 sip:10.77.0.21:5060 8 1 name=primary-b
2 sip:10.77.0.30:5060 0 0 name=backup

3 sip:10.77.0.50:5060
"""
FAILOVER = Routing("failover", "backup", 2, {"95588": 2}, frozenset({1}))
NORMAL = Routing("normal", "primary", 1, {"95588": 1}, active_sets=frozenset({1}))


def test_failover_disables_every_destination_of_the_fenced_set_and_keeps_the_rest() -> None:
    text = rewrite_list(LIST, FAILOVER)
    assert list_entries(text) == [
        (1, "sip:10.77.0.20:5060", 4),
        (1, "sip:10.77.0.21:5060", 4),
        (2, "sip:10.77.0.30:5060", 0),
        (3, "sip:10.77.0.50:5060", 0),
    ]
    assert text.splitlines()[0] == LIST.splitlines()[0]  # comments kept
    assert "1 sip:10.77.0.21:5060 4 1 name=primary-b" in text  # priority and attrs kept
    assert text.splitlines()[5] == "3 sip:10.77.0.50:5060"  # untouched line kept verbatim


def test_failback_lists_the_set_active_with_flags_0_not_probing() -> None:
    # Flag 8 would hold a destination back until it answers a probe (REFERENCE.md).
    text = rewrite_list(rewrite_list(LIST, FAILOVER), NORMAL)
    assert [f for s, _, f in list_entries(text) if s == 1] == [0, 0]


def test_no_dns_and_no_ping_bits_survive_fencing() -> None:
    assert wanted_flags(1, 16 | 32 | FLAG_PROBING, FAILOVER) == 16 | 32 | FLAG_DISABLED
    assert wanted_flags(1, 16 | FLAG_DISABLED, NORMAL) == 16


def test_a_routing_that_sends_calls_to_a_fenced_set_is_refused() -> None:
    bad = Routing("x", "backup", 1, {"95588": 1, "95566": 2}, frozenset({1}), frozenset({1}))
    assert routing_problems(bad) == [
        "set(s) [1] both fenced and active",
        "default set 1 is fenced",
        "hotline 95588 goes to fenced set 1",
    ]
    assert routing_problems(FAILOVER) == routing_problems(NORMAL) == []


def test_a_broken_list_line_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a dispatcher line"):
        list_entries("1\n")
    with pytest.raises(ValueError):
        list_entries("1 sip:a flags\n")


def test_write_atomically_keeps_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "dispatcher.list"
    path.write_text(LIST)
    os.chmod(path, 0o640)
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dispatcher.list"]


sets = st.integers(min_value=1, max_value=5)
routings = st.builds(
    lambda fenced, active, default: Routing(
        "r", "s", default, {}, frozenset(fenced), frozenset(active - fenced)
    ),
    st.sets(sets, max_size=3),
    st.sets(sets, max_size=3),
    sets,
)
lines = st.lists(
    st.tuples(sets, st.integers(min_value=0, max_value=63), st.integers(min_value=0, max_value=9)), max_size=8
)


@given(routings, lines)
def test_rewrite_is_idempotent_and_only_touches_fenced_or_active_sets(
    routing: Routing, entries: list
) -> None:
    text = "# head\n" + "".join(
        f"{s} sip:10.0.0.{i}:5060 {f} {p} name=x{i}\n" for i, (s, f, p) in enumerate(entries)
    )
    once = rewrite_list(text, routing)
    assert rewrite_list(once, routing) == once
    for (s, f, _), (s2, _, f2) in zip(entries, list_entries(once), strict=True):
        assert s == s2
        if s in routing.fenced_sets:
            assert f2 & FLAG_DISABLED and not f2 & 0b1011
        elif s in routing.active_sets:
            assert f2 & 0b1111 == 0
        else:
            assert f2 == f


def test_fencing_a_destination_keeps_the_rest_of_its_set() -> None:
    from failover.actuators.kamailio import rewrite_list
    from failover.routing import Routing

    text = "1 sip:10.0.0.1:5060 0 10 name=primary\n1 sip:10.0.0.2:5060 0 0 name=backup\n2 sip:10.0.0.2:5060 0 0\n"
    fenced = Routing("failover", "backup", 2, fenced_uris=frozenset({"sip:10.0.0.1:5060;transport=udp"}))
    assert rewrite_list(text, fenced) == (
        "1 sip:10.0.0.1:5060 4 10 name=primary\n1 sip:10.0.0.2:5060 0 0 name=backup\n2 sip:10.0.0.2:5060 0 0\n"
    )
    back = Routing("normal", "primary", 1, active_uris=frozenset({"sip:10.0.0.1:5060"}))
    assert rewrite_list(rewrite_list(text, fenced), back) == text


LAB_SETS = {
    1: {"sip:10.77.0.20:5060": "AP", "sip:10.77.0.30:5060": "AP"},
    2: {"sip:10.77.0.30:5060": "AP"},
}


def test_the_fenced_table_lists_an_sbc_fenced_everywhere_and_never_a_fallback_still_used() -> None:
    by_uri = Routing("failover", "backup", 2, {"95588": 2}, fenced_uris=frozenset({"sip:10.77.0.20:5060"}))
    assert fenced_destinations(by_uri, LAB_SETS) == {"sip:10.77.0.20:5060"}
    # Fencing set 1 disables the backup there too, but set 2 still uses it: its ringing calls stay.
    assert fenced_destinations(FAILOVER, LAB_SETS) == {"sip:10.77.0.20:5060"}
    assert fenced_destinations(NORMAL, LAB_SETS) == set()
    # Same SBC written with a transport parameter in the routing: still the same destination.
    with_params = Routing("f", "backup", 2, fenced_uris=frozenset({"sip:10.77.0.20:5060;transport=udp"}))
    assert fenced_destinations(with_params, LAB_SETS) == {"sip:10.77.0.20:5060"}
