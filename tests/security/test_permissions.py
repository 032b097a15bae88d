"""The permission model, run as real (throwaway) users against the real daemon.

A service user runs the daemon; a technician in the read-only CLI group can
read the status but not move routing, and cannot read secrets or the state
(database, replicas); an operator can move routing but reads no secret
either; a user in no CLI group cannot even connect.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MINIMAL, REPO, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates system users and groups: needs root"),
    pytest.mark.skipif(
        not shutil.which("useradd") or not shutil.which("setpriv"), reason="needs useradd, setpriv"
    ),
]

# The test's interpreter may live where other users cannot reach (/root/.pyenv): use the
# system's Python of the same minor version with the virtualenv's packages on the path.
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
SITE = next(p for p in sys.path if p.endswith("site-packages"))


@pytest.fixture
def people() -> Iterator[dict[str, str]]:
    """Throwaway groups (cli, ops) and users (svc, tech, oper, outsider); removed afterwards."""
    tag = "hs" + secrets.token_hex(3)
    groups = {"cli": f"{tag}cli", "ops": f"{tag}ops"}
    users = {"svc": f"{tag}svc", "tech": f"{tag}tech", "oper": f"{tag}oper", "outsider": f"{tag}out"}
    membership = {
        "svc": [groups["cli"]],
        "tech": [groups["cli"]],
        "oper": [groups["cli"], groups["ops"]],
        "outsider": [],
    }
    try:
        for name in groups.values():
            subprocess.run(["groupadd", "--system", name], check=True)
        for role, name in users.items():
            extra = ["-G", ",".join(membership[role])] if membership[role] else []
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    *extra,
                    name,
                ],
                check=True,
            )
        yield {**users, **{f"group_{k}": v for k, v in groups.items()}}
    finally:
        for name in users.values():
            subprocess.run(["userdel", name], check=False, capture_output=True)
        for name in groups.values():
            subprocess.run(["groupdel", name], check=False, capture_output=True)


def as_user(user: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{SITE}", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd="/",
    )


def cli(user: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return as_user(user, SYSTEM_PYTHON, "-m", "appliance.cli.main", "--config", str(config), *args)


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason=f"needs {SYSTEM_PYTHON}")
def test_read_only_user_reads_status_but_cannot_move_routing_or_read_secrets(people: dict[str, str]) -> None:
    base = Path(tempfile.mkdtemp(prefix="hotsite-perm-"))
    base.chmod(0o755)
    try:
        svc = people["svc"]
        shutil.chown(base, svc, svc)
        secrets_dir = base / "secrets"
        secrets_dir.mkdir(mode=0o700)
        secret = secrets_dir / "smtp-password"
        secret.write_text("the-smtp-password\n")
        secret.chmod(0o600)
        for path in (secrets_dir, secret):
            shutil.chown(path, svc, svc)
        text = MINIMAL.format(
            state=base / "state",
            run=base / "run",
            metrics_port=free_port(),
            sbc_port=free_port(socket.SOCK_DGRAM),
        )
        text = text.replace(
            "[appliance]\n",
            f'[appliance]\nsocket_group = "{people["group_cli"]}"\nread_only_groups = ["{people["group_cli"]}"]\n'
            f'operator_groups = ["{people["group_ops"]}"]\n',
        )
        text += (
            f'\n[channels.mail]\ntype = "smtp"\nhost = "127.0.0.1"\nport = {free_port()}\n'
            f'from_addr = "hotsite@example.com"\nusername = "hotsite"\npassword_file = "{secret}"\n'
        )
        config = base / "hotsite.toml"
        config.write_text(text)
        config.chmod(0o644)
        check = cli("root", config, "config", "check", str(config))
        assert check.returncode == 0, check.stderr

        log = (base / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            ["setpriv", f"--reuid={svc}", f"--regid={svc}", "--init-groups", SYSTEM_PYTHON, "-m"]
            + ["appliance.cli.main", "--config", str(config), "run"],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{SITE}", "HOME": "/nonexistent"},
            cwd="/",
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while cli(people["tech"], config, "status", "--json").returncode != 0:
                assert daemon.poll() is None and time.monotonic() < deadline, (
                    base / "daemon.log"
                ).read_text()
                time.sleep(0.3)
            status = json.loads(cli(people["tech"], config, "status", "--json").stdout)
            assert "failover" in status

            moved = cli(
                people["tech"], config, "failover", "--to", "backup", "--force", "--yes", "--reason", "x"
            )
            assert moved.returncode == 1 and "read-only role" in moved.stderr, (moved.stdout, moved.stderr)
            maint = cli(people["tech"], config, "maintenance", "on", "--reason", "tech")
            assert maint.returncode == 1 and "read-only role" in maint.stderr, maint.stderr
            assert "Traceback" not in moved.stderr + maint.stderr

            operator = cli(people["oper"], config, "maintenance", "on", "--reason", "planned work")
            assert operator.returncode == 0, operator.stderr
            events = json.loads(cli(people["tech"], config, "events", "--json", "--limit", "20").stdout)
            assert any(people["oper"] in json.dumps(e) for e in events), events

            outsider = cli(people["outsider"], config, "status")
            assert outsider.returncode == 1 and "permission denied" in outsider.stderr, outsider.stderr

            state_db = base / "state" / "hotsite.db"
            for user in (people["tech"], people["oper"], people["outsider"]):
                for path in (secret, state_db):
                    read = as_user(user, "/bin/cat", str(path))
                    assert read.returncode != 0 and "Permission denied" in read.stderr, (
                        user,
                        path,
                        read.stdout,
                    )
            assert (base / "state").stat().st_mode & 0o777 == 0o700
            assert state_db.stat().st_mode & 0o077 == 0, oct(state_db.stat().st_mode)
        finally:
            daemon.terminate()
            daemon.wait(20)
            log.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
