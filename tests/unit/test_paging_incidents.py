"""The escalation core: dedupe, grouping, steps on time, ack stops it, resolve notices, night rules."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.clock import SimulatedClock
from appliance.paging.incidents import (
    Ack,
    Clear,
    Note,
    Page,
    PagerState,
    Raise,
    Resolve,
    Tick,
    Undelivered,
    step,
)
from appliance.paging.oncall import (
    WEEK_S,
    Contact,
    Night,
    Override,
    Policy,
    Roster,
    Rotation,
    Step,
    on_call,
    schedule,
)

T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC).timestamp()  # a Monday 09:00 UTC


def roster(night: Night | None = None, repeat: int = 1) -> Roster:
    contacts = {
        "Zhang Wei": Contact("Zhang Wei", phone="+8613800138000", email="zw@example.com"),
        "Li Na": Contact("Li Na", phone="+8613900139000"),
        "Wang Fang": Contact("Wang Fang", phone="+8613700137000", wake_for="warning"),
        "Vendor Mgr": Contact("Vendor Mgr", email="vm@example.com"),
        "Site Mgr": Contact("Site Mgr", phone="+8613600136000"),
    }
    return Roster(
        contacts=contacts,
        rotations={"primary": Rotation("primary", ("Zhang Wei", "Li Na"), start=T0)},
        overrides=(),
        policies={
            "default": Policy(
                "default",
                (
                    Step(("rotation:primary",), 300),
                    Step(("Wang Fang",), 600),
                    Step(("Vendor Mgr", "Site Mgr"), 900),
                ),
                repeat=repeat,
            )
        },
        night=night,
        site="dr1",
    )


def pages(actions: list, kind: str | None = None) -> list[Page]:
    return [a for a in actions if isinstance(a, Page) and (kind is None or a.kind == kind)]


def notes(actions: list, kind: str) -> list[Note]:
    return [a for a in actions if isinstance(a, Note) and a.kind == kind]


def test_rotation_is_weekly_and_an_override_wins() -> None:
    r = roster()
    assert on_call(r, "primary", T0) == "Zhang Wei"
    assert on_call(r, "primary", T0 + WEEK_S - 1) == "Zhang Wei"
    assert on_call(r, "primary", T0 + WEEK_S) == "Li Na"
    assert on_call(r, "primary", T0 + 2 * WEEK_S) == "Zhang Wei"
    assert on_call(r, "primary", T0 - 1) == "Li Na"  # before the first turn the cycle runs backwards
    o = Roster(**{**r.__dict__, "overrides": (Override("primary", "Wang Fang", T0 + 3600, T0 + 7200),)})
    assert on_call(o, "primary", T0 + 3599) == "Zhang Wei"
    assert on_call(o, "primary", T0 + 3600) == "Wang Fang"
    assert on_call(o, "primary", T0 + 7200) == "Zhang Wei"
    assert on_call(o, "nope", T0) is None
    view = schedule(o, T0 + 10)
    assert view[0]["on_call"] == "Zhang Wei" and view[0]["next"][0]["contact"] == "Li Na"  # type: ignore[index]
    assert view[0]["overrides"] == [{"contact": "Wang Fang", "start": T0 + 3600, "end": T0 + 7200}]


def test_escalation_runs_steps_on_time_and_repeats_then_stops() -> None:
    r, clock = roster(repeat=1), SimulatedClock(start=T0, wall_offset=0)
    state, actions = step(PagerState(), Raise("trunk:a", "trunk a down", "critical"), clock.time(), r)
    assert [(p.contact, p.kind) for p in pages(actions)] == [("Zhang Wei", "trigger")]
    assert "on call in rotation primary" in pages(actions)[0].reason
    assert "Reply ACK 1 or" in pages(actions)[0].text
    timeline = []
    for _ in range(60 * 60):  # one tick a second for an hour
        clock.advance(1)
        state, actions = step(state, Tick(), clock.time(), r)
        timeline += [(clock.time() - T0, p.contact) for p in pages(actions)]
        if notes(actions, "exhausted"):
            timeline.append((clock.time() - T0, "exhausted"))
    assert timeline == [
        (300, "Wang Fang"),
        (900, "Vendor Mgr"),
        (900, "Site Mgr"),
        (1800, "Zhang Wei"),  # round 2
        (2100, "Wang Fang"),
        (2700, "Vendor Mgr"),
        (2700, "Site Mgr"),
        (2700, "exhausted"),
    ]


def test_dedupe_group_ack_and_resolve_notices() -> None:
    r = roster()
    state, actions = step(
        PagerState(), Raise("trunk:a", "trunk a down", "error", group="site:primary"), T0, r
    )
    state, actions = step(
        state, Raise("trunk:a", "trunk a down", "critical", group="site:primary"), T0 + 1, r
    )
    assert notes(actions, "duplicate") and notes(actions, "worsened")
    assert [(p.contact, p.text) for p in pages(actions)] == [
        ("Zhang Wei", "[dr1] #1 now CRITICAL: trunk a down. Reply ACK 1 or " + state.incidents[1].short_code)
    ]
    state, actions = step(state, Raise("trunk:b", "trunk b down", group="site:primary"), T0 + 2, r)
    assert pages(actions) == [] and notes(actions, "grouped")
    (incident,) = state.incidents.values()
    assert incident.keys == ("trunk:a", "trunk:b") and incident.hits == 3 and incident.severity == "critical"
    state, actions = step(state, Tick(), T0 + 300, r)
    assert [p.contact for p in pages(actions)] == ["Wang Fang"]
    state, actions = step(state, Ack(incident.short_code, "Wang Fang", "sms"), T0 + 320, r)
    assert notes(actions, "acked")[0].data["after_s"] == 320
    state, actions = step(state, Ack("1", "Li Na", "sms"), T0 + 321, r)
    assert notes(actions, "ack_duplicate")
    state, actions = step(state, Tick(), T0 + 5000, r)
    assert pages(actions) == []
    state, actions = step(state, Clear("trunk:a"), T0 + 5001, r)
    assert pages(actions) == [] and state.incidents
    state, actions = step(state, Clear("trunk:b"), T0 + 5002, r)
    assert state.incidents == {}
    resolved = pages(actions, "resolve")
    assert sorted(p.contact for p in resolved) == ["Wang Fang", "Zhang Wei"]
    assert resolved[0].text == "[dr1] RESOLVED #1: trunk a down"
    state, actions = step(state, Raise("trunk:a", "trunk a down again"), T0 + 6000, r)
    assert state.incidents[2].id == 2 and pages(actions)[0].contact == "Zhang Wei"


def test_a_condition_cleared_for_a_reason_says_it() -> None:
    """A reload removed the trunk: its incident closes, and the record says why (not "recovered")."""
    r = roster()
    state, _ = step(PagerState(), Raise("trunk:a", "trunk a down", group="g"), T0, r)
    state, _ = step(state, Raise("trunk:b", "trunk b down", group="g"), T0 + 1, r)
    state, actions = step(state, Clear("trunk:a", reason="trunk:a removed from the configuration"), T0 + 2, r)
    assert (
        notes(actions, "cleared")[0].message
        == "trunk:a cleared: trunk:a removed from the configuration; 1 remain"
    )
    state, actions = step(state, Clear("trunk:b"), T0 + 3, r)
    assert notes(actions, "resolved")[0].message == "condition trunk:b cleared" and state.incidents == {}


def test_a_warning_that_becomes_a_failover_tells_who_was_paged_it_is_critical_now() -> None:
    """The engine's "primary judged down" (warning) is followed by "failover started" (critical)
    in the same group: the contact paged WARNING must not be left believing it is only that."""
    night = Night(22 * 60, 7 * 60, "Asia/Shanghai")
    r = roster(night=night)
    at = dt.datetime(2026, 3, 2, 15, 0, tzinfo=dt.UTC).timestamp()  # 23:00 in Shanghai
    state, actions = step(
        PagerState(),
        Raise("failover:primary-down", "Primary judged down", "warning", group="failover"),
        at,
        r,
    )
    assert pages(actions) == [] and notes(actions, "deferred")  # Zhang Wei sleeps through warnings
    state, actions = step(state, Tick(), at + 300, r)
    assert [p.contact for p in pages(actions)] == ["Wang Fang"]  # she wakes for warnings
    started = Raise(
        "failover:failover", "Failover started by daemon: primary lost", "critical", group="failover"
    )
    state, actions = step(state, started, at + 400, r)
    (incident,) = state.incidents.values()
    assert incident.severity == "critical" and incident.summary == started.summary
    told = {p.contact: p for p in pages(actions)}
    assert sorted(told) == ["Wang Fang", "Zhang Wei"]  # the one paged, and the one held overnight
    assert all(p.text.startswith("[dr1] #1 now CRITICAL: Failover started") for p in told.values())
    assert incident.deferred == () and set(incident.paged) == {"Wang Fang", "Zhang Wei"}
    state, actions = step(
        state, Raise("failover:rolled-back", "x", "critical", group="failover"), at + 500, r
    )
    assert pages(actions) == []  # as severe as it was: joined, nobody paged again


def test_unknown_ack_is_rejected_and_changes_nothing() -> None:
    r = roster()
    state, _ = step(PagerState(), Raise("disk", "disk full"), T0, r)
    after, actions = step(state, Ack("99", "Li Na", "sms"), T0 + 1, r)
    assert after == state and notes(actions, "ack_rejected")
    after, actions = step(state, Resolve("99", "root"), T0 + 1, r)
    assert after == state and notes(actions, "resolve_rejected")


def test_night_holds_lesser_pages_until_morning_but_wakes_for_critical() -> None:
    night = Night(22 * 60, 7 * 60, "Asia/Shanghai")  # 22:00-07:00 UTC+8 = 14:00-23:00 UTC
    r = roster(night=night)
    at = dt.datetime(2026, 3, 2, 15, 0, tzinfo=dt.UTC).timestamp()  # 23:00 in Shanghai
    assert night.is_night(at)
    state, actions = step(PagerState(), Raise("lag", "replication lag", "warning"), at, r)
    assert pages(actions) == [] and notes(actions, "deferred")
    state, actions = step(state, Tick(), at + 300, r)  # step 2: Wang Fang wakes for warnings
    assert [p.contact for p in pages(actions)] == ["Wang Fang"]
    morning = dt.datetime(2026, 3, 2, 23, 0, tzinfo=dt.UTC).timestamp()  # 07:00 in Shanghai
    state, actions = step(state, Tick(), morning - 1, r)
    assert "Zhang Wei" not in [p.contact for p in pages(actions)]
    state, actions = step(state, Tick(), morning, r)
    assert "Zhang Wei" in [p.contact for p in pages(actions)]
    assert all("held overnight" in p.reason for p in pages(actions) if p.contact == "Zhang Wei")
    state2, actions = step(PagerState(), Raise("primary", "primary site down", "critical"), at, r)
    assert [p.contact for p in pages(actions)] == ["Zhang Wei"]


def test_state_round_trips_through_json() -> None:
    r = roster()
    state, _ = step(PagerState(), Raise("a", "x", group="g"), T0, r)
    state, _ = step(state, Raise("b", "y", group="g"), T0 + 1, r)
    state, _ = step(state, Tick(), T0 + 400, r)
    assert PagerState.from_json(state.to_json()) == state


# ---------------------------------------------------------------------------
# Properties over random event sequences

events = st.one_of(
    st.builds(
        Raise,
        key=st.sampled_from(["a", "b", "c", "d"]),
        summary=st.just("s"),
        severity=st.sampled_from(["info", "warning", "error", "critical"]),
        group=st.sampled_from(["", "g1", "g2"]),
    ),
    st.builds(Clear, key=st.sampled_from(["a", "b", "c", "d"])),
    st.builds(Ack, incident=st.sampled_from(["1", "2", "3", "4", "5"]), actor=st.just("Li Na")),
    st.builds(Resolve, incident=st.sampled_from(["1", "2", "3"]), actor=st.just("root")),
    st.just(Tick()),
)


@settings(max_examples=150, deadline=None)
@given(
    script=st.lists(st.tuples(events, st.floats(min_value=0, max_value=2000)), max_size=40),
    with_night=st.booleans(),
)
def test_properties(script: list, with_night: bool) -> None:
    r = roster(night=Night(22 * 60, 7 * 60, "Asia/Shanghai") if with_night else None, repeat=2)
    clock = SimulatedClock(start=T0, wall_offset=0)
    state = PagerState()
    closed: set[int] = set()  # acked or resolved
    triggered: dict[int, set[str]] = {}
    resolve_notices: dict[int, list[str]] = {}
    dedups: set[str] = set()
    for event, gap in script:
        clock.advance(gap)
        before = dict(state.incidents)
        state, actions = step(state, event, clock.time(), r)
        for action in actions:
            if isinstance(action, Page):
                assert action.reason, "every page has a reason"
                assert action.contact in r.contacts
                assert action.dedup not in dedups, "a page is decided once"
                dedups.add(action.dedup)
                if action.kind == "trigger":
                    assert action.incident not in closed, "never a trigger page after ack or resolve"
                    after = state.incidents.get(action.incident)
                    assert after is not None and after.status == "open", (
                        "trigger pages only for open incidents"
                    )
                    triggered.setdefault(action.incident, set()).add(action.contact)
                elif action.kind == "ack":
                    assert action.contact in triggered.get(action.incident, set()), (
                        "ack notices go to the paged"
                    )
                    assert action.contact != "Li Na", "the one who acknowledged is not told about it"
                else:
                    resolve_notices.setdefault(action.incident, []).append(action.contact)
        for incident_id in before:
            if incident_id not in state.incidents or state.incidents[incident_id].status == "acked":
                closed.add(incident_id)
        for incident in state.incidents.values():
            if incident.status == "acked":
                assert incident.next_at is None and incident.deferred == ()
            keys = [k for i in state.incidents.values() for k in i.keys]
            assert len(keys) == len(set(keys)), "a key belongs to at most one active incident"
    for incident_id, contacts in resolve_notices.items():
        assert sorted(contacts) == sorted(triggered.get(incident_id, set())), (
            "resolve notices go exactly to those paged, once each"
        )


def test_a_condition_joining_an_acknowledged_group_opens_a_new_incident() -> None:
    """Issue 14 item 3: the acked incident would swallow it silently; a new one pages."""
    r = roster()
    state, _ = step(PagerState(), Raise("trunk:a", "trunk a down", group="trunk"), T0, r)
    state, _ = step(state, Ack("1", "Li Na"), T0 + 10, r)
    state, actions = step(state, Raise("trunk:b", "trunk b down", group="trunk"), T0 + 20, r)
    assert notes(actions, "opened") and not notes(actions, "grouped")
    (page,) = pages(actions, "trigger")
    assert page.incident == 2 and "while #1 is acknowledged by Li Na" in page.text
    # ... and a third condition joins the new, still open incident (one thread, not twenty).
    state, actions = step(state, Raise("trunk:c", "trunk c down", group="trunk"), T0 + 30, r)
    assert notes(actions, "grouped")[0].incident == 2 and not pages(actions)


def test_ack_tells_everyone_else_who_was_paged() -> None:
    r = roster()
    state, _ = step(PagerState(), Raise("site:p", "primary down", "critical"), T0, r)
    state, _ = step(state, Tick(), T0 + 300, r)  # step 2: Wang Fang
    state, actions = step(state, Ack("1", "Wang Fang", "sms"), T0 + 310, r)
    (notice,) = pages(actions, "ack")
    assert notice.contact == "Zhang Wei" and "acknowledged by Wang Fang (sms)" in notice.text


def test_an_undelivered_page_escalates_at_once() -> None:
    r = roster()
    state, _ = step(PagerState(), Raise("site:p", "primary down", "critical"), T0, r)
    state, actions = step(state, Undelivered(1, "Zhang Wei", "+CMS ERROR 304"), T0 + 5, r)
    assert notes(actions, "undelivered") and [p.contact for p in pages(actions, "trigger")] == ["Wang Fang"]
