"""The health model, driven by observations and a simulated clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitoring.health import TargetHealth, Thresholds, observe
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
    states = []
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
    assert health.transitions == 1


def test_a_result_for_another_target_is_refused() -> None:
    with pytest.raises(ValueError, match="result for 'trunk:b' given to the health of 'trunk:a'"):
        observe(TargetHealth("trunk:a"), result(True, 0.0, "trunk:b"), Thresholds())


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0)])
def test_thresholds_must_be_positive(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        Thresholds(rise=rise, fall=fall)


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
