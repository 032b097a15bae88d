"""``hotsite config check`` and ``hotsite run`` against hostile config files.

Whatever the file holds, ``config check`` exits 0 (valid) or 2 (names the
problem) and never prints a traceback; special files are refused without
hanging or reading without end.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cli.main import cli
from tests.conftest import MINIMAL, free_port
from tests.integration.daemon_helpers import hotsite

SECTIONS = [
    "appliance", "metrics", "probes", "sites", "sites.primary", "trunks", "failover", "kamailio",
    "paging", "channels", "contacts", "replication", "coordination", "actuators", "hotlines", "host",
]  # fmt: skip
KEYS = [
    "name", "role", "sbc", "listen", "state_dir", "runtime_dir", "interval_s", "timeout_s", "rise",
    "fall", "witness", "policy", "type", "device", "url", "token_file", "tls_ca_file", "kamailio_set",
    "alertmanager_listen", "command", "endpoints", "enabled", "phone", "x",
]  # fmt: skip


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
SCALARS = (
    st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | TEXT
    | st.sampled_from(["127.0.0.1:9", "", "/dev/zero", "http://u:p@h/x?apikey=1", "sip:1.2.3.4", "auto"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | TEXT, inner, max_size=4)
    ),
    max_leaves=12,
)
DOCUMENTS = st.dictionaries(
    st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6), max_size=6
)


def render(doc: dict[str, dict[str, object]]) -> str:
    return "".join(
        f"[{section}]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in body.items())
        for section, body in doc.items()
    )


def check(runner: CliRunner, path: Path) -> None:
    result = runner.invoke(cli, ["config", "check", str(path)])
    detail = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
    assert result.exit_code in (0, 2), (result.exit_code, result.output, detail, path.read_text()[:2000])
    assert "Traceback" not in result.output, result.output


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=DOCUMENTS)
def test_any_toml_document_gives_0_or_2_never_a_traceback(
    doc: dict[str, dict[str, object]], tmp_path: Path
) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(render(doc))
    check(CliRunner(), path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(0, 2000), junk=st.text(max_size=40) | st.sampled_from(["[" * 5000, "a = " + "[" * 5000])
)
def test_a_valid_config_with_junk_spliced_in_gives_0_or_2(cut: int, junk: str, tmp_path: Path) -> None:
    text = MINIMAL.format(state=tmp_path / "s", run=tmp_path / "r", metrics_port=9, sbc_port=9)
    cut = min(cut, len(text))
    path = tmp_path / "spliced.toml"
    path.write_text(text[:cut] + junk + text[cut:])
    check(CliRunner(), path)


def config_text(tmp_path: Path) -> str:
    return MINIMAL.format(
        state=tmp_path / "state",
        run=tmp_path / "run",
        metrics_port=free_port(),
        sbc_port=free_port(socket.SOCK_DGRAM),
    )


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("nested", "a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than"),
        ("empty-runtime", None, "appliance.runtime_dir"),
    ],
)
def test_deep_nesting_and_an_empty_runtime_dir_exit_2(
    name: str, text: str | None, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        text
        if text is not None
        else config_text(tmp_path).replace(f'runtime_dir = "{tmp_path / "run"}"', 'runtime_dir = ""')
    )
    for args in (["config", "check", str(path)], ["--config", str(path), "run"]):
        proc = hotsite(*args, timeout=30)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_special_files_are_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    for path, expected in (
        (fifo, "a FIFO"),
        (Path("/dev/zero"), "a character device"),
        (tmp_path, "a directory"),
    ):
        proc = hotsite("config", "check", str(path), timeout=20)  # today's code hangs on the FIFO
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]


def test_every_referenced_file_is_checked_and_a_missing_ca_does_not_crash_run(tmp_path: Path) -> None:
    wide = tmp_path / "token"
    wide.write_text("t\n")
    wide.chmod(0o644)
    state = tmp_path / "state-is-a-file"
    state.write_text("")
    text = config_text(tmp_path).replace(f'state_dir = "{tmp_path / "state"}"', f'state_dir = "{state}"')
    text = text.replace("[probes]\n", f'[probes]\ntls_ca_file = "{tmp_path / "no-ca.pem"}"\n')
    text += f'\n[failover]\nwitness = "https://127.0.0.1:9/vote"\nwitness_token_file = "{wide}"\n'
    path = tmp_path / "hotsite.toml"
    path.write_text(text)
    proc = hotsite("config", "check", str(path))
    assert proc.returncode == 2, proc.stderr
    for expected in (
        "probes.tls_ca_file: ",
        "does not exist",
        "failover.witness_token_file: ",
        "has mode 0644",
        "appliance.state_dir: ",
    ):
        assert expected in proc.stderr, proc.stderr
    state.unlink()
    path.write_text(text.replace(f'state_dir = "{state}"', f'state_dir = "{tmp_path / "state"}"'))
    run = hotsite("--config", str(path), "run", timeout=60)
    assert run.returncode == 2 and "probes.tls_ca_file" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
