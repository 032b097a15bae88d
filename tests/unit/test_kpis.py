"""Per-trunk call KPIs: Kamailio's statistic names, their parsing, the window, and the judgement.

The judgement is pure (counters and a clock reading in, a state out): tested with a
simulated clock and hypothesis. Kamailio's side is tested for real in
tests/integration/test_lab_kpis.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from appliance.clock import SimulatedClock
from appliance.config import Config
from appliance.kamailio import KamailioRpc
from monitoring import kpis
from monitoring.kpi_monitor import CallKpiMetrics, KpiMonitor
from monitoring.kpi_settings import CallKpisSection
from monitoring.kpis import AsrPolicy, CallsHealth, Counters, Window, judge_calls
from provisioning.lab import kamailio as lab_kamailio


def _counters(attempts: int, answered: int, codes: dict[int, int] | None = None, **extra: int) -> Counters:
    codes = codes or {}
    classes = {k: sum(n for c, n in codes.items() if str(c)[0] == k[0]) for k in kpis.CLASSES}
    for key, value in extra.items():
        if key.startswith("fail_"):
            classes[key.removeprefix("fail_")] += value
    return Counters(
        attempts=attempts,
        answered=answered,
        classes=classes,
        codes=codes,
        **{k: v for k, v in extra.items() if not k.startswith("fail_")},
    )


def test_stat_names_are_kamailio_safe_and_per_trunk() -> None:
    names = kpis.stat_names("10.77.0.11")
    assert "kpi_10_77_0_11_attempts" in names and "kpi_10_77_0_11_code_503" in names
    assert all(n.replace("_", "").isalnum() for n in names)
    assert kpis.stat_prefix("2001:db8::1") == "kpi_2001_db8__1"
    assert not set(names) & set(kpis.stat_names("10.77.0.12"))


def test_parse_statistics_reads_kamailio_answer() -> None:
    values = kpis.parse_statistics(
        ["script:kpi_10_77_0_11_attempts = 7", "script:kpi_10_77_0_11_answered = 3"]
    )
    assert values == {"kpi_10_77_0_11_attempts": 7, "kpi_10_77_0_11_answered": 3}
    counters = kpis.counters_for("10.77.0.11", values)
    assert counters is not None and counters.attempts == 7 and counters.answered == 3
    assert kpis.counters_for("10.77.0.12", values) is None  # not counted by this Kamailio


@pytest.mark.parametrize("bad", [None, {"a": 1}, ["no equals sign"], ["script:x = lots"], [3]])
def test_parse_statistics_names_what_it_expected(bad: object) -> None:
    with pytest.raises(kpis.KpiParseError, match="expected"):
        kpis.parse_statistics(bad)


def test_asr_ner_pdd_and_top_failure() -> None:
    c = _counters(10, 4, {486: 2, 503: 3}, fail_5xx=1, pdd_ms=120, pdd_calls=6)
    assert c.asr == 0.4
    assert c.ner == 0.6  # answered 4 + busy 2 (the user's doing); 503s and the other 5xx are the network's
    assert c.failed == 6 and c.network_failures == 4
    assert c.pdd_avg_ms == 20
    assert c.top_failure() == ("503", 3)
    assert _counters(3, 0, {}, fail_5xx=3).top_failure() == ("other 5xx", 3)
    assert Counters().asr is None and Counters().ner is None and Counters().top_failure() is None


def test_window_keeps_window_s_and_forgets_a_kamailio_restart() -> None:
    w = Window(60)
    for t, attempts in ((0, 0), (30, 10), (60, 20), (90, 30)):
        w.add(t, _counters(attempts, attempts // 2))
    assert w.traffic().attempts == 20 and w.span_s == 60  # readings at 30..90
    w.add(95, _counters(2, 1))  # counters went backwards: Kamailio restarted
    assert w.traffic().attempts == 0 and w.span_s == 0
    w.add(100, _counters(5, 1))
    assert w.traffic().attempts == 3 and w.traffic().answered == 0


def test_judgement_with_evidence() -> None:
    policy = AsrPolicy(min_asr_pct=20, recover_asr_pct=30, min_attempts=20)
    failing = judge_calls(CallsHealth(), _counters(40, 2, {503: 30, 486: 8}), 300, policy, now=10)
    assert failing.state == "failing" and failing.since == 10
    assert failing.why == "ASR 5% over 40 attempts in 300 s, top failure 503 (30)"
    state, why = kpis.trunk_state("up", "2 consecutive successes", failing)
    assert state == "degraded" and why.startswith("calls failing: ASR 5% over 40 attempts")
    assert kpis.trunk_state("down", "no answer", failing) == ("down", "no answer")  # OPTIONS down says more
    # Hysteresis: 25% is not back yet (recover at 30%), 30% is.
    assert judge_calls(failing, _counters(40, 10), 300, policy, now=20).state == "failing"
    ok = judge_calls(failing, _counters(40, 12), 300, policy, now=30)
    assert ok.state == "ok" and ok.since == 30


asr_pcts = st.floats(min_value=0, max_value=100, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 200), st.floats(0, 1)), min_size=1, max_size=40
    ),  # (attempts in window, answered fraction)
    min_asr=asr_pcts,
    extra=st.floats(0, 50),
    min_attempts=st.integers(1, 100),
)
def test_never_failing_below_min_attempts_and_recovers_with_asr(
    steps: list[tuple[int, float]], min_asr: float, extra: float, min_attempts: int
) -> None:
    policy = AsrPolicy(min_asr, min(100.0, min_asr + extra), min_attempts)
    health, now = CallsHealth(), 0.0
    for attempts, fraction in steps:
        now += 5.0  # the simulated clock: one reading every 5 s
        answered = int(attempts * fraction)
        before = health
        health = judge_calls(before, _counters(attempts, answered), 300, policy, now)
        asr_pct = 100 * answered / attempts if attempts else 0.0
        if attempts < min_attempts:
            assert health.state == "unknown"  # never degraded on too few calls
        elif asr_pct >= policy.recover_asr_pct:
            assert health.state == "ok"  # ASR back: recovered, whatever came before
        elif asr_pct < policy.min_asr_pct:
            assert health.state == "failing"
        else:  # between the lines: hysteresis keeps what was
            assert health.state == ("failing" if before.state == "failing" else "ok")
        assert health.since is not None and health.since <= now
        if health.state == before.state and before.since is not None:
            assert health.since == before.since


def test_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(ValidationError, match="recover_asr_pct"):
        CallKpisSection(min_asr_pct=40, recover_asr_pct=30)
    with pytest.raises(ValidationError, match="window_s"):
        CallKpisSection(interval_s=10, window_s=15)
    with pytest.raises(ValidationError, match="channels"):
        CallKpisSection.model_validate({"channels": {"trunk-a": 0}})
    with pytest.raises(ValidationError, match="extra"):
        CallKpisSection.model_validate({"min_asr": 3})


def test_generated_config_counts_only_the_trunks_it_names(tmp_path: Path) -> None:
    text = lab_kamailio.render_cfg(
        address="10.77.0.10",
        module_dir="/usr/lib/kamailio/modules",
        dispatcher_list=tmp_path / "d.list",
        rpc_socket=tmp_path / "r.sock",
        trunks=["10.77.0.11"],
    )
    for name in kpis.stat_names("10.77.0.11"):
        assert f'modparam("statistics", "variable", "{name}")' in text
    assert '$sht(kpitrunk=>10.77.0.11) = "kpi_10_77_0_11";' in text
    assert "kpi_10_77_0_12" not in text
    assert "|".join(map(str, kpis.CODES)) in text


# The monitor folds readings handed to it here and never calls Kamailio: an RPC to nowhere.
UNUSED_RPC = KamailioRpc(socket_path="/nonexistent/kamailio-rpc.sock")


def _config(**callkpis: object) -> Config:
    return Config.model_validate(
        {
            "sites": {
                "primary": {"role": "primary", "sbc": "10.0.0.20:5060", "kamailio_set": 1},
                "backup": {"role": "backup", "sbc": "10.0.0.30:5060", "kamailio_set": 2},
            },
            "trunks": {"trunk-a": {"address": "10.77.0.11:5060"}, "trunk-b": {"address": "10.77.0.12:5060"}},
            "callkpis": callkpis,
        }
    )


def _reading(attempts: int, answered: int, c503: int) -> dict[str, int]:
    p = kpis.stat_prefix("10.77.0.11")
    return {
        f"{p}_attempts": attempts,
        f"{p}_answered": answered,
        f"{p}_fail_5xx": c503,
        f"{p}_code_503": c503,
        f"{p}_pdd_ms": 10 * answered,
        f"{p}_pdd_calls": answered,
    }


def test_monitor_folds_readings_tells_changes_exports_and_survives_a_reload() -> None:
    changes: list[tuple[str, str, str]] = []
    cfg = _config(min_attempts=5, min_asr_pct=50, recover_asr_pct=60, window_s=60, channels={"trunk-a": 30})
    monitor = KpiMonitor(
        cfg,
        rpc=UNUSED_RPC,
        clock=SimulatedClock(),
        on_change=lambda t, b, a: changes.append((t, b.state, a.state)),
    )
    monitor.fold(_reading(0, 0, 0), now=0)
    monitor.fold(_reading(10, 2, 8), now=10)
    assert changes == [("trunk-a", "unknown", "failing")]
    assert monitor.uncounted == ["trunk-b"]  # Kamailio's config does not count it: said, not guessed
    view = monitor.view("trunk-a", calls_in_progress=12)
    assert (view["attempts"], view["answered"], view["asr_pct"], view["pdd_avg_ms"]) == (10, 2, 20.0, 10.0)
    assert (view["channels"], view["channels_used_pct"], view["calls"]) == (30, 40.0, "failing")
    assert view["codes"] == {"503": 8} and view["top_failure"] == {"code": "503", "count": 8}

    registry = CollectorRegistry()
    CallKpiMetrics(registry).source = monitor
    assert registry.get_sample_value("hotsite_trunk_call_attempts_total", {"trunk": "trunk-a"}) == 10
    assert registry.get_sample_value("hotsite_trunk_asr_ratio", {"trunk": "trunk-a"}) == 0.2
    assert registry.get_sample_value("hotsite_trunk_calls_failing", {"trunk": "trunk-a"}) == 1
    assert registry.get_sample_value("hotsite_trunk_channels", {"trunk": "trunk-a"}) == 30
    assert registry.get_sample_value("hotsite_trunk_call_attempts_total", {"trunk": "trunk-b"}) is None

    reloaded = KpiMonitor(
        cfg,
        rpc=UNUSED_RPC,
        clock=SimulatedClock(),
        on_change=lambda t, b, a: changes.append((t, b.state, a.state)),
    )
    reloaded.adopt(monitor)
    reloaded.fold(_reading(30, 17, 13), now=20)  # 15 of 20 more answered: 17/30 = 57% < 60%: still failing
    assert reloaded.health["trunk-a"].state == "failing"
    reloaded.fold(_reading(40, 27, 13), now=30)  # 27/40 = 67.5%: recovered, and the change is told
    assert changes[-1] == ("trunk-a", "failing", "ok")


def test_channels_of_an_unknown_trunk_are_a_config_problem() -> None:
    problems = _config(channels={"trunk-z": 30}).problems()
    assert any(
        p.startswith("callkpis.channels names 'trunk-z': expected a name of [trunks.*]") for p in problems
    )
    assert not [p for p in _config(channels={"trunk-a": 30}).problems() if "callkpis" in p]
