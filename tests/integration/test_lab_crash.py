"""The daemon killed with SIGKILL in the middle of a runbook: on restart, routing is consistent.

The runbook's second step is a slow hook, so the kill lands after Kamailio
was switched and before the hook was: the worst moment, with the world half
moved. The restarted daemon must resume the failover from its persisted
state (every step is idempotent, a newer fencing token) and finish it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.lab import config as lab_config
from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for
from tests.support import lab as lab_rig

pytestmark = lab_rig.marks(pytest.mark.slow)

HOOK = """#!/bin/sh
# A slow external step (a carrier's redirect API, say) that records what it was told.
state="{state}"
if [ "$1" = "--verify" ]; then
    held="$(cat "$state" 2>/dev/null || echo none)"
    [ "$held" = "$HOTSITE_ROUTING" ] && exit 0
    echo "redirect holds $held"
    exit 1
fi
sleep 4
echo "$HOTSITE_ROUTING" > "$state"
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with lab_rig.netns_lab(tmp_path_factory) as (_, info):
        yield info


def _rpc(method: str, *params: Any) -> Any:
    body = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}
    return httpx.post("http://10.77.0.10:5071/RPC", json=body, timeout=3, trust_env=False).json()["result"]


def test_sigkill_mid_runbook_resumes_and_completes(lab: dict[str, Any], tmp_path: Path) -> None:
    state_file = tmp_path / "redirect.state"
    script = tmp_path / "redirect.sh"
    script.write_text(HOOK.format(state=state_file))
    script.chmod(0o755)
    config = Path(lab["workdir"]) / "hotsite.toml"
    text = lab_config.render(lab, metrics_listen=f"127.0.0.1:{free_port()}")
    text += f'\n[actuators.redirect]\ntype = "hook"\ncommand = ["{script}"]\ntimeout_s = 10\n'
    config.write_text(text.replace('policy = "auto"', 'policy = "manual"'))

    first = RunningDaemon(config, tmp_path / "first.log")
    first.wait_ready()
    wait_for(lambda: first.status()["failover"]["state"] == "primary_active", what="normal operation")
    moved = hotsite("failover", "--force", "--yes", "--reason", "planned move", config=config)
    assert moved.returncode == 0, moved.stderr
    # Kamailio is switched first; the hook then sleeps: kill the daemon right there.
    wait_for(lambda: _rpc("htable.get", "hotlines", "95588")["item"]["value"] == 2, what="kamailio switched")
    assert not state_file.exists()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()

    second = RunningDaemon(config, tmp_path / "second.log")
    try:
        second.wait_ready()
        try:
            # Done means routing on the backup; with the primary up, the engine goes on at
            # once to failback_pending (failback stays manual), so accept either state.
            done = wait_for(
                lambda: (
                    (f := second.status()["failover"])["state"] in ("backup_active", "failback_pending")
                    and f["routing"] == "failover"
                    and f
                ),
                timeout=60,
                what="resumed failover completed",
            )
        except AssertionError as exc:  # say why: the restarted daemon's own account
            raise AssertionError(
                f"{exc}\n--- restarted daemon's log ---\n{second.log.read_text()[-6000:]}"
            ) from None
        assert done["routing"] == "failover" and done["epoch"] == 2  # a newer token than the killed run's
        assert state_file.read_text().strip() == "failover"
        assert _rpc("htable.get", "hotlines", "95588")["item"]["value"] == 2
        decisions = json.loads(
            hotsite("events", "--json", "--kind", "failover.decision", config=config).stdout
        )
        assert any(
            d["message"].startswith("resuming the interrupted failover from the top (epoch 2")
            for d in decisions
        )
    finally:
        assert second.stop() == 0


FAILING_HOOK = """#!/bin/sh
# A carrier redirect API that refuses the change (or, once fixed, accepts it).
state="{state}"
if [ "$1" = "--verify" ]; then
    held="$(cat "$state" 2>/dev/null || echo normal)"
    [ "$held" = "$HOTSITE_ROUTING" ] && exit 0
    echo "redirect holds $held"
    exit 1
fi
if [ -e "{broken}" ] && [ "$HOTSITE_ROUTING" = "failover" ]; then
    echo "carrier API: 503 redirect service unavailable" >&2
    exit 1
fi
echo "$HOTSITE_ROUTING" > "$state"
"""


def test_failover_wait_exits_1_when_the_runbook_fails_and_0_when_it_completes(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """`failover --wait`: a script learns whether routing moved, not only that a runbook started.

    Its own state directory (a fresh appliance) facing a Kamailio that may have obeyed
    tokens already: the epochs continue above them (failover/service.py)."""
    broken = tmp_path / "carrier-broken"
    broken.touch()
    script = tmp_path / "redirect.sh"
    script.write_text(FAILING_HOOK.format(state=tmp_path / "redirect.state", broken=broken))
    script.chmod(0o755)
    config = tmp_path / "hotsite.toml"
    text = lab_config.render(lab, metrics_listen=f"127.0.0.1:{free_port()}")
    text = text.replace(f'"{Path(lab["workdir"]) / "state"}"', f'"{tmp_path / "state"}"')
    text = text.replace(f'"{Path(lab["workdir"]) / "run"}"', f'"{tmp_path / "run"}"')
    text += f'\n[actuators.redirect]\ntype = "hook"\ncommand = ["{script}"]\ntimeout_s = 10\n'
    config.write_text(text.replace('policy = "auto"', 'policy = "manual"'))

    daemon = RunningDaemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        wait_for(lambda: daemon.status()["failover"]["state"] == "primary_active", what="normal operation")
        failed = hotsite("failover", "--force", "--yes", "--wait", "60", "--reason", "drill", config=config)
        assert failed.returncode == 1, (failed.stdout, failed.stderr, daemon.log.read_text()[-3000:])
        assert "the runbook failed" in failed.stderr and "503 redirect service unavailable" in failed.stderr
        assert "redirect: redirect:" not in failed.stderr
        assert daemon.status()["failover"]["routing"] == "normal"  # rolled back

        broken.unlink()  # the carrier fixed its API
        moved = hotsite("failover", "--force", "--yes", "--wait", "60", "--json", config=config)
        assert moved.returncode == 0, (moved.stdout, moved.stderr, daemon.log.read_text()[-3000:])
        assert json.loads(moved.stdout)["failover"]["routing"] == "failover"
        assert _rpc("htable.get", "hotlines", "95588")["item"]["value"] == 2
        back = hotsite("failback", "--force", "--yes", "--wait", "60", config=config)
        assert back.returncode == 0, (back.stdout, back.stderr)
    finally:
        assert daemon.stop() == 0
