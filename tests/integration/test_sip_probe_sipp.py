"""The OPTIONS probe against a real SIPp UAS: the same peer the lab uses for trunks and SBCs."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from monitoring.probes.base import ProbeResult
from monitoring.probes.sip import SipOptionsProbe
from tests.conftest import free_port

SIPP = shutil.which("sipp")
pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)")

# A UAS that answers every OPTIONS with [status], echoing what RFC 3261 8.2.6.2 requires.
SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="hotsite OPTIONS responder">
  <recv request="OPTIONS"/>
  <send>
    <![CDATA[

      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""


class Sipp:
    """One SIPp UAS process on loopback, run without a terminal."""

    def __init__(self, workdir: Path, status: str) -> None:
        self.port = free_port(socket.SOCK_DGRAM)
        scenario = workdir / "uas.xml"
        scenario.write_text(SCENARIO.format(status=status))
        self.log = workdir / "sipp.out"
        assert SIPP is not None
        # -nostdin: no keyboard thread; stdout to a file: no screen needs a tty.
        cmd = [SIPP, "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(self.port)]
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
def sipp_factory(tmp_path: Path) -> Iterator[Callable[[str], Sipp]]:
    started: list[Sipp] = []

    def start(status: str) -> Sipp:
        sipp = Sipp(tmp_path, status)
        started.append(sipp)
        return sipp

    yield start
    for sipp in started:
        sipp.stop()


async def probe_until_answered(probe: SipOptionsProbe, sipp: Sipp) -> ProbeResult:
    """SIPp needs a moment to bind; before that the port is (rightly) unreachable."""
    deadline = time.monotonic() + 10
    while True:
        result = await probe.probe("site:primary:sbc", "127.0.0.1", sipp.port, timeout=0.5)
        if result.code is not None or time.monotonic() > deadline:
            return result
        if sipp.proc.poll() is not None:
            pytest.fail(f"sipp exited {sipp.proc.returncode}: {sipp.log.read_text()[-2000:]}")
        await asyncio.sleep(0.05)


def test_sipp_200_is_up_and_down_once_sipp_stops(sipp_factory: Callable[[str], Sipp]) -> None:
    sipp = sipp_factory("200 OK")
    unmatched: list[str] = []

    async def scenario() -> None:
        probe = SipOptionsProbe(on_unmatched=unmatched.append)
        first = await probe_until_answered(probe, sipp)
        assert (first.ok, first.reason, first.code, first.detail) == (True, "ok", 200, "200 OK")
        rtts = []
        for _ in range(20):
            result = await probe.probe("site:primary:sbc", "127.0.0.1", sipp.port, timeout=0.5)
            assert result.ok, result
            assert result.rtt_s is not None
            rtts.append(result.rtt_s)
        assert max(rtts) < 0.1
        print(f"sipp loopback rtt: median {sorted(rtts)[10] * 1e3:.3f} ms, max {max(rtts) * 1e3:.3f} ms")

        sipp.stop()
        started = time.monotonic()
        down = await probe.probe("site:primary:sbc", "127.0.0.1", sipp.port, timeout=1.0)
        # Linux answers a closed loopback port with ICMP port unreachable, at once.
        assert (down.ok, down.reason, down.code) == (False, "unreachable", None), down
        assert time.monotonic() - started < 0.2
        await probe.close()

    asyncio.run(scenario())
    assert unmatched == []


def test_sipp_503_is_down_with_its_code(sipp_factory: Callable[[str], Sipp]) -> None:
    sipp = sipp_factory("503 Service Unavailable")

    async def scenario() -> None:
        probe = SipOptionsProbe()
        result = await probe_until_answered(probe, sipp)
        assert (result.ok, result.reason, result.code) == (False, "bad_code", 503)
        assert result.detail == "503 Service Unavailable"
        await probe.close()

    asyncio.run(scenario())
