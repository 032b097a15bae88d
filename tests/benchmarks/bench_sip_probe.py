"""SIP OPTIONS probe throughput and CPU, side by side with Kamailio's own dispatcher pinging.

Run as root or not (loopback only): ``.venv/bin/python -m tests.benchmarks.bench_sip_probe``.
Prints figures; asserts nothing (issue 3's targets are printed next to them).

* (a1) closed-loop throughput on one core: N probes always outstanding against
  a Kamailio that answers OPTIONS statelessly (``sl_send_reply``);
* (a2) 5,000 targets at a 1 s interval through ``ProbeScheduler``, as the
  daemon runs them, and the scheduler's own cost with a null probe;
* (b) 1,000 targets probed by us and the same 1,000 by Kamailio's dispatcher
  (``ds_ping_interval`` 1) in the same run: CPU per probe for both.

This process is pinned to CPU 0 and every Kamailio to CPU 1, so "one core"
means one core, and the responder's CPU is printed to show which side limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable

from monitoring.probes.base import ProbeResult
from monitoring.probes.sip import SipOptionsProbe
from monitoring.scheduler import ProbeScheduler
from monitoring.targets import Target
from tests.benchmarks.kamailio import KamailioProcess, dispatcher_pinger, have_kamailio, responder

PROBE_CPU = 0
KAMAILIO_CPUS = {1}
ADDRESSES = ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"]
PINGER = "127.0.0.30"
TIMEOUT = 0.9


def targets(n: int, prefix: str = "trunk") -> list[Target]:
    return [Target(f"{prefix}:{i}", "sip", ADDRESSES[i % len(ADDRESSES)], 5060, "udp") for i in range(n)]


class Window:
    """CPU of this process and of a Kamailio over a wall-clock window."""

    def __init__(self, *kamailios: KamailioProcess) -> None:
        self.kamailios = kamailios
        self.wall = time.monotonic()
        self.cpu = time.process_time()
        self.kam = [k.cpu_seconds() for k in kamailios]

    def close(self) -> tuple[float, float, list[float]]:
        wall = time.monotonic() - self.wall
        return (
            wall,
            time.process_time() - self.cpu,
            [k.cpu_seconds() - c for k, c in zip(self.kamailios, self.kam, strict=True)],
        )


async def closed_loop(probe: SipOptionsProbe, concurrency: int, seconds: float) -> tuple[int, int]:
    count = ok = 0
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal count, ok
        host = ADDRESSES[i % len(ADDRESSES)]
        while time.monotonic() < stop:
            result = await probe.probe(f"trunk:{i}", host, 5060, timeout=TIMEOUT)
            count += 1
            ok += result.ok

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return count, ok


async def stop(task: asyncio.Task[None]) -> int:
    """Cancel until it ends; returns how many extra cancels a swallowed cancellation needed."""
    extra = -1
    while not task.done():
        extra += 1
        task.cancel()
        await asyncio.wait({task}, timeout=2.0)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()
    return max(extra, 0)


class Tally:
    def __init__(self) -> None:
        self.count = self.ok = 0
        self.reasons: dict[str, int] = {}
        self.extra_cancels = 0

    def __call__(self, result: ProbeResult) -> None:
        self.count += 1
        self.ok += result.ok
        if not result.ok:
            self.reasons[result.reason] = self.reasons.get(result.reason, 0) + 1


async def scheduled(
    probe_fn: Callable[[Target, float], Awaitable[ProbeResult]],
    tlist: list[Target],
    warmup: float,
    seconds: float,
    *kamailios: KamailioProcess,
    kind: type[ProbeScheduler] = ProbeScheduler,
) -> tuple[Tally, tuple[float, float, list[float]]]:
    tally = Tally()
    scheduler = kind(probe_fn, tally, interval_s=1.0, timeout_s=TIMEOUT)
    task = asyncio.create_task(scheduler.run(tlist))
    await asyncio.sleep(warmup)
    tally.count = tally.ok = 0
    tally.reasons.clear()
    window = Window(*kamailios)
    await asyncio.sleep(seconds)
    figures = window.close()
    tally.extra_cancels = await stop(task)
    return tally, figures


def section_a1(kam: KamailioProcess) -> None:
    print("(a1) closed-loop throughput, probe pinned to one core, Kamailio sl_send_reply responder")
    print(
        f"{'outstanding':>11} {'probes/s':>9} {'answered':>9} {'probe CPU':>10} {'us/probe':>9} {'Kamailio CPU':>13}"
    )
    for concurrency in (50, 100, 200):

        async def run(c: int = concurrency) -> tuple[int, int, tuple[float, float, list[float]]]:
            probe = SipOptionsProbe()
            await closed_loop(probe, c, 1.0)  # sockets made, caches warm
            window = Window(kam)
            count, ok = await closed_loop(probe, c, 8.0)
            figures = window.close()
            await probe.close()
            return count, ok, figures

        count, ok, (wall, cpu, (kcpu,)) = asyncio.run(run())
        print(
            f"{concurrency:>11} {count / wall:>9.0f} {ok / count:>9.2%} {cpu / wall:>9.2f}c "
            f"{cpu / count * 1e6:>9.1f} {kcpu / wall:>12.2f}c"
        )
    print("   target: >= 10,000 OPTIONS/s on one core")


def section_a2(kam: KamailioProcess) -> None:
    print("(a2) 5,000 targets at 1 s interval through monitoring.scheduler.ProbeScheduler (daemon path)")

    async def run_real(kind: type[ProbeScheduler]) -> tuple[Tally, tuple[float, float, list[float]]]:
        probe = SipOptionsProbe()

        async def fn(t: Target, timeout: float) -> ProbeResult:
            return await probe.probe(t.name, t.host, t.port, timeout=timeout, transport=t.transport)

        try:
            return await scheduled(fn, targets(5000), 3.0, 10.0, kam, kind=kind)
        finally:
            await probe.close()

    async def run_null(kind: type[ProbeScheduler]) -> tuple[Tally, tuple[float, float, list[float]]]:
        async def fn(t: Target, timeout: float) -> ProbeResult:
            await asyncio.sleep(0)
            return ProbeResult(t.name, True, time.monotonic(), 0.0001, 200, "ok", "200 OK")

        return await scheduled(fn, targets(5000), 3.0, 10.0, kind=kind)

    runs = [
        ("SipOptionsProbe, ProbeScheduler", run_real, ProbeScheduler),
        ("null probe, ProbeScheduler", run_null, ProbeScheduler),
    ]
    for label, runner, kind in runs:
        tally, (wall, cpu, kcpus) = asyncio.run(runner(kind))
        kam_text = f", Kamailio {kcpus[0] / wall:.2f}c" if kcpus else ""
        print(
            f"   {label:<30} {tally.count / wall:7.0f} results/s, answered {tally.ok / max(tally.count, 1):.2%}"
            f" {tally.reasons or ''}, CPU {cpu / wall:.3f} core ({cpu / max(tally.count, 1) * 1e6:.1f} us/probe)"
            f"{kam_text}; cancels needed to stop: {1 + tally.extra_cancels}"
        )
    print("   target: < 0.5 core for 5,000 targets at 1 s")
    print("   (measured before the heap scheduler, per-target tasks: 0.71 core, 141 us/probe)")


def section_b(kam: KamailioProcess) -> None:
    print("(b) the same 1,000 targets: hotsite probe vs Kamailio dispatcher (ds_ping_interval 1), same run")
    uris = [f"sip:probe{i}@{ADDRESSES[i % len(ADDRESSES)]}:5060" for i in range(1000)]
    with dispatcher_pinger(PINGER, uris, cpus=KAMAILIO_CPUS) as pinger:

        async def run() -> tuple[Tally, tuple[float, float, list[float]], int]:
            probe = SipOptionsProbe()

            async def fn(t: Target, timeout: float) -> ProbeResult:
                return await probe.probe(t.name, t.host, t.port, timeout=timeout)

            tally = Tally()
            scheduler = ProbeScheduler(fn, tally, interval_s=1.0, timeout_s=TIMEOUT)
            task = asyncio.create_task(scheduler.run(targets(1000)))
            await asyncio.sleep(3.0)
            tally.count = tally.ok = 0
            replies = pinger.statistic("rcv_replies")
            window = Window(pinger, kam)
            await asyncio.sleep(10.0)
            figures = window.close()
            replies = pinger.statistic("rcv_replies") - replies
            await stop(task)
            await probe.close()
            return tally, figures, replies

        tally, (wall, cpu, (pcpu, kcpu)), replies = asyncio.run(run())
    ours = cpu / max(tally.count, 1) * 1e6
    theirs = pcpu / max(replies, 1) * 1e6
    print(f"   {'prober':<22} {'probes/s':>9} {'CPU':>8} {'us CPU/probe':>13}")
    print(f"   {'hotsite (Python)':<22} {tally.count / wall:>9.0f} {cpu / wall:>7.3f}c {ours:>13.1f}")
    print(f"   {'Kamailio dispatcher':<22} {replies / wall:>9.0f} {pcpu / wall:>7.3f}c {theirs:>13.1f}")
    print(f"   ratio hotsite/dispatcher CPU per probe: {ours / theirs:.2f}  (responder: {kcpu / wall:.2f}c)")


def main() -> int:
    if not have_kamailio():
        print("kamailio not installed: nothing to measure")
        return 1
    os.sched_setaffinity(0, {PROBE_CPU})
    print(
        f"python {sys.version.split()[0]}, probe on CPU {PROBE_CPU}, Kamailio on CPU {sorted(KAMAILIO_CPUS)}"
    )
    sections = sys.argv[1:] or ["a1", "a2", "b"]
    with responder(ADDRESSES, children=1, cpus=KAMAILIO_CPUS) as kam:
        time.sleep(0.5)
        for name in sections:
            {"a1": section_a1, "a2": section_a2, "b": section_b}[name](kam)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
