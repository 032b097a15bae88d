"""Fencing tokens kept in files (netlink, Kamailio): they never go down, and a fence stops older applies.

The netlink actuator is given an interface that does not exist: an apply
that got past the token check would fail with "no such interface", so a
:class:`StaleToken` proves the kernel was never touched.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover.actuators.base import ActuatorError, StaleToken
from failover.actuators.netlink import NetlinkActuator
from failover.actuators.tokenfile import raise_token, read_token, write_if_newest
from failover.routing import Routing

FAILOVER = Routing("failover", "backup", 2, {"95588": 2}, frozenset({1}))


def netlink(token_file: Path | None) -> NetlinkActuator:
    return NetlinkActuator("192.0.2.10/24", "hs-no-such0", token_file=token_file, garp_count=0)


def test_a_fenced_netlink_actuator_refuses_older_tokens_before_touching_the_kernel(tmp_path: Path) -> None:
    token_file = tmp_path / "actuators" / "vip.token"
    asyncio.run(netlink(token_file).fence(137))
    assert read_token(token_file) == 137
    later = netlink(token_file)  # another process, or this daemon restarted: memory is empty
    with pytest.raises(StaleToken, match="token 2 is older than 137"):
        asyncio.run(later.apply(FAILOVER, 2))
    with pytest.raises(StaleToken):
        asyncio.run(later.fence(136))
    with pytest.raises(ActuatorError, match="no such interface") as reached:
        asyncio.run(later.apply(FAILOVER, 137))  # the fencing leader itself gets through to the kernel
    assert not isinstance(reached.value, StaleToken)
    assert read_token(token_file) == 137


def test_a_broken_token_file_is_an_actuator_error_naming_it(tmp_path: Path) -> None:
    token_file = tmp_path / "vip.token"
    token_file.write_text("garbage\n")
    with pytest.raises(ActuatorError, match="vip.token holds 'garbage', not a number"):
        asyncio.run(netlink(token_file).fence(3))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=20))
def test_the_token_file_holds_the_largest_token_ever_raised(tokens: list[int]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.token"
        for token in tokens:
            assert raise_token(path, token) == max(token, read_token(path))
        assert read_token(path) == max(tokens)


def test_racing_writers_never_lower_the_token(tmp_path: Path) -> None:
    path = tmp_path / "t.token"

    def writer(start: int) -> None:
        for token in range(start, 400, 4):
            raise_token(path, token)

    threads = [threading.Thread(target=writer, args=(start,)) for start in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert read_token(path) == 399


def test_a_lock_held_by_a_stalled_process_times_out_instead_of_hanging(tmp_path: Path) -> None:
    """A former leader SIGSTOPped inside the token file's critical section keeps its lock. A new
    leader's fence must give up within its time limit (and be retried), never wait forever in a
    worker thread no one can cancel: stuck threads would starve the daemon's whole pool."""
    import subprocess
    import sys
    import time

    import pytest

    path = tmp_path / "t.token"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(path) + '.lock'!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="lock"):
            raise_token(path, 7, wait_s=0.5)
        with pytest.raises(TimeoutError, match="lock"):
            write_if_newest(path, 7, tmp_path / "list", "data", wait_s=0.5)
        assert time.monotonic() - started < 3
        assert read_token(path) == 0 and not (tmp_path / "list").exists()
    finally:
        holder.kill()
        holder.wait()
    assert raise_token(path, 7, wait_s=0.5) == 7  # the holder gone, the fence goes through
