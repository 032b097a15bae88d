"""Ending a session's helpers never swallows a cancellation aimed at the session itself.

The race, built exactly: the caller cancels a child and waits for it; the child takes a few
steps to end (as a reader or a worker thread does); the caller is cancelled while it waits.
``task.cancel(); with suppress(BaseException): await task`` lost that cancellation: the caller
went on (a stopped stream kept reconnecting, a stopping agent handed a follower to a session).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from pathlib import Path

from appliance.replication.follower import SqliteFollower
from appliance.replication.source import SourceAgent
from appliance.replication.tasks import cancel_and_wait

ROOT = Path(__file__).resolve().parents[2]


async def _slow_to_stop(ended: list[str], steps: int = 5) -> None:
    """A child that needs a few loop steps to end once cancelled (cleanup, a thread finishing)."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        for _ in range(steps):
            await asyncio.sleep(0)
        ended.append("child")
        raise


async def _cancel_while_waiting(caller: asyncio.Task[object]) -> None:
    for _ in range(3):
        await asyncio.sleep(0)  # the caller now waits for its child to end
    assert not caller.done()
    caller.cancel()
    done, _ = await asyncio.wait({caller}, timeout=5)
    assert done, "the caller never ended"


def test_a_cancellation_of_the_caller_while_its_child_ends_is_re_raised() -> None:
    async def main() -> None:
        ended: list[str] = []
        child = asyncio.create_task(_slow_to_stop(ended))
        after: list[str] = []

        async def session() -> None:
            await asyncio.sleep(0)
            await cancel_and_wait(child)
            after.append("went on")  # must not happen: the caller was told to stop

        caller = asyncio.create_task(session())
        await _cancel_while_waiting(caller)
        assert caller.cancelled(), "the caller's cancellation was swallowed"
        assert after == []
        assert ended == ["child"] and child.cancelled(), "the child must have ended before the caller"

    asyncio.run(main())


def test_the_old_pattern_loses_it() -> None:
    """The test above can fail: the pattern it replaces, under the same race, goes on."""

    async def main() -> None:
        child = asyncio.create_task(_slow_to_stop([]))
        after: list[str] = []

        async def session() -> None:
            await asyncio.sleep(0)
            child.cancel()
            with contextlib.suppress(BaseException):  # the pattern under test
                await child
            after.append("went on")

        caller = asyncio.create_task(session())
        await _cancel_while_waiting(caller)
        assert not caller.cancelled() and after == ["went on"]

    asyncio.run(main())


def test_a_childs_failure_is_consumed_and_an_uncancelled_caller_goes_on() -> None:
    async def main() -> None:
        async def fails() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                raise OSError("reader broke while stopping")

        children = [asyncio.create_task(fails()), asyncio.create_task(_slow_to_stop([]))]
        await asyncio.sleep(0)
        await cancel_and_wait(*children)  # raises nothing: the caller was not cancelled
        assert all(c.done() for c in children)
        await cancel_and_wait(*children)  # already ended: nothing to wait for

    asyncio.run(main())


def _wal_db(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()


def test_an_agent_stopped_while_a_session_takes_the_standing_follower(tmp_path: Path) -> None:
    """``_take_standing`` cancelled as the standing task ends: re-raised, the follower closed
    (nobody would hold its guard, which pins the application's WAL, otherwise)."""
    db = tmp_path / "src.db"
    _wal_db(db)

    async def main() -> None:
        agent = SourceAgent([], ssl_context=None)
        follower = SqliteFollower(db)
        await asyncio.to_thread(follower.open)
        agent.standing["db"] = follower
        agent._standing_tasks["db"] = asyncio.create_task(_slow_to_stop([]))
        await asyncio.sleep(0)
        got: list[object] = []

        async def session() -> None:
            got.append(await agent._take_standing("db"))

        caller = asyncio.create_task(session())
        await _cancel_while_waiting(caller)
        assert caller.cancelled() and got == []
        assert follower.closed
        assert agent.standing == {} and agent._standing_tasks == {}

    asyncio.run(main())


def test_no_replication_code_suppresses_a_cancellation_around_an_await() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "appliance" / "replication").glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"suppress\((BaseException|asyncio\.CancelledError)\)", line)
        and not line.lstrip().startswith(("``", "#"))
    ]
    assert found == [], "use tasks.cancel_and_wait (see its docstring):\n" + "\n".join(found)
