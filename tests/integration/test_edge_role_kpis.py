"""The kamailio_edge role's config counts per-trunk KPIs, proven by real calls and the daemon's reader.

The role's own "Write kamailio.cfg" task (its content expression and its
``kamailio -c`` validation, verbatim from roles/kamailio_edge/tasks/main.yml) is run
by real ``ansible-playbook`` with the role's defaults and an inventory's
``kamailio_edge_trunks``, writing to a temporary path instead of /etc. The real
Kamailio then runs that file on loopback addresses, with SIPp SBCs behind it; SIPp
calls arrive from the declared trunk's address (answered, then rejected 486) and
from an undeclared one. hotsite's KPI reader (monitoring/kpi_monitor.py, the one
the daemon polls with) reads the statistics over JSON-RPC and must see exactly
the declared trunk's calls, and say the undeclared trunk is not counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.clock import SystemClock
from appliance.config import Config
from appliance.kamailio import KamailioRpc
from monitoring.kpi_monitor import KpiMonitor
from provisioning.lab import checks, kamailio, processes
from provisioning.lab import topology as topo
from provisioning.lab.lab import sipp_command
from tests.conftest import REPO
from tests.integration.test_lab_kpis import _caller_scenario

pytestmark = [pytest.mark.lab, pytest.mark.slow]
for ok, why in [
    (os.geteuid() == 0, "Kamailio on port 5060 needs root"),
    (shutil.which("kamailio") is not None, "kamailio is not installed"),
    (shutil.which("sipp") is not None, "sipp (sip-tester) is not installed"),
    (kamailio.find_module_dir() is not None, "Kamailio's modules are not installed"),
]:
    if not ok:
        pytestmark.append(pytest.mark.skip(reason=why))

ANSIBLE = REPO / "provisioning" / "ansible"
ROLE = ANSIBLE / "roles" / "kamailio_edge"
EDGE, PRIMARY, BACKUP, TRUNK, STRANGER = (f"127.0.77.{i}" for i in range(1, 6))


def _role_task(name_start: str) -> dict[str, Any]:
    tasks = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    return next(t for t in tasks if t["name"].startswith(name_start))


def render_with_ansible(workdir: Path, extra_vars: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Run the role's kamailio.cfg task through ansible-playbook; dest under workdir, not /etc."""
    task = _role_task("Write kamailio.cfg")
    copy = dict(task["ansible.builtin.copy"], dest=str(workdir / "kamailio.cfg"), owner="root", group="root")
    play = [
        {
            "name": "Render the kamailio_edge role's kamailio.cfg",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars_files": [str(ROLE / "defaults" / "main.yml")],
            "tasks": [{"name": task["name"], "ansible.builtin.copy": copy}],
        }
    ]
    (workdir / "play.yml").write_text(yaml.safe_dump(play))
    (workdir / "vars.json").write_text(json.dumps(extra_vars))
    env = dict(os.environ, ANSIBLE_FILTER_PLUGINS=str(ANSIBLE / "filter_plugins"), ANSIBLE_NOCOLOR="1")
    cmd = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "-i",
        "localhost,",
        str(workdir / "play.yml"),
    ]
    cmd += ["-e", f"@{workdir / 'vars.json'}", "-e", f"ansible_python_interpreter={sys.executable}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=workdir)


def _edge_vars(workdir: Path, trunks: Any) -> dict[str, Any]:
    return {
        "kamailio_edge_address": EDGE,
        "kamailio_edge_primary_sbc": PRIMARY,
        "kamailio_edge_backup_sbc": BACKUP,
        "kamailio_edge_module_dir": kamailio.find_module_dir(),
        "kamailio_edge_dispatcher_list": str(workdir / "dispatcher.list"),
        "kamailio_edge_rpc_socket": str(workdir / "kamailio-rpc.sock"),
        "kamailio_edge_trunks": trunks,
    }


class Edge:
    """The role's kamailio.cfg, running, with a primary and a backup SIPp SBC behind it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pids: dict[str, int] = {}

    def sbc(self, name: str, addr: str, reject: int | None = None) -> None:
        """(Re)start one SBC's SIPp: answering, or rejecting every INVITE with ``reject``."""
        if name in self.pids:
            processes.terminate([self.pids.pop(name)])
        cmd = sipp_command(
            shutil.which("sipp") or "sipp", addr, self.workdir, name, reject=reject, media=False
        )
        self.pids[name] = processes.start("sipp", name, cmd, self.workdir / f"{name}.log", None).pid
        _wait_sip(addr, self.workdir / f"{name}.log")

    def kamailio(self) -> None:
        binary = shutil.which("kamailio") or "kamailio"
        (self.workdir / "run").mkdir(exist_ok=True)
        cfg, pidfile = self.workdir / "kamailio.cfg", self.workdir / "kamailio.pid"
        cmd = kamailio.command(binary, cfg, pidfile, self.workdir / "run")
        self.pids["kamailio"] = processes.start(
            "kamailio", "edge", cmd, self.workdir / "kamailio.log", None
        ).pid
        _wait_sip(EDGE, self.workdir / "kamailio.log")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    workdir = tmp_path_factory.mktemp("edge")
    # As an inventory would give it: the appliance's own [trunks] table, reused as it is.
    trunks = {"carrier-a": {"address": f"{TRUNK}:5060", "carrier": "Carrier A"}}
    done = render_with_ansible(workdir, _edge_vars(workdir, trunks))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (workdir / "dispatcher.list").write_text(kamailio.render_dispatcher_list(PRIMARY, BACKUP))
    the_edge = Edge(workdir)
    try:
        the_edge.sbc("primary", PRIMARY)
        the_edge.sbc("backup", BACKUP)
        the_edge.kamailio()
        yield the_edge
    finally:
        processes.terminate(list(the_edge.pids.values()))


def _wait_sip(addr: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if " 200 " in checks.sip_options(addr, topo.SIP_PORT, timeout=0.5, bind=TRUNK) + " ":
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{addr} did not answer OPTIONS: {processes.log_tail(log, 20)}"
        time.sleep(0.2)


def _calls(workdir: Path, source: str, n: int) -> None:
    scenario = _caller_scenario(shutil.which("sipp") or "sipp", workdir)
    cmd = ["sipp", "-sf", str(scenario), f"{EDGE}:{topo.SIP_PORT}", "-s", "95588", "-m", str(n), "-l", "1"]
    cmd += ["-r", "10", "-i", source, "-p", "5090", "-nostdin", "-timeout", "60", "-timeout_error"]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"sipp exit {done.returncode}: {done.stdout[-1500:]}{done.stderr[-1500:]}"


def _reader() -> KpiMonitor:
    """The daemon's KPI reader, configured as an appliance naming both trunks would be."""
    cfg = Config.model_validate(
        {
            "sites": {
                "primary": {"role": "primary", "sbc": f"{PRIMARY}:5060", "kamailio_set": 1},
                "backup": {"role": "backup", "sbc": f"{BACKUP}:5060", "kamailio_set": 2},
            },
            "trunks": {
                "carrier-a": {"address": f"{TRUNK}:5060"},
                "stranger": {"address": f"{STRANGER}:5060"},
            },
        }
    )
    rpc = KamailioRpc(f"http://{EDGE}:{topo.RPC_PORT}{topo.RPC_PATH}")
    return KpiMonitor(cfg, rpc, SystemClock())


def test_calls_through_a_declared_trunk_are_counted_by_the_roles_config(edge: Edge) -> None:
    monitor, loop = _reader(), asyncio.new_event_loop()  # one loop: the reader keeps its HTTP client
    loop.run_until_complete(monitor.poll())  # the window's base: Kamailio has just started, all zero
    assert monitor.error is None, monitor.error
    assert monitor.totals["carrier-a"].attempts == 0
    _calls(edge.workdir, TRUNK, 3)  # answered by the primary SBC
    _calls(edge.workdir, STRANGER, 2)  # answered too, but from an address the role did not declare
    edge.sbc("primary", PRIMARY, reject=486)
    edge.sbc("backup", BACKUP, reject=486)
    _calls(edge.workdir, TRUNK, 2)

    loop.run_until_complete(monitor.poll())
    loop.close()
    assert monitor.error is None, monitor.error
    assert monitor.uncounted == ["stranger"]  # said, not guessed: the role's config does not count it
    total = monitor.totals["carrier-a"]
    assert (total.attempts, total.answered, total.failed) == (5, 3, 2)
    assert total.classes["4xx"] == 2 and total.codes[486] == 2
    assert total.pdd_calls == 3  # the answered calls; a rejected call never rang: no post-dial delay
    view = monitor.view("carrier-a")
    assert (view["attempts"], view["asr_pct"], view["ner_pct"]) == (5, 60.0, 100.0)  # 486: the user's


def test_a_trunk_that_is_not_an_address_is_refused_naming_the_key(tmp_path: Path) -> None:
    done = render_with_ansible(tmp_path, _edge_vars(tmp_path, ["192.0.2.21:5060", "carrier-b.example"]))
    assert done.returncode != 0
    assert "kamailio_edge_trunks[1]: expected an IP address" in done.stdout + done.stderr
    assert not (tmp_path / "kamailio.cfg").exists()
