"""Issue 19: ``hotsite lab sms --from NUMBER TEXT`` reaches the demo's modem, and its SMS log shows both ways."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.main import cli
from appliance.paging import pdu
from provisioning.lab import modem_link
from tests.support.modem_server import ModemServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ModemServer]:
    running = ModemServer(tmp_path).start()
    try:
        yield running
    finally:
        running.stop()


def _stored_texts(server: ModemServer) -> list[tuple[str, str]]:
    out = []
    for _, hexpdu in server.modem.storage.values():
        message = pdu.decode_deliver(hexpdu)
        out.append((message.sender, message.text))
    return out


def test_a_text_sent_with_lab_sms_is_in_the_modem_and_the_log(server: ModemServer, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["lab", "sms", "--workdir", str(tmp_path), "--from", "+8613800138000", "ACK 7"]
    )
    assert result.exit_code == 0, result.output
    assert ("+8613800138000", "ACK 7") in _stored_texts(server)
    [line] = modem_link.log_tail(tmp_path, 5)
    assert line.endswith("in   +8613800138000  ACK 7") and "UTC" in line
    assert (tmp_path / modem_link.DEVICE).read_text() == server.modem.path


def test_the_log_shows_what_the_daemon_sent(server: ModemServer, tmp_path: Path) -> None:
    server.modem.submitted_texts = lambda: [("+8613900139000", "Primary site judged down:  failover")]  # type: ignore[method-assign]
    deadline = time.monotonic() + 10
    while not modem_link.log_tail(tmp_path, 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert modem_link.log_tail(tmp_path, 1)[0].endswith(
        "out  +8613900139000  Primary site judged down: failover"
    )


def test_without_the_demo_lab_sms_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["lab", "sms", "--workdir", str(tmp_path), "--from", "+1", "ACK 1"])
    assert result.exit_code == 1
    assert "no demo modem" in result.stderr and "hotsite lab demo" in result.stderr
