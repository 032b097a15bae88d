"""Issue 20: test calls as critical evidence for the site serving a hotline.

The pure run of failures (:mod:`monitoring.callevidence`) under a simulated clock,
with hypothesis: never on a blip, never on failures spread wider than the window,
ended by one good call, lapsing when no failure is recent. Then the real monitor fed
real probe results: the site serving the hotline (as the failover service says) is
judged down, grey, with the calls' words; the setting's mistakes name the key.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from appliance import config
from appliance.clock import SimulatedClock
from appliance.errors import ConfigError
from failover import plans
from failover.engine import EngineState
from monitoring.callevidence import CallPolicy, FailedCall, SiteCalls, critical, failed_at, fold
from monitoring.health import SiteVerdict, Thresholds, judge_site
from monitoring.metrics import Metrics
from monitoring.monitor import Monitor
from monitoring.probes.base import ProbeResult
from monitoring.probes.testcall import CallResult
from tests.support import configs

POLICY = CallPolicy(failures=3, window_s=60)


def run(*calls: tuple[float, str | None], policy: CallPolicy = POLICY) -> SiteCalls:
    """Fold (time, None for a good call or what failed) at the primary, to 95588."""
    site = SiteCalls("primary")
    for at, what in calls:
        site = fold(site, None if what is None else FailedCall(at, "95588", what), policy)
    return site


def test_three_failures_within_the_window_are_critical_and_say_why() -> None:
    site = run((0, "503"), (20, "503"), (40, "503"))
    assert critical(site, POLICY, 40) == "test calls to 95588 failing at primary: 503 ×3"
    mixed = fold(site, FailedCall(50, "95566", "no audio"), POLICY)
    assert critical(mixed, POLICY, 50) == "test calls to 95588, 95566 failing at primary: 503 ×2, no audio ×1"


def test_never_on_a_blip_nor_on_failures_spread_wider_than_the_window() -> None:
    assert critical(run((0, "503")), POLICY, 0) is None  # one failed call moves nothing
    assert critical(run((0, "503"), (20, "503")), POLICY, 20) is None
    assert critical(run((0, "503"), (40, "503"), (61, "503")), POLICY, 61) is None  # 61 s apart
    assert critical(run((0, "503"), (20, "503"), (30, None), (40, "503")), POLICY, 40) is None
    off = CallPolicy(failures=0)
    assert critical(run((0, "503"), (1, "503"), (2, "503"), policy=off), off, 2) is None


def test_the_evidence_lapses_when_no_failure_is_recent() -> None:
    site = run((0, "503"), (20, "503"), (40, "503"))
    assert critical(site, POLICY, 100) is not None
    assert critical(site, POLICY, 100.5) is None  # the latest failure is older than the window


def test_what_a_call_says_of_the_site_serving_its_hotline() -> None:
    assert failed_at("primary", True, "ok", 200, "site:primary") is None
    assert failed_at("primary", True, "ok", 200, "Oracle SBC") is None  # no configured site named: good
    assert failed_at("primary", True, "ok", 200, None) is None
    # The edge's fallback answered at the backup: the serving site refused it.
    assert failed_at("primary", True, "ok", 200, "site:backup") == "answered at backup"
    assert failed_at("primary", False, "rejected", 503, None) == "503"
    assert failed_at("primary", False, "bad_code", 480, None) == "480"
    assert failed_at("primary", False, "no_audio", 200, "site:primary") == "no audio"
    assert failed_at("primary", False, "timeout", None, None) == "timeout"


@settings(max_examples=300)
@given(
    calls=st.lists(
        st.tuples(st.floats(0, 50), st.sampled_from([None, "503", "503", "no audio", "timeout"])), max_size=30
    ),
    failures=st.integers(1, 5),
    window=st.floats(10, 200),
)
def test_critical_exactly_when_the_latest_n_calls_failed_within_the_window(
    calls: list[tuple[float, str | None]], failures: int, window: float
) -> None:
    policy = CallPolicy(failures, window)
    site, now, history = SiteCalls("primary"), 0.0, []
    for gap, what in calls:
        now += gap
        site = fold(site, None if what is None else FailedCall(now, "95588", what), policy)
        history.append((now, what))
        last = history[-failures:]
        expected = (
            len(last) == failures
            and all(w is not None for _, w in last)
            and last[-1][0] - last[0][0] <= window
        )
        said = critical(site, policy, now)
        assert (said is not None) == expected
        if said is not None:
            assert f"×{failures}" in said or "," in said.split(": ", 1)[1]  # the counts add up to N
            assert len(site.failures) <= failures  # bounded memory


CONFIG = configs.valid(
    """
[hotlines.vip]
number = "95588"
failover = ["backup"]
[kamailio]
sip = "10.0.0.10:5060"
[testcalls]
hotlines = ["vip"]
interval_s = 20
site_critical_failures = 3
site_critical_window_s = 120
""",
    backup_sbc="10.0.0.2:5060",
)


def monitor(text: str = CONFIG) -> tuple[Monitor, SimulatedClock, list[str]]:
    clock = SimulatedClock()
    recorded: list[str] = []
    mon = Monitor(
        config.parse(text),
        Metrics(CollectorRegistry()),
        clock,
        lambda kind, **kw: recorded.append(kw["message"]),
    )
    return mon, clock, recorded


def call(mon: Monitor, clock: SimulatedClock, ok: bool) -> None:
    clock.advance(20)
    code, reason = (200, "ok") if ok else (503, "bad_code")
    mon.on_result(ProbeResult("testcall:vip", ok, clock.monotonic(), None, code, reason, "95588: 503"))


def test_the_monitor_judges_the_serving_site_down_on_the_third_failed_call_not_the_first() -> None:
    mon, clock, recorded = monitor()
    told: list[tuple[str, str, bool, str]] = []
    mon.on_verdict = lambda v: told.append((v.site, v.verdict, v.grey, "; ".join(v.why)))
    call(mon, clock, False)
    assert mon.sites["primary"].verdict != "down" and not told  # a blip: nothing moves
    call(mon, clock, False)
    assert mon.sites["primary"].verdict != "down"
    call(mon, clock, False)
    assert told == [("primary", "down", True, "test calls to 95588 failing at primary: 503 ×3: grey failure")]
    assert any("test calls to 95588 failing at primary: 503 ×3" in m for m in recorded)
    assert mon.sites["backup"].verdict != "down"  # the evidence is for the serving site only
    call(mon, clock, True)  # a good call at the site ends the run
    assert not mon.sites["primary"].grey


def test_calls_the_edge_answered_at_another_site_are_failures_at_the_serving_one() -> None:
    mon, clock, _ = monitor()
    for _ in range(3):
        clock.advance(20)
        at = clock.monotonic()
        answer = CallResult(
            "testcall:vip", "95588", ok=True, reason="ok", code=200, answered_by="site:backup"
        )
        answer.started = at
        mon.prober.last_calls["testcall:vip"] = answer
        mon.on_result(answer.to_probe())
    assert mon.sites["primary"].grey
    assert mon.sites["primary"].why == (
        "test calls to 95588 failing at primary: answered at backup ×3: grey failure",
    )


def test_after_a_failover_the_calls_are_evidence_for_the_backup_and_the_old_run_lapses() -> None:
    mon, clock, _ = monitor()
    for _ in range(3):
        call(mon, clock, False)
    assert mon.sites["primary"].grey
    cfg = config.parse(CONFIG)
    moved = EngineState(state="backup_active", routing="failover")
    mon.serving_site = lambda hotline: plans.hotline_site(cfg, moved.routing, moved.lost, hotline)
    call(mon, clock, True)  # answered at the backup: says nothing of the primary
    assert mon.sites["primary"].grey
    clock.advance(120)
    call(mon, clock, True)  # no failure at the primary for longer than the window: lapsed
    assert not mon.sites["primary"].grey
    mon.serving_site = lambda hotline: None  # a runbook under way: a call proves nothing of a site
    for _ in range(4):
        call(mon, clock, False)
    assert not any(v.grey for v in mon.sites.values())


def test_off_by_default_and_trunk_calls_are_not_site_evidence() -> None:
    text = CONFIG.replace("site_critical_failures = 3\n", "")
    mon, clock, _ = monitor(text)
    for _ in range(5):
        call(mon, clock, False)
    assert not mon.sites["primary"].grey
    assert config.parse(text).testcalls.site_critical_failures == 0


def test_the_grey_verdict_from_calls_keeps_its_since_while_it_holds() -> None:
    why = "test calls to 95588 failing at primary: 503 ×3"
    first = judge_site(SiteVerdict("primary"), [], Thresholds(), 10.0, calls=why)
    again = judge_site(first, [], Thresholds(), 30.0, calls="test calls to 95588 failing at primary: 503 ×4")
    assert (first.verdict, first.grey, again.since) == ("down", True, 10.0)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("site_critical_failures = -1\n", "testcalls.site_critical_failures: -1"),
        ('site_critical_failures = "many"\n', "testcalls.site_critical_failures"),
        ("site_critical_window_s = 1\n", "testcalls.site_critical_window_s: 1"),
        (
            "site_critical_failures = 4\nsite_critical_window_s = 30\n",
            "site_critical_window_s (30) must be at least (site_critical_failures - 1) x interval_s (60)",
        ),
    ],
)
def test_mistakes_name_the_key(extra: str, expected: str) -> None:
    text = CONFIG.replace("site_critical_failures = 3\nsite_critical_window_s = 120\n", extra)
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert any(expected in p for p in info.value.problems), info.value.problems
