"""One scheduler for all probes.

Each target gets its own loop with a jittered first run (so a hundred trunks
are not probed in the same millisecond), a fixed grid of due times (no drift:
the next run is ``start + k * interval``, not ``end + interval``), a hard
timeout on every probe, and no pile-up: a probe that overruns its slot makes
the loop skip the missed slots rather than queue them. A semaphore bounds
how many probes are in flight at once (back-pressure instead of unbounded
tasks).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence

from appliance.clock import Clock, SystemClock
from appliance.logs import kv
from monitoring.probes.base import ProbeResult
from monitoring.targets import Target

log = logging.getLogger(__name__)

# probe(target, timeout_s): must return within timeout_s; the scheduler enforces it anyway.
ProbeFn = Callable[[Target, float], Awaitable[ProbeResult]]
# Grace beyond the probe's own timeout before the scheduler cancels it.
HARD_TIMEOUT_GRACE_S = 0.25


class ProbeScheduler:
    def __init__(
        self,
        probe: ProbeFn,
        on_result: Callable[[ProbeResult], None],
        *,
        interval_s: float,
        timeout_s: float,
        clock: Clock | None = None,
        max_in_flight: int = 64,
        rng: random.Random | None = None,
        on_skipped: Callable[[Target, int], None] = lambda target, n: None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if not 0 < timeout_s <= interval_s:
            raise ValueError(f"timeout_s must be in (0, interval_s={interval_s}], got {timeout_s}")
        self._probe = probe
        self._on_result = on_result
        self._interval = interval_s
        self._timeout = timeout_s
        self._clock = clock or SystemClock()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._rng = rng or random.Random()
        self._on_skipped = on_skipped

    async def run(self, targets: Sequence[Target]) -> None:
        """Probe every target until cancelled."""
        async with asyncio.TaskGroup() as group:
            for target in targets:
                group.create_task(self._loop(target), name=f"probe {target.name}")

    def timing(self, target: Target) -> tuple[float, float]:
        """The target's (interval, timeout): its own settings, else the defaults."""
        interval = target.interval_s or self._interval
        return interval, min(target.timeout_s or self._timeout, interval)

    async def _loop(self, target: Target) -> None:
        interval, timeout = self.timing(target)
        await asyncio.sleep(self._rng.uniform(0, interval))
        due = self._clock.monotonic()
        while True:
            result = await self._run_one(target, timeout)
            try:
                self._on_result(result)
            except Exception:
                log.exception("probe result handler failed", extra=kv(target=target.name))
            due += interval
            now = self._clock.monotonic()
            if due < now:
                missed = math.ceil((now - due) / interval)
                due += missed * interval
                self._on_skipped(target, missed)
            await asyncio.sleep(due - now)

    async def _run_one(self, target: Target, timeout: float) -> ProbeResult:
        async with self._slots:
            started = self._clock.monotonic()
            try:
                # asyncio.timeout, not wait_for: no extra task per probe, and no lost
                # cancellation when a probe ends as the scheduler is cancelled (bpo-42130).
                async with asyncio.timeout(timeout + HARD_TIMEOUT_GRACE_S):
                    return await self._probe(target, timeout)
            except TimeoutError:
                return ProbeResult(target.name, False, started, None, None, "timeout", "hard timeout")
            except Exception as exc:  # a probe bug must not stop the other targets
                log.exception("probe raised", extra=kv(target=target.name))
                return ProbeResult(target.name, False, started, None, None, "error", type(exc).__name__)
