"""Peer views: other appliances as the witness, judged on our own clock (pure parts)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from failover.etcd.peers import Freshness, PeerView, judge, parse_view, render_view


def view(name: str, site: str, primary: str, seq: int = 1) -> PeerView:
    return PeerView(name, site, seq, {"primary": primary, site: "up"})


def test_a_view_round_trips_and_garbage_is_refused() -> None:
    v = view("appl-east", "east", "down", 7)
    assert parse_view(render_view(v)) == v
    for raw in (
        "",
        "null",
        "[]",
        '{"appliance": ""}',
        '{"appliance": "a", "site": "s", "seq": "1", "verdicts": {}}',
        '{"appliance": "a", "site": "s", "seq": true, "verdicts": {}}',
        "x" * 20000,
        "{not json",
    ):
        assert parse_view(raw) is None, raw
    odd = parse_view(
        '{"appliance": "a", "site": "s", "seq": 1, "verdicts": {"p": "exploded", "q": "up", "r": 3}}'
    )
    assert odd is not None and odd.verdicts == {"q": "up"}  # unknown verdicts dropped, not trusted


def test_freshness_follows_the_sequence_number_not_the_peers_clock() -> None:
    fresh = Freshness()
    assert fresh.update([view("b", "east", "up", 1)], now=100.0)[0][1] == 100.0
    assert fresh.update([view("b", "east", "up", 1)], now=105.0)[0][1] == 100.0  # unchanged: aging
    assert fresh.update([view("b", "east", "up", 2)], now=106.0)[0][1] == 106.0
    assert fresh.update([], now=107.0) == []  # gone from etcd (its lease expired): forgotten
    assert fresh.update([view("b", "east", "up", 2)], now=108.0)[0][1] == 108.0


def test_one_peer_that_still_sees_the_primary_means_a_partition() -> None:
    views = [(view("b", "east", "down"), 10.0), (view("c", "west", "up"), 10.0)]
    assert judge(views, me="a", primary="primary", now=11.0, max_age_s=5) == (
        True,
        "c@west (up) still sees primary",
    )


def test_every_fresh_peer_must_agree_the_primary_is_down() -> None:
    both = [(view("b", "east", "down"), 10.0), (view("c", "west", "down"), 10.0)]
    assert judge(both, me="a", primary="primary", now=11.0, max_age_s=5) == (
        False,
        "b@east, c@west judge primary down too",
    )
    unsure = [(view("b", "east", "down"), 10.0), (view("c", "west", "unknown"), 10.0)]
    assert judge(unsure, me="a", primary="primary", now=11.0, max_age_s=5) == (
        None,
        "c cannot say whether primary is up",
    )


def test_stale_views_and_our_own_do_not_count() -> None:
    views = [(view("a", "east", "down"), 10.0), (view("c", "west", "up"), 1.0)]
    assert judge(views, me="a", primary="primary", now=11.0, max_age_s=5) == (
        None,
        "no other appliance's view is fresh",
    )


verdict = st.sampled_from(["up", "degraded", "down", "unknown"])


@given(st.lists(st.tuples(st.sampled_from("abcdef"), verdict, st.floats(0, 20)), max_size=8))
def test_judge_never_says_down_while_a_fresh_peer_sees_the_primary(
    peers: list[tuple[str, str, float]],
) -> None:
    views = [(view(name, "s", v), at) for name, v, at in peers]
    alive, _ = judge(views, me="a", primary="primary", now=20.0, max_age_s=5)
    fresh = [v for name, v, at in peers if name != "a" and 20.0 - at <= 5]
    if any(v in ("up", "degraded") for v in fresh):
        assert alive is True
    elif fresh and all(v == "down" for v in fresh):
        assert alive is False
    else:
        assert alive is None
