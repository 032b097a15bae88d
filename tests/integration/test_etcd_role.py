"""The etcd role's flags, rendered by Ansible for three members, run by real etcd processes.

The role's own task files (``roles/etcd/tasks/checks.yml`` and ``flags.yml``)
run for an inventory of three members on this machine (connection local,
addresses 127.77.N.1-3, a CA and member certificates made here); each
member's flags file is then the environment of a real ``etcd`` (it reads
``ETCD_*`` variables, as Debian's unit does through ``EnvironmentFile``).
Shown: etcd recognises every flag the role writes, the three form a
cluster, a client without a certificate is refused, the appliance (with
``coordination.ca_file``/``cert_file``/``key_file``) reports 3 of 3 healthy,
the timings follow the sites' RTT, and the role's checks refuse an even
cluster. Needs root (the role writes its files as root) and etcd.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import config
from appliance.replication.certs import issue, make_ca
from failover.coordination.etcd import Etcd
from tests.conftest import REPO
from tests.integration.test_etcd_cluster import ETCD, needs_etcd

ROLES = REPO / "provisioning" / "ansible" / "roles"
PLAYBOOK = REPO / ".venv" / "bin" / "ansible-playbook"
pytestmark = [
    needs_etcd,
    pytest.mark.skipif(os.geteuid() != 0, reason="the role writes its files owned by root"),
    pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-playbook not in the virtualenv"),
]
NAMES = ["m1", "m2", "m3"]

PLAY = [
    {
        "name": "The etcd role's checks and flags, for each member",
        "hosts": "etcd_members",
        "gather_facts": False,
        "tasks": [
            {"name": "Checks", "ansible.builtin.include_role": {"name": "etcd", "tasks_from": "checks"}},
            {"name": "Flags", "ansible.builtin.include_role": {"name": "etcd", "tasks_from": "flags"}},
        ],
    }
]


def member_cert(tls: Path, name: str, address: str) -> tuple[str, str]:
    """A member's certificate: server *and* client auth (peers are both), SAN = its address.

    And 127.0.0.1: etcd checks a peer's *client* certificate against the
    address the connection comes from, and three members on one machine
    connect to each other from 127.0.0.1 (the role's note on etcd_tls_cert).
    """
    ca_cert = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(a)) for a in (address, "127.0.0.1")]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, key_pem


def render(work: Path, net: int, names: list[str], rtt_ms: int) -> subprocess.CompletedProcess[str]:
    """Run the role's checks and flags for ``names``; each member's flags land in ``work/<name>.env``."""
    tls = work / "tls"
    if not (tls / "ca.pem").exists():
        make_ca(tls, "hotsite etcd test CA")
    hosts = {}
    for i, name in enumerate(names, start=1):
        address = f"127.77.{net}.{i}"
        cert, key = member_cert(tls, name, address)
        member_tls = work / f"tls-{name}"  # where this member's files would be: written here by the test
        member_tls.mkdir(exist_ok=True)
        shutil.copy(tls / "ca.pem", member_tls / "ca.pem")
        (member_tls / "member.pem").write_text(cert)
        (member_tls / "member.key").write_text(key)
        hosts[name] = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "etcd_address": address,
            "etcd_env_file": str(work / f"{name}.env"),
            "etcd_data_dir": str(work / f"data-{name}"),
            "etcd_tls_dir": str(member_tls),
            "etcd_tls_ca": (tls / "ca.pem").read_text(),
            "etcd_tls_cert": cert,
            "etcd_tls_key": key,
            "etcd_metrics_url": f"http://{address}:2381",  # three members on one machine: not 127.0.0.1
            "etcd_cluster_token": f"hotsite-role-test-{os.getpid()}",
            "etcd_site_rtt_ms": rtt_ms,
            "etcd_start": False,
        }
    (work / "inventory.yml").write_text(
        yaml.safe_dump({"all": {"children": {"etcd_members": {"hosts": hosts}}}})
    )
    (work / "play.yml").write_text(yaml.safe_dump(PLAY, sort_keys=False))
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROLES),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(work),
    }
    return subprocess.run(
        [str(PLAYBOOK), "-i", str(work / "inventory.yml"), str(work / "play.yml")],
        capture_output=True, text=True, timeout=180, env=env, cwd=work,
    )  # fmt: skip


def flags(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if line.startswith("ETCD_"):
            key, _, value = line.partition("=")
            found[key] = value.strip().strip('"')
    return found


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def members(work: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def wait_healthy(metrics_url: str, timeout_s: float = 30.0) -> None:
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{metrics_url}/health", timeout=1.0, trust_env=False)
            if answer.status_code == 200 and answer.json().get("health") == "true":
                return
            last = answer.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise AssertionError(f"{metrics_url} not healthy within {timeout_s}s: {last}")


def test_the_roles_flags_run_a_tls_cluster_with_pre_vote_that_refuses_clients_without_a_certificate(
    work: Path, members: dict[str, subprocess.Popen[bytes]]
) -> None:
    net = random.randint(1, 254)
    done = render(work, net, NAMES, rtt_ms=30)
    assert done.returncode == 0, done.stdout + done.stderr
    rendered = {name: flags(work / f"{name}.env") for name in NAMES}
    first = rendered["m1"]
    assert first["ETCD_PRE_VOTE"] == "true"
    assert (first["ETCD_HEARTBEAT_INTERVAL"], first["ETCD_ELECTION_TIMEOUT"]) == ("100", "1000")
    assert first["ETCD_CLIENT_CERT_AUTH"] == first["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    assert first["ETCD_LISTEN_CLIENT_URLS"] == f"https://127.77.{net}.1:2379"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    for name in NAMES:
        log = (work / f"{name}.log").open("ab")
        members[name] = subprocess.Popen(
            [ETCD], env={**base_env, **rendered[name]}, stdout=log, stderr=subprocess.STDOUT, cwd=work
        )
    for name in NAMES:
        wait_healthy(rendered[name]["ETCD_LISTEN_METRICS_URLS"])
    m1_log = (work / "m1.log").read_text()
    for key in first:  # etcd took every flag the role writes, and none is unknown to it
        assert (
            f"recognized and used environment variable {key}=" in m1_log
            or f"recognized environment variable {key}" in m1_log
        ), (key, m1_log[:3000])
    assert "unrecognized environment variable" not in m1_log

    endpoints = [f"https://127.77.{net}.{i}:2379" for i in range(1, 4)]
    tls = work / "tls"
    with pytest.raises(httpx.HTTPError):  # the server's CA is trusted, but we show no certificate
        httpx.post(f"{endpoints[0]}/v3/maintenance/status", json={}, verify=str(tls / "ca.pem"), timeout=3)
    issue(tls, "appliance", hosts=[], server=False)
    text = (
        '[sites.primary]\nrole = "primary"\nsbc = "10.0.0.1:5060"\nkamailio_set = 1\n'
        '[sites.backup]\nrole = "backup"\nsbc = "10.0.0.2:5060"\nkamailio_set = 2\n'
        f'[coordination]\nbackend = "etcd"\nrequest_timeout_s = 2\nendpoints = {endpoints!r}\n'
        f'ca_file = "{tls / "ca.pem"}"\ncert_file = "{tls / "appliance.pem"}"\nkey_file = "{tls / "appliance.key"}"\n'
    ).replace("'", '"')

    async def health() -> dict[str, object]:
        coordination = Etcd(config.parse(text).coordination, appliance="a")
        try:
            return await coordination.check_health()
        finally:
            await coordination.gateway.close()

    found = asyncio.run(health())
    assert (found["healthy"], found["total"], found["problem"]) == (3, 3, None), found


@pytest.mark.parametrize(
    ("rtt_ms", "heartbeat", "election"), [(30, "100", "1000"), (80, "120", "1200"), (200, "300", "3000")]
)
def test_the_timings_follow_the_sites_rtt(work: Path, rtt_ms: int, heartbeat: str, election: str) -> None:
    done = render(work, 1, NAMES, rtt_ms=rtt_ms)
    assert done.returncode == 0, done.stdout + done.stderr
    rendered = flags(work / "m1.env")
    assert (rendered["ETCD_HEARTBEAT_INTERVAL"], rendered["ETCD_ELECTION_TIMEOUT"]) == (heartbeat, election)


def test_an_even_cluster_is_refused_before_anything_is_written(work: Path) -> None:
    done = render(work, 1, NAMES[:2], rtt_ms=30)
    assert done.returncode != 0
    assert "group etcd_members has 2 member(s)" in done.stdout, done.stdout
    assert not list(work.glob("*.env"))
