"""Paging benchmarks: prints figures, asserts nothing. Run: .venv/bin/python -m tests.benchmarks.bench_paging

1. Decision to ``AT+CMGS`` written (issue 5 target: under 200 ms at p99): a
   PagingService with the real GSM channel on the pty modem emulator; from the
   ``raise_incident`` call (the escalation decision) to the moment the modem
   has the complete ``AT+CMGS=<n>`` line. Idle modem, one page at a time, and
   a burst of 10 incidents (queueing behind one serial port).
2. Outbox throughput with 1,000 queued pages, through a Null channel, with the
   state DB's ``synchronous=FULL`` (each page: claim + finish, two commits).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from appliance import config
from appliance.paging.channel import NullChannel
from appliance.paging.service import PagingService
from appliance.store import Store
from tests.integration.test_paging_service import CONFIG
from tests.support.modem import ModemEmulator

TARGET_P99_MS = 200.0


def make_config(device: str) -> config.Config:
    return config.parse(
        CONFIG.replace("{device}", device).replace("rate_limit_per_hour = 3", "rate_limit_per_hour = 1000")
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def decision_to_cmgs(runs: int) -> tuple[list[float], list[float]]:
    emu = ModemEmulator().start()
    state = Path(tempfile.mkdtemp())
    store = Store.open(state)
    svc = PagingService(make_config(emu.path), store, CollectorRegistry(), tick_s=3600)
    await svc.start()
    idle: list[float] = []
    burst: list[float] = []
    try:
        for n in range(runs):
            before = len(emu.commands)
            t0 = time.monotonic()
            await svc.raise_incident(f"bench:{n}", f"benchmark incident {n}", "critical")
            while not any(c.startswith("AT+CMGS=") for c in emu.commands[before:]):
                await asyncio.sleep(0.0005)
            at = next(
                t
                for c, t in zip(emu.commands[before:], emu.command_times[before:], strict=False)
                if c.startswith("AT+CMGS=")
            )
            idle.append((at - t0) * 1000)
            while len(emu.submitted) < n + 1 or svc.outbox.depth():
                await asyncio.sleep(0.001)
            await svc.clear(f"bench:{n}")
            while svc.outbox.depth():
                await asyncio.sleep(0.001)
        for _ in range(3):
            before = len(emu.commands)
            t0 = time.monotonic()
            for n in range(10):
                await svc.raise_incident(f"burst:{n}", f"burst incident {n}", "critical")
            while sum(c.startswith("AT+CMGS=") for c in emu.commands[before:]) < 10:
                await asyncio.sleep(0.001)
            burst += [
                (t - t0) * 1000
                for c, t in zip(emu.commands[before:], emu.command_times[before:], strict=False)
                if c.startswith("AT+CMGS=")
            ]
            for n in range(10):
                await svc.clear(f"burst:{n}")
            while svc.outbox.depth():
                await asyncio.sleep(0.001)
    finally:
        await svc.stop()
        store.close()
        emu.stop()
    return idle, burst


async def outbox_throughput(count: int) -> tuple[float, float]:
    store = Store.open(Path(tempfile.mkdtemp()))
    null = NullChannel("sms")
    svc = PagingService(
        make_config("/dev/null"), store, CollectorRegistry(), tick_s=3600, channels={"sms": null}
    )
    now = svc.clock.time()
    t0 = time.perf_counter()
    with store.transaction() as conn:
        for n in range(count):
            svc.outbox.enqueue(
                conn,
                dedup=f"b{n}",
                incident_id=None,
                contact=("Zhang Wei", "Li Na")[n % 2],
                kind="reply",
                text=f"page {n}",
                reason="benchmark",
                channels=[],
                now=now,
            )
    enqueue_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while await svc.drain():
        pass
    drain_s = time.perf_counter() - t0
    assert len(null.sent) == count, len(null.sent)
    store.close()
    return enqueue_s, drain_s


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    idle, burst = asyncio.run(decision_to_cmgs(runs))
    print(
        f"decision -> AT+CMGS written, idle modem ({runs} pages): p50 {statistics.median(idle):.1f} ms,"
        f" p99 {pct(idle, 99):.1f} ms, max {max(idle):.1f} ms | target p99 < {TARGET_P99_MS:.0f} ms:"
        f" {'met' if pct(idle, 99) < TARGET_P99_MS else 'MISSED'}"
    )
    print(
        f"decision -> AT+CMGS written, burst of 10 (3 bursts, queued behind one serial port):"
        f" p50 {statistics.median(burst):.1f} ms, p99 {pct(burst, 99):.1f} ms, max {max(burst):.1f} ms"
    )
    enqueue_s, drain_s = asyncio.run(outbox_throughput(1000))
    print(
        f"outbox, 1,000 queued pages: enqueue in one transaction {enqueue_s * 1000:.0f} ms;"
        f" drained in {drain_s:.2f} s = {1000 / drain_s:.0f} pages/s (Null channel, synchronous=FULL)"
    )


if __name__ == "__main__":
    main()
