"""Paging benchmarks: prints figures, asserts nothing. Run: .venv/bin/python -m tests.benchmarks.bench_paging

1. Decision to ``AT+CMGS`` written (issue 5 target: under 200 ms at p99): a
   PagingService with the real GSM channel on the pty modem emulator; from the
   ``raise_incident`` call (the escalation decision) to the moment the modem
   has the complete ``AT+CMGS=<n>`` line. Idle modem, one page at a time, and
   a burst of 10 incidents (queueing behind one serial port).
2. Outbox throughput with 1,000 queued pages, through a Null channel, with the
   state DB's ``synchronous=FULL`` (each page: claim + finish, two commits).
3. Pages lost / duplicated over random kills (issue 14; target 0 lost, duplicates
   only where uncertain and marked): the real daemon (``hotsite run``) pages two
   contacts; the modem emulator SIGKILLs it at a random step of the exchange
   (command, prompt, PDU, final answer): at that instant 7 times in 10, else
   0-200 ms later; it is restarted and every page checked. ``--kills N`` (default 10; the issue's
   figure is ``--kills 200``, about 15 minutes).

Run: .venv/bin/python -m tests.benchmarks.bench_paging [RUNS] [--kills N]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from appliance import config
from appliance.migrations import COMPONENTS
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
    store = Store.open(state, components=COMPONENTS)
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
    store = Store.open(Path(tempfile.mkdtemp()), components=COMPONENTS)
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


def random_kills(kills: int) -> dict[str, int]:
    """Kill the real daemon ``kills`` times at random points; count lost and duplicated pages."""
    import os
    import random
    import signal
    import socket
    import threading

    from aiosmtpd.controller import Controller

    from tests.conftest import MINIMAL, free_port
    from tests.integration.daemon_helpers import RunningDaemon, wait_for
    from tests.integration.test_paging_chaos import PHONES, Inbox, _outbox, alert, chaos_config

    tmp = Path(tempfile.mkdtemp())
    base = MINIMAL.format(
        state=tmp / "state", run=tmp / "run", metrics_port=free_port(), sbc_port=free_port(socket.SOCK_DGRAM)
    )
    inbox, port = Inbox(), free_port()
    smtp = Controller(inbox, hostname="127.0.0.1", port=port)
    smtp.start()
    emu = ModemEmulator().start()
    cfg, listen = chaos_config(base, tmp, emu.path, port, 2)
    totals = {"kills": 0, "pages": 0, "lost": 0, "uncertain": 0, "duplicates": 0, "unmarked_duplicates": 0}
    seed = int(os.environ.get("HOTSITE_BENCH_SEED", str(int(time.time()))))
    rng = random.Random(seed)  # printed, so a run can be repeated
    totals["seed"] = seed
    daemon = RunningDaemon(cfg, tmp / "life0.log")
    daemon.wait_ready(30)
    try:
        for life in range(kills):
            # Mostly at the exact step (the narrow windows that matter), sometimes a little later.
            step = rng.choice(["command", "prompt", "pdu", "final"])
            delay = 0.0 if rng.random() < 0.7 else rng.uniform(0, 0.2)
            killed = threading.Event()
            pid = daemon.proc.pid

            def kill(pid: int = pid, killed: threading.Event = killed) -> None:
                if not killed.is_set():
                    killed.set()
                    os.kill(pid, signal.SIGKILL)

            def on_step(name: str, step: str = step, delay: float = delay, kill: Any = kill) -> None:
                if name == step:
                    threading.Timer(delay, kill).start()

            emu.on_step = on_step
            marker = f"chaos kill{life}x"
            alert(listen, f"kill{life}x")
            wait_for(lambda killed=killed: killed.is_set(), timeout=60, what="kill")
            time.sleep(0.35)
            emu.on_step = lambda name: None
            if daemon.proc.poll() is None:  # every page went out before the timer fired
                daemon.proc.kill()
            daemon.proc.wait()
            daemon.stop()
            daemon = RunningDaemon(cfg, tmp / f"life{life + 1}.log")
            daemon.wait_ready(30)

            def settled(marker: str = marker) -> bool:
                rows = [r for r in _outbox(tmp / "state") if marker in r["text"]]
                return len(rows) >= 2 and all(r["state"] in ("sent", "uncertain", "failed") for r in rows)

            wait_for(settled, timeout=60, what="settled")
            rows = [r for r in _outbox(tmp / "state") if marker in r["text"] and r["repeat_of"] is None]
            totals["kills"] += 1
            totals["pages"] += len(rows)
            totals["uncertain"] += sum(r["state"] == "uncertain" for r in rows)
            texts = emu.submitted_texts()
            mail = [to for to, body in inbox.messages if marker in body]
            for n in range(2):
                got = [t for to, t in texts if to == PHONES[n] and marker in t]
                if not got and f"c{n}@example.com" not in mail:
                    totals["lost"] += 1
                totals["duplicates"] += max(0, len(got) - 1)
                totals["unmarked_duplicates"] += max(
                    0, len([t for t in got if not t.startswith("(repeat)")]) - 1
                )
    finally:
        emu.on_step = lambda name: None
        daemon.stop()
        emu.stop()
        smtp.stop()
    return totals


def main() -> None:
    args = sys.argv[1:]
    kills = 10
    if "--kills" in args:
        at = args.index("--kills")
        kills = int(args[at + 1])
        del args[at : at + 2]
    runs = int(args[0]) if args else 200
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
    if kills:
        t = random_kills(kills)
        print(
            f"random SIGKILLs of the real daemon (seed {t['seed']}): {t['kills']} kills, {t['pages']} pages:"
            f" {t['lost']} lost,"
            f" {t['uncertain']} uncertain, {t['duplicates']} duplicate SMS"
            f" ({t['unmarked_duplicates']} without the (repeat) mark) | target 0 lost, duplicates only marked:"
            f" {'met' if t['lost'] == 0 and t['unmarked_duplicates'] == 0 else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
