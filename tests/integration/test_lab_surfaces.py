"""Issue 19: what every read command prints into a pipe, in a lab that has something to say.

The primary is cut, so the sites carry "down since …" reasons, an incident is open and paged
(the GSM modem is the emulator), and events, reports and the on-call view all have content.
Then every read command runs as a script or a serial console would run it (stdout a pipe):

* no box-drawing characters, no line over 200 columns, no trailing blanks;
* no bare monotonic clock value (the daemon's ``time.monotonic()`` leaked as
  ``site:primary:http down since 1710.5``): every number in the text that falls in the band of
  monotonic readings taken while the daemon ran is reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from provisioning.lab import Lab
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for
from tests.support import lab as lab_rig
from tests.support.lab import LabDaemon
from tests.support.surfaces import BOX, monotonic_leaks

pytestmark = lab_rig.marks(pytest.mark.slow)

MAX_COLUMNS = 200
# Markdown documents, not tables for a terminal: a Markdown table row cannot be wrapped without
# breaking the table, so only the box and time checks apply to them.
DOCUMENTS = ("report ",)
ON_CALL = "+8613800138000"

PAGING = lab_rig.SMS_ROTATION_PAGING

# Every command that only reads, with what it needs. `logs` reads journald (no unit here).
READ_COMMANDS: list[tuple[str, ...]] = [
    ("status",),
    ("trunks",),
    ("probes",),
    ("events", "--limit", "200"),
    ("events", "--since", "15m", "--kind", "site"),
    ("incidents",),
    ("oncall",),
    ("replication", "status"),
    ("top",),
    ("top", "--width", "160"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, LabDaemon, float]]:
    """A lab whose primary has been cut: failed over, an incident open and paged."""
    with lab_rig.modem() as modem, lab_rig.netns_lab(tmp_path_factory) as (the_lab, info):
        started = time.monotonic()
        with lab_rig.lab_daemon(
            info, tmp_path_factory, PAGING.replace("{device}", modem.path), ready_timeout=60, clean_exit=False
        ) as daemon:
            wait_for(lambda: daemon.status()["failover"]["state"] == "primary_active"
                     and all(s["verdict"] == "up" for s in daemon.status()["sites"]),
                     timeout=60, what="steady")  # fmt: skip
            assert (
                hotsite("lab", "impair", "--workdir", str(the_lab.workdir), "primary", "--cut").returncode
                == 0
            )
            wait_for(lambda: daemon.status()["failover"]["state"] == "backup_active",
                     timeout=90, what="failover")  # fmt: skip
            wait_for(lambda: modem.submitted, timeout=60, what="the page to the on-call contractor")
            yield the_lab, daemon, started


def _incident_id(daemon: RunningDaemon) -> str:
    listed = json.loads(hotsite("incidents", "--json", config=daemon.config).stdout)
    return str(next(i for i in listed["active"] if i["group"] == "failover")["id"])


def _outputs(the_lab: Any, daemon: RunningDaemon) -> dict[str, str]:
    """What each read command printed into a pipe (subprocess: stdout is not a terminal)."""
    commands = [*READ_COMMANDS, ("report", "incident", _incident_id(daemon))]
    outputs = {}
    for args in commands:
        result = hotsite(*args, config=daemon.config, timeout=60)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert result.stdout.strip(), args
        outputs[" ".join(args)] = result.stdout
    lab = hotsite("lab", "status", "--workdir", str(the_lab.workdir), timeout=60)
    assert lab.returncode == 0, lab.stderr
    outputs["lab status"] = lab.stdout
    return outputs


def test_every_read_command_prints_plain_narrow_text_without_monotonic_values(
    world: tuple[Any, RunningDaemon, float],
) -> None:
    the_lab, daemon, started = world
    outputs = _outputs(the_lab, daemon)
    band = (started - 5, time.monotonic() + 5)
    assert "down" in outputs["status"] and "since" in outputs["status"]  # the reasons the issue quoted
    problems: list[str] = []
    for name, text in outputs.items():
        if BOX & set(text):
            problems.append(f"{name}: box characters {sorted(BOX & set(text))}")
        for line in text.splitlines():
            if len(line) > MAX_COLUMNS and not name.startswith(DOCUMENTS):
                problems.append(f"{name}: {len(line)} columns: {line[:80]!r}…")
            if line != line.rstrip():
                problems.append(f"{name}: trailing blanks: {line!r}")
        problems += [f"{name}: monotonic value: {line!r}" for line in monotonic_leaks(text, *band)]
    assert problems == [], "\n".join(problems)
