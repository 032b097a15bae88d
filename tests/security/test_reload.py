"""SIGHUP with a hostile or broken config never kills the running daemon: the old config stays."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import MINIMAL, free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for

pytestmark = pytest.mark.slow


def test_sighup_with_bad_configs_keeps_the_old_one_and_the_daemon(tmp_path: Path) -> None:
    good = MINIMAL.format(
        state=tmp_path / "state",
        run=tmp_path / "run",
        metrics_port=free_port(),
        sbc_port=free_port(socket.SOCK_DGRAM),
    )
    cfg = tmp_path / "hotsite.toml"
    cfg.write_text(good)
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        hostile = [
            "a = " + "[" * 50_000 + "]" * 50_000 + "\n",  # killed today's daemon (RecursionError)
            good.replace("[probes]\n", f'[probes]\ntls_ca_file = "{tmp_path / "absent-ca.pem"}"\n'),
            good + "\n[appliance.extra]\n",
            "\x00\xff" * 1000,
        ]
        for n, text in enumerate(hostile, start=1):
            cfg.write_text(text)
            daemon.signal(signal.SIGHUP)

            def rejected(
                n: int = n,
            ) -> bool:  # rejected, or (the absent CA) applied as check_environment logs
                out = hotsite("events", "--json", "--kind", "config", config=tmp_path / "keep.toml")
                return out.returncode == 0 and len(json.loads(out.stdout)) >= n

            (tmp_path / "keep.toml").write_text(good)
            wait_for(rejected, timeout=30, what=f"reload {n} answered", on_fail=daemon.log.read_text)
            assert daemon.proc.poll() is None, daemon.log.read_text()
        time.sleep(0.5)
        assert daemon.proc.poll() is None, daemon.log.read_text()
        cfg.write_text(good)
        assert daemon.status()["failover"]
        assert "Traceback" not in daemon.log.read_text()
    finally:
        daemon.stop()
