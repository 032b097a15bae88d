"""``hotsite top`` against a real daemon: plain text through a pipe, and the live screen under tmux.

The daemon runs on a small config (two sites and a trunk on closed loopback ports, so the
sites go down and an incident opens). tmux gives ``top`` a real 80x24 terminal; the test
reads the screen with ``capture-pane`` and presses keys with ``send-keys``: ``a`` must
acknowledge the open incident (checked through the API too), ``d`` must ask before a drill,
``q`` must quit and give the terminal back.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for

# Until `top` is registered in appliance.cli.main, run the group with it added (idempotent after).
TOP = [
    sys.executable,
    "-c",
    "import sys; from appliance.cli.main import cli; from appliance.cli.top import top;"
    " cli.add_command(top); cli(sys.argv[1:])",  # no quotes: it goes through tmux's shell
]

TRUNK = """
[trunks.trunk-a]
address = "127.0.0.1:{port}"
transport = "udp"
carrier = "Nobody answers here"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    from tests.conftest import MINIMAL

    work = tmp_path_factory.mktemp("top")
    config = work / "hotsite.toml"
    config.write_text(
        MINIMAL.format(
            state=work / "state",
            run=work / "run",
            metrics_port=free_port(),
            sbc_port=free_port(socket.SOCK_DGRAM),
        )
        + TRUNK.format(port=free_port(socket.SOCK_DGRAM))
    )
    running = RunningDaemon(config, work / "daemon.log")
    try:
        running.wait_ready()
        wait_for(lambda: _active(running), timeout=15, what="an incident for the down sites")
        yield running
    finally:
        running.stop()


def _active(daemon: RunningDaemon) -> list[dict[str, object]]:
    proc = hotsite("incidents", "--json", config=daemon.config)
    return json.loads(proc.stdout)["active"] if proc.returncode == 0 else []


def _top(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOP, "--config", str(daemon.config), "top", *args], capture_output=True, text=True, timeout=30
    )


def test_plain_snapshot_when_not_a_terminal(daemon: RunningDaemon) -> None:
    proc = _top(daemon)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "\x1b[" not in proc.stdout, "no escape sequences in a pipe"
    assert max(len(line) for line in lines) <= 80
    assert len(lines) <= 24
    text = proc.stdout
    assert "hotsite top test" in text and "failover" in text
    assert "primary" in text and "backup" in text and "trunk-a" in text
    assert "DOWN" in text
    assert "on call:" in text
    assert "a ack" not in text, "no key help where there are no keys"


def test_json_snapshot(daemon: RunningDaemon) -> None:
    proc = _top(daemon, "--json")
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    assert {s["name"] for s in snap["status"]["sites"]} == {"primary", "backup"}
    assert snap["incidents"]["active"]


def test_watch_prints_several_snapshots(daemon: RunningDaemon) -> None:
    proc = subprocess.Popen(
        [*TOP, "--config", str(daemon.config), "top", "--watch", "-i", "0.3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert out.count("hotsite top test") >= 2


def test_without_a_daemon_it_fails_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*TOP, "--runtime-dir", str(tmp_path), "top"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("hotsite: error:") and len(proc.stderr.splitlines()) == 1


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (Debian package: tmux)")
def test_live_screen_under_tmux(daemon: RunningDaemon, tmp_path: Path) -> None:
    session = f"hotsite-top-{uuid.uuid4().hex[:8]}"
    socket_path = tmp_path / "tmux.sock"
    tmux = ["tmux", "-S", str(socket_path)]
    command = shlex.join([*TOP, "--config", str(daemon.config), "top", "-i", "0.5"])
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", "80", "-y", "24", f"{command}; sleep 30"],
        check=True,
        env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )

    def screen() -> str:
        proc = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True)
        return proc.stdout

    def keys(*sent: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", session, *sent], check=True)

    try:
        text = wait_for(
            lambda: "hotsite top" in (s := screen()) and "trunk-a" in s and s, what="the live screen"
        )
        assert "a ack oldest open" in text and "q quit" in text
        assert all(len(line) <= 80 for line in text.splitlines())
        open_before = [i for i in _active(daemon) if i["status"] == "open"]
        assert open_before, "the fixture's incident should be open"
        oldest = min(int(str(i["id"])) for i in open_before)

        keys("a")
        wait_for(lambda: f"acknowledged #{oldest}" in screen(), what="the ack message")
        acked = next(i for i in _active(daemon) if i["id"] == oldest)
        assert acked["status"] == "acked" and acked["acked_by"]

        keys("d")
        wait_for(lambda: "y to confirm" in screen(), what="the drill confirmation")
        keys("n")
        wait_for(lambda: "drill not started" in screen(), what="the drill cancelled")
        keys("d")
        wait_for(lambda: "y to confirm" in screen(), what="the drill confirmation again")
        keys("y")
        wait_for(lambda: "drill:" in screen(), what="the drill's answer from the daemon")

        keys("q")
        wait_for(lambda: "hotsite top" not in screen(), what="the screen given back after q")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
