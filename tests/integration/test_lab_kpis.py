"""Per-trunk call KPIs from real traffic, in the lab: Kamailio counts, hotsite reads, judges and pages.

Real calls (SIPp) arrive at the carrier-edge Kamailio from trunk-a's address with a
known mix of outcomes: answered, rejected busy (486, the user's doing) by the SBC,
rejected 503 by both SBCs (the network's). Kamailio counts them in its statistics;
the daemon reads the totals over JSON-RPC and must show exactly the counts and ratios
the mix implies, on its API, `hotsite trunks` and /metrics. The mix's ASR is below
the configured threshold, so trunk-a — still answering OPTIONS — becomes
``degraded: calls failing`` with the evidence, an incident is opened and paged (SMS,
the GSM modem emulator); good calls bring the ASR back and the trunk recovers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.lab import Lab
from provisioning.lab import topology as topo
from tests.integration.daemon_helpers import RunningDaemon, hotsite, metrics, wait_for
from tests.support import lab as lab_rig
from tests.support.lab import LabDaemon
from tests.support.modem import ModemEmulator

pytestmark = lab_rig.marks(pytest.mark.slow)

ON_CALL = "+8613800138000"
CALLKPIS = (
    """
[callkpis]
interval_s = 0.5
window_s = 900
min_attempts = 5
min_asr_pct = 50
recover_asr_pct = 60
channels = { trunk-a = 30 }
"""
    + lab_rig.SMS_ROTATION_PAGING
)


def _caller_scenario(sipp: str, workdir: Path) -> Path:
    """SIPp's own uac, taught to end a call cleanly on a 486, 500 or 503 (ACK) instead of aborting it.

    500: a proxy never forwards a 503 (RFC 3261 16.7): tm turns the last SBC's 503 into 500.
    """
    text = subprocess.run([sipp, "-sd", "uac"], capture_output=True, text=True).stdout  # exits 99 when done
    assert "<scenario" in text, "sipp -sd uac printed no scenario"
    rejected = "".join(
        f'  <recv response="{code}" optional="true" next="rejected"/>\n' for code in (486, 500, 503)
    )
    text = text.replace(
        '  <recv response="200" rtd="true">', rejected + '  <recv response="200" rtd="true">', 1
    )
    text = text.replace("<pause/>", '<pause milliseconds="100"/>', 1)
    ack = """
  <label id="rejected"/>
  <send>
    <![CDATA[

      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <label id="done"/>
"""
    text = re.sub(r'(<recv response="200" crlf="true")>', r'\1 next="done">', text, count=1)
    text = text.replace("  <ResponseTimeRepartition", ack + "  <ResponseTimeRepartition", 1)
    path = workdir / "trunk-caller.xml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Lab, LabDaemon, ModemEmulator, Path]]:
    with (
        lab_rig.modem() as modem,
        lab_rig.netns_lab(tmp_path_factory) as (the_lab, info),
        lab_rig.lab_daemon(
            info,
            tmp_path_factory,
            CALLKPIS.replace("{device}", modem.path),
            ready_timeout=60,
            clean_exit=False,
        ) as daemon,
    ):
        scenario = _caller_scenario(shutil.which("sipp") or "sipp", Path(info["workdir"]))
        yield the_lab, daemon, modem, scenario


def _calls(scenario: Path, n: int, port: int) -> None:
    """n calls to 95588 from trunk-a's address into Kamailio, one after another; all must end."""
    carrier, trunk = topo.host("carrier").netns_addr, topo.host("trunk-a").netns_addr
    cmd = ["ip", "netns", "exec", topo.host("trunk-a").namespace, "sipp", "-sf", str(scenario)]
    cmd += [f"{carrier}:{topo.SIP_PORT}", "-s", "95588", "-m", str(n), "-l", "1", "-r", "10"]
    cmd += ["-i", trunk, "-p", str(port), "-nostdin", "-timeout", "60", "-timeout_error"]
    done = subprocess.run(cmd, cwd=scenario.parent, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"sipp exit {done.returncode}: {done.stdout[-1500:]}{done.stderr[-1500:]}"


def _kpis(daemon: RunningDaemon) -> dict[str, Any]:
    trunk = _trunk(daemon)
    return trunk.get("kpis") or {}


def _trunk(daemon: RunningDaemon) -> dict[str, Any]:
    trunks = json.loads(hotsite("trunks", "--json", config=daemon.config).stdout)
    return next(t for t in trunks if t["name"] == "trunk-a")


def test_counts_and_ratios_of_a_known_mix_degrade_page_and_recover(
    world: tuple[Lab, LabDaemon, ModemEmulator, Path],
) -> None:
    the_lab, daemon, modem, scenario = world
    wait_for(lambda: _trunk(daemon)["state"] == "up", timeout=60, what="trunk-a up (OPTIONS)")
    wait_for(lambda: _kpis(daemon).get("attempts") == 0, timeout=30, what="Kamailio's counters read")

    _calls(scenario, 6, 7001)  # answered at the primary
    assert the_lab.impair("primary", reject_invites=486)  # busy: final, no retry (a 4xx)
    _calls(scenario, 4, 7002)
    assert the_lab.impair("backup", reject_invites=503)
    assert the_lab.impair("primary", reject_invites=503)  # 503 at both: the retry fails too
    try:
        _calls(scenario, 3, 7003)
    finally:
        the_lab.heal("primary")
        the_lab.heal("backup")

    k = wait_for(
        lambda: (k := _kpis(daemon)).get("attempts") == 13 and k, timeout=30, what="13 attempts counted"
    )
    print(json.dumps(k, indent=1))
    assert (k["answered"], k["failed"]) == (6, 7)
    assert k["failures"] == {"4xx": 4, "5xx": 3} and k["codes"] == {"486": 4, "503": 3}
    assert (k["user_failures"], k["network_failures"]) == (4, 3)
    assert k["asr_pct"] == round(100 * 6 / 13, 1) and k["ner_pct"] == round(100 * 10 / 13, 1)
    assert k["top_failure"] == {"code": "486", "count": 4}
    assert k["pdd_avg_ms"] is not None and 0 < k["pdd_avg_ms"] < 2000  # 6 answered calls rang
    assert k["channels"] == 30 and k["total"] == {"attempts": 13, "answered": 6, "failed": 7}

    # ASR 46% < 50% over 13 >= 5 attempts: trunk-a (OPTIONS fine) is degraded, with the evidence.
    trunk = wait_for(
        lambda: (t := _trunk(daemon))["state"] == "degraded" and t, timeout=30, what="trunk-a degraded"
    )
    assert trunk["why"] == "calls failing: ASR 46% over 13 attempts in 900 s, top failure 486 (4)"
    assert trunk["last_result"] == "ok"  # its OPTIONS are still answered: only the calls tell
    incident = wait_for(lambda: _incident(daemon), timeout=30, what="the calls-failing incident")
    assert "trunk trunk-a is degraded: calls failing: ASR 46%" in incident["summary"]
    texts = wait_for(
        lambda: [t for to, t in modem.submitted_texts() if to == ON_CALL and "trunk-a" in t],
        timeout=60,
        what="the page by SMS",
    )
    assert "calls failing" in texts[0]

    scraped = metrics(daemon.listen)
    assert 'hotsite_trunk_call_attempts_total{trunk="trunk-a"} 13.0' in scraped
    assert 'hotsite_trunk_calls_answered_total{trunk="trunk-a"} 6.0' in scraped
    assert 'hotsite_trunk_call_failure_codes_total{code="503",trunk="trunk-a"} 3.0' in scraped
    assert 'hotsite_trunk_calls_failing{trunk="trunk-a"} 1.0' in scraped
    text = hotsite("trunks", config=daemon.config).stdout
    assert "Calls (Kamailio, last 900 s)" in text and "46.2%" in text and "486:4" in text, text
    assert "failing:" in text and "ASR 46%" in text, text  # the degraded trunk's why (wrapped in a pipe)

    # Good calls again: 16 of 23 answered, 69.6% >= 60%: recovered, the incident resolved.
    _calls(scenario, 10, 7004)
    wait_for(lambda: _trunk(daemon)["state"] == "up", timeout=30, what="trunk-a's calls good again")
    k = _kpis(daemon)
    assert (k["attempts"], k["answered"], k["calls"]) == (23, 16, "ok")
    wait_for(lambda: _incident(daemon) is None, timeout=30, what="the incident resolved")


def _incident(daemon: RunningDaemon) -> dict[str, Any] | None:
    listed = json.loads(hotsite("incidents", "--json", config=daemon.config).stdout)
    return next((i for i in listed["active"] if "calls:trunk-a" in i.get("keys", [])), None)
