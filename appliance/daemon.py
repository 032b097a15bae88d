"""The daemon base class and the supervisor that owns its tasks.

Signal handlers only set flags and wake the main loop; all work happens in
the loop, between awaits, so a signal can never interrupt a half-done
change. SIGTERM and SIGINT stop, SIGHUP reloads. systemd is told about
readiness, reloads and stopping, and gets watchdog pings while the loop is
alive (a wedged loop stops pinging, and systemd restarts us).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from appliance.logs import kv
from appliance.systemd import Notifier

log = logging.getLogger(f"hotsite.{__name__}")


class Supervisor:
    """Owns the daemon's long-running tasks and restarts any that crash.

    A task that raises is logged and restarted after a backoff that doubles
    up to ``max_backoff_s``; a task that returns normally is not restarted.
    """

    def __init__(self, *, min_backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._min_backoff = min_backoff_s
        self._max_backoff = max_backoff_s
        self.restarts: dict[str, int] = {}

    def start(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"task {name!r} is already running")
        self._tasks[name] = asyncio.create_task(self._keep(name, factory), name=name)

    async def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop_all(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)
        for job in list(self._jobs):
            job.cancel()

    def spawn(self, name: str, job: Coroutine[Any, Any, object]) -> None:
        """A short job (send a page, clear an incident) that must not block the caller.

        Its failure is logged, never raised; the daemon keeps a reference until it ends.
        """

        async def guarded() -> None:
            try:
                await job
            except Exception:
                log.exception("job failed", extra=kv(job=name))

        task = asyncio.create_task(guarded(), name=name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def running(self) -> list[str]:
        return sorted(name for name, task in self._tasks.items() if not task.done())

    async def _keep(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        backoff = self._min_backoff
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.exception("task crashed; restarting", extra=kv(task=name, backoff_s=backoff))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)


class Daemon(abc.ABC):
    """Run loop of a long-lived service: start, serve until told to stop, reload on demand."""

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        self.supervisor = Supervisor()
        self._stop_requested = False
        self._reload_requested = False
        self._wake = asyncio.Event()

    @abc.abstractmethod
    async def start(self) -> None:
        """Open resources and start tasks; raise a HotsiteError to refuse to start."""

    @abc.abstractmethod
    async def reload(self) -> None:
        """Re-read the configuration; keep the old one if the new one is invalid."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release resources; called once, also after a failed start."""

    def describe(self) -> str:
        """One line for systemd's STATUS."""
        return "running"

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self.start()
            self.notifier.ready(self.describe())
            if self.notifier.watchdog_interval_s:
                self.supervisor.start("watchdog", self._watchdog)
            await self._serve()
        finally:
            self.notifier.stopping()
            await self.supervisor.stop_all()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _serve(self) -> None:
        while not self._stop_requested:
            await self._wake.wait()
            self._wake.clear()
            if self._reload_requested and not self._stop_requested:
                self._reload_requested = False
                self.notifier.reloading()
                try:
                    await self.reload()
                except Exception:  # a reload must never stop a running daemon
                    log.exception("reload failed; the daemon keeps running")
                self.notifier.ready(self.describe())

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_interval_s
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval_s / 2)
