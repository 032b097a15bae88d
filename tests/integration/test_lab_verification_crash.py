"""Issue 20: the verification calls after a failover survive the daemon's SIGKILL.

The backup's SBC rejects INVITEs (OPTIONS still answered), so after the failover
runbook has moved routing the verification calls keep failing and retrying for
``verify_timeout_s``: the kill lands after routing changed and before the calls
reported. The SBC is healed, the daemon restarted on the same state: it must place
the owed calls again, answered at the backup, and the incident report must show
each hotline's first good call.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.lab import config as lab_config
from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]
for ok, why in [
    (os.geteuid() == 0, "the namespace lab needs root"),
    (shutil.which("kamailio") is not None, "kamailio is not installed"),
    (shutil.which("sipp") is not None, "sipp (sip-tester) is not installed"),
]:
    if not ok:
        pytestmark.append(pytest.mark.skip(reason=why))

TESTCALLS = """
[testcalls]
caller = "10086"
hotlines = ["vip", "cards"]
interval_s = 600
duration_s = 1
setup_timeout_s = 2
verify_timeout_s = 60
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any]]]:
    from provisioning.lab import Lab

    the_lab = Lab(tmp_path_factory.mktemp("lab"))
    try:
        info = the_lab.up(mode="netns")
        the_lab.wait_ready()
        yield the_lab, info
    finally:
        the_lab.down()


def _events(config: Path, kind: str) -> list[dict[str, Any]]:
    proc = hotsite("events", "--json", "--kind", kind, "--limit", "50", config=config)
    return list(json.loads(proc.stdout)) if proc.returncode == 0 else []


def _lab(the_lab: Any, *args: str) -> None:
    proc = hotsite("lab", *args[:1], "--workdir", str(the_lab.workdir), *args[1:])
    assert proc.returncode == 0, proc.stderr


def test_sigkill_mid_verification_places_the_calls_again_after_restart(
    lab: tuple[Any, dict[str, Any]], tmp_path: Path
) -> None:
    the_lab, info = lab
    config = Path(info["workdir"]) / "hotsite.toml"
    text = lab_config.render(info, metrics_listen=f"127.0.0.1:{free_port()}") + TESTCALLS
    config.write_text(text.replace('policy = "auto"', 'policy = "manual"'))
    first = RunningDaemon(config, tmp_path / "first.log")
    first.wait_ready()
    wait_for(
        lambda: (
            (s := first.status())["failover"]["state"] == "primary_active"
            and all(site["verdict"] == "up" for site in s["sites"])
        ),
        timeout=60,
        what="both sites up, normal routing",
    )
    _lab(the_lab, "impair", "backup", "--reject-invites", "503")
    try:
        moved = hotsite("failover", "--force", "--yes", "--reason", "planned move", config=config)
        assert moved.returncode == 0, moved.stderr
        wait_for(
            lambda: (
                (f := first.status()["failover"])["routing"] == "failover"
                and f["state"] in ("backup_active", "failback_pending")
            ),
            timeout=30,
            what="routing moved to the backup",
        )
        # Routing changed; the verification calls are being rejected and retried: kill right here.
        assert not _events(config, "failover.verification")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        _lab(the_lab, "heal", "backup")

    second = RunningDaemon(config, tmp_path / "second.log")
    try:
        second.wait_ready()
        verified = wait_for(
            lambda: next(iter(_events(config, "failover.verification")), None),
            timeout=90,
            what="the owed verification calls, placed after the restart",
            on_fail=lambda: second.log.read_text()[-4000:],
        )
        data = verified["data"]
        print(json.dumps(data, indent=1))
        assert data["ok"] and data["epoch"] == 1, data
        assert {h["answered_by"] for h in data["hotlines"]} == {"site:backup"}
        decisions = _events(config, "failover.decision")
        assert any(
            "placing the interrupted failover's verification calls again (epoch 1)" in d["message"]
            for d in decisions
        ), [d["message"] for d in decisions]
        assert any(d["message"].startswith("failover verified by calls (epoch 1)") for d in decisions)
        start = next(d for d in decisions if d["data"].get("to") == "failing_over")
        report = json.loads(
            hotsite("report", "incident", str(start["id"]), "--format", "json", config=config).stdout
        )
        assert report["figures"]["verified_by_calls"] is True
        assert set(report["figures"]["first_good_call_after_detection"]) == {"95588", "95566"}
        assert second.status()["failover"]["routing"] == "failover"  # calls never move routing
    finally:
        assert second.stop() == 0
