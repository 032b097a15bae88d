"""The lab tests' one rig: what they need to run, a namespace lab, and the real daemon on it.

Every ``tests/integration/test_lab_*.py`` used to open with the same skip list and the
same two module fixtures (bring the lab up, start a daemon on its rendered config), each
file its own copy. They are here once; a file keeps only what is its own (its config
sections, its scenario), so a change to how the lab is brought up is made in one place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from provisioning.lab import Lab
from provisioning.lab import config as lab_config
from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon
from tests.support.modem import ModemEmulator

# What the namespace lab needs on this machine, and what a skip says when it is missing.
NEEDS = [
    (os.geteuid() == 0, "the namespace lab needs root"),
    (shutil.which("kamailio") is not None, "kamailio is not installed"),
    (shutil.which("sipp") is not None, "sipp (sip-tester) is not installed"),
]

# Paging on the lab: SMS through the emulated modem (``{device}``: its path, put in with
# str.replace), the on-call rotation of the lab's contact, paged once by the default policy.
SMS_ROTATION_PAGING = """
[channels.sms]
type = "gsm"
device = "{device}"
send_timeout_s = 5
prompt_timeout_s = 2
poll_s = 0.5

[paging.rotations.telephony]
contacts = ["Lab On-Call"]
start = 2026-01-05T09:00:00+08:00
period_s = 604800

[paging.policies.default]
repeat = 0
[[paging.policies.default.steps]]
targets = ["rotation:telephony"]
escalate_after_s = 600
"""


def marks(*extra: pytest.MarkDecorator) -> list[pytest.MarkDecorator]:
    """A lab module's ``pytestmark``: ``lab``, ``extra`` (e.g. ``slow``), a skip per missing need."""
    return [pytest.mark.lab, *extra, *(pytest.mark.skip(reason=why) for ok, why in NEEDS if not ok)]


class LabDaemon(RunningDaemon):
    """A running daemon that knows where its metrics are served (``listen``)."""

    def __init__(self, config: Path, log: Path, listen: str) -> None:
        super().__init__(config, log)
        self.listen = listen


@contextmanager
def modem() -> Iterator[ModemEmulator]:
    """The emulated GSM modem the lab's SMS channel pages through, stopped afterwards."""
    emulator = ModemEmulator().start()
    try:
        yield emulator
    finally:
        emulator.stop()


@contextmanager
def netns_lab(
    tmp_path_factory: pytest.TempPathFactory, *, ready: bool = True
) -> Iterator[tuple[Lab, dict[str, Any]]]:
    """A namespace lab (``ready``: waited for until every peer answers), taken down afterwards."""
    the_lab = Lab(tmp_path_factory.mktemp("lab"))
    try:
        info = the_lab.up(mode="netns")
        if ready:
            the_lab.wait_ready()
        yield the_lab, info
    finally:
        the_lab.down()


@contextmanager
def lab_daemon(
    info: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    extra: str = "",
    *,
    ready_timeout: float = 15.0,
    clean_exit: bool = True,
) -> Iterator[LabDaemon]:
    """The real daemon on the lab's rendered config plus ``extra`` TOML, its metrics on a free port.

    ``clean_exit``: its exit status on SIGTERM
    must be 0 (a test that kills it on purpose says False).
    """
    listen = f"127.0.0.1:{free_port()}"
    path = Path(info["workdir"]) / "hotsite.toml"
    path.write_text(lab_config.render(info, metrics_listen=listen) + extra)
    running = LabDaemon(path, tmp_path_factory.mktemp("daemon") / "daemon.log", listen)
    try:
        running.wait_ready(timeout=ready_timeout)
        yield running
    finally:
        code = running.stop()
        if clean_exit:
            assert code == 0, f"daemon exited {code}"
