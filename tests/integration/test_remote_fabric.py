"""hotsite remote (fabric) against a real sshd in a network namespace.

The host runs this checkout's hotsite (the overlay shows this machine's
files; nothing written there reaches it): a real daemon answers `hotsite
status --json` for the diagnostics bundle, `hotsite config check` gates the
config push on the host itself, and credential rotation installs
certificates the replication TLS code accepts.
"""

from __future__ import annotations

import json
import ssl
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.provision import remote
from appliance.errors import ConfigError
from appliance.replication import certs
from provisioning.remote import MASK, Target, collect_diagnostics, push_config, rotate_replication_credentials
from tests.conftest import REPO
from tests.support import sshd_host

pytestmark = [pytest.mark.skipif(sshd_host.available() is not None, reason=str(sshd_host.available()))]

HOTSITE = str(REPO / ".venv/bin/hotsite")
SECRET = "smtp-pa55-do-not-leak"
CONFIG = """[appliance]
name = "remote-test"
state_dir = "/var/lib/hotsite"
runtime_dir = "/run/hotsite"

[metrics]
enabled = false

[sites.primary]
role = "primary"
sbc = "127.0.0.1:15060"
kamailio_set = 1

[sites.backup]
role = "backup"
sbc = "127.0.0.1:15061"
kamailio_set = 2

[channels.email]
type = "smtp"
host = "127.0.0.1"
from_addr = "hotsite@example.com"
password_file = "/etc/hotsite/secrets/smtp-password"
"""


@pytest.fixture(scope="module")
def host() -> Iterator[sshd_host.SshHost]:
    h = sshd_host.SshHost()
    h.up()
    try:
        for d in ("/etc/hotsite/secrets", "/var/lib/hotsite", "/var/log/hotsite"):
            h.path(d).mkdir(parents=True, exist_ok=True)
        h.path("/etc/hotsite/hotsite.toml").write_text(CONFIG)
        h.path("/etc/hotsite/secrets/smtp-password").write_text(SECRET + "\n")
        h.path("/etc/hotsite/secrets/smtp-password").chmod(0o600)
        # A real daemon on the host, so `hotsite status --json` has something to say.
        h.ssh(
            f"cd / && setsid -f {HOTSITE} --config /etc/hotsite/hotsite.toml run "
            "> /var/log/hotsite/daemon.log 2>&1 < /dev/null",
            timeout=10,
        )
        deadline = time.monotonic() + 20
        while not h.path("/run/hotsite/hotsite.sock").exists():
            assert time.monotonic() < deadline, h.path("/var/log/hotsite/daemon.log").read_text()
            time.sleep(0.1)
        yield h
    finally:
        h.down()


def target(h: sshd_host.SshHost) -> Target:
    return Target(h.address, identity=str(h.key), hotsite=HOTSITE)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    f = tar.extractfile(member)
    assert f is not None, member.name  # a regular file always has contents
    return f.read().decode()


def bundle_files(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name.split("/", 1)[1]: _read(tar, m) for m in tar.getmembers() if m.isfile()}


def test_diagnostics_bundle_has_status_versions_logs_and_no_secret(
    host: sshd_host.SshHost, tmp_path: Path
) -> None:
    out = tmp_path / "diag.tar.gz"
    result = CliRunner().invoke(
        remote,
        [
            "--identity",
            str(host.key),
            "--hotsite",
            HOTSITE,
            "diagnostics",
            host.address,
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    files = bundle_files(out)
    status = json.loads(files["status.json"])
    assert status["appliance"]["name"] == "remote-test" if "appliance" in status else "sites" in status
    assert json.loads(files["config-check.json"])["ok"] is True
    assert files["versions/hotsite.txt"].startswith("hotsite")
    assert "pydantic==" in files["versions/pip-freeze.txt"]
    assert "Linux" in files["versions/os.txt"]
    assert 'password_file = "/etc/hotsite/secrets/smtp-password"' in files["config/hotsite.toml"]
    paths = json.loads(files["config/secret-files.json"])["paths"]
    assert paths == {"channels.email.password_file": "/etc/hotsite/secrets/smtp-password"}
    assert all(SECRET not in text for text in files.values())
    steps = {s["name"]: s["exit_code"] for s in manifest["steps"]}
    assert steps["status.json"] == 0 and steps["versions/hotsite.txt"] == 0
    assert "logs/journal-hotsite.txt" in files  # journald may be absent: its failure is recorded, not fatal


def test_inline_secrets_in_a_config_are_masked_in_the_bundle(host: sshd_host.SshHost, tmp_path: Path) -> None:
    host.path("/etc/hotsite/legacy.toml").write_text('[hook]\ntoken = "tok-123"\nurl = "https://x"\n')
    collect_diagnostics(target(host), tmp_path / "d.tar.gz", config_path="/etc/hotsite/legacy.toml")
    files = bundle_files(tmp_path / "d.tar.gz")
    assert f'token = "{MASK}"' in files["config/legacy.toml"]
    assert all("tok-123" not in text for text in files.values())


def test_push_config_checks_on_the_host_first_and_never_installs_a_bad_one(host: sshd_host.SshHost) -> None:
    live = host.path("/etc/hotsite/hotsite.toml")
    before = live.read_text()
    with pytest.raises(ConfigError) as refused:
        push_config(target(host), (before + "\n[probes]\nintervall_s = 1\n").encode(), reload=False)
    assert any("probes.intervall_s" in p for p in refused.value.problems), refused.value.problems
    assert live.read_text() == before
    assert not list(host.path("/etc/hotsite").glob("hotsite.toml.new-*"))

    good = before.replace('name = "remote-test"', 'name = "remote-test-2"')
    result = push_config(target(host), good.encode(), reload=False)
    assert live.read_text() == good
    assert host.path("/etc/hotsite/hotsite.toml.bak").read_text() == before
    assert result["installed"] == "/etc/hotsite/hotsite.toml"


def test_rotated_credentials_are_installed_at_both_ends_and_work_together(
    host: sshd_host.SshHost, tmp_path: Path
) -> None:
    ca = tmp_path / "ca"
    certs.make_ca(ca)
    tls = host.path("/etc/hotsite/tls")
    tls.mkdir()
    host.path("/etc/hotsite/source.toml").write_text(
        '[source]\ntls_cert_file = "/etc/hotsite/tls/source.pem"\ntls_key_file = "/etc/hotsite/secrets/source.key"\n'
        'tls_ca_file = "/etc/hotsite/tls/ca.pem"\n'
    )
    host.path("/etc/hotsite/appliance-repl.toml").write_text(
        '[replication]\ntls_cert_file = "/etc/hotsite/tls/appliance.pem"\n'
        'tls_key_file = "/etc/hotsite/secrets/appliance.key"\n'
    )
    t = target(host)
    done = rotate_replication_credentials(t, t, ca, appliance_config="/etc/hotsite/appliance-repl.toml")
    assert done[host.address]["certificate"] == "/etc/hotsite/tls/appliance.pem"
    for name in ("tls/source.pem", "secrets/source.key", "tls/appliance.pem", "secrets/appliance.key"):
        assert host.path(f"/etc/hotsite/{name}").stat().st_size > 0
    assert oct(host.path("/etc/hotsite/secrets/appliance.key").stat().st_mode & 0o777) == "0o640"
    # The two new pairs authenticate each other through the CA, as the replication link does.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(
        host.path("/etc/hotsite/tls/source.pem"), host.path("/etc/hotsite/secrets/source.key")
    )
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(
        host.path("/etc/hotsite/tls/appliance.pem"), host.path("/etc/hotsite/secrets/appliance.key")
    )
    client.load_verify_locations(ca / "ca.pem")
    pem = host.path("/etc/hotsite/tls/source.pem").read_text()
    assert "BEGIN CERTIFICATE" in pem


def test_an_unreachable_host_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        remote, ["--timeout", "1", "diagnostics", "10.99.255.254", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 1
    assert "cannot connect over SSH" in result.output
