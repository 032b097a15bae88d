"""Calls already ringing at the primary's SBC when it dies, in the namespace lab, for real.

tm holds a branch that got a provisional reply for fr_inv_timer (60 s) and
never retries it elsewhere; the generated Kamailio config gives such a branch
up when its SBC is fenced by hotsite's actuator (within ~0.2 s) or has been
down in the dispatcher for ``ringing_dead_limit_ms`` (Kamailio alone), so the
failure route retries the call at the backup. A ringing call at a healthy SBC
must ring on and be answered there.

The lab's primary SBC is replaced (in this module's own lab) by a SIPp that
rings ``RING_MS`` before answering and answers a CANCEL with 487, like a real
SBC. Each test places one call from trunk-a with SIPp's built-in uac.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.kamailio import KamailioRpc
from failover.actuators.kamailio import KamailioActuator
from failover.routing import Routing
from provisioning.lab import kamailio as lab_kamailio
from provisioning.lab import topology as topo
from tests.support import lab as lab_rig

pytestmark = lab_rig.marks()

RING_MS = 4000
KAMAILIO = f"{topo.host('carrier').netns_addr}:{topo.SIP_PORT}"
RPC_URL = f"http://{topo.host('carrier').netns_addr}:{topo.RPC_PORT}{topo.RPC_PATH}"
PRIMARY, BACKUP = topo.host("primary").netns_addr, topo.host("backup").netns_addr
PRIMARY_URI = f"sip:{PRIMARY}:{topo.SIP_PORT}"
NUMBER = "95588"
FAILOVER = Routing(
    name="failover",
    serving_site="backup",
    default_set=topo.SET_BACKUP,
    hotlines={NUMBER: topo.SET_BACKUP},
    fenced_uris=frozenset({PRIMARY_URI}),
)
NORMAL = Routing(
    name="normal",
    serving_site="primary",
    default_set=topo.SET_PRIMARY,
    hotlines={NUMBER: topo.SET_PRIMARY},
    active_uris=frozenset({PRIMARY_URI}),
)

RINGING_UAS = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="an SBC that rings RING_MS before answering, and honours CANCEL">
  <recv request="OPTIONS" optional="true" next="options"/>
  <recv request="INVITE" crlf="true"/>
  <send><![CDATA[

SIP/2.0 100 Trying
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <send><![CDATA[

SIP/2.0 180 Ringing
[last_Via:]
[last_From:]
[last_To:];tag=[pid]Ring[call_number]
[last_Call-ID:]
[last_CSeq:]
[last_Record-Route:]
Contact: <sip:[local_ip]:[local_port]>
Content-Length: 0

]]></send>
  <recv request="CANCEL" timeout="RING_MS" ontimeout="answer"/>
  <send><![CDATA[

SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <send><![CDATA[

SIP/2.0 487 Request Terminated
[last_Via:]
[last_From:]
[last_To:];tag=[pid]Ring[call_number]
[last_Call-ID:]
CSeq: [last_cseq_number] INVITE
Content-Length: 0

]]></send>
  <recv request="ACK" next="done"/>
  <label id="answer"/>
  <send retrans="500"><![CDATA[

SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]Ring[call_number]
[last_Call-ID:]
[last_CSeq:]
[last_Record-Route:]
Contact: <sip:[local_ip]:[local_port]>
Content-Type: application/sdp
Content-Length: [len]

v=0
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000

]]></send>
  <recv request="ACK"/>
  <recv request="BYE"/>
  <send next="done"><![CDATA[

SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <label id="options"/>
  <send><![CDATA[

SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]Opt[call_number]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <label id="done"/>
</scenario>
""".replace("RING_MS", str(RING_MS))


class Lab:
    """The namespace lab with a ringing primary SBC, and helpers to drive it."""

    def __init__(self, workdir: Path) -> None:
        from provisioning.lab import Lab as RealLab

        self.workdir = workdir
        self.lab = RealLab(workdir / "lab")
        self.info: dict[str, Any] = self.lab.up(mode="netns")
        self.lab.wait_ready()
        self.primary_sbc = self._replace_primary_sbc()
        self.calls = 0

    def _replace_primary_sbc(self) -> subprocess.Popen[bytes]:
        entry = next(h for h in self.info["hosts"] if h["name"] == "primary")
        for proc in entry["processes"]:
            if proc["name"] == "sipp":
                os.kill(int(proc["pid"]), signal.SIGTERM)
        time.sleep(0.3)
        scenario = self.workdir / "ringing-uas.xml"
        scenario.write_text(RINGING_UAS)
        cmd = ["ip", "netns", "exec", entry["namespace"], "sipp", "-sf", str(scenario), "-i", PRIMARY]
        cmd += ["-p", str(topo.SIP_PORT), "-bind_local", "-nostdin", "-trace_msg"]
        cmd += ["-message_file", str(self.workdir / "primary.msg")]
        with (self.workdir / "primary-sipp.log").open("ab") as log:
            proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        self.primary_up()
        return proc

    def rpc(self, method: str, *params: object) -> Any:
        async def go() -> Any:
            rpc = KamailioRpc(RPC_URL, timeout_s=1.0)
            try:
                return await rpc.call(method, *params)
            finally:
                await rpc.close()

        return asyncio.run(go())

    def ringing(self) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            rpc = KamailioRpc(RPC_URL, timeout_s=1.0)
            try:
                return await rpc.htable_dump("ringing")
            finally:
                await rpc.close()

        return asyncio.run(go())

    def primary_up(self, timeout: float = 10) -> None:
        """Until Kamailio's keepalives see the primary SBC alive again (set 1 all "AP")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.rpc("dispatcher.list")["RECORDS"]
            flags = [t["DEST"]["FLAGS"] for r in records if r["SET"]["ID"] == 1 for t in r["SET"]["TARGETS"]]
            if flags and all(f == "AP" for f in flags):
                return
            time.sleep(0.1)
        pytest.fail(f"primary SBC not seen alive by Kamailio in {timeout}s: {flags}")

    def route(self, routing: Routing) -> None:
        async def go() -> None:
            act = KamailioActuator(KamailioRpc(RPC_URL, timeout_s=1.0), owns_rpc=True)
            try:
                await act.apply(routing, await act.highest_token() + 1)
                assert await act.verify(routing) == []
            finally:
                await act.close()

        asyncio.run(go())

    def place_call(self) -> Call:
        self.calls += 1
        return Call(self.workdir / f"call{self.calls}", 5300 + self.calls)

    def stop(self) -> None:
        self.primary_sbc.terminate()
        self.primary_sbc.wait(5)
        self.lab.down()


class Call:
    """One call from trunk-a through Kamailio (SIPp's uac, held 100 ms)."""

    def __init__(self, workdir: Path, port: int) -> None:
        workdir.mkdir()
        self.messages = workdir / "messages.log"
        cmd = [
            "ip",
            "netns",
            "exec",
            "hs-lab-trunk-a",
            "sipp",
            "-sn",
            "uac",
            KAMAILIO,
            "-s",
            NUMBER,
            "-m",
            "1",
        ]
        cmd += ["-d", "100", "-i", topo.host("trunk-a").netns_addr, "-p", str(port), "-nostdin"]
        cmd += ["-timeout", "30", "-trace_msg", "-message_file", str(self.messages)]
        cmd += ["-trace_rtt", "-rtt_freq", "1"]
        self.dir = workdir
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log(self) -> str:
        return self.messages.read_text(errors="replace") if self.messages.exists() else ""

    def post_dial_delay_ms(self) -> float:
        """SIPp's response time of the call: INVITE sent to 200 received."""
        rows = next(self.dir.glob("*_rtt.csv")).read_text().splitlines()[1:]
        return float(rows[-1].split(";")[1])

    def wait_ringing(self, lab: Lab) -> None:
        """Until the caller heard 180 and Kamailio remembers the branch as ringing at the primary."""
        if not self.rings_at_primary(lab):
            pytest.fail(f"the call never rang at the primary; {self.diagnosis(lab)}")

    def rings_at_primary(self, lab: Lab, within_s: float = 5) -> bool:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if "SIP/2.0 180" in self.log() and any(PRIMARY_URI in str(v) for v in lab.ringing().values()):
                return True
            time.sleep(0.05)
        return False

    def diagnosis(self, lab: Lab) -> str:
        kamailio = (lab.lab.workdir / "kamailio.log").read_text(errors="replace").splitlines()[-15:]
        return (
            f"dispatcher: {lab.rpc('dispatcher.list')}\nkamailio.log tail:\n"
            + "\n".join(kamailio)
            + f"\ncaller saw:\n{self.log()[-1500:]}"
        )

    def answered_by(self, timeout: float) -> tuple[str, float]:
        """(address of the SBC that answered, seconds since the call was placed); fails if it failed."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"call not over in {timeout}s; caller saw:\n{self.log()[-2000:]}")
        took = time.monotonic() - self.started
        assert code == 0, f"call failed (sipp exit {code}); caller saw:\n{self.log()[-2000:]}"
        answer = re.search(r"SIP/2.0 200 OK\r?\n(?:.*\r?\n)*?CSeq: 1 INVITE", self.log())
        assert answer is not None, self.log()[-2000:]
        contact = re.search(r"Contact: <sip:([\d.]+):", self.log()[answer.start() :])
        assert contact is not None, self.log()[-2000:]
        return contact.group(1), took


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    the_lab = Lab(tmp_path_factory.mktemp("ringing"))
    try:
        yield the_lab
    finally:
        the_lab.stop()


@pytest.fixture()
def normal(lab: Lab) -> Iterator[Lab]:
    """Each test starts and ends with the primary healed, unfenced and seen alive."""
    lab.route(NORMAL)
    lab.primary_up()
    yield lab
    lab.lab.heal("primary")
    lab.route(NORMAL)
    lab.primary_up()


def test_a_ringing_call_at_a_healthy_primary_rings_on_and_is_answered_there(normal: Lab) -> None:
    call = normal.place_call()
    call.wait_ringing(normal)
    where, took = call.answered_by(timeout=RING_MS / 1000 + 5)
    assert where == PRIMARY
    assert took >= RING_MS / 1000  # rang its full time: never given up
    assert normal.ringing() == {}  # forgotten once answered


def test_a_forged_abandon_reply_from_elsewhere_is_dropped_and_the_call_rings_on(normal: Lab) -> None:
    """The branch-ending 503 counts only from Kamailio itself: a forged copy must not move a call."""
    call = normal.place_call()
    call.wait_ringing(normal)
    ringmsg = asyncio.run(_dump("ringmsg"))
    assert len(ringmsg) == 1, ringmsg
    forged = str(next(iter(ringmsg.values())))  # the exact reply, right Via branch and all
    sender = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f" s.sendto(sys.stdin.buffer.read(), ('{topo.host('carrier').netns_addr}', {topo.SIP_PORT}))"
    )
    subprocess.run(
        ["ip", "netns", "exec", "hs-lab-trunk-b", "python3", "-c", sender], input=forged.encode(), check=True
    )
    where, _took = call.answered_by(timeout=RING_MS / 1000 + 10)
    assert where == PRIMARY, "a forged abandon reply ended the branch at the ringing primary"
    log = (normal.lab.workdir / "kamailio.log").read_text(errors="replace")
    assert "not from this proxy: dropped" in log


def test_a_call_ringing_at_the_primary_when_it_dies_is_answered_at_the_backup_once_fenced(
    normal: Lab,
) -> None:
    call = normal.place_call()
    call.wait_ringing(normal)
    normal.lab.impair("primary", cut=True)
    time.sleep(0.3)  # hotsite's decision takes some time; meanwhile the call just rings
    fenced_at = time.monotonic()
    normal.route(FAILOVER)  # what hotsite's runbook does: fence the primary's SBC, hotlines to the backup
    where, _ = call.answered_by(timeout=10)
    assert where == BACKUP
    after_fence = time.monotonic() - fenced_at
    assert after_fence < 1.0, f"answered {after_fence:.2f}s after the fence"
    assert normal.ringing() == {}


def test_kamailio_alone_gives_up_a_ringing_branch_once_the_primary_is_down_long_enough(normal: Lab) -> None:
    call = normal.place_call()
    call.wait_ringing(normal)
    cut_at = time.monotonic()
    normal.lab.impair("primary", cut=True)
    where, _ = call.answered_by(timeout=15)
    took = time.monotonic() - cut_at
    assert where == BACKUP
    # Keepalives see it down within ~1.4 s, then ringing_dead_limit_ms (2 s): far below fr_inv_timer's 60 s.
    limit = lab_kamailio.Timers().ringing_dead_limit_ms / 1000
    assert limit <= took < limit + 3.0, f"given up {took:.2f}s after the cut"


def test_a_fenced_primary_that_is_still_up_gets_a_cancel_and_the_call_goes_to_the_backup(normal: Lab) -> None:
    # The precondition (a call ringing at the primary) failed once in a CI run right after the
    # previous test's cut and heal: the call went straight to the backup. That is not what this
    # test is about (the ringing tests above are), so a second call is placed, the miss printed.
    call = normal.place_call()
    if not call.rings_at_primary(normal):
        print(f"first call did not ring at the primary: {call.diagnosis(normal)}")
        call.proc.wait(RING_MS / 1000 + 10)
        call = normal.place_call()
        call.wait_ringing(normal)
    before = normal.workdir.joinpath("primary.msg").read_text(errors="replace").count("CANCEL sip:")
    normal.route(FAILOVER)  # e.g. a grey failure: the SBC answers, the site cannot serve
    where, took = call.answered_by(timeout=10)
    assert where == BACKUP
    assert took < RING_MS / 1000  # not answered by the primary after its ring time
    time.sleep(0.2)
    after = normal.workdir.joinpath("primary.msg").read_text(errors="replace").count("CANCEL sip:")
    # The primary was told to stop ringing: never answered at both sites. (At least one: on a
    # loaded machine Kamailio retransmits a CANCEL whose 200 is late; 5 were seen.)
    assert after >= before + 1


def test_a_new_call_to_a_dead_primary_is_answered_at_the_backup_within_half_a_second(normal: Lab) -> None:
    normal.lab.impair("primary", cut=True)
    # Placed at once: the keepalives (every second, timeout fr_timer) have most likely not seen the
    # primary die yet, so the INVITE goes there first and the backup gets it after fr_timer.
    call = normal.place_call()
    where, _ = call.answered_by(timeout=10)
    assert where == BACKUP
    timers = lab_kamailio.Timers()
    # fr_timer, rounded up to tm's 62.5 ms tick, plus the backup's answer; 1000+ ms before this change.
    assert call.post_dial_delay_ms() <= timers.fr_timer_ms + 2 * lab_kamailio.TICKS_MS + 50


async def _dump(table: str) -> dict[str, Any]:
    rpc = KamailioRpc(RPC_URL, timeout_s=1.0)
    try:
        return await rpc.htable_dump(table)
    finally:
        await rpc.close()
