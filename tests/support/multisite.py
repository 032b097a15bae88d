"""Three call-centre sites in network namespaces, each with its own etcd member and appliance.

Each site ``hs-ms-<site>`` sits on a bridge in ``hs-ms-core`` (10.78.0.0/24)
and runs what a real site would: an etcd member of the one cluster, its SBC
(SIPp answering OPTIONS and INVITE), its health endpoint (the lab's healthd,
whose switch file makes a grey failure), and a full ``hotsite run`` daemon
with ``[coordination] backend = "etcd"``. The routing they all drive is a
shared "routing world" (``tests/support/routing_world.py``), a hook with a
fencing rule and a log of every request.

:meth:`Sites.cut` sets a site's bridge port down: a real partition, for the
etcd member, the appliance, the SBC and the health endpoint at once.
Everything lives under one prefix and one temp dir and is removed by
:meth:`Sites.down`, leaving the project's lab (``hs-lab-*``) alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import config
from failover import plans
from provisioning.lab.lab import HEALTHD, SCENARIO
from tests.integration.daemon_helpers import HOTSITE, hotsite
from tests.support import configs

PREFIX = "hs-ms-"
CORE = f"{PREFIX}core"
BRIDGE = "msbr0"
SITES = {"primary": "10.78.0.10", "east": "10.78.0.20", "west": "10.78.0.30"}
REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_MS, ELECTION_MS = 100, 1000  # the etcd role's timings for site RTTs up to ~65 ms
WORLD_HOOK = REPO / "tests" / "support" / "routing_world.py"
ROLE_LINE = re.compile(r'^ts=(?P<ts>\S+) .*msg="coordination role changed".* role=(?P<role>\w+)')


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def namespace(site: str) -> str:
    return f"{PREFIX}{site}"


def teardown() -> None:
    """Remove every hs-ms-* namespace and the processes inside (idempotent)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for ns in [n for n in listed if n.startswith(PREFIX)]:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def config_text(
    site: str, workdir: Path, *, ttl_s: int = 2, retry_s: float = 0.2, name: str | None = None
) -> str:
    """One appliance's configuration: three sites, hotlines spread by plan, etcd, the world hook.

    ``name`` tells apart two appliances at one site (an HA pair); default: the site's name.
    """
    name = name or site
    sites = "".join(
        f'[sites.{name}]\nrole = "{"primary" if name == "primary" else "backup"}"\n'
        f'sbc = "{addr}:5060"\nhealth_url = "http://{addr}:8080/health"\n'
        f"kamailio_set = {index + 1}\nseats = {seats}\n"
        for index, ((name, addr), seats) in enumerate(zip(SITES.items(), (400, 100, 80), strict=True))
    )
    endpoints = ", ".join(f'"http://{addr}:2379"' for addr in SITES.values())
    hook = json.dumps(
        [sys.executable, str(WORLD_HOOK), "--world", str(workdir / "world.json"), "--name", name]
    )
    # An apply starts only if the lease view outlasts its timeout (failover/lease.py may_apply).
    hook_timeout_s = round(0.6 * ttl_s, 1)
    state = workdir / f"appliance-{name}"
    return f"""
[appliance]
name = "appliance-{name}"
site = "{site}"
state_dir = "{state}/state"
runtime_dir = "{state}/run"
watchdog = false

[metrics]
enabled = false

[probes]
interval_s = 0.2
timeout_s = 0.15
rise = 2
fall = 3

{sites}
[destinations.ivr]
kind = "ivr"
kamailio_set = 9

{configs.three_hotlines(["east", "west", "ivr"], ["west", "east", "ivr"])}
[failover]
policy = "auto"
hold_down_s = 1
min_dwell_s = 1
max_auto_per_hour = 20
failback_stable_s = 2
tick_s = 0.1
witness_poll_s = 0.1
reconcile_interval_s = 1
step_timeout_s = 5

[actuators.world]
type = "hook"
command = {hook}
timeout_s = {hook_timeout_s:g}

[coordination]
backend = "etcd"
endpoints = [{endpoints}]
domain = "multisite"
ttl_s = {ttl_s}
request_timeout_s = 0.5
retry_s = {retry_s}
views_interval_s = 0.2
"""


class Sites:
    """The three sites. etcd runs as the ``etcd`` role provisions it: ``--pre-vote=true`` (etcd 3.4's
    default is false) and etcd's default timings (heartbeat 100 ms, election 1000 ms), which the
    role keeps for site RTTs up to ~65 ms; ``pre_vote=False`` is the unprovisioned default, for
    the benchmark's comparison."""

    def __init__(self, *, ttl_s: int = 2, retry_s: float = 0.2, pre_vote: bool = True) -> None:
        self.ttl_s, self.retry_s = ttl_s, retry_s
        self.pre_vote = pre_vote
        self.dir = Path(tempfile.mkdtemp(prefix="hotsite-multisite-"))
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.configs: dict[str, Path] = {}
        self.cut_at: dict[str, float] = {}

    # -- network -------------------------------------------------------------------------
    def up(self) -> None:
        teardown()
        subprocess.run(["ip", "netns", "add", CORE], check=True)
        ip("link", "add", BRIDGE, "type", "bridge", ns=CORE)
        ip("link", "set", BRIDGE, "up", ns=CORE)
        for site, addr in SITES.items():
            self._add_host(site, addr)
        for site in SITES:
            self._start_site(site)
        # Before hotsite, the world routes normally (calls to the primary), obeyed no token yet.
        normal = plans.normal_routing(config.parse(self.configs["east"].read_text()))
        (self.dir / "world.json").write_text(
            json.dumps({"token": 0, "routing": normal.to_json(), "by": "install"})
        )
        self._wait_etcd()

    def _add_host(self, host: str, addr: str) -> None:
        ns, port = namespace(host), f"ms-{host}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=CORE)
        ip("link", "set", port, "master", BRIDGE, "up", ns=CORE)
        ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
        ip("link", "set", "eth0", "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)

    def add_pair_member(self, host: str, site: str, addr: str) -> None:
        """A second appliance at ``site`` on a machine of its own (an HA pair), not yet started."""
        self._add_host(host, addr)
        self.configs[host] = self.dir / f"{host}.toml"
        text = config_text(site, self.dir, ttl_s=self.ttl_s, retry_s=self.retry_s, name=host)
        self.configs[host].write_text(text)

    def cut(self, site: str) -> None:
        ip("link", "set", f"ms-{site}", "down", ns=CORE)
        self.cut_at[site] = time.time()

    def heal(self, site: str) -> None:
        ip("link", "set", f"ms-{site}", "up", ns=CORE)

    def degrade(self, site: str, reason: str = "ACD down: no agents logged in") -> None:
        (self.dir / f"{site}.unhealthy").write_text(reason)

    # -- processes -----------------------------------------------------------------------
    def _spawn(self, site: str, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}-{site}.log").open("ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace(site), *cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        )
        log.close()
        return proc

    def _start_site(self, site: str) -> None:
        addr = SITES[site]
        cluster = ",".join(f"{s}=http://{a}:2380" for s, a in SITES.items())
        self._spawn(site, "etcd", [
            shutil.which("etcd") or "/usr/bin/etcd", f"--name={site}", f"--data-dir={self.dir / ('etcd-' + site)}",
            f"--listen-client-urls=http://{addr}:2379", f"--advertise-client-urls=http://{addr}:2379",
            f"--listen-peer-urls=http://{addr}:2380", f"--initial-advertise-peer-urls=http://{addr}:2380",
            f"--initial-cluster={cluster}", "--initial-cluster-token=hotsite-multisite",
            "--initial-cluster-state=new", f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}", f"--pre-vote={'true' if self.pre_vote else 'false'}",
            "--log-level=error",
        ])  # fmt: skip
        self._spawn(site, "sipp", [
            shutil.which("sipp") or "/usr/bin/sipp", "-sf", str(SCENARIO), "-i", addr, "-p", "5060",
            "-bind_local", "-nostdin",
        ])  # fmt: skip
        self._spawn(site, "healthd", [
            sys.executable, str(HEALTHD), "--bind", addr, "--port", "8080", "--site", site,
            "--workdir", str(self.dir),
        ])  # fmt: skip
        self.configs[site] = self.dir / f"{site}.toml"
        self.configs[site].write_text(config_text(site, self.dir, ttl_s=self.ttl_s, retry_s=self.retry_s))

    def _wait_etcd(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            healthy = subprocess.run(
                ["ip", "netns", "exec", namespace("east"), sys.executable, "-c",
                 "import httpx,sys; r = httpx.get('http://10.78.0.20:2379/health', timeout=1);"
                 " sys.exit(0 if r.json().get('health') == 'true' else 1)"],
                capture_output=True,
            )  # fmt: skip
            if healthy.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("etcd cluster of the three sites not healthy in time:\n" + self.logs("etcd"))

    def raft_leader(self, via: str | None = None) -> str | None:
        """The site whose etcd member leads the raft group, as the members reachable from ``via`` say."""
        via = via or next(s for s in SITES if s not in self.cut_at)
        script = (
            "import httpx, json, sys\n"
            "found = {}\n"
            f"for site, addr in {SITES!r}.items():\n"
            "    try:\n"
            "        doc = httpx.post(f'http://{addr}:2379/v3/maintenance/status', json={}, timeout=0.5).json()\n"
            "    except Exception:\n"
            "        continue\n"
            "    found[site] = (doc['header']['member_id'], doc.get('leader'))\n"
            "print(json.dumps(found))\n"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", namespace(via), sys.executable, "-c", script],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        members = json.loads(out.stdout or "{}")
        ids = {member_id: site for site, (member_id, _) in members.items()}
        leaders = {ids.get(leader) for _, leader in members.values() if leader and leader != "0"}
        leaders.discard(None)
        return leaders.pop() if len(leaders) == 1 else None

    def role_timeline(self) -> dict[str, list[tuple[float, str]]]:
        """Each appliance's coordination roles with the (unix) time it logged each change."""
        found: dict[str, list[tuple[float, str]]] = {}
        for path in sorted(self.dir.glob("hotsite-*.log")):
            site = path.stem.removeprefix("hotsite-")
            for line in path.read_text(errors="replace").splitlines():
                match = ROLE_LINE.match(line)
                if match:
                    at = datetime.strptime(match["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
                    found.setdefault(site, []).append((at.timestamp(), match["role"]))
        return found

    def reconfigure(self, *, ttl_s: int, retry_s: float) -> None:
        """New coordination timings for appliances started from now on."""
        self.ttl_s, self.retry_s = ttl_s, retry_s
        for site in SITES:
            self.configs[site].write_text(config_text(site, self.dir, ttl_s=ttl_s, retry_s=retry_s))

    def stop_appliance(self, site: str) -> None:
        proc = self.daemons.pop(site)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)

    def start_appliance(self, site: str) -> None:
        self.daemons[site] = self._spawn(
            site, "hotsite", [*HOTSITE, "--config", str(self.configs[site]), "run"]
        )

    def kill_appliance(self, site: str) -> None:
        proc = self.daemons[site]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def status(self, site: str) -> dict[str, Any] | None:
        """``hotsite status --json`` over the appliance's unix socket (filesystem: no namespace needed)."""
        proc = hotsite("status", "--json", config=self.configs[site], timeout=10)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def world(self) -> dict[str, Any] | None:
        path = self.dir / "world.json"
        return json.loads(path.read_text()) if path.exists() else None

    def world_log(self) -> list[dict[str, Any]]:
        path = self.dir / "world.json.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def logs(self, name: str = "hotsite") -> str:
        """The last decisions of each appliance (coordination and failover; probes left out)."""
        keep = ("hotsite.etcd", "failover.", "hotsite.peers", "Traceback", "Error")
        parts = []
        for path in sorted(self.dir.glob(f"{name}-*.log")):
            lines = path.read_text(errors="replace").splitlines()
            chosen = [line for line in lines if name != "hotsite" or any(k in line for k in keep)]
            parts.append(f"--- {path.name}\n" + "\n".join(chosen[-25:]))
        return "\n".join(parts)

    def down(self) -> None:
        for proc in self.daemons.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.daemons.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        teardown()
        if os.environ.get("HOTSITE_KEEP_MULTISITE"):  # debugging: keep the logs and the world
            print(f"multi-site files kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
