"""Failover in the lab, measured, beside Kamailio alone: hard loss, grey failure, false failovers.

Run as root: ``.venv/bin/python -m tests.benchmarks.bench_failover [--trials 20] [--loss-minutes 10]``.
Prints figures; asserts nothing.

* **Hard loss.** SIPp places calls at 20/s to a hotline through the carrier
  edge's Kamailio; the primary's link is cut. Printed per system: failed
  calls, the longest post-dial delay (SIPp's response time: INVITE to 200),
  and for hotsite the time from the cut to every hotline routed by plan with
  the primary fenced (the failover runbook's completion in the audit log).
  Kamailio alone is the same lab with no daemon: its per-call failover
  (set 1 = primary, then backup) is the first line of defence hotsite keeps.
  keepalived's 3.07 s to move an address is REFERENCE.md's figure, not
  re-measured here.
* **Grey failure.** The primary's health says it cannot serve while its SBC
  keeps answering; calls placed meanwhile are counted by who answered them
  (Kamailio's ``calls`` htable remembers it). Kamailio alone never notices.
* **False failovers.** The primary with 5% random loss (nftables) and its
  SBC's SIP answers held uniform 0..60 ms (30 ms jitter, made in user space
  by SIPp: this kernel has no netem) for ``--loss-minutes``, then a
  partition of the backup from the primary alone: failovers counted.

The daemon runs with fast settings for the benchmark: probes every 100 ms,
fall 3, hold-down 0.3 s, the witness asked every 100 ms (and the lab's
witness restarted with a 100 ms interval).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from provisioning.lab import Lab
from provisioning.lab import config as lab_config
from provisioning.lab.lab import SCENARIO
from tests.conftest import free_port
from tests.integration.conftest import LOCK as LAB_LOCK
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for

FAST = {
    "interval_s = 0.5\ntimeout_s = 0.4": "interval_s = 0.1\ntimeout_s = 0.08",
    "hold_down_s = 3": "hold_down_s = 0.3\nwitness_poll_s = 0.1\ntick_s = 0.1\nwitness_max_age_s = 2",
    "min_dwell_s = 10": "min_dwell_s = 1",
    "max_auto_per_hour = 5": "max_auto_per_hour = 60",
}
CALL_RATE = 20


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def rpc(method: str, *params: Any) -> Any:
    body = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}
    return (
        httpx.post("http://10.77.0.10:5071/RPC", json=body, timeout=3, trust_env=False).json().get("result")
    )


class Caller:
    """SIPp placing calls at a steady rate from trunk-a's namespace."""

    def __init__(self, workdir: Path, number: str, port: int, hold_ms: int = 1) -> None:
        self.dir = Path(tempfile.mkdtemp(dir=workdir))
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                "hs-lab-trunk-a",
                "sipp",
                "-sn",
                "uac",
                "10.77.0.10:5060",
                "-s",
                number,
                "-r",
                str(CALL_RATE),
                "-d",
                str(hold_ms),
                "-i",
                "10.77.0.11",
                "-p",
                str(port),
                "-nostdin",
                "-trace_stat",
                "-fd",
                "1",
                "-trace_rtt",
                "-rtt_freq",
                "1",
                "-timeout_error",
                "-max_recv_loops",
                "1000",
                "-trace_err",
            ],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, float]:
        self.proc.send_signal(signal.SIGUSR1)  # stop placing calls, let the ongoing ones finish
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        stats = _last_row(next(self.dir.glob("uac_*_.csv"), None))
        rtts = _rtts(next(self.dir.glob("uac_*_rtt.csv"), None))
        ok = float(stats.get("SuccessfulCall(C)", 0))
        # Still unanswered 15 s after the last call was placed: waiting on tm's fr_inv_timer (60 s)
        # at a dead SBC. SIPp counts them neither answered nor failed; they are failed set-ups.
        stuck = max(0.0, float(stats.get("TotalCallCreated", 0)) - ok - float(stats.get("FailedCall(C)", 0)))
        failed = float(stats.get("FailedCall(C)", 0)) + stuck
        late = _failures(next(self.dir.glob("uac_*_errors.log"), None))
        return {
            "ok": ok,
            "failed": failed,
            "failed_setup": max(0.0, failed - len(late["late_1xx"]) - len(late["bye_lost"])),
            "stuck": stuck,
            "failed_late_1xx": float(len(late["late_1xx"])),
            "failed_bye_lost": float(len(late["bye_lost"])),
            "max_pdd_ms": max(rtts) if rtts else float("nan"),
            "pdd_over_500": float(sum(1 for r in rtts if r > 500)),
        }


# SIPp's built-in uac scenario: 0 INVITE, 1-3 provisional, 4 the 200 (answer), 5 ACK, 6 pause, 7 BYE, 8 its 200.
ANSWERED_INDEX = 5
ABORT = re.compile(
    r"Aborting call on unexpected message for Call-Id '([^']+)': while [^(]*\(index (\d+)\), received 'SIP/2.0 (\d+)"
)


def _failures(path: Path | None) -> dict[str, set[str]]:
    """Calls SIPp aborted, by when: ``late_1xx`` (a provisional after the answer) or ``bye_lost``.

    * ``bye_lost``: answered, then the BYE failed. The cut is phase-locked to
      SIPp's call clock (both start together, the cut comes 1.0 s later), so it
      lands in the few milliseconds of one call's INVITE..BYE nearly every
      time; a call answered by the primary whose BYE then meets the dead link
      lived at the failed site: no router can save it.
    * ``late_1xx``: answered, then a 180 arrived after the 200. Kamailio's UDP
      workers send a relayed provisional after releasing the reply lock
      (t_reply.c ``relay_reply``), so under CPU load a 180 sent back-to-back
      with its 200 can leave after it. SIPp's uac aborts such a call; a phone
      ignores the stray 180 (RFC 3261 17.1.1.2) and the call goes on.
    Set-up failures (the ones routing must save) are the rest of FailedCall.
    """
    found: dict[str, set[str]] = {"late_1xx": set(), "bye_lost": set()}
    if path is None:
        return found
    for m in ABORT.finditer(path.read_text(errors="replace")):
        index, status = int(m.group(2)), int(m.group(3))
        if index >= ANSWERED_INDEX:
            found["late_1xx" if status < 200 else "bye_lost"].add(m.group(1))
    return found


def _last_row(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    lines = path.read_text().splitlines()
    header, last = lines[0].split(";"), lines[-1].split(";")
    return dict(zip(header, last, strict=False))


def _rtts(path: Path | None) -> list[float]:
    if path is None:
        return []
    values = []
    for line in path.read_text().splitlines()[1:]:
        parts = line.split(";")  # date_ms;response_time_ms;rtd_no
        if len(parts) >= 2:
            try:
                values.append(float(parts[1]))
            except ValueError:
                continue
    return values


def fast_witness(info: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Replace the lab's witness (0.5 s interval) with one probing every 100 ms."""
    for host in info["hosts"]:
        if host["name"] == "witness":
            for p in host["processes"]:
                subprocess.run(["kill", str(p["pid"])], check=False)
    time.sleep(0.3)
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            "hs-lab-witness",
            sys.executable,
            "-m",
            "appliance.cli.witness",
            "--listen",
            "10.77.0.40:8080",
            "--primary",
            "sip:10.77.0.20:5060",
            "--primary",
            "http://10.77.0.20:8080/health",
            "--interval",
            "0.1",
            "--timeout",
            "0.08",
            "--fall",
            "3",
            "--allow-plain-http",
            "--allow-unauthenticated",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def failover_state(daemon: RunningDaemon) -> str:
    return str(daemon.status()["failover"]["state"])


def runbook_done_at(daemon: RunningDaemon, after: float) -> float | None:
    events = json.loads(
        hotsite(
            "events",
            "--json",
            "--kind",
            "failover.runbook.failover.done",
            "--limit",
            "5",
            config=daemon.config,
        ).stdout
    )
    times = [e["at_epoch"] for e in events if e["at_epoch"] >= after]
    return min(times) if times else None


def back_to_normal(lab: Lab, daemon: RunningDaemon | None, host: str = "primary") -> None:
    lab.heal(host)
    if daemon is None:
        time.sleep(3)
        return
    wait_for(
        lambda: failover_state(daemon) in ("failback_pending", "primary_active"),
        timeout=30,
        what="primary back",
    )
    if failover_state(daemon) == "failback_pending":
        hotsite("failback", "--yes", config=daemon.config)
    wait_for(
        lambda: (
            failover_state(daemon) == "primary_active"
            and all(s["verdict"] == "up" for s in daemon.status()["sites"])
        ),
        timeout=30,
        what="normal",
    )
    time.sleep(1.2)  # past min_dwell_s


def hard_loss(lab: Lab, daemon: RunningDaemon | None, trials: int, workdir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "failed": [],
        "failed_setup": [],
        "failed_late_1xx": [],
        "failed_bye_lost": [],
        "max_pdd_ms": [],
        "pdd_over_500": [],
        "stuck": [],
        "routed_s": [],
        "calls": [],
    }
    for trial in range(trials):
        caller = Caller(workdir, "95588", 5100 + trial % 50)
        time.sleep(1.0)
        cut_at = time.time()
        lab.impair("primary", cut=True)
        if daemon is not None:
            wait_for(lambda: failover_state(daemon) == "backup_active", timeout=30, what="failover")
            done = runbook_done_at(daemon, cut_at)
            out["routed_s"].append((done - cut_at) if done else float("nan"))
        time.sleep(2.0)
        stats = caller.stop()
        for key in ("failed", "failed_setup", "failed_late_1xx", "failed_bye_lost", "pdd_over_500", "stuck"):
            out[key].append(stats[key])
        out["max_pdd_ms"].append(stats["max_pdd_ms"])
        out["calls"].append(stats["ok"] + stats["failed"])
        back_to_normal(lab, daemon)
    return out


def grey(lab: Lab, daemon: RunningDaemon | None, trials: int, workdir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"moved_s": [], "dead_ended": [], "calls": []}
    for trial in range(trials):
        caller = Caller(workdir, "95566", 5200 + trial % 50, hold_ms=2000)
        sampler = DialogSampler(caller.proc.pid)
        time.sleep(0.5)
        started = time.time()
        sampler.start()
        lab.degrade("primary")
        moved = float("nan")
        if daemon is not None:
            wait_for(lambda: failover_state(daemon) == "backup_active", timeout=30, what="grey failover")
            done = runbook_done_at(daemon, started)
            moved = (done - started) if done else float("nan")
        else:
            time.sleep(5.0)
        sampler.stop()
        caller.stop()
        answered = sampler.answered_by()
        out["moved_s"].append(moved)
        out["dead_ended"].append(answered.get("10.77.0.20", 0))
        out["calls"].append(sum(answered.values()))
        back_to_normal(lab, daemon)
    return out


class DialogSampler(threading.Thread):
    """Which SBC answered each of one caller's calls placed after start: read from Kamailio's dialogs.

    SIPp's Call-IDs are ``<n>-<pid>@<ip>`` (``ip netns exec`` execs into sipp, so the pid is
    ours); calls are held 2 s, so sampling dlg.list every 200 ms sees every one of them.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self._mark = f"-{pid}@"
        self._stop_flag = threading.Event()
        self._before: set[str] = set()
        self.calls: dict[str, str] = {}

    def start(self) -> None:
        self._before = set(self._sample())  # calls already up before the failure are not counted
        super().start()

    def run(self) -> None:
        while not self._stop_flag.is_set():
            for call_id, host in self._sample().items():
                if call_id not in self._before:
                    self.calls.setdefault(call_id, host)
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop_flag.set()
        self.join()

    def _sample(self) -> dict[str, str]:
        found: dict[str, str] = {}
        try:
            dialogs = rpc("dlg.list") or []
        except httpx.HTTPError:  # a loaded machine may cut a long answer short: skip this sample
            return found
        for dialog in dialogs:
            call_id = str(dialog.get("call-id", ""))
            if self._mark in call_id:
                contact = str(dialog.get("callee", {}).get("contact", ""))
                found[call_id] = contact.removeprefix("sip:").split(":")[0].split(";")[0]
        return found

    def answered_by(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for host in self.calls.values():
            counts[host] = counts.get(host, 0) + 1
        return counts


JITTER_MAX_MS = 60  # uniform 0..60 ms: 30 ms mean delay, +-30 ms jitter


def jittery_primary(lab: Lab, workdir: Path) -> subprocess.Popen[bytes]:
    """Replace the primary SBC's SIPp with one that holds every answer uniform 0..60 ms.

    This kernel has no netem, so the jitter is made in user space: the lab's
    own UAS scenario with a SIPp ``<pause distribution="uniform">`` before its
    answers to OPTIONS and INVITE (SIPp pauses each call on its own, so
    answers overtake each other, like real jitter). Only SIP is delayed, not
    the health endpoint's HTTP.
    """
    info = lab.status()
    assert info is not None
    entry = next(h for h in info["hosts"] if h["name"] == "primary")
    pause = f'\n  <pause distribution="uniform" min="0" max="{JITTER_MAX_MS}"/>'
    text = SCENARIO.read_text()
    for anchor in ('<recv request="INVITE" crlf="true"/>', '<label id="options"/>'):
        if anchor not in text:
            raise SystemExit(f"{SCENARIO} changed: no {anchor!r} to put the jitter after")
        text = text.replace(anchor, anchor + pause, 1)
    scenario = workdir / "uas-jitter.xml"
    scenario.write_text(text)
    for p in entry["processes"]:
        if p["name"] == "sipp":
            subprocess.run(["kill", str(p["pid"])], check=False)
    time.sleep(0.2)
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            entry["namespace"],
            "sipp",
            "-sf",
            str(scenario),
            "-i",
            entry["address"],
            "-p",
            "5060",
            "-bind_local",
            "-nostdin",
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def false_failovers(lab: Lab, daemon: RunningDaemon, minutes: float, workdir: Path) -> dict[str, int]:
    def starts() -> int:
        events = json.loads(
            hotsite(
                "events", "--json", "--kind", "failover.decision", "--limit", "1000", config=daemon.config
            ).stdout
        )
        return sum(1 for e in events if "starting failover" in e["message"])

    jittery_primary(lab, workdir)  # Lab.down() stops it with everything in the namespaces
    back_to_normal(lab, daemon)  # the swap takes ~0.2 s: a failover it may cause is not counted
    base = starts()
    lab.impair("primary", loss_pct=5)
    time.sleep(minutes * 60)
    lab.heal("primary")
    after_loss = starts() - base
    lab.partition("primary", "appliance")
    time.sleep(10)
    lab.heal("primary")
    time.sleep(3)
    return {"loss": after_loss, "partition": starts() - base - after_loss}


def summary(values: list[float]) -> str:
    clean = [v for v in values if v == v]
    if not clean:
        return "n/a"
    return f"median {statistics.median(clean):.3f}  p95 {pct(clean, 95):.3f}  max {max(clean):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--grey-trials", type=int, default=5)
    ap.add_argument("--loss-minutes", type=float, default=10.0)
    args = ap.parse_args()
    lock = LAB_LOCK.open("a")  # one lab per machine: wait for test runs using it
    fcntl.flock(lock, fcntl.LOCK_EX)
    workdir = Path(tempfile.mkdtemp(prefix="hotsite-bench-failover-"))
    lab = Lab(workdir / "lab")
    daemon = None
    witness = None
    try:
        info = lab.up(mode="netns")
        lab.wait_ready()
        print(
            f"Kamailio alone, {args.trials} hard cuts of the primary at {CALL_RATE} calls/s ...", flush=True
        )
        alone = hard_loss(lab, None, args.trials, workdir)
        alone_grey = grey(lab, None, max(1, args.grey_trials // 2), workdir)
        witness = fast_witness(info)
        text = lab_config.render(info, metrics_listen=f"127.0.0.1:{free_port()}")
        for old, new in FAST.items():
            text = text.replace(old, new)
        config = workdir / "hotsite-bench.toml"
        config.write_text(text)
        daemon = RunningDaemon(config, workdir / "daemon.log")
        daemon.wait_ready()
        back_to_normal(lab, daemon)
        print(f"hotsite, {args.trials} hard cuts ...", flush=True)
        ours = hard_loss(lab, daemon, args.trials, workdir)
        print(f"hotsite, {args.grey_trials} grey failures ...", flush=True)
        ours_grey = grey(lab, daemon, args.grey_trials, workdir)
        print(f"hotsite, {args.loss_minutes:g} min of 5% loss, then a partition ...", flush=True)
        false = false_failovers(lab, daemon, args.loss_minutes, workdir)
    finally:
        if daemon is not None:
            daemon.stop()
        if witness is not None:
            witness.kill()
        lab.down()

    print("\nHARD LOSS (primary link cut, calls at 20/s)")
    print(
        f"{'':24}{'failed calls':>22}{'max post-dial delay ms':>34}{'cut -> hotlines routed, primary fenced (s)':>46}"
    )
    print(
        f"{'Kamailio alone':24}{summary(alone['failed']):>22}{summary(alone['max_pdd_ms']):>34}{'never (no site decision)':>46}"
    )
    print(
        f"{'hotsite + Kamailio':24}{summary(ours['failed']):>22}{summary(ours['max_pdd_ms']):>34}{summary(ours['routed_s']):>46}"
    )
    print(
        f"{'keepalived (REFERENCE)':24}{'calls fail meanwhile':>22}{'':>34}{'3.07 s to move an address':>46}"
    )
    print(
        f"calls placed per trial: Kamailio alone {summary(alone['calls'])}; hotsite {summary(ours['calls'])}"
    )
    print(
        "failed calls split (totals over the trials): set-up failed (routing's job); answered, then a stray 180"
        " after the 200 (SIPp aborts, a phone would not); answered at the primary before the cut, BYE lost:"
    )
    for name, res in (("Kamailio alone", alone), ("hotsite + Kamailio", ours)):
        print(
            f"  {name:22} set-up {sum(res['failed_setup']):g} (of which never answered, stuck ringing at the"
            f" dead primary: {sum(res['stuck']):g}), stray 180 {sum(res['failed_late_1xx']):g},"
            f" BYE lost {sum(res['failed_bye_lost']):g}; failed per trial: {' '.join(f'{v:g}' for v in res['failed'])}"
        )
    print("calls answered after more than 500 ms (INVITE to 200), per trial:")
    for name, res in (("Kamailio alone", alone), ("hotsite + Kamailio", ours)):
        print(
            f"  {name:22} {summary(res['pdd_over_500'])}   PDD max per trial (ms): "
            f"{' '.join(f'{v:.0f}' for v in res['max_pdd_ms'])}"
        )
    print("\nGREY FAILURE (the primary's health says it cannot serve; its SBC still answers)")
    print(
        f"  hotsite: health bad -> hotlines moved (s): {summary(ours_grey['moved_s'])}; "
        f"calls dead-ended at the primary meanwhile: {summary(ours_grey['dead_ended'])} "
        f"of {summary(ours_grey['calls'])}"
    )
    print(
        f"  Kamailio alone: not detected within the 5 s window; calls dead-ended at the primary: "
        f"{summary(alone_grey['dead_ended'])} of {summary(alone_grey['calls'])} (all of them)"
    )
    print("\nFALSE FAILOVERS")
    print(
        f"  {args.loss_minutes:g} min with 5% loss and 0..{JITTER_MAX_MS} ms jitter (SIP) on the primary: "
        f"{false['loss']}"
    )
    print(f"  10 s partition of the backup from the primary (witness sees it): {false['partition']}")


if __name__ == "__main__":
    main()
