"""Cancellation-safe time limits: the one rule for every ``await`` that must not take forever.

1. Bound an await with ``async with asyncio.timeout(seconds):``, never
   ``asyncio.wait_for``. Python 3.11's ``wait_for`` swallows a cancellation
   that lands in the same step as the awaited operation completes: a task the
   supervisor stopped runs on (the journal-bound retry hang,
   tests/unit/test_replication_cancel.py). ``asyncio.timeout`` never loses a
   cancellation it did not cause. tests/unit/test_no_wait_for.py enforces it.
2. Where a ``TimeoutError`` is caught and the code goes on (a retry loop, an
   error turned into a value), call :func:`cancelled_meanwhile` first: a timeout
   and a cancellation can land together, and the cancellation must win.
"""

from __future__ import annotations

import asyncio


def cancelled_meanwhile() -> None:
    """Raise ``CancelledError`` if this task was cancelled while its timeout fired.

    Otherwise the cancellation comes back as an ordinary error, a retry loop
    swallows it, and whoever cancelled (a stop, a shutdown) waits forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
