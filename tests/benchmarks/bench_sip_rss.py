"""Daemon-like RSS with 5,000 SIP trunk targets probed every second (issue 3 target: < 150 MB).

``.venv/bin/python -m tests.benchmarks.bench_sip_rss``: imports the daemon's modules
(``appliance.app``), then runs ``ProbeScheduler`` + ``SipOptionsProbe`` over 5,000
targets against a stateless Kamailio, and prints RSS before, during and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import psutil

import appliance.app  # noqa: F401  (the daemon's import footprint counts)
from monitoring.probes.base import ProbeResult
from monitoring.probes.sip import SipOptionsProbe
from monitoring.scheduler import ProbeScheduler
from monitoring.targets import Target
from tests.benchmarks.bench_sip_probe import ADDRESSES, TIMEOUT, Tally, stop, targets
from tests.benchmarks.kamailio import have_kamailio, responder

TARGETS = 5000


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


async def run() -> None:
    probe = SipOptionsProbe()
    tally = Tally()

    async def fn(t: Target, timeout: float) -> ProbeResult:
        return await probe.probe(t.name, t.host, t.port, timeout=timeout, transport=t.transport)

    scheduler = ProbeScheduler(fn, tally, interval_s=1.0, timeout_s=TIMEOUT)
    task = asyncio.create_task(scheduler.run(targets(TARGETS)))
    peak = 0.0
    for second in range(1, 21):
        await asyncio.sleep(1.0)
        peak = max(peak, rss_mb())
        if second in (2, 10, 20):
            print(
                f"   after {second:2d} s: RSS {rss_mb():6.1f} MB, {tally.count} results, {tally.ok} answered"
            )
    await stop(task)
    await probe.close()
    print(f"   peak RSS while probing {TARGETS} targets at 1 s: {peak:.1f} MB   (target: < 150 MB)")


def main() -> int:
    if not have_kamailio():
        print("kamailio not installed: nothing to measure")
        return 1
    print(f"RSS after importing the daemon's modules: {rss_mb():.1f} MB")
    with responder(ADDRESSES, children=1):
        time.sleep(0.5)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
