"""A session's readers stop when cancelled, even as a message arrives (no swallowed cancellation).

Each session ends by cancelling its reader task and awaiting it: the client's after a batch is
refused (journal_limit_mb, a checksum) or when the stream stops, the agent's when a session ends.
Python 3.11's ``asyncio.wait_for`` returns the result instead of raising when the cancellation
lands in the same step as the awaited read completes; a reader looping on it then reads on, and
the session awaits it forever. That race is built here exactly: the message's bytes and the
cancellation arrive together. (Seen live: the retry after a journal-bound refusal hung in 2 of 3
runs, tests/integration/test_replication_vacuum.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from appliance.replication import protocol, source
from appliance.replication.client import SqliteStreamClient
from appliance.replication.protocol import Msg
from appliance.replication.replica import Replica


async def cancelled_as_a_message_arrives(
    reader_task: Callable[[asyncio.StreamReader], Coroutine[Any, Any, object]],
) -> None:
    reader = asyncio.StreamReader()
    task = asyncio.create_task(reader_task(reader))
    for _ in range(3):
        await asyncio.sleep(0)  # the reader is now waiting for a message
    assert not task.done()
    reader.feed_data(protocol.encode(Msg.HEARTBEAT, {"position": None}))
    task.cancel()  # in the same step: the read completes as the cancellation lands
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:  # the bug: reading on, never ending (stopped here so that the test ends)
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert done and task.cancelled(), "the reader went on reading after it was cancelled"


def test_the_clients_reader_stops_when_cancelled_as_a_message_arrives(tmp_path: Path) -> None:
    client = SqliteStreamClient(
        "db", "db", Replica(tmp_path / "r.db"), host="127.0.0.1", port=1, ssl_context=None
    )

    async def pump(reader: asyncio.StreamReader) -> None:
        queue: asyncio.Queue[protocol.Message | BaseException] = asyncio.Queue()
        await client._pump(reader, queue)

    asyncio.run(cancelled_as_a_message_arrives(pump))


@pytest.mark.parametrize("silent_after", [None, 15.0])
def test_the_agents_reader_stops_when_cancelled_as_a_message_arrives(silent_after: float | None) -> None:
    async def pump(reader: asyncio.StreamReader) -> str:
        return await source._pump(reader, asyncio.Queue(), silent_after)

    asyncio.run(cancelled_as_a_message_arrives(pump))
