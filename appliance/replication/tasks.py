"""Ending a child task without losing a cancellation aimed at the caller.

Why: a session ends by cancelling its helpers (a reader, a keepalive, the
sending work, a standing follower) and waiting for them. Written as
``task.cancel(); with suppress(BaseException): await task``, a cancellation
of the *caller* that lands while it waits is swallowed with the child's: the
caller's ``await task`` is interrupted, its CancelledError suppressed, and it
goes on as if nobody had asked it to stop (the same family of bug as 3.11's
``asyncio.wait_for``, see tests/unit/test_no_wait_for.py). A stop of the
stream or of the agent is then lost, or the session carries on with a
follower it was told to give up.

:func:`cancel_and_wait` tells the two apart: it waits with
``asyncio.wait``, which is interrupted only by the caller's own
cancellation (the child's ending is a result, not an exception), still waits
for the child to end (so no thread or descriptor outlives the session), and
then re-raises the caller's CancelledError.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, whatever it ends with.

    Their own results, exceptions or cancellations are consumed (the caller
    decided they are not needed). A cancellation of the calling task
    received meanwhile is re-raised once all of them have ended, so the
    caller's own cleanup after this call is skipped only by its own stop.
    """
    for task in tasks:
        task.cancel()
    caller_cancelled = False
    pending = {t for t in tasks if not t.done()}
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            caller_cancelled = True  # (the children were asked once: their cleanup is not cut short)
        pending = {t for t in pending if not t.done()}
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: never logged as "exception was never retrieved"
    if caller_cancelled:
        raise asyncio.CancelledError
