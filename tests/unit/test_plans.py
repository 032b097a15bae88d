"""Per-hotline plans: priorities, capacities, self-service fallback, validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import config
from failover import plans
from tests.support import configs

SITES = (
    configs.site("primary", "primary", "10.0.0.1", 1, seats=400)
    + configs.site("backup", "backup", "10.0.1.1", 2, seats=100)
    + configs.destination("ivr", "ivr", 3)
    + configs.destination("remote", "remote_agents", 4, capacity=30)
)

HOTLINES = configs.three_hotlines(["backup", "remote", "ivr"], ["backup", "ivr"])


def test_failover_serves_by_priority_within_capacity() -> None:
    cfg = config.parse(SITES + HOTLINES)
    assignments, unserved = plans.assign(cfg, "primary")
    assert unserved == []
    assert [(a.hotline, a.destination) for a in assignments] == [
        ("vip", "backup"),  # 60 of 100 seats
        ("cards", "ivr"),  # 60 > 40 left at the backup, 60 > 30 remote: self-service
        ("loans", "backup"),  # 40 fits the 40 left
    ]
    routing = plans.failover_routing(cfg)
    assert routing.hotlines == {"95588": 2, "95566": 3, "95577": 2}
    assert routing.default_set == 2 and routing.serving_site == "backup"
    assert routing.fenced_uris == {"sip:10.0.0.1:5060"} and not routing.fenced_sets  # the SBC, not set 1


def test_normal_routing_sends_every_hotline_to_the_primary_set() -> None:
    routing = plans.normal_routing(config.parse(SITES + HOTLINES))
    assert routing.hotlines == {"95588": 1, "95566": 1, "95577": 1}
    assert routing.default_set == 1 and not routing.fenced_uris
    # every SBC enabled again: the backup is the primary's per-call fallback
    assert routing.active_uris == {"sip:10.0.0.1:5060", "sip:10.0.1.1:5060"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[hotlines.x]\nnumber = "123"\nagents = 500\nfailover = ["backup"]\n',
            "hotlines.x: no destination in ['backup'] can take it when primary is lost (needs 500 agents)",
        ),
        (
            '[hotlines.x]\nnumber = "95588"\nfailover = ["ivr"]\n',
            "hotlines.x.number '95588' is already hotlines.vip",
        ),
        (
            '[hotlines.x]\nnumber = "1"\nfailover = ["ivr"]\n',
            "hotlines.x.number: '1': expected a dialled number",
        ),
        (
            '[hotlines.x]\nnumber = "123"\nfailover = ["moon"]\n',
            "hotlines.x.failover: unknown destination 'moon' (known: backup, ivr, primary, remote)",
        ),
        (
            '[destinations.dup]\nkind = "ivr"\nkamailio_set = 2\n',
            "destinations.dup.kamailio_set 2 is already used by sites.backup: each site and destination needs its own dispatcher set",
        ),
        (
            '[hotlines.x]\nnumber = "123"\nfailover = []\n',
            "hotlines.x.failover: a list: List should have at least 1 item",
        ),
    ],
)
def test_unusable_plans_are_config_errors(extra: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(SITES + HOTLINES + extra)
    assert any(message in p for p in info.value.problems), info.value.problems


@given(
    lines=st.lists(
        st.tuples(
            st.integers(1, 5),
            st.integers(0, 80),
            st.sampled_from([("backup", "ivr"), ("remote", "ivr"), ("backup", "remote", "ivr")]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_capacities_are_never_exceeded_and_every_line_is_served(
    lines: list[tuple[int, int, tuple[str, ...]]],
) -> None:
    text = SITES + "".join(
        f'[hotlines.h{i}]\nnumber = "{1000 + i}"\npriority = {prio}\nagents = {agents}\nfailover = {list(prefs)!r}\n'.replace(
            "'", '"'
        )
        for i, (prio, agents, prefs) in enumerate(lines)
    )
    cfg = config.parse(text)
    assignments, unserved = plans.assign(cfg, "primary")
    assert unserved == [] and len(assignments) == len(lines)
    used: dict[str, int] = {}
    for a in assignments:
        used[a.destination] = used.get(a.destination, 0) + a.agents
    assert used.get("backup", 0) <= 100 and used.get("remote", 0) <= 30
    # Self-service only when the preferred seats were really gone: a line that wanted
    # the backup but got the IVR did not fit in what higher-priority lines had left.
    taken = 0
    for a in assignments:  # in the order they were served (priority, name)
        prefs = dict((f"h{i}", p) for i, (_, _, p) in enumerate(lines))[a.hotline]
        if a.destination == "backup":
            taken += a.agents
        elif prefs[0] == "backup" and a.destination == "ivr":
            assert taken + a.agents > 100


# -- three sites: a primary and two backup sites with seats of their own ----------------

THREE_SITES = (
    configs.site("primary", "primary", "10.0.0.1", 1, seats=400)
    + configs.site("east", "backup", "10.0.1.1", 2, seats=100)
    + configs.site("west", "backup", "10.0.2.1", 5, seats=80)
    + configs.destination("ivr", "ivr", 3)
)

THREE_SITE_HOTLINES = configs.three_hotlines(["east", "west", "ivr"], ["west", "east", "ivr"])


def test_three_sites_spread_hotlines_over_the_surviving_sites() -> None:
    cfg = config.parse(THREE_SITES + THREE_SITE_HOTLINES)
    routing = plans.failover_routing(cfg)
    # vip fills 60 of east's 100; cards no longer fits there and goes west; loans wants west
    # but only 20 seats are left there, so east takes it (its 40 remaining seats).
    assert routing.hotlines == {"95588": 2, "95566": 5, "95577": 2}
    assert routing.name == "failover" and routing.serving_site == "east" and routing.default_set == 2
    assert routing.fenced_uris == {"sip:10.0.0.1:5060"}
    assert routing.active_uris == {"sip:10.0.1.1:5060", "sip:10.0.2.1:5060"}


def test_a_lost_backup_site_is_planned_around_and_fenced() -> None:
    cfg = config.parse(THREE_SITES + THREE_SITE_HOTLINES)
    routing = plans.failover_routing(cfg, ["east"])
    assert routing.name == "failover-without:east" and plans.lost_from_name(routing.name) == ("east",)
    assert routing.hotlines == {"95588": 5, "95566": 3, "95577": 3}  # west's 80 seats: vip; the rest IVR
    assert routing.serving_site == "west" and routing.default_set == 5
    assert routing.fenced_uris == {"sip:10.0.0.1:5060", "sip:10.0.1.1:5060"}
    everything_lost = plans.failover_routing(cfg, ["east", "west"])
    assert everything_lost.default_set == 3 and set(everything_lost.hotlines.values()) == {3}


def test_known_routings_name_every_combination_of_lost_backup_sites() -> None:
    cfg = config.parse(THREE_SITES + THREE_SITE_HOTLINES)
    assert sorted(plans.known_routings(cfg)) == [
        "failover",
        "failover-without:east",
        "failover-without:west",
        "normal",
    ]
    assert plans.lost_from_name("normal") is None and plans.lost_from_name("failover") == ()


def test_hotlines_unserved_when_a_backup_is_lost_too_are_warned_about() -> None:
    text = THREE_SITES + '[hotlines.vip]\nnumber = "95588"\nagents = 90\nfailover = ["east", "west"]\n'
    cfg = config.parse(text)  # valid: with the primary alone lost, east takes it
    assert cfg.warnings() and any(
        "hotlines.vip: no destination in ['east', 'west'] can take it when east and primary are lost" in w
        for w in cfg.warnings()
    )


@given(
    lines=st.lists(
        st.tuples(st.integers(0, 120), st.permutations(["east", "west"]), st.booleans()),
        min_size=1,
        max_size=10,
    ),
    lost=st.sets(st.sampled_from(["east", "west"])),
)
def test_no_hotline_is_ever_routed_to_a_lost_site_or_over_capacity(
    lines: list[tuple[int, list[str], bool]], lost: set[str]
) -> None:
    text = THREE_SITES + "".join(
        f'[hotlines.h{i}]\nnumber = "{2000 + i}"\nagents = {agents}\nfailover = {[*order, "ivr"] if ivr else order}\n'.replace(
            "'", '"'
        )
        for i, (agents, order, ivr) in enumerate(lines)
    )
    try:
        cfg = config.parse(text)
    except config.ConfigError:
        return  # a plan unusable with the primary alone lost is refused: covered above
    routing = plans.failover_routing(cfg, lost)
    gone_sets = {1} | {cfg.sites[s].kamailio_set for s in lost}
    assert not set(routing.hotlines.values()) & gone_sets
    assert routing.default_set not in gone_sets
    assert routing.fenced_uris.isdisjoint(routing.active_uris)
    seats = {2: 100, 5: 80}
    for set_id, limit in seats.items():
        used = sum(
            cfg.hotlines[f"h{i}"].agents
            for i in range(len(lines))
            if routing.hotlines.get(f"{2000 + i}") == set_id
        )
        assert used <= limit


def test_every_failover_routing_is_of_kind_failover_whatever_it_avoids() -> None:
    """Actuators that only care which side serves (service address, promotion) read ``kind``."""
    cfg = config.parse(THREE_SITES + THREE_SITE_HOTLINES)
    kinds = {name: routing.kind for name, routing in plans.known_routings(cfg).items()}
    assert kinds == {
        "normal": "normal",
        "failover": "failover",
        "failover-without:east": "failover",
        "failover-without:west": "failover",
    }
