"""No ``asyncio.wait_for`` in the daemon, the agents or the CLI.

Python 3.11's ``wait_for`` swallows a cancellation that lands in the same step
as the awaited operation completes. A task stopped by the supervisor then runs
on: a session waited forever for a reader that read on (the journal-bound retry
hang, tests/unit/test_replication_cancel.py). ``async with asyncio.timeout(...)``
has the same time limit and never loses a cancellation it did not cause.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("appliance", "failover", "monitoring", "provisioning")


def test_no_package_uses_asyncio_wait_for() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\basyncio\.wait_for\(|\bfrom asyncio import .*\bwait_for\b", line)
    ]
    assert found == [], "use `async with asyncio.timeout(...)` instead:\n" + "\n".join(found)
