"""When to look at the tree again: inotify (asyncinotify), or polling when it cannot watch."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.logs import kv

log = logging.getLogger("hotsite.appliance.replication.files")


class ChangeWatcher(abc.ABC):
    """Says when a tree may have changed, so it is scanned then rather than on a timer.

    Contract: :meth:`wait` returns within ``timeout`` seconds (plus the
    quiet period): True if something in the tree may have changed since the
    last call (an event, an overflow, or a watcher that cannot know), False
    if the time ran out with no sign of change. It never raises for files or
    directories that vanish; a lost ability to watch turns into True
    (the caller scans), never into silence. :meth:`close` releases the
    kernel resources and may be called twice.
    """

    @abc.abstractmethod
    async def wait(self, timeout: float) -> bool: ...

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        pass


class PollingWatcher(ChangeWatcher):
    """The Null watcher: no notification, a ``stat`` comparison every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval

    async def wait(self, timeout: float) -> bool:
        await asyncio.sleep(min(self.interval, max(timeout, 0.0)))
        return True


class InotifyWatcher(ChangeWatcher):
    """inotify on every directory of the tree; new directories get watches as they appear.

    Raises ``OSError`` from the constructor if inotify cannot be had at all
    (the caller then polls). Past ``max_user_watches`` it watches what it
    could and reports "changed" on every call (polling in effect) while
    ``degraded`` says so.
    """

    QUIET_S = 0.03
    MAX_DEBOUNCE_S = 0.3

    def __init__(self, root: Path, skip: Callable[[str], bool] = lambda name: name.startswith(".hotsite")):
        from asyncinotify import Inotify, Mask

        self.root = root
        self._skip = skip
        self._mask = (
            Mask.CLOSE_WRITE
            | Mask.MODIFY
            | Mask.ATTRIB
            | Mask.CREATE
            | Mask.DELETE
            | Mask.MOVED_FROM
            | Mask.MOVED_TO
            | Mask.DELETE_SELF
            | Mask.MOVE_SELF
            | Mask.ONLYDIR
        )
        self._dir_flag = Mask.ISDIR
        self._created = Mask.CREATE | Mask.MOVED_TO
        self._inotify = Inotify()
        # Events are read by one task that is never cancelled mid-read and handed over through a
        # queue, whose get() may be cancelled safely: an Inotify.get() cancelled by a timeout just
        # after it read the kernel's events loses them (an edit then waited for the full rescan).
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self.degraded = False
        self.overflows = 0
        self.events = 0
        self._add_tree(root)

    def _add(self, path: Path) -> None:
        try:
            self._inotify.add_watch(path, self._mask)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                if not self.degraded:
                    log.warning("inotify watch limit reached; polling this tree", extra=kv(root=self.root))
                self.degraded = True
            # ENOENT / ENOTDIR: gone already; the scan sees that

    def _add_tree(self, top: Path) -> None:
        self._add(top)
        for dirpath, dirnames, _files in os.walk(top):
            dirnames[:] = [d for d in dirnames if not self._skip(d)]
            for d in dirnames:
                self._add(Path(dirpath) / d)

    def _note(self, event: Any) -> None:
        from asyncinotify import Mask

        self.events += 1
        if event.mask & Mask.Q_OVERFLOW:
            self.overflows += 1
            log.info("inotify queue overflowed; the tree is scanned", extra=kv(root=self.root))
            return
        is_new_dir = event.mask & self._dir_flag and event.mask & self._created
        if is_new_dir and event.path is not None and not self._skip(event.path.name):
            self._add_tree(event.path)

    async def wait(self, timeout: float) -> bool:
        if self.degraded:
            await asyncio.sleep(min(0.2, max(timeout, 0.0)))
            return True
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that lands just as
        # the awaited thing completes, and the session then outlives the agent's stop().
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                event = await self._queue.get()
        except TimeoutError:
            return False
        self._note(event)
        # Quiet period: a file written in pieces, or many files copied in, make one scan.
        until = time.monotonic() + self.MAX_DEBOUNCE_S
        while time.monotonic() < until:
            try:
                async with asyncio.timeout(self.QUIET_S):
                    event = await self._queue.get()
            except TimeoutError:
                break
            self._note(event)
        return True

    async def _read(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self._queue.put_nowait(await self._inotify.get())

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(OSError):
            self._inotify.close()


def make_watcher(root: Path, watch: bool, poll_s: float) -> ChangeWatcher:
    """inotify when asked for and possible, else polling (said once in the log)."""
    if watch:
        try:
            return InotifyWatcher(root)
        except (OSError, ImportError) as exc:
            log.warning("inotify unavailable; polling", extra=kv(root=root, error=str(exc)))
    return PollingWatcher(max(poll_s, 0.2))
