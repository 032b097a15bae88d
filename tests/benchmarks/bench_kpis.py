"""The cost of reading the per-trunk call KPIs from Kamailio, against the number of trunks declared.

``.venv/bin/python -m tests.benchmarks.bench_kpis [--trunks 1,10,50,200] [--polls 100]`` as root
(Kamailio binds 127.0.78.1:5060 and :5071; run it under the integration lock). For each
size, the real Kamailio runs the generated config (provisioning/lab/kamailio.py, the one
the lab and the kamailio_edge role render) declaring that many trunks, and the
daemon's own reader (``KpiMonitor.poll``: one ``stats.get_statistics script:`` over
JSON-RPC/HTTP, parse, fold into every trunk's window and judgement) runs ``--polls``
times back to back. Printed per size: statistics declared, answer size, wall time per
poll (median, p95), of which parse + fold, hotsite's CPU per poll, Kamailio's CPU per
poll, Kamailio's resident memory (all its processes, shared memory counted once per process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.clock import SystemClock
from appliance.config import Config
from appliance.kamailio import KamailioRpc
from monitoring import kpis
from monitoring.kpi_monitor import KpiMonitor
from provisioning.lab import kamailio as lab_kamailio
from provisioning.lab import topology as topo
from tests.benchmarks.kamailio import KamailioProcess, _start

EDGE = "127.0.78.1"


def trunk_ips(n: int) -> list[str]:
    return [f"10.99.{i // 250}.{i % 250 + 1}" for i in range(n)]


def start_edge(workdir: Path, ips: list[str]) -> KamailioProcess:
    module_dir = lab_kamailio.find_module_dir()
    if module_dir is None:
        raise SystemExit("Kamailio's modules are not installed (Debian package kamailio)")
    dispatcher = workdir / "dispatcher.list"
    dispatcher.write_text(lab_kamailio.render_dispatcher_list("127.0.78.2", "127.0.78.3"))
    cfg = lab_kamailio.render_cfg(
        address=EDGE,
        module_dir=module_dir,
        dispatcher_list=dispatcher,
        rpc_socket=workdir / "rpc.sock",
        trunks=ips,
    )
    return _start(cfg, workdir, None, [(EDGE, topo.SIP_PORT)])


def reader(ips: list[str]) -> KpiMonitor:
    cfg = Config.model_validate(
        {
            "sites": {
                "primary": {"role": "primary", "sbc": "127.0.78.2:5060", "kamailio_set": 1},
                "backup": {"role": "backup", "sbc": "127.0.78.3:5060", "kamailio_set": 2},
            },
            "trunks": {f"trunk-{i}": {"address": f"{ip}:5060"} for i, ip in enumerate(ips)},
        }
    )
    rpc = KamailioRpc(f"http://{EDGE}:{topo.RPC_PORT}{topo.RPC_PATH}", timeout_s=10)
    return KpiMonitor(cfg, rpc, SystemClock())


async def measure(n: int, polls: int) -> dict[str, Any]:
    ips = trunk_ips(n)
    with tempfile.TemporaryDirectory(prefix="bench-kpis-") as tmp:
        kam = start_edge(Path(tmp), ips)
        try:
            monitor = reader(ips)
            deadline = time.monotonic() + 20
            while True:  # the HTTP RPC listener comes up a little after SIP
                await monitor.poll()
                if monitor.error is None:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"Kamailio's RPC never answered: {monitor.error}\n{kam.log_tail()}")
                await asyncio.sleep(0.2)
            if monitor.uncounted:
                raise SystemExit(
                    f"{len(monitor.uncounted)} trunks not counted: the config is not the one read"
                )
            raw = await monitor._rpc.call("stats.get_statistics", f"{kpis.GROUP}:")
            walls: list[float] = []
            kam_cpu0, cpu0 = kam.cpu_seconds(), time.process_time()
            for _ in range(polls):
                t0 = time.perf_counter()
                await monitor.poll()
                walls.append(time.perf_counter() - t0)
            cpu, kam_cpu = time.process_time() - cpu0, kam.cpu_seconds() - kam_cpu0
            assert monitor.error is None, monitor.error
            t0 = time.perf_counter()
            for _ in range(polls):  # the pure part alone, on the same answer
                monitor.fold(kpis.parse_statistics(raw), time.monotonic())
            pure = (time.perf_counter() - t0) / polls
            rss = sum(p.memory_info().rss for p in kam.tree())
            return {
                "trunks": n,
                "stats": len(raw),
                "answer_kb": len(json.dumps(raw)) / 1024,
                "median_ms": 1000 * statistics.median(walls),
                "p95_ms": 1000 * sorted(walls)[int(0.95 * (len(walls) - 1))],
                "pure_ms": 1000 * pure,
                "cpu_ms": 1000 * cpu / polls,
                "kam_cpu_ms": 1000 * kam_cpu / polls,
                "kam_rss_mb": rss / 2**20,
            }
        finally:
            kam.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunks", default="1,10,50,200", help="sizes, comma-separated")
    parser.add_argument("--polls", type=int, default=100, help="reads per size")
    args = parser.parse_args()
    sizes = [int(x) for x in args.trunks.split(",")]
    print(
        f"{'trunks':>6} {'stats':>6} {'answer':>8} {'poll med':>9} {'p95':>8} {'parse+fold':>10}"
        f" {'hotsite CPU':>11} {'Kamailio CPU':>12} {'Kamailio RSS':>12}"
    )
    for n in sizes:
        r = asyncio.run(measure(n, args.polls))
        print(
            f"{r['trunks']:>6} {r['stats']:>6} {r['answer_kb']:>6.1f}kB {r['median_ms']:>7.2f}ms"
            f" {r['p95_ms']:>6.2f}ms {r['pure_ms']:>8.2f}ms {r['cpu_ms']:>9.2f}ms"
            f" {r['kam_cpu_ms']:>10.2f}ms {r['kam_rss_mb']:>10.1f}MB"
        )
    print(f"(per poll; {args.polls} polls per size; one poll per [callkpis] interval_s, default 5 s)")


if __name__ == "__main__":
    main()
