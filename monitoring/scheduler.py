"""One scheduler for all probes.

Every target has a fixed grid of due times (no drift: the next run is
``start + k * interval``, not ``end + interval``) with a jittered start (so
a hundred trunks are not probed in the same millisecond). A probe that
overruns its slot makes the target skip the missed slots rather than queue
them (no pile-up), at most ``max_in_flight`` probes run at once
(back-pressure: due probes wait for a free slot instead of spawning
unbounded tasks), and every probe has a hard timeout.

Why one task and a heap rather than a task per target: with thousands of
trunks, a sleeping task, a timer and a timeout scope per target and per
probe cost as much CPU as the probes themselves. Here one loop keeps the due
times in a heap, starts what is due, and a single sweep cancels probes that
outlived their hard timeout.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from appliance.clock import Clock, SystemClock
from appliance.logs import kv
from monitoring.probes.base import ProbeResult
from monitoring.targets import Target

log = logging.getLogger(f"hotsite.{__name__}")

# probe(target, timeout_s): must return within timeout_s; the scheduler enforces it anyway.
ProbeFn = Callable[[Target, float], Awaitable[ProbeResult]]
# Grace beyond the probe's own timeout before the scheduler cancels it.
HARD_TIMEOUT_GRACE_S = 0.25
# The longest the loop sleeps: new due times and hard timeouts are noticed this fast.
TICK_S = 0.01


@dataclass(slots=True)
class _Running:
    target: Target
    due: float  # the slot this run belongs to
    started: float
    deadline: float  # hard timeout
    interval: float


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
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._probe = probe
        self._on_result = on_result
        self._interval = interval_s
        self._timeout = timeout_s
        self._clock = clock or SystemClock()
        self._max_in_flight = max_in_flight
        self._rng = rng or random.Random()
        self._on_skipped = on_skipped
        self._due: list[tuple[float, int, Target]] = []
        self._order = itertools.count()
        self._running: dict[asyncio.Future[ProbeResult], _Running] = {}

    def timing(self, target: Target) -> tuple[float, float]:
        """The target's (interval, timeout): its own settings, else the defaults."""
        interval = target.interval_s or self._interval
        return interval, min(target.timeout_s or self._timeout, interval)

    async def run(self, targets: Sequence[Target]) -> None:
        """Probe every target until cancelled."""
        now = self._clock.monotonic()
        self._due = []
        for target in targets:
            interval, _ = self.timing(target)
            self._schedule(now + self._rng.uniform(0, interval), target)
        try:
            while True:
                self._start_due()
                self._cancel_overdue()
                await asyncio.sleep(self._sleep_for())
        finally:
            for task in list(self._running):
                task.cancel()
            self._running.clear()

    def _schedule(self, due: float, target: Target) -> None:
        heapq.heappush(self._due, (due, next(self._order), target))

    def _sleep_for(self) -> float:
        if not self._due or len(self._running) >= self._max_in_flight:
            return TICK_S
        return max(0.0, min(TICK_S, self._due[0][0] - self._clock.monotonic()))

    def _start_due(self) -> None:
        loop = asyncio.get_running_loop()
        now = self._clock.monotonic()
        while self._due and self._due[0][0] <= now and len(self._running) < self._max_in_flight:
            due, _, target = heapq.heappop(self._due)
            interval, timeout = self.timing(target)
            task = asyncio.ensure_future(self._probe(target, timeout), loop=loop)
            self._running[task] = _Running(target, due, now, now + timeout + HARD_TIMEOUT_GRACE_S, interval)
            task.add_done_callback(self._finished)

    def _cancel_overdue(self) -> None:
        now = self._clock.monotonic()
        for task, run in self._running.items():
            if run.deadline <= now and not task.done():
                task.cancel()

    def _finished(self, task: asyncio.Future[ProbeResult]) -> None:
        run = self._running.pop(task, None)
        if run is None:  # the scheduler is shutting down
            return
        result = self._result(task, run)
        try:
            self._on_result(result)
        except Exception:
            log.exception("probe result handler failed", extra=kv(target=run.target.name))
        due = run.due + run.interval
        now = self._clock.monotonic()
        if due < now:
            missed = math.ceil((now - due) / run.interval)
            due += missed * run.interval
            self._on_skipped(run.target, missed)
        self._schedule(due, run.target)

    def _result(self, task: asyncio.Future[ProbeResult], run: _Running) -> ProbeResult:
        name = run.target.name
        if task.cancelled():
            return ProbeResult(name, False, run.started, None, None, "timeout", "hard timeout")
        error = task.exception()
        if error is not None:  # a probe bug must not stop the other targets
            log.error("probe raised", exc_info=error, extra=kv(target=name))
            return ProbeResult(name, False, run.started, None, None, "error", type(error).__name__)
        return task.result()
