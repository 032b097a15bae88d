"""A real ``hotsite witness`` process watching a real primary: a SIPp SBC and a stdlib health server.

Kill both and the vote must turn to "primary down" within fall x interval +
timeout; kill the witness and the appliance's voter must say "cannot tell".
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.clock import SystemClock
from failover.thirdvote import Vote
from failover.witness import HttpWitnessVoter
from tests.conftest import REPO

SIPP = shutil.which("sipp")
pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)")

UAS = REPO / "provisioning" / "lab" / "scenarios" / "uas.xml"
HEALTHD = REPO / "provisioning" / "lab" / "healthd.py"
INTERVAL, TIMEOUT, RISE, FALL = 0.3, 0.25, 1, 3
BOUND = FALL * INTERVAL + TIMEOUT  # the promise: the vote flips within this after the primary dies
SLACK = 0.75  # polling granularity and a busy 2-core machine


def free_port_on(host: str, kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    running = Procs(tmp_path)
    yield running
    running.stop_all()


async def poll(voter: HttpWitnessVoter, until: bool | None, within: float) -> tuple[Vote, float, list[Vote]]:
    """Vote every 50 ms until primary_alive is ``until``; return it, when, and every vote seen."""
    started = time.monotonic()
    seen = []
    while True:
        vote = await voter.vote()
        seen.append(vote)
        if vote.primary_alive is until or time.monotonic() - started > within:
            return vote, time.monotonic() - started, seen
        await asyncio.sleep(0.05)


def test_witness_process_sees_the_primary_die_and_its_own_death_is_unknown(procs: Procs) -> None:
    host = f"127.0.0.{random.randint(2, 250)}"
    sip_port = free_port_on(host, socket.SOCK_DGRAM)
    http_port = free_port_on(host, socket.SOCK_STREAM)
    listen_port = free_port_on(host, socket.SOCK_STREAM)
    assert SIPP is not None
    procs.start("sipp", [SIPP, "-sf", str(UAS), "-i", host, "-p", str(sip_port), "-nostdin", "-trace_err"])
    procs.start(
        "healthd", [sys.executable, str(HEALTHD), "--bind", host, "--port", str(http_port), "--site", "p"]
    )
    sip_url, health_url = f"sip:{host}:{sip_port}", f"http://{host}:{http_port}/health"
    witness = procs.start(
        "witness",
        [sys.executable, "-m", "appliance.cli.witness", "--name", "edge", "--listen", f"{host}:{listen_port}"]
        + ["--allow-plain-http", "--allow-unauthenticated"]
        + ["--primary", sip_url, "--primary", health_url]
        + ["--interval", str(INTERVAL), "--timeout", str(TIMEOUT), "--rise", str(RISE), "--fall", str(FALL)],
    )
    url = f"http://{host}:{listen_port}/vote"

    async def scenario() -> None:
        voter = HttpWitnessVoter(url, timeout_s=0.5, max_age_s=2.0, clock=SystemClock())
        try:
            # Both targets up (SIPp takes a moment to bind): the witness sees the primary.
            deadline = time.monotonic() + 15
            while True:
                try:
                    doc = httpx.get(url, timeout=1).json()
                except httpx.HTTPError:
                    doc = {}
                if [e["state"] for e in doc.get("evidence", [])] == ["up", "up"]:
                    break
                assert witness.poll() is None, procs.log("witness")
                assert time.monotonic() < deadline, (doc, procs.log("witness"), procs.log("sipp"))
                await asyncio.sleep(0.1)
            vote = await voter.vote()
            assert vote.primary_alive is True and vote.source == "witness:edge", vote

            # The SBC alone dies: the health endpoint still answers, so the witness still sees it.
            procs.kill("sipp")
            await asyncio.sleep(BOUND + SLACK)
            vote = await voter.vote()
            assert vote.primary_alive is True and f"{sip_url} down" in vote.detail, vote

            # The whole primary dies: false within fall x interval + timeout, never "unknown" on the way.
            procs.kill("healthd")
            vote, took, seen = await poll(voter, False, within=BOUND + 5)
            assert vote.primary_alive is False, (vote, procs.log("witness"))
            assert took <= BOUND + SLACK, f"took {took:.2f}s, promised {BOUND:.2f}s (+{SLACK}s slack)"
            assert all(v.primary_alive is not None for v in seen), seen
            print(f"\nvote turned false {took:.2f}s after the primary died (bound {BOUND:.2f}s)")

            # The witness itself dies: the voter cannot tell, and says why, within its timeout.
            procs.kill("witness")
            started = time.monotonic()
            vote = await voter.vote()
            assert vote.primary_alive is None and "unreachable" in vote.detail, vote
            assert time.monotonic() - started < 0.5 + 0.2
        finally:
            await voter.close()

    asyncio.run(scenario())
    log = procs.log("witness")
    # One line per change: two targets up, SBC down, health down; the belief: alive, then down.
    assert log.count("witness target state changed") == 4, log
    assert log.count("witness view of the primary changed") == 2, log


def test_sigterm_stops_the_witness_cleanly(procs: Procs) -> None:
    host = "127.0.0.1"
    port = free_port_on(host, socket.SOCK_STREAM)
    proc = procs.start(
        "witness",
        [
            sys.executable,
            "-m",
            "appliance.cli.witness",
            "--listen",
            f"{host}:{port}",
            "--primary",
            "tcp://127.0.0.1:9",
            "--allow-plain-http",
            "--allow-unauthenticated",
        ],
    )
    deadline = time.monotonic() + 10
    while "witness listening" not in procs.log("witness"):
        assert proc.poll() is None and time.monotonic() < deadline, procs.log("witness")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0, procs.log("witness")
    assert "witness stopped" in procs.log("witness")


def test_bad_options_exit_2_naming_the_problem(procs: Procs) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli.witness", "--listen", "nowhere", "--primary", "ftp://x"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc
    assert "listen: 'nowhere': expected host:port" in proc.stderr
    assert "primary[0]: 'ftp://x'" in proc.stderr
