"""The OPTIONS probe over TCP against a real SIPp UAS (``sipp -t t1``): one connection, matched replies."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitoring.probes.base import ProbeResult
from monitoring.probes.sip import SipOptionsProbe
from tests.conftest import free_port
from tests.integration.test_sip_probe_sipp import SCENARIO

SIPP = shutil.which("sipp")
pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)")


class TcpSipp:
    """One SIPp UAS on a loopback TCP port, single socket mode (-t t1)."""

    def __init__(self, workdir: Path, status: str) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        scenario = workdir / "uas.xml"
        scenario.write_text(SCENARIO.format(status=status))
        self.log = workdir / "sipp.out"
        assert SIPP is not None
        cmd = [SIPP, "-sf", str(scenario), "-t", "t1", "-i", "127.0.0.1", "-p", str(self.port)]
        cmd += ["-nostdin", "-trace_err"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def sipp_200(tmp_path: Path) -> Iterator[TcpSipp]:
    sipp = TcpSipp(tmp_path, "200 OK")
    yield sipp
    sipp.stop()


async def until_answered(probe: SipOptionsProbe, sipp: TcpSipp) -> ProbeResult:
    """Before SIPp listens, the port is (rightly) refused."""
    deadline = time.monotonic() + 10
    while True:
        result = await probe.probe("trunk:carrier-a", "127.0.0.1", sipp.port, timeout=0.5, transport="tcp")
        if result.code is not None or time.monotonic() > deadline:
            return result
        assert result.reason == "refused", result
        if sipp.proc.poll() is not None:
            pytest.fail(f"sipp exited {sipp.proc.returncode}: {sipp.log.read_text()[-2000:]}")
        await asyncio.sleep(0.05)


def test_sipp_over_tcp_is_up_then_down_when_it_stops(sipp_200: TcpSipp) -> None:
    unmatched: list[str] = []

    async def scenario() -> None:
        probe = SipOptionsProbe(on_unmatched=unmatched.append)
        first = await until_answered(probe, sipp_200)
        assert (first.ok, first.reason, first.code, first.detail) == (True, "ok", 200, "200 OK")
        connection = probe._streams[("127.0.0.1", sipp_200.port, "tcp")]
        rtts = []
        for _ in range(20):
            result = await probe.probe(
                "trunk:carrier-a", "127.0.0.1", sipp_200.port, timeout=0.5, transport="tcp"
            )
            assert result.ok and result.rtt_s is not None, result
            rtts.append(result.rtt_s)
        # the same connection served every probe
        assert probe._streams[("127.0.0.1", sipp_200.port, "tcp")] is connection
        assert max(rtts) < 0.1
        print(f"sipp tcp loopback rtt: median {sorted(rtts)[10] * 1e3:.3f} ms, max {max(rtts) * 1e3:.3f} ms")

        sipp_200.stop()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        down = await probe.probe("trunk:carrier-a", "127.0.0.1", sipp_200.port, timeout=1.0, transport="tcp")
        assert (down.ok, down.reason, down.code) == (False, "refused", None), down
        assert time.monotonic() - started < 0.2
        await probe.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert unmatched == []


def test_sipp_over_tcp_503_is_down_with_its_code(tmp_path: Path) -> None:
    sipp = TcpSipp(tmp_path, "503 Service Unavailable")

    async def scenario() -> None:
        probe = SipOptionsProbe()
        result = await until_answered(probe, sipp)
        assert (result.ok, result.reason, result.code) == (False, "bad_code", 503)
        await probe.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        sipp.stop()
