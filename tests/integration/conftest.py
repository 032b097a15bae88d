"""Integration fixtures.

The namespace lab uses machine-wide names (hs-lab-*, the hs-appl link, the
10.77.0.0/24 subnet), so only one lab may be up at a time on a machine. Every
test module marked ``lab`` holds an exclusive file lock while it runs: two
test runs (two developers' checkouts, a CI run) wait for each other instead
of failing.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

LOCK = Path("/tmp/hotsite-lab-tests.lock")


@pytest.fixture(scope="module", autouse=True)
def _one_lab_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("lab") is None:
        yield
        return
    with LOCK.open("a") as handle:
        started = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.monotonic() - started
        if waited > 1:
            print(f"waited {waited:.0f}s for another run's lab")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
