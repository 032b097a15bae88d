"""The generated Kamailio config's timers: defaults that meet the post-dial-delay target, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioning.lab import kamailio


def test_default_timers_give_up_a_dead_sbc_within_half_a_second_after_one_retransmission() -> None:
    t = kamailio.Timers()
    assert kamailio.timer_problems(t) == []
    assert t.fr_timer_ms + kamailio.TICKS_MS < 500  # even rounded up to tm's next tick, under 0.5 s
    assert t.fr_timer_ms >= 2 * t.t1_timer_ms
    text = kamailio.render_cfg(
        address="10.77.0.10", module_dir="/m", dispatcher_list=Path("/d"), rpc_socket=Path("/r"), timers=t
    )
    assert 'modparam("tm", "fr_timer", 400)' in text
    assert 'modparam("tm", "retr_timer1", 200)' in text
    assert "interval=100000u" in text


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"fr_timer_ms": 300, "t1_timer_ms": 200}, "retransmitted once"),
        ({"t1_timer_ms": 10}, "timer resolution"),
        ({"fr_inv_timer_ms": 400}, "must exceed"),
        ({"ringing_dead_limit_ms": 1000}, "one lost keepalive"),
    ],
)
def test_unworkable_timers_are_refused_with_the_reason(change: dict[str, int], problem: str) -> None:
    timers = kamailio.Timers(**change)
    assert any(problem in p for p in kamailio.timer_problems(timers))
    with pytest.raises(ValueError, match=problem):
        kamailio.render_cfg(
            address="10.77.0.10",
            module_dir="/m",
            dispatcher_list=Path("/d"),
            rpc_socket=Path("/r"),
            timers=timers,
        )
