"""Shared fixtures: a minimal valid config and free ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support import configs

REPO = Path(__file__).resolve().parent.parent

MINIMAL = configs.DAEMON  # the template integration tests start a daemon on


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
