"""The one-machine lab, for real: namespaces, Kamailio, SIPp, healthd.

Each test talks to the real components over the real network path from the
root namespace (the appliance), with its own tiny SIP client rather than the
lab's readiness checks, so a bug in the lab cannot hide itself.

Namespace names are global: these tests refuse to run (skip) while another
lab is up — e.g. the demo — instead of tearing it down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from provisioning.lab import Lab, LabError
from provisioning.lab import netns as labnet
from provisioning.lab import topology as topo

REPO = Path(__file__).resolve().parents[2]


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "the namespace lab needs root"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is missing"
    for tool, pkg in (("kamailio", "kamailio"), ("sipp", "sip-tester")):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is missing (apt install {pkg})"
    probe = f"hs-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    # Another run's lab is not a reason to skip: the lab lock (tests/integration/conftest.py)
    # makes this module wait for it; a lab left by a crash makes up() fail, saying so.
    return None


SKIP = _why_skip()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


def options(addr: str, port: int = 5060, timeout: float = 1.0) -> str:
    """One raw UDP OPTIONS; the reply's status line (TimeoutError if none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((addr, port))
        lip, lport = s.getsockname()
        cid = uuid.uuid4().hex
        s.send(
            (
                f"OPTIONS sip:{addr}:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {lip}:{lport};branch=z9hG4bK{cid[:12]};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:test@{lip}>;tag={cid[:6]}\r\n"
                f"To: <sip:{addr}:{port}>\r\nCall-ID: {cid}\r\nCSeq: 7 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
        )
        reply = s.recv(65535).decode()
        assert cid in reply
        return reply.split("\r\n", 1)[0]


def _options_answered(addr: str, timeout: float) -> bool:
    try:
        return options(addr, timeout=timeout).startswith("SIP/2.0 200")
    except TimeoutError:
        return False


def rpc(url: str, method: str, params: list[Any] | None = None) -> Any:
    body = {"jsonrpc": "2.0", "method": method, "params": params or [], "id": 1}
    r = httpx.post(url, json=body, timeout=3, trust_env=False)
    r.raise_for_status()
    data = r.json()
    assert "error" not in data, data
    return data["result"]


def flags(result: Any) -> dict[int, dict[str, str]]:
    return {
        rec["SET"]["ID"]: {t["DEST"]["URI"]: t["DEST"]["FLAGS"] for t in rec["SET"]["TARGETS"]}
        for rec in result["RECORDS"]
    }


def leftovers(workdir: Path) -> list[str]:
    found = [f"namespace {n}" for n in labnet.lab_namespaces()]
    if labnet.root_link_exists(topo.APPLIANCE_IFACE):
        found.append(f"link {topo.APPLIANCE_IFACE}")
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(workdir) in a for a in p.info["cmdline"] or []):
            found.append(f"process {p.info['pid']} {p.info['cmdline']}")
    return found


def sipp_call(target: str, *, local_ip: str, trace: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [
        "sipp",
        "-sn",
        "uac",
        target,
        "-m",
        "1",
        "-s",
        "1000",
        "-i",
        local_ip,
        "-p",
        "15099",
        "-nostdin",
        "-timeout",
        "15",
        "-timeout_error",
    ]
    if trace:
        cmd += ["-trace_msg", "-message_file", str(trace)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    the_lab = Lab(tmp_path_factory.mktemp("lab"))
    try:
        t0 = time.monotonic()
        the_lab.up(mode="netns")
        print(f"lab up in {time.monotonic() - t0:.2f}s")
        yield the_lab
    finally:
        the_lab.down()


def test_status_lists_every_host_alive(lab: Lab) -> None:
    info = lab.status()
    assert info is not None
    json.dumps(info)  # what `hotsite lab status --json` prints
    assert info["mode"] == "netns"
    assert info["workdir"] == str(lab.workdir)
    assert isinstance(info["skipped"], list)
    assert info["appliance"] == {"namespace": None, "interface": "hs-appl", "address": "10.77.0.2"}
    k = info["kamailio"]
    assert k["sip"] == "10.77.0.10:5060"
    assert k["rpc_url"] == "http://10.77.0.10:5071/RPC"
    assert k["sets"] == {"primary": 1, "backup": 2}
    assert Path(k["dispatcher_list"]).is_file()
    assert Path(k["rpc_socket"]).is_socket()
    hosts = {h["name"]: h for h in info["hosts"]}
    assert list(hosts) == ["carrier", "trunk-a", "trunk-b", "primary", "backup", "witness"]
    roles = {n: h["role"] for n, h in hosts.items()}
    assert roles == {
        "carrier": "carrier-edge",
        "trunk-a": "trunk",
        "trunk-b": "trunk",
        "primary": "primary-sbc",
        "backup": "backup-sbc",
        "witness": "witness",
    }
    assert hosts["primary"]["ports"] == {"sip": 5060, "http": 8080}
    assert hosts["carrier"]["ports"] == {"sip": 5060, "rpc": 5071}
    for h in info["hosts"]:
        assert h["namespace"] == f"hs-lab-{h['name']}"
        assert h["interface"] == "eth0"
        assert h["processes"], h
        for p in h["processes"]:
            assert p["alive"] is True, (h["name"], p)
            assert psutil.pid_exists(p["pid"])
            assert Path(p["log"]).exists()
    assert json.loads((lab.workdir / "lab.json").read_text())["mode"] == "netns"


def test_every_sipp_answers_options(lab: Lab) -> None:
    info = lab.status()
    assert info is not None
    for h in info["hosts"]:
        if "sip" in h["ports"]:
            assert options(h["address"], h["ports"]["sip"]).startswith("SIP/2.0 200"), h["name"]


def test_healthd_and_the_witness_answer(lab: Lab) -> None:
    r = httpx.get("http://10.77.0.20:8080/health", timeout=2, trust_env=False)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "site": "primary"}
    vote = httpx.get("http://10.77.0.40:8080/vote", timeout=2, trust_env=False).json()
    assert vote["primary_alive"] is True and len(vote["evidence"]) == 2


def test_kamailio_rpc_lists_both_sets_probed(lab: Lab) -> None:
    info = lab.status()
    assert info is not None
    got = flags(rpc(info["kamailio"]["rpc_url"], "dispatcher.list"))
    assert got == {
        1: {"sip:10.77.0.20:5060": "AP", "sip:10.77.0.30:5060": "AP"},
        2: {"sip:10.77.0.30:5060": "AP"},
        3: {"sip:10.77.0.11:5060": "AP", "sip:10.77.0.12:5060": "AP"},  # the trunks: keepalives only
    }
    dump = rpc(info["kamailio"]["rpc_url"], "htable.dump", ["routing"])
    assert {"name": "active_set", "value": 1, "type": "int"} in dump[0]["slot"]


def test_call_through_kamailio_goes_to_the_active_site(lab: Lab, tmp_path: Path) -> None:
    info = lab.status()
    assert info is not None
    url = info["kamailio"]["rpc_url"]
    for active, sbc in ((1, "10.77.0.20"), (2, "10.77.0.30")):
        rpc(url, "htable.seti", ["routing", "active_set", active])
        trace = tmp_path / f"call-{active}.log"
        r = sipp_call(info["kamailio"]["sip"], local_ip="10.77.0.2", trace=trace)
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-500:]
        assert "Successful call" in r.stdout
        assert f"Contact: <sip:{sbc}:5060" in trace.read_text()
    rpc(url, "htable.seti", ["routing", "active_set", 1])


def test_call_from_a_trunk_namespace(lab: Lab) -> None:
    r = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            "hs-lab-trunk-a",
            "sipp",
            "-sn",
            "uac",
            "10.77.0.10:5060",
            "-m",
            "1",
            "-s",
            "1000",
            "-i",
            "10.77.0.11",
            "-p",
            "15098",
            "-nostdin",
            "-timeout",
            "15",
            "-timeout_error",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-500:]


def test_cut_and_heal(lab: Lab) -> None:
    assert options("10.77.0.11").startswith("SIP/2.0 200")
    desc = lab.impair("trunk-a", cut=True)
    assert "trunk-a" in desc
    with pytest.raises(TimeoutError):
        options("10.77.0.11", timeout=1.0)
    assert options("10.77.0.12").startswith("SIP/2.0 200")  # only trunk-a is cut
    info = lab.status()
    assert info is not None
    assert next(h for h in info["hosts"] if h["name"] == "trunk-a")["impairment"] == desc
    assert "trunk-a" in lab.heal("trunk-a")
    deadline = time.monotonic() + 5
    while True:
        try:
            assert options("10.77.0.11").startswith("SIP/2.0 200")
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def test_loss_and_delay_are_applied_or_reported_skipped(lab: Lab) -> None:
    info = lab.status()
    assert info is not None
    desc = lab.impair("witness", delay_ms=200)
    try:
        if info["capabilities"]["netem"]:
            t0 = time.monotonic()
            httpx.get("http://10.77.0.40:8080/health", timeout=5, trust_env=False)
            assert time.monotonic() - t0 >= 0.2
        else:
            assert desc.startswith("skipped:")
            assert any("netem" in s for s in info["skipped"])
    finally:
        lab.heal("witness")


def test_random_loss_drops_about_that_share(lab: Lab) -> None:
    """50% egress loss: of 200 OPTIONS, between 60 and 140 are answered (mean 100, sd 7)."""
    info = lab.status()
    assert info is not None
    if not (info["capabilities"]["netem"] or info["capabilities"].get("nft_loss")):
        pytest.skip("neither netem nor nftables can drop packets here")
    desc = lab.impair("trunk-b", loss_pct=50)
    try:
        assert "loss 50%" in desc
        answered = sum(_options_answered("10.77.0.12", timeout=0.2) for _ in range(200))
    finally:
        lab.heal("trunk-b")
    assert 60 <= answered <= 140, answered
    assert _options_answered("10.77.0.12", timeout=1.0)


def test_bad_requests_raise_laberror(lab: Lab) -> None:
    with pytest.raises(LabError, match="unknown lab host"):
        lab.impair("nowhere", cut=True)
    with pytest.raises(LabError, match="loss_pct"):
        lab.impair("trunk-a", loss_pct=150)
    with pytest.raises(LabError, match="already up"):
        lab.up()


def test_second_lab_in_another_workdir_is_refused(lab: Lab, tmp_path: Path) -> None:
    with pytest.raises(LabError, match="namespaces already exist"):
        Lab(tmp_path / "other").up()
    info = lab.status()  # ... and the first lab is untouched
    assert info is not None
    assert all(p["alive"] for h in info["hosts"] for p in h["processes"])


def test_down_leaves_nothing(lab: Lab) -> None:
    lines = lab.down()
    assert any("hs-lab-core" in line for line in lines)
    assert leftovers(lab.workdir) == []
    assert not (lab.workdir / "lab.json").exists()
    assert lab.status() is None
    assert lab.down() == []  # idempotent


CRASHER = """
import sys, time
from pathlib import Path
from provisioning.lab import Lab
Lab(Path(sys.argv[1])).up(mode=sys.argv[2])
print("UP", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("when", ["after-up", "mid-up"])
def test_down_after_a_crash(tmp_path: Path, when: str) -> None:
    workdir = tmp_path / "crashed"
    errors = tmp_path / "crasher.err"
    with errors.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHER, str(workdir), "netns"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        if when == "after-up":
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "UP", errors.read_text()
        else:  # as soon as Kamailio runs, before up() returns
            deadline = time.monotonic() + 20
            while not (workdir / "kamailio.pid").exists():
                assert time.monotonic() < deadline, "up() never started Kamailio"
                time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (workdir / "lab.json").unlink(missing_ok=True)
    assert labnet.lab_namespaces(), "the crash should have left namespaces behind"
    lines = Lab(workdir).down()
    assert lines
    assert leftovers(workdir) == [], lines


def test_loopback_mode(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "loop")
    try:
        info = lab.up(mode="loopback")
        assert info["mode"] == "loopback"
        assert info["appliance"]["address"] == "127.0.0.1"
        assert any("namespaces" in s for s in info["skipped"])
        assert any("netem" in s for s in info["skipped"])
        assert labnet.lab_namespaces() == []
        for h in info["hosts"]:
            assert h["namespace"] is None
            assert h["address"].startswith("127.77.0.")
            assert all(p["alive"] for p in h["processes"])
            if "sip" in h["ports"]:
                assert options(h["address"]).startswith("SIP/2.0 200"), h["name"]
        got = flags(rpc(info["kamailio"]["rpc_url"], "dispatcher.list"))
        assert got == {
            1: {"sip:127.77.0.20:5060": "AP", "sip:127.77.0.30:5060": "AP"},
            2: {"sip:127.77.0.30:5060": "AP"},
            3: {"sip:127.77.0.11:5060": "AP", "sip:127.77.0.12:5060": "AP"},  # the trunks: keepalives only
        }
        assert lab.impair("trunk-b", loss_pct=5).startswith("skipped:")
        lab.impair("trunk-b", cut=True)
        with pytest.raises(TimeoutError):
            options("127.77.0.12")
        lab.heal("trunk-b")
        assert options("127.77.0.12").startswith("SIP/2.0 200")
    finally:
        lab.down()
    assert leftovers(lab.workdir) == []
