"""``hotsite probe``: probe one target a few times from the command line, like ping.

For the technician at the rack: no daemon, no config, the same probe code
the daemon uses, so what it prints is what the daemon would see.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

from monitoring.prober import Prober
from monitoring.probes.base import ProbeResult
from monitoring.targets import Target


def run_probes(target: Target, *, count: int, interval: float, timeout: float, as_json: bool) -> bool:
    """Probe ``count`` times; print each result and a summary; return whether any answered."""
    try:
        results = asyncio.run(_run(target, count, interval, min(timeout, interval * 10), as_json))
    except KeyboardInterrupt:
        return False
    ok = [r for r in results if r.ok]
    rtts = [r.rtt_s * 1000 for r in ok if r.rtt_s is not None]
    summary = {
        "target": target.name,
        "sent": len(results),
        "answered": len(ok),
        "loss_pct": round(100 * (1 - len(ok) / len(results)), 1) if results else 100.0,
        "rtt_ms_min": round(min(rtts), 3) if rtts else None,
        "rtt_ms_avg": round(statistics.fmean(rtts), 3) if rtts else None,
        "rtt_ms_max": round(max(rtts), 3) if rtts else None,
    }
    if as_json:
        print(json.dumps({"summary": summary}))
    else:
        rtt = (
            f", rtt min/avg/max {summary['rtt_ms_min']}/{summary['rtt_ms_avg']}/{summary['rtt_ms_max']} ms"
            if rtts
            else ""
        )
        print(
            f"--- {target.name}: {summary['sent']} sent, {summary['answered']} answered, "
            f"{summary['loss_pct']}% loss{rtt}"
        )
    return bool(ok)


async def _run(
    target: Target, count: int, interval: float, timeout: float, as_json: bool
) -> list[ProbeResult]:
    prober = Prober()
    results = []
    try:
        start = time.monotonic()
        for i in range(count):
            result = await prober.probe(target, timeout)
            results.append(result)
            _print(i + 1, result, as_json)
            if i + 1 < count:
                await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
    finally:
        await prober.close()
    return results


def _print(seq: int, r: ProbeResult, as_json: bool) -> None:
    rtt_ms = None if r.rtt_s is None else round(r.rtt_s * 1000, 3)
    if as_json:
        print(
            json.dumps(
                {
                    "seq": seq,
                    "target": r.target,
                    "ok": r.ok,
                    "rtt_ms": rtt_ms,
                    "code": r.code,
                    "reason": r.reason,
                    "detail": r.detail,
                }
            )
        )
    else:
        code = f" {r.code}" if r.code else ""
        rtt = f" rtt={rtt_ms} ms" if rtt_ms is not None else ""
        detail = f" ({r.detail})" if r.detail else ""
        print(f"seq={seq} {r.target}:{code} {r.reason}{rtt}{detail}")
    sys.stdout.flush()
