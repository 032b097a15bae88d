"""Run the hotsite playbooks through ansible-runner, with live progress and a summary.

Technicians and contractors are not Ansible people: ``hotsite provision``
shows one line per task result as it happens and ends with what changed on
which host, instead of Ansible's wall of output. The fold from
ansible-runner's events to that summary (:class:`Progress`) is pure and
tested on its own; :func:`run_playbook` is the one place that runs Ansible.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError, HotsiteError

PLAYBOOK_DIR = Path(__file__).resolve().parent / "ansible"
PLAYBOOKS = ("site.yml", "appliance.yml", "source.yml", "edge.yml", "witness.yml")
REPO = Path(__file__).resolve().parent.parent


class ProvisionError(HotsiteError):
    """Ansible could not be run at all (not installed, no playbook); exit status 1."""


@dataclass
class HostSummary:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    changed_tasks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "changed": self.changed,
            "failed": self.failed,
            "unreachable": self.unreachable,
            "skipped": self.skipped,
            "changed_tasks": self.changed_tasks,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class Line:
    """One line of live progress: ``status`` is ok, changed, failed, unreachable, skipped or play."""

    status: str
    host: str
    text: str


class Progress:
    """Folds ansible-runner events into per-host counts, changed tasks and errors.

    ``feed`` returns the progress line an event deserves, or None (most events
    are bookkeeping). A failure whose task says ``ignore_errors`` counts as ok,
    as Ansible counts it. The final ``playbook_on_stats`` event, when it comes,
    is authoritative for the counts.
    """

    def __init__(self) -> None:
        self.hosts: dict[str, HostSummary] = {}
        self.stats_seen = False

    def _host(self, name: str) -> HostSummary:
        return self.hosts.setdefault(name, HostSummary())

    def feed(self, event: Mapping[str, Any]) -> Line | None:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = str(data.get("host") or data.get("remote_addr") or "")
        task = str(data.get("task") or "").strip()
        raw = data.get("res")
        res: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if kind == "playbook_on_play_start":
            return Line("play", "", str(data.get("play") or data.get("name") or ""))
        if kind == "runner_on_ok":
            summary = self._host(host)
            if res.get("changed"):
                summary.changed += 1
                summary.changed_tasks.append(task)
                return Line("changed", host, task)
            summary.ok += 1
            return Line("ok", host, task)
        if kind == "runner_on_failed":
            summary = self._host(host)
            if data.get("ignore_errors"):
                summary.ok += 1
                return Line("ok", host, f"{task} (failed, ignored)")
            summary.failed += 1
            message = _message(res)
            summary.errors.append(f"{task}: {message}")
            return Line("failed", host, f"{task}: {message}")
        if kind == "runner_on_unreachable":
            summary = self._host(host)
            summary.unreachable += 1
            message = _message(res)
            summary.errors.append(f"unreachable: {message}")
            return Line("unreachable", host, message)
        if kind == "runner_on_skipped":
            self._host(host).skipped += 1
            return Line("skipped", host, task)
        if kind == "playbook_on_stats":
            self._stats(data)
        return None

    def _stats(self, data: Mapping[str, Any]) -> None:
        self.stats_seen = True
        fields = {
            "ok": "ok",
            "changed": "changed",
            "failures": "failed",
            "dark": "unreachable",
            "skipped": "skipped",
        }
        names = set()
        for key in fields:
            names |= set((data.get(key) or {}).keys())
        for name in names:
            summary = self._host(name)
            for key, attr in fields.items():
                count = int((data.get(key) or {}).get(name, 0))
                # Ansible's "ok" includes the changed results; ours does not.
                if key == "ok":
                    count -= int((data.get("changed") or {}).get(name, 0))
                setattr(summary, attr, max(count, 0))

    @property
    def failed(self) -> bool:
        return any(h.failed or h.unreachable for h in self.hosts.values())

    @property
    def changed_hosts(self) -> list[str]:
        return sorted(name for name, h in self.hosts.items() if h.changed)

    def summary(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "changed_hosts": self.changed_hosts,
            "hosts": {name: self.hosts[name].as_dict() for name in sorted(self.hosts)},
        }


def _message(res: Mapping[str, Any]) -> str:
    msg = res.get("msg") or res.get("stderr") or res.get("reason") or "failed"
    first = str(msg).strip().splitlines()
    return first[0][:300] if first else "failed"


@dataclass
class Result:
    progress: Progress
    status: str  # ansible-runner's: successful, failed, timeout, canceled
    rc: int
    elapsed_s: float
    output_tail: str = ""  # Ansible's own last lines, when it failed before any host result

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0 and not self.progress.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.progress.summary(),
            "status": self.status,
            "rc": self.rc,
            "elapsed_s": self.elapsed_s,
            "ok": self.ok,
        }


def ansible_env() -> dict[str, str]:
    """What ansible-playbook needs to find hotsite's roles and plugins from any working directory."""
    bindir = str(Path(sys.executable).parent)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PATH": os.pathsep.join((bindir, os.environ.get("PATH", "/usr/bin:/bin"))),
        "PYTHONPATH": pythonpath,
        "ANSIBLE_ROLES_PATH": str(PLAYBOOK_DIR / "roles"),
        "ANSIBLE_FILTER_PLUGINS": str(PLAYBOOK_DIR / "filter_plugins"),
        "ANSIBLE_CONNECTION_PLUGINS": str(PLAYBOOK_DIR / "connection_plugins"),
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_FORKS": "10",
    }


def run_playbook(
    inventory: Path,
    *,
    playbook: str = "site.yml",
    check: bool = False,
    limit: str | None = None,
    extravars: Mapping[str, Any] | None = None,
    tags: str | None = None,
    on_line: Callable[[Line], None] | None = None,
    timeout_s: int | None = None,
) -> Result:
    """Run ``playbook`` from provisioning/ansible against ``inventory``; never raises for a failed host.

    Raises ConfigError (exit 2) for a missing inventory or an unknown
    playbook, ProvisionError when Ansible is not installed. Hosts that fail
    are in the result, with their first error line.
    """
    import ansible_runner

    if not inventory.is_file():
        raise ConfigError(f"inventory {str(inventory)!r} does not exist or is not a file")
    if playbook not in PLAYBOOKS:
        raise ConfigError(f"unknown playbook {playbook!r}: known are {', '.join(PLAYBOOKS)}")
    env = ansible_env()
    if shutil.which("ansible-playbook", path=env["PATH"]) is None:
        raise ProvisionError("ansible-playbook is not installed: pip install 'ansible-core==2.19.14'")
    progress = Progress()

    def handler(event: dict[str, Any]) -> bool:
        line = progress.feed(event)
        if line is not None and on_line is not None:
            on_line(line)
        return False  # ansible-runner need not keep the event on disk

    cmdline = "--check --diff" if check else None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hotsite-provision-") as private:
        runner = ansible_runner.run(
            private_data_dir=private,
            project_dir=str(PLAYBOOK_DIR),
            playbook=playbook,
            inventory=str(inventory.resolve()),
            extravars=dict(extravars or {}),
            limit=limit,
            tags=tags,
            cmdline=cmdline,
            envvars=env,
            event_handler=handler,
            quiet=True,
            timeout=timeout_s,
            settings={"suppress_ansible_output": True},
        )
        tail = ""
        if runner.status != "successful" and not progress.hosts and runner.stdout is not None:
            tail = "\n".join(runner.stdout.read().strip().splitlines()[-15:])
    return Result(progress, str(runner.status), int(runner.rc or 0), time.monotonic() - started, tail)
