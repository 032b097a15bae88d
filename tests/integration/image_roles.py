"""The source and witness roles applied for real to the booted appliance image (issue 18).

test_provision_role.py applies every role to an sshd host in a namespace, where no systemd
runs: there the witness and the source agent are started by hand as their units would start
them. Here the same roles go, through hotsite's own Ansible runner over SSH, to the booted
image (Debian 12 under systemd, as a real server), so the VM's systemd starts hotsite-source
and hotsite-witness under the units the roles install, sandbox included. Each is then proven
from this machine by what it serves, through QEMU's port forwards: the witness answers a vote
(and refuses one without its token), the source agent welcomes a replica holding a client
certificate it allows and seeds it over mutual TLS. Neither unit's journal may hold an
EPERM/EACCES. Used by test_appliance_image.py on the VM it has already booted.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import yaml

from appliance.replication.certs import issue, make_ca
from appliance.replication.client import SqliteStreamClient
from appliance.replication.replica import Replica
from appliance.replication.tls import client_context
from provisioning.runner import run_playbook

SOURCE_PORT = 7450  # in the VM; forwarded from this machine's loopback
WITNESS_PORT = 8080
TOKEN = "t0ken-of-the-witness"
DENIED = re.compile(r"EPERM|EACCES|Operation not permitted|Permission denied")


class Guest(Protocol):
    """What this needs of the test's Vm."""

    def must(self, script: str, timeout: float = 120) -> str: ...

    def step(self, what: str) -> None: ...


@dataclass
class Forwards:
    """How this machine reaches the VM: its SSH and the two services' ports on 127.0.0.1."""

    ssh: int
    source: int
    witness: int
    key: Path


def _inventory(path: Path, fwd: Forwards, wheels: Path, tls: Path) -> Path:
    """The VM in the primary_sources and witnesses groups of site.yml (the other plays find no host)."""
    (path.parent / "controller-tmp").mkdir(exist_ok=True)
    host = {
        "ansible_host": "127.0.0.1",
        "ansible_port": fwd.ssh,
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(fwd.key),
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        # One SSH round trip per task: under TCG each costs seconds.
        "ansible_pipelining": True,
        # hotsite is installed in the image by the appliance role from these same wheels: the
        # shared install tasks (proven by the image build and test_provision_role) are skipped,
        # as when an earlier play of the run had installed it.
        "hotsite_install_done": True,
        "hotsite_apt_packages": ["python3-venv", "python3-apt", "python3-packaging"],
        "hotsite_wheel_dir": str(wheels),
        "hotsite_controller_tmp": str(path.parent / "controller-tmp"),
        "hotsite_source_config": {
            "source": {
                "listen": f"0.0.0.0:{SOURCE_PORT}",
                "tls_cert_file": "/etc/hotsite/tls/source.pem",
                "tls_key_file": "/etc/hotsite/secrets/source.key",
                "tls_ca_file": "/etc/hotsite/tls/source-ca.pem",
                "allowed_clients": ["backup-appliance"],
            },
            "streams": {"customers": {"kind": "sqlite", "path": "/srv/callcentre/customers.db"}},
        },
        "hotsite_source_files": {
            "/etc/hotsite/tls/source.pem": (tls / "source.pem").read_text(),
            "/etc/hotsite/tls/source-ca.pem": (tls / "ca.pem").read_text(),
        },
        "hotsite_source_secrets": {"source.key": (tls / "source.key").read_text()},
        "hotsite_source_rw_paths": ["/srv/callcentre"],
        "hotsite_source_groups": ["callcentre"],
        "hotsite_witness_config": {
            "name": "witness-1",
            "listen": f"0.0.0.0:{WITNESS_PORT}",
            "primary": ["tcp://203.0.113.10:5060"],
            "token_file": "/etc/hotsite/secrets/witness-token",
            "allow_plain_http": True,
        },
        "hotsite_witness_secrets": {"witness-token": TOKEN + "\n"},
    }
    groups = ("primary_sources", "witnesses")
    path.write_text(yaml.safe_dump({"all": {"children": {g: {"hosts": {"vm": host}} for g in groups}}}))
    return path


def _primary_data(vm: Guest) -> None:
    """The call centre's database the agent serves, owned by its group (the agent joins it)."""
    vm.must(
        "mkdir -p /srv/callcentre && (getent group callcentre >/dev/null || groupadd callcentre) && "
        "python3 -c \"import sqlite3; db = sqlite3.connect('/srv/callcentre/customers.db'); "
        "db.execute('PRAGMA journal_mode=WAL'); "
        "db.execute('CREATE TABLE IF NOT EXISTS customers (id INTEGER PRIMARY KEY, name TEXT)'); "
        "db.executemany('INSERT INTO customers (name) VALUES (?)', [('Li Na',), ('Wang Fang',)]); db.commit()\" && "
        "chgrp -R callcentre /srv/callcentre && chmod -R g+rwX /srv/callcentre"
    )


def _vote(fwd: Forwards, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{fwd.witness}/vote"
    while True:
        try:
            return httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the witness never answered"
            time.sleep(1)


def _seed(fwd: Forwards, tls: Path, replica_path: Path, timeout: float = 90) -> str:
    """A replica with the allowed client certificate, seeded from the agent in the VM: its mode."""

    async def replicate() -> str:
        replica = Replica(replica_path)
        replica.open()
        context = client_context(tls / "backup-appliance.pem", tls / "backup-appliance.key", tls / "ca.pem")
        client = SqliteStreamClient(
            "customers", "customers", replica, host="127.0.0.1", port=fwd.source, ssl_context=context
        )
        task = asyncio.create_task(client.run())
        try:
            deadline = time.monotonic() + timeout
            while not (client.stats.connected and replica.position is not None):
                assert time.monotonic() < deadline, client.stats
                await asyncio.sleep(0.5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            replica.close()
        return client.stats.mode

    return asyncio.run(replicate())


def apply_and_prove(vm: Guest, fwd: Forwards, wheels: Path, work: Path) -> None:
    """site.yml with the VM as primary source and witness; then each service by what it serves."""
    work.mkdir(exist_ok=True)
    tls = work / "tls"
    make_ca(tls)
    issue(tls, "source", hosts=["127.0.0.1"], server=True)  # reached through the port forward
    issue(tls, "backup-appliance", hosts=[], server=False)
    _primary_data(vm)
    # The appliance's part is over: its daemon (busy replicating) would only slow TCG's Ansible.
    vm.must("systemctl stop hotsite")
    cursor = vm.must("journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'").strip()
    result = run_playbook(_inventory(work / "inventory.yml", fwd, wheels, tls), playbook="site.yml")
    assert result.ok, (result.progress.hosts["vm"].errors, result.output_tail)
    vm.step(f"source and witness roles applied over SSH: {result.progress.hosts['vm'].changed} changed")
    vm.must(
        "for i in $(seq 60); do systemctl is-active -q hotsite-source hotsite-witness && exit 0; sleep 1; done;"
        " systemctl status --no-pager hotsite-source hotsite-witness; exit 1"
    )
    users = vm.must(
        "for u in hotsite-source hotsite-witness; do ps -o user= -p $(systemctl show -p MainPID --value $u); done"
    )
    assert users.split() == ["hotsite", "hotsite"], users

    vote = _vote(fwd)
    assert vote.status_code == 200 and vote.json()["witness"] == "witness-1", vote.text
    refused = httpx.get(f"http://127.0.0.1:{fwd.witness}/vote", timeout=5)
    assert refused.status_code == 401, refused.text
    vm.step(
        f"witness under systemd: vote primary_alive={vote.json()['primary_alive']}, 401 without the token"
    )

    mode = _seed(fwd, tls, work / "replica.db")
    with sqlite3.connect(work / "replica.db") as db:
        names = [row[0] for row in db.execute("SELECT name FROM customers ORDER BY id")]
    assert names[:2] == ["Li Na", "Wang Fang"], names
    vm.step(f"source agent under systemd: replica seeded over mutual TLS ({mode}), {len(names)} customers")

    journal = vm.must(
        f"journalctl -u hotsite-source -u hotsite-witness --after-cursor='{cursor}' --no-pager -o cat"
    )
    denied = [line for line in journal.splitlines() if DENIED.search(line)]
    assert denied == [], denied
    scores = vm.must(
        "for u in hotsite-source hotsite-witness; do systemd-analyze security --no-pager $u | tail -1; done"
    )
    vm.step("their journals: no EPERM/EACCES; " + "; ".join(scores.strip().splitlines()))
