"""The health model, driven by observations and a simulated clock."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitoring.health import SiteVerdict, TargetHealth, Thresholds, judge_site, observe
from monitoring.probes.base import ProbeResult


def result(ok: bool, at: float, target: str = "trunk:a") -> ProbeResult:
    return ProbeResult(
        target=target,
        ok=ok,
        at=at,
        rtt_s=0.002 if ok else None,
        code=200 if ok else None,
        reason="ok" if ok else "timeout",
    )


DEFAULT = Thresholds(rise=2, fall=3)


def run(oks: list[bool], thresholds: Thresholds = DEFAULT) -> list[str]:
    health = TargetHealth("trunk:a")
    states: list[str] = []
    for i, ok in enumerate(oks):
        health = observe(health, result(ok, float(i)), thresholds)
        states.append(health.state)
    return states


def test_rise_and_fall_counts() -> None:
    assert run([True, True]) == ["unknown", "up"]
    assert run([True, True, False, False, False]) == ["unknown", "up", "up", "up", "down"]
    assert run([False, False, False, True, True]) == ["unknown", "unknown", "down", "down", "up"]


def test_a_blip_never_moves_the_state() -> None:
    # One lost probe between successes: still up.
    assert run([True, True, False, True, False, False, True]).count("down") == 0


def test_since_and_reason() -> None:
    health = TargetHealth("trunk:a")
    assert health.reason == "not probed yet"
    for at, ok in [(10.0, True), (11.0, True), (12.0, True), (13.0, False)]:
        health = observe(health, result(ok, at), Thresholds(rise=2, fall=3))
    assert health.state == "up" and health.since == 11.0
    assert health.reason == "1 consecutive failures: timeout"
    assert health.why == "2 consecutive successes"
    assert health.transitions == 1


def test_a_result_for_another_target_is_refused() -> None:
    with pytest.raises(ValueError, match="result for 'trunk:b' given to the health of 'trunk:a'"):
        observe(TargetHealth("trunk:a"), result(True, 0.0, "trunk:b"), Thresholds())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rise": 0}, "rise must be >= 1, got 0"),
        ({"fall": 0}, "fall must be >= 1, got 0"),
        ({"damping_s": -1}, "damping_s must be >= 0, got -1"),
        ({"min_evidence": 0}, "min_evidence must be >= 1, got 0"),
    ],
)
def test_thresholds_are_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Thresholds(**kwargs)  # type: ignore[arg-type]


@given(
    oks=st.lists(st.booleans(), max_size=200),
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
)
def test_state_follows_only_runs_long_enough(oks: list[bool], rise: int, fall: int) -> None:
    """Property: the state is 'up' iff the last run of rise successes came after the last
    run of fall failures (and 'unknown' before either), whatever the sequence."""
    states = run(oks, Thresholds(rise=rise, fall=fall))
    for i, state in enumerate(states):
        history = oks[: i + 1]
        last_up = _last_run_end(history, True, rise)
        last_down = _last_run_end(history, False, fall)
        if last_up is None and last_down is None:
            expected = "unknown"
        elif last_down is None or (last_up is not None and last_up > last_down):
            expected = "up"
        else:
            expected = "down"
        assert state == expected


def _last_run_end(history: list[bool], value: bool, length: int) -> int | None:
    """Index where the latest run of ``length`` consecutive ``value``s was completed."""
    best, count = None, 0
    for i, ok in enumerate(history):
        count = count + 1 if ok == value else 0
        if count >= length:
            best = i
    return best


def test_damping_holds_a_fast_flip_and_publishes_it_once_the_dwell_is_over() -> None:
    policy = Thresholds(rise=1, fall=1, damping_s=10.0)
    h = TargetHealth("trunk:a")
    h = observe(h, result(True, 0.0), policy)
    assert h.state == "up"
    h = observe(h, result(False, 2.0), policy)
    assert (h.state, h.evidence, h.pending) == ("up", "down", True)
    assert "held back by damping" in h.reason
    h = observe(h, result(False, 9.9), policy)
    assert h.state == "up"
    h = observe(h, result(False, 10.0), policy)
    assert (h.state, h.since, h.pending) == ("down", 10.0, False)
    assert h.why == "3 consecutive failures, last timeout"


@given(
    steps=st.lists(st.tuples(st.booleans(), st.floats(0.01, 5.0)), max_size=150),
    rise=st.integers(1, 4),
    fall=st.integers(1, 4),
    damping=st.floats(0.0, 20.0),
)
def test_no_flap_faster_than_damping_and_every_transition_explained(
    steps: list[tuple[bool, float]], rise: int, fall: int, damping: float
) -> None:
    policy = Thresholds(rise=rise, fall=fall, damping_s=damping)
    h = TargetHealth("trunk:a")
    now = 0.0
    published: list[float] = []
    for ok, gap in steps:
        now += gap
        before = h
        h = observe(h, result(ok, now), policy)
        if h.state != before.state:
            assert h.since == now and h.transitions == before.transitions + 1
            assert "consecutive" in h.why
            if before.state != "unknown":
                published.append(now)
        # The published state never contradicts settled evidence for longer than the dwell.
        if h.pending:
            assert before.since is not None and now - h.since < damping  # type: ignore[operator]
    assert all(b - a >= damping for a, b in zip(published, published[1:], strict=False))


def health(name: str, kind: str, state: str, since: float = 5.0) -> TargetHealth:
    return TargetHealth(name, kind=kind, state=state, since=since)  # type: ignore[arg-type]


def test_site_verdicts_say_why() -> None:
    policy = Thresholds(min_evidence=2)
    start = SiteVerdict("primary")
    assert judge_site(start, [health("sbc", "sip", "unknown")], policy, 1.0).verdict == "unknown"
    up = judge_site(start, [health("sbc", "sip", "up"), health("acd", "tcp", "up")], policy, 1.0)
    assert (up.verdict, up.why) == ("up", ("all 2 targets up",))
    grey = judge_site(up, [health("sbc", "sip", "up"), health("acd", "tcp", "down")], policy, 2.0)
    assert grey.verdict == "degraded" and grey.down == ("acd",) and grey.since == 2.0
    assert grey.why[0] == "acd down for 0 s"  # no wall clock given: an age, never the monotonic reading
    lonely = judge_site(grey, [health("sbc", "sip", "down")], policy, 3.0)
    assert lonely.verdict == "degraded" and lonely.since == 2.0  # same verdict: since kept
    assert "only 1 kind of evidence (sip); 2 must agree" in lonely.why[-1]
    down = judge_site(lonely, [health("sbc", "sip", "down"), health("acd", "tcp", "down")], policy, 4.0)
    assert down.verdict == "down" and down.since == 4.0 and down.kinds_down == ("sip", "tcp")
    assert down.why[-1] == "2 independent kinds of evidence agree (sip, tcp)"


@given(
    states=st.lists(
        st.tuples(
            st.sampled_from(["sip", "http", "tcp", "icmp"]), st.sampled_from(["unknown", "up", "down"])
        ),
        max_size=8,
    ),
    min_evidence=st.integers(1, 4),
)
def test_a_site_is_down_only_when_independent_evidence_agrees(
    states: list[tuple[str, str]], min_evidence: int
) -> None:
    healths = [health(f"t{i}", kind, state) for i, (kind, state) in enumerate(states)]
    verdict = judge_site(SiteVerdict("p"), healths, Thresholds(min_evidence=min_evidence), 1.0)
    known = [h for h in healths if h.state != "unknown"]
    if verdict.verdict == "down":
        assert all(h.state == "down" for h in known)
        assert len({h.kind for h in known}) >= min_evidence
    if verdict.verdict == "up":
        assert known and all(h.state == "up" for h in known)
    assert verdict.why


def test_a_critical_check_answering_no_is_a_grey_failure() -> None:
    policy = Thresholds(min_evidence=2)
    sbc = health("site:p:sbc", "sip", "up")
    said_no = dataclasses.replace(
        health("site:p:http", "http", "down"),
        last=ProbeResult("site:p:http", False, 4.0, 0.01, 503, "bad_code", "HTTP 503"),
    )
    unreachable = dataclasses.replace(
        said_no, last=ProbeResult("site:p:http", False, 4.0, None, None, "timeout")
    )
    critical = frozenset({"site:p:http"})
    grey = judge_site(SiteVerdict("p"), [sbc, said_no], policy, 5.0, critical)
    assert (grey.verdict, grey.grey, grey.down) == ("down", True, ("site:p:http",))
    assert grey.why == ("site:p:http says the site cannot serve (HTTP 503): grey failure",)
    # Unreachable is not the site saying anything: just one piece of evidence.
    assert judge_site(SiteVerdict("p"), [sbc, unreachable], policy, 5.0, critical).verdict == "degraded"
    # Not critical: degraded, as before.
    assert judge_site(SiteVerdict("p"), [sbc, said_no], policy, 5.0).verdict == "degraded"


def test_site_why_names_the_wall_time_a_target_went_down_never_a_monotonic_reading() -> None:
    """Issue 19: ``site:primary:http down since 1710.5`` leaked a monotonic value into status and events."""
    wall_now = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
    verdict = judge_site(
        SiteVerdict("primary"),
        [health("site:primary:http", "http", "down", since=1710.5), health("sbc", "sip", "up")],
        Thresholds(min_evidence=2),
        1722.5,
        wall_now=wall_now,
    )
    assert verdict.why[0] == "site:primary:http down since 07:59:48 UTC (12 s)"
    assert "1710" not in " ".join(verdict.why)
