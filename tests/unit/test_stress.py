"""``make test-stress`` (tests/stress.py): the hogs really burn CPU while the command runs, and are gone after."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests import stress

# Reads the hogs' pids, waits until they used CPU time, prints them, and exits 3.
PROBE = """
import os, sys, time
pids = [int(p) for p in os.environ["HOTSITE_STRESS_HOGS"].split(",")]
def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in ticks
deadline = time.monotonic() + 30
while min(cpu(p) for p in pids) < 5 and time.monotonic() < deadline:
    time.sleep(0.05)
print(",".join(map(str, pids)), min(cpu(p) for p in pids))
sys.exit(3)
"""


def test_the_command_runs_beside_busy_hogs_and_its_exit_status_is_kept(tmp_path: Path, capfd: object) -> None:
    code = stress.main(["--hogs", "2", "--", sys.executable, "-c", PROBE])
    assert code == 3
    out = capfd.readouterr().out  # type: ignore[attr-defined]
    pids_text, ticks = out.split()
    assert int(ticks) >= 5, "the hogs used CPU while the command ran"
    for pid in map(int, pids_text.split(",")):
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"hog {pid} still running"


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_no_command_is_a_usage_error() -> None:
    try:
        stress.main(["--hogs", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("no command was accepted")
    assert os.environ.get("HOTSITE_STRESS_HOGS") is None
