"""A slow SBC, for real: Kamailio holding each answer (usleep), probed through the daemon's scheduler.

This kernel has no sch_netem, so delay is injected by the responder instead of
the link: what the probe sees is the same, an answer that comes late. A trunk
answering within its timeout stays up with the right RTT; one answering after
it is judged down (timeout), and a late answer is ignored as late, never
counted as a success.
"""

from __future__ import annotations

import asyncio

import pytest

from monitoring.health import TargetHealth, Thresholds, observe
from monitoring.probes.sip import SipOptionsProbe
from tests.benchmarks.kamailio import have_kamailio, responder
from tests.conftest import free_port

pytestmark = pytest.mark.skipif(not have_kamailio(), reason="kamailio is not installed")


def test_a_slow_answer_within_the_timeout_is_up_and_one_beyond_it_is_down() -> None:
    port = free_port()
    late: list[str] = []

    async def judge(timeout: float, rounds: int = 4) -> tuple[TargetHealth, list[float]]:
        probe = SipOptionsProbe(on_unmatched=late.append)
        health, rtts = TargetHealth("trunk:slow"), []
        try:
            for _ in range(rounds):
                result = await probe.probe("trunk:slow", "127.0.0.1", port, timeout=timeout)
                health = observe(health, result, Thresholds(rise=2, fall=3))
                if result.rtt_s is not None:
                    rtts.append(result.rtt_s)
                await asyncio.sleep(0.05)
        finally:
            await probe.close()
        return health, rtts

    with responder(["127.0.0.1"], port=port, children=1, delay_us=150_000):
        up, rtts = asyncio.run(judge(timeout=0.4))
        assert up.state == "up", up.reason
        assert all(0.15 <= r < 0.25 for r in rtts), rtts  # 150 ms held, a few ms of path
        down, _ = asyncio.run(judge(timeout=0.1))
        assert down.state == "down" and down.last is not None and down.last.reason == "timeout"
    # The answers that came after their probe's timeout were seen, and only counted, never obeyed.
    assert late and set(late) <= {"late", "no_match"}, late
