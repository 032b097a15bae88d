"""A new probe kind is one module and one line: the kind table is the only place kinds are listed.

A throwaway ``echo`` kind (a UDP echo, against a real echo server on
loopback) is written here as its own module would be, registered with one
line, and seen accepted by the config (as a site check, and as evidence),
by the witness, dispatched by the prober and listed in ``hotsite probe``'s
help and in the error that names the known forms.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from appliance import config
from appliance.cli.main import cli
from appliance.errors import ConfigError
from failover.witness import WitnessSettings
from monitoring.prober import Prober
from monitoring.probes import kinds
from monitoring.probes.base import Address, ProbeContext, ProbeResult, ProbeTarget
from monitoring.targets import parse_url
from tests.support import configs

# --- the new kind's module, as it would be written --------------------------------------


def parse_echo(url: str) -> Address:
    host, _, port = url[len("echo://") :].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{url!r}: expected echo://HOST:PORT")
    return Address(host, int(port))


class EchoProbe:
    """Sends a datagram, expects it back."""

    def __init__(self, ctx: ProbeContext) -> None:
        self._clock = ctx.clock

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        loop = asyncio.get_running_loop()
        started = self._clock()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, (target.host, target.port))
            await loop.sock_sendall(sock, b"hotsite")
            try:
                async with asyncio.timeout(timeout):
                    data = await loop.sock_recv(sock, 64)
            except TimeoutError:
                return ProbeResult(target.name, False, self._clock(), None, None, "timeout")
        ok = data == b"hotsite"
        now = self._clock()
        return ProbeResult(target.name, ok, now, now - started, None, "ok" if ok else "bad_body")

    async def close(self) -> None:
        pass


ECHO = kinds.Kind(
    "echo",
    EchoProbe,
    ("echo://",),
    parse_echo,
    "echo://HOST:PORT",
    "echo://HOST:PORT",
    "echo://",
    evidence=True,
)

# --------------------------------------------------------------------------------------------


@pytest.fixture
def echo_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(kinds.KINDS, "echo", ECHO)  # the one line


@pytest.fixture(scope="module")
def echo_server() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(64)
            except TimeoutError:
                continue
            sock.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    sock.close()


def site_config(check_url: str) -> str:
    return configs.valid(f'[sites.primary.checks.acd]\nurl = "{check_url}"\n')


def test_without_its_line_the_kind_is_unknown_everywhere() -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(site_config("echo://127.0.0.1:7"))
    assert (
        "sites.primary.checks.acd.url" in err.value.problems[0] and "unknown target" in err.value.problems[0]
    )
    with pytest.raises(ValueError, match="unknown target kind 'echo'"):
        kinds.get("echo")
    assert "echo://" not in CliRunner().invoke(cli, ["probe", "--help"]).output


def test_the_config_accepts_it_as_a_site_check_and_counts_it_as_evidence(echo_kind: None) -> None:
    cfg = config.parse(site_config("echo://127.0.0.1:7"))
    assert cfg.evidence_kinds("primary") == {"sip", "echo"}
    assert not any(line.startswith("sites.primary:") for line in cfg.warnings())  # two kinds: enough


def test_the_witness_accepts_it(echo_kind: None) -> None:
    settings = WitnessSettings.model_validate(
        {
            "listen": "127.0.0.1:8080",
            "allow_plain_http": True,
            "allow_unauthenticated": True,
            "primary": ["echo://127.0.0.1:7"],
        }
    )
    assert settings.primary == ["echo://127.0.0.1:7"]


def test_the_prober_dispatches_it(echo_kind: None, echo_server: int) -> None:
    async def twice() -> list[ProbeResult]:
        prober = Prober(clock=time.monotonic)
        try:
            target = parse_url(f"echo://127.0.0.1:{echo_server}", "site:primary:acd")
            return [await prober.probe(target, 2.0), await prober.probe(target, 2.0)]
        finally:
            await prober.close()

    results = asyncio.run(twice())
    assert [(r.target, r.ok, r.reason) for r in results] == [("site:primary:acd", True, "ok")] * 2


def test_help_and_errors_list_it(echo_kind: None) -> None:
    help_text = CliRunner().invoke(cli, ["probe", "--help"]).output
    assert "echo://HOST:PORT" in help_text.split("Examples:")[0]
    with pytest.raises(ValueError, match=r"or echo://HOST:PORT$"):
        parse_url("gopher://x")


def test_the_table_keeps_todays_kinds_and_texts() -> None:
    assert list(kinds.KINDS) == ["sip", "http", "tcp", "icmp", "host", "link", "testcall"]
    assert (
        kinds.expected_urls()
        == "sip:HOST:PORT;transport=udp|tcp|tls, http(s)://…, tcp://HOST:PORT or icmp://HOST"
    )
    assert kinds.url_labels(evidence_only=True) == "sip:, http(s)://, tcp:// or icmp://"
    assert [k for k in kinds.KINDS.values() if not k.polled] == [kinds.KINDS["link"]]
