"""A target removed from the configuration (SIGHUP) while its incident is open: the incident closes.

No lab: the trunk points at a closed loopback port, so the real daemon judges it down
and opens ``target:trunk:trunk-z``. The trunk is then removed from the file and the
daemon reloaded: nothing will ever probe it again, so nothing would ever clear it;
the reload must resolve the incident, saying why.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for

KEY = "target:trunk:trunk-z"


def _incidents(cfg: Path) -> dict[str, Any]:
    return dict(json.loads(hotsite("incidents", "--json", config=cfg).stdout))


def _open(cfg: Path) -> dict[str, Any] | None:
    return next((i for i in _incidents(cfg)["active"] if KEY in i["keys"]), None)


def test_a_trunk_removed_by_a_reload_closes_its_open_incident(
    minimal_config_text: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "hotsite.toml"
    trunk = f'\n[trunks.trunk-z]\naddress = "127.0.0.1:{free_port(socket.SOCK_DGRAM)}"\ntransport = "udp"\n'
    cfg.write_text(minimal_config_text + trunk)
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        incident = wait_for(lambda: _open(cfg), timeout=30, what="the trunk's incident")
        cfg.write_text(minimal_config_text)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: _open(cfg) is None, timeout=20, what="the incident closed by the reload",
                 on_fail=lambda: json.dumps(_incidents(cfg), indent=1))  # fmt: skip
        events = json.loads(
            hotsite("events", "--json", "--incident", str(incident["id"]), "--limit", "50", config=cfg).stdout
        )
        messages = [e["message"] for e in events]
        print(messages)
        assert any(
            f"condition {KEY} cleared: trunk:trunk-z removed from the configuration" in m for m in messages
        ), messages
    finally:
        assert daemon.stop() == 0
