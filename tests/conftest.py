"""Shared fixtures: a minimal valid config and free ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
[appliance]
name = "test"
state_dir = "{state}"
runtime_dir = "{run}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[probes]
interval_s = 0.2
timeout_s = 0.15
rise = 1
fall = 2

[sites.primary]
role = "primary"
sbc = "127.0.0.1:{sbc_port}"
kamailio_set = 1

[sites.backup]
role = "backup"
sbc = "127.0.0.1:{sbc_port}"
kamailio_set = 2
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def minimal_config_text(tmp_path: Path) -> str:
    return MINIMAL.format(
        state=tmp_path / "state",
        run=tmp_path / "run",
        metrics_port=free_port(),
        sbc_port=free_port(socket.SOCK_DGRAM),
    )
