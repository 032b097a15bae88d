"""The probe scheduler: hard timeouts, no pile-up, bounded concurrency, crash isolation."""

from __future__ import annotations

import asyncio
import contextlib
import random

from monitoring.probes.base import ProbeResult
from monitoring.scheduler import ProbeScheduler
from monitoring.targets import Target


def target(name: str, interval_s: float | None = None) -> Target:
    return Target(name, "sip", "127.0.0.1", 5060, "udp", interval_s=interval_s)


async def _run_for(scheduler: ProbeScheduler, targets: list[Target], seconds: float) -> None:
    task = asyncio.create_task(scheduler.run(targets))
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_hung_probe_becomes_a_timeout_result_and_others_keep_running() -> None:
    results: list[ProbeResult] = []

    async def probe(t: Target, timeout: float) -> ProbeResult:
        if t.name == "hung":
            await asyncio.sleep(3600)
        if t.name == "buggy":
            raise RuntimeError("bug")
        return ProbeResult(t.name, True, 0.0, 0.001, 200, "ok")

    scheduler = ProbeScheduler(probe, results.append, interval_s=0.1, timeout_s=0.05)
    asyncio.run(_run_for(scheduler, [target("hung"), target("ok"), target("buggy")], 1.0))
    by_target = {name: [r for r in results if r.target == name] for name in ("hung", "ok", "buggy")}
    assert by_target["hung"] and all(r.reason == "timeout" for r in by_target["hung"])
    assert by_target["buggy"] and all(
        r.reason == "error" and r.detail == "RuntimeError" for r in by_target["buggy"]
    )
    assert len(by_target["ok"]) >= 5 and all(r.ok for r in by_target["ok"])


def test_slow_probe_skips_missed_slots_instead_of_piling_up() -> None:
    in_flight = 0
    peak = 0
    skipped: list[int] = []

    async def probe(t: Target, timeout: float) -> ProbeResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.3)  # overruns three slots of 0.1 s (hard timeout is 0.35 s)
        in_flight -= 1
        return ProbeResult(t.name, True, 0.0, 0.3, 200, "ok")

    scheduler = ProbeScheduler(
        probe,
        lambda r: None,
        interval_s=0.1,
        timeout_s=0.1,
        on_skipped=lambda t, n: skipped.append(n),
    )
    asyncio.run(_run_for(scheduler, [target("slow")], 1.2))
    assert peak == 1
    assert skipped and all(n >= 2 for n in skipped)


def test_in_flight_probes_are_bounded() -> None:
    in_flight = 0
    peak = 0

    async def probe(t: Target, timeout: float) -> ProbeResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return ProbeResult(t.name, True, 0.0, 0.05, 200, "ok")

    scheduler = ProbeScheduler(
        probe,
        lambda r: None,
        interval_s=0.1,
        timeout_s=0.1,
        max_in_flight=3,
        rng=random.Random(1),
    )
    asyncio.run(_run_for(scheduler, [target(f"t{i}") for i in range(20)], 0.6))
    assert peak == 3


def test_invalid_timing_is_refused() -> None:
    async def probe(t: Target, timeout: float) -> ProbeResult:
        raise AssertionError

    for kwargs, message in [
        ({"interval_s": 0, "timeout_s": 0.1}, "interval_s must be > 0"),
        ({"interval_s": 1, "timeout_s": 2}, "timeout_s must be in (0, interval_s=1]"),
    ]:
        try:
            ProbeScheduler(probe, lambda r: None, **kwargs)  # type: ignore[arg-type]
        except ValueError as exc:
            assert message in str(exc)
        else:
            raise AssertionError("accepted")


def test_each_target_runs_on_its_own_interval_and_timeout_never_exceeds_it() -> None:
    seen: dict[str, list[float]] = {"fast": [], "slow": []}

    async def probe(t: Target, timeout: float) -> ProbeResult:
        seen[t.name].append(timeout)
        return ProbeResult(t.name, True, 0.0, 0.001, 200, "ok")

    scheduler = ProbeScheduler(probe, lambda r: None, interval_s=0.5, timeout_s=0.4)
    assert scheduler.timing(target("fast", interval_s=0.1)) == (0.1, 0.1)
    asyncio.run(_run_for(scheduler, [target("fast", interval_s=0.1), target("slow")], 1.05))
    assert len(seen["fast"]) >= 3 * len(seen["slow"]) > 0
    assert set(seen["slow"]) == {0.4}
