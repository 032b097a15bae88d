"""appliance/timeouts.py: a cancellation that a library turned into an error still stops the task."""

from __future__ import annotations

import asyncio

import pytest

from appliance.timeouts import cancelled_meanwhile


class Swallowed(Exception):
    """What an HTTP library may raise instead of the CancelledError it caught mid-request."""


async def request_that_swallows_a_cancel() -> None:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        raise Swallowed("connection reset") from None


async def retry_loop(rounds: list[int]) -> None:
    """The shape of every poll/retry loop: an error is logged and the loop goes on."""
    while True:
        rounds.append(1)
        try:
            await request_that_swallows_a_cancel()
        except Swallowed:
            cancelled_meanwhile()
        await asyncio.sleep(0)


def test_a_swallowed_cancellation_ends_the_loop_that_caught_the_error() -> None:
    async def scenario() -> list[int]:
        rounds: list[int] = []
        task = asyncio.create_task(retry_loop(rounds))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):  # without the helper the loop runs on and this times out
                await task
        return rounds

    assert asyncio.run(scenario()) == [1]


def test_an_error_with_no_cancellation_is_just_an_error() -> None:
    async def scenario() -> str:
        try:
            raise Swallowed("refused")
        except Swallowed:
            cancelled_meanwhile()
            return "went on"

    assert asyncio.run(scenario()) == "went on"
