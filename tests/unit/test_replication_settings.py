"""The source agent's config keys for checkpoints and watching: defaults, limits, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.replication.settings import load_source_config

BASE = """
[source]
tls_cert_file = "/c"
tls_key_file = "/k"
tls_ca_file = "/ca"
{extra}
[streams.customers]
kind = "sqlite"
path = "/srv/customers.db"
"""


def load(tmp_path: Path, extra: str) -> object:
    path = tmp_path / "source.toml"
    path.write_text(BASE.format(extra=extra))
    return load_source_config(path)


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    s = cfg.source  # type: ignore[attr-defined]
    assert (s.checkpoint_frames, s.restart_frames, s.checkpoint_busy_ms, s.watch) == (2000, 1000, 50, True)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("checkpoint_frames = -1", "source.checkpoint_frames: -1: expected greater than or equal to 0"),
        ("restart_frames = -5", "source.restart_frames: -5: expected greater than or equal to 0"),
        ("checkpoint_busy_ms = 0", "source.checkpoint_busy_ms: 0: expected greater than or equal to 1"),
        (
            "checkpoint_busy_ms = 60000",
            "source.checkpoint_busy_ms: 60000: expected less than or equal to 5000",
        ),
        ('watch = "sometimes"', "source.watch: 'sometimes': expected a valid boolean"),
        ("restart_frame = 10", "source.restart_frame: unknown key"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    assert info.value.exit_code == 2
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_values_taken(tmp_path: Path) -> None:
    s = load(
        tmp_path, "checkpoint_frames = 0\nrestart_frames = 0\ncheckpoint_busy_ms = 20\nwatch = false"
    ).source  # type: ignore[attr-defined]
    assert (s.checkpoint_frames, s.restart_frames, s.checkpoint_busy_ms, s.watch) == (0, 0, 20, False)
