"""Shared fixtures: a minimal valid config and free ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support import configs

REPO = Path(__file__).resolve().parent.parent

MINIMAL = configs.DAEMON  # the template integration tests start a daemon on

# Property tests assert behaviour, not speed: on a loaded 2-core CI machine an example can
# take longer than Hypothesis's 200 ms default deadline, or generation can look "too slow",
# and neither says anything about the code under test.
settings.register_profile("hotsite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hotsite")


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
