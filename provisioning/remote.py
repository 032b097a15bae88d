"""``hotsite remote`` tasks over SSH (fabric): diagnostics, a checked config push, credential rotation.

Written for the contractor at a laptop who must look at an appliance or the
primary's source agent without knowing where everything lives:

- :func:`collect_diagnostics` fetches a bundle (config with secrets masked,
  logs, versions, ``hotsite status --json``) into one ``.tar.gz``. Files named
  by ``*_file`` keys hold secrets: their paths are shown, their contents are
  never read. Every command's exit status is kept, so a failing ``status``
  (daemon down) is itself a finding, not an error of the bundle.
- :func:`push_config` uploads a config beside the live one, runs ``hotsite
  config check`` on it *there*, and only then renames it into place (atomic,
  the previous one kept as ``.bak``) and asks the daemon to reload.
- :func:`rotate_replication_credentials` issues new mutual-TLS certificates
  for the replication link from the operator's CA and installs them at both
  ends, the same way (beside, then renamed).

The pure parts (masking) are module functions tested on their own.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError, HotsiteError
from appliance.redact import mask_text

DEFAULT_HOTSITE = "/opt/hotsite/bin/hotsite"
DEFAULT_CONFIG = "/etc/hotsite/hotsite.toml"
DEFAULT_SOURCE_CONFIG = "/etc/hotsite/source.toml"
MASK = "********"
_SECRET_WORDS = {"password", "passwd", "secret", "token", "pin", "key", "apikey", "credential", "credentials"}


class RemoteError(HotsiteError):
    """SSH failed, or a remote step failed; the message says which host and which step."""


# -- masking (pure) ------------------------------------------------------------------


def is_secret_key(name: str) -> bool:
    """A key whose value is a secret: named like password/secret/token/pin/key, not a ``*_file`` path."""
    lowered = name.lower()
    if lowered.endswith("_file"):
        return False
    return any(word in _SECRET_WORDS for word in re.split(r"[_\-.]", lowered))


def mask_config(data: Any) -> Any:
    """A copy of parsed config data with every secret value replaced by ``MASK``."""
    if isinstance(data, Mapping):
        return {k: (MASK if is_secret_key(str(k)) else mask_config(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_config(v) for v in data]
    return data


_ASSIGNMENT = re.compile(r"^(\s*)([A-Za-z0-9_.\"'-]+)(\s*=\s*)(.*)$")


def mask_config_text(text: str) -> str:
    """Mask secrets line by line, keeping comments and layout (also for a file TOML cannot parse)."""
    out = []
    for line in text.splitlines():
        m = _ASSIGNMENT.match(line)
        if m and is_secret_key(m.group(2).strip("\"'").split(".")[-1]):
            line = f'{m.group(1)}{m.group(2)}{m.group(3)}"{MASK}"'
        out.append(mask_text(line))  # URL user-info and ?apikey=... inside any value
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def secret_paths(data: Any, prefix: str = "") -> dict[str, str]:
    """Every ``*_file`` key and the path it names: listed in the bundle, never read."""
    found: dict[str, str] = {}
    if isinstance(data, Mapping):
        for k, v in data.items():
            where = f"{prefix}.{k}" if prefix else str(k)
            if str(k).endswith("_file") and isinstance(v, str):
                found[where] = v
            else:
                found.update(secret_paths(v, where))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found.update(secret_paths(v, f"{prefix}[{i}]"))
    return found


# -- the SSH side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where to connect. ``identity`` is a private key file; None uses the SSH agent and ~/.ssh."""

    host: str
    user: str = "root"
    port: int = 22
    identity: str | None = None
    hotsite: str = DEFAULT_HOTSITE
    timeout_s: float = 10.0

    def connect(self) -> Any:
        from fabric import Connection

        kwargs: dict[str, Any] = {"banner_timeout": self.timeout_s}
        if self.identity:
            kwargs["key_filename"] = [self.identity]
            kwargs["look_for_keys"] = False
            kwargs["allow_agent"] = False
        return Connection(
            self.host, user=self.user, port=self.port, connect_kwargs=kwargs, connect_timeout=self.timeout_s
        )


@dataclass
class Step:
    name: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    elapsed_s: float


@dataclass
class Session:
    """One SSH connection; commands as root (through sudo when the user is not root)."""

    target: Target
    conn: Any = None
    steps: list[Step] = field(default_factory=list)

    def __enter__(self) -> Session:
        try:
            self.conn = self.target.connect()
            self.conn.open()
        except Exception as exc:  # paramiko and socket errors have no common base worth naming
            raise RemoteError(f"{self.target.host}: cannot connect over SSH: {exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def run(self, name: str, command: str, timeout_s: float = 60) -> Step:
        """Run ``command``; a non-zero exit is recorded, not raised (callers decide)."""
        sudo = "" if self.target.user == "root" else "sudo -n "
        started = time.monotonic()
        try:
            result = self.conn.run(
                f"{sudo}sh -c {shlex.quote(command)}",
                hide=True,
                warn=True,
                in_stream=False,
                timeout=timeout_s,
            )
            step = Step(
                name, command, int(result.exited), result.stdout, result.stderr, time.monotonic() - started
            )
        except Exception as exc:  # invoke's CommandTimedOut, SSH errors
            step = Step(name, command, -1, "", f"{type(exc).__name__}: {exc}", time.monotonic() - started)
        self.steps.append(step)
        return step

    def must(self, name: str, command: str, timeout_s: float = 60) -> Step:
        step = self.run(name, command, timeout_s)
        if step.exit_code != 0:
            detail = (step.stderr or step.stdout).strip().splitlines()
            raise RemoteError(
                f"{self.target.host}: {name} failed ({step.exit_code}): "
                f"{detail[-1] if detail else 'no output'}"
            )
        return step

    def read(self, path: str) -> str | None:
        step = self.run(f"read {path}", f"cat {shlex.quote(path)}")
        return step.stdout if step.exit_code == 0 else None

    def put_beside(self, data: bytes, dest: str, mode: str) -> str:
        """Upload ``data`` next to ``dest`` (same filesystem, so the later rename is atomic).

        Owner root; group that of the file it replaces, else hotsite when that
        group exists, else root.
        """
        tmp = f"{dest}.new-{int(time.time() * 1000)}"
        staging = f"/tmp/hotsite-upload-{int(time.time() * 1000)}"
        self.conn.put(io.BytesIO(data), staging)
        q = shlex.quote(dest)
        group = (
            f"$(stat -c %G {q} 2>/dev/null || (getent group hotsite >/dev/null && echo hotsite) || echo root)"
        )
        self.must(
            f"stage {dest}",
            f'install -m {mode} -o root -g "{group}" {shlex.quote(staging)} '
            f"{shlex.quote(tmp)}; rc=$?; rm -f {shlex.quote(staging)}; exit $rc",
        )
        return tmp


# -- diagnostics -----------------------------------------------------------------------


def collect_diagnostics(
    target: Target,
    output: Path,
    *,
    config_path: str = DEFAULT_CONFIG,
    journal_lines: int = 2000,
    units: tuple[str, ...] = ("hotsite", "hotsite-source", "hotsite-witness"),
) -> dict[str, Any]:
    """Write a ``.tar.gz`` bundle of ``target`` to ``output``; returns its manifest.

    Nothing in the bundle comes from a file a ``*_file`` key names, and every
    secret-looking key of the config is masked.
    """
    hotsite = shlex.quote(target.hotsite)
    venv_python = shlex.quote(str(Path(target.hotsite).parent / "python"))
    files: dict[str, str] = {}
    with Session(target) as s:
        raw = s.read(config_path)
        secrets: dict[str, str] = {}
        if raw is None:
            files["config/MISSING"] = f"{config_path} could not be read\n"
        else:
            files[f"config/{Path(config_path).name}"] = mask_config_text(raw)
            try:
                secrets = secret_paths(tomllib.loads(raw))
            except tomllib.TOMLDecodeError as exc:
                files["config/PARSE-ERROR"] = f"{exc}\n"
        files["config/secret-files.json"] = json.dumps(
            {"note": "paths named by *_file keys; their contents are not collected", "paths": secrets},
            indent=2,
        )
        commands = {
            "status.json": f"{hotsite} --config {shlex.quote(config_path)} status --json",
            "config-check.json": f"{hotsite} config check --json {shlex.quote(config_path)}",
            "versions/hotsite.txt": f"{hotsite} --version",
            "versions/pip-freeze.txt": f"{venv_python} -m pip freeze",
            "versions/os.txt": "uname -a; cat /etc/debian_version /etc/os-release 2>/dev/null",
            "versions/kamailio.txt": "kamailio -v 2>/dev/null || echo 'kamailio: not installed'",
            "system/uptime.txt": "uptime; df -h /var/lib /etc 2>/dev/null; free -m",
            "system/ip.txt": "ip -br addr; ip route",
            "system/units.txt": "systemctl --no-pager status " + " ".join(f"{u}.service" for u in units),
            "logs/var-log-hotsite.txt": "tail -n 2000 /var/log/hotsite/*.log 2>/dev/null || true",
        }
        for unit in units:
            commands[f"logs/journal-{unit}.txt"] = (
                f"journalctl --no-pager -o short-iso -n {journal_lines} -u {unit}"
            )
        for name, command in commands.items():
            step = s.run(name, command)
            text = step.stdout if step.exit_code == 0 else step.stdout + (step.stderr or "")
            # Every command's output, not only logs: status and config check quote URLs too.
            files[name] = mask_config_text(text) if text else text
        manifest = {
            "host": target.host,
            "collected_at": time.time(),
            "config": config_path,
            "steps": [
                {
                    "name": st.name,
                    "command": st.command,
                    "exit_code": st.exit_code,
                    "elapsed_s": round(st.elapsed_s, 3),
                }
                for st in s.steps
            ],
        }
    files["manifest.json"] = json.dumps(manifest, indent=2)
    output.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"hotsite-diag-{target.host}"
    with tarfile.open(output, "w:gz") as tar:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    return manifest


# -- config push ---------------------------------------------------------------------------


def push_config(
    target: Target, config: bytes, *, dest: str = DEFAULT_CONFIG, reload: bool = True
) -> dict[str, Any]:
    """Check ``config`` on the target, then put it in place atomically and reload the daemon.

    Raises ConfigError (exit 2) with the check's problems when the target's
    ``hotsite config check`` refuses it; the live config is then untouched.
    """
    hotsite = shlex.quote(target.hotsite)
    with Session(target) as s:
        tmp = s.put_beside(config, dest, "0640")
        check = s.run("config check", f"{hotsite} config check --json {shlex.quote(tmp)}")
        if check.exit_code != 0:
            s.run("discard", f"rm -f {shlex.quote(tmp)}")
            try:
                report = json.loads(check.stdout)
                problems = [str(p) for p in report.get("problems") or []] or [str(report.get("error"))]
            except (ValueError, AttributeError):
                problems = [(check.stderr or check.stdout).strip() or f"exit status {check.exit_code}"]
            raise ConfigError(f"{target.host}: the new config was refused; {dest} is unchanged", problems)
        q = shlex.quote(dest)
        s.must("install", f"if [ -e {q} ]; then cp -p {q} {q}.bak; fi; mv -f {shlex.quote(tmp)} {q}")
        reloaded = None
        if reload:
            step = s.run("reload", "systemctl is-active --quiet hotsite && systemctl reload hotsite")
            reloaded = step.exit_code == 0
    return {"host": target.host, "installed": dest, "backup": f"{dest}.bak", "reloaded": reloaded}


# -- credential rotation ---------------------------------------------------------------------


def _tls_paths(text: str | None, table: str, where: str) -> tuple[str, str]:
    if text is None:
        raise RemoteError(f"{where}: config not readable")
    try:
        section = tomllib.loads(text).get(table) or {}
    except tomllib.TOMLDecodeError as exc:
        raise RemoteError(f"{where}: config does not parse: {exc}") from None
    cert, key = section.get("tls_cert_file"), section.get("tls_key_file")
    if not (isinstance(cert, str) and isinstance(key, str)):
        raise RemoteError(f"{where}: [{table}] has no tls_cert_file and tls_key_file")
    return cert, key


def rotate_replication_credentials(
    appliance: Target,
    source: Target,
    ca_dir: Path,
    *,
    appliance_config: str = DEFAULT_CONFIG,
    source_config: str = DEFAULT_SOURCE_CONFIG,
    client_name: str = "backup-appliance",
    server_name: str = "primary-source",
    server_hosts: tuple[str, ...] = (),
) -> dict[str, Any]:
    """New certificates for both ends of the replication link, signed by the CA in ``ca_dir``.

    The paths come from each end's own config (``[replication]`` at the
    appliance, ``[source]`` at the primary). Each new pair is staged beside the
    old one and renamed into place; the source agent is restarted and the
    appliance reloaded so both present the new certificates. ``client_name``
    must be one of the source's ``allowed_clients`` (when it restricts them).
    """
    from appliance.replication import certs

    if not (ca_dir / "ca.pem").is_file() or not (ca_dir / "ca.key").is_file():
        raise ConfigError(f"{ca_dir}: needs ca.pem and ca.key (the replication CA)")
    done: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hotsite-rotate-") as tmp:
        work = Path(tmp)
        for name in ("ca.pem", "ca.key"):
            (work / name).write_bytes((ca_dir / name).read_bytes())
        hosts = list(server_hosts) or [source.host]
        server_cert, server_key = certs.issue(work, server_name, hosts=hosts, server=True)
        client_cert, client_key = certs.issue(work, client_name, hosts=[], server=False)
        plan = (
            (source, source_config, "source", server_cert, server_key, "hotsite-source", "restart"),
            (appliance, appliance_config, "replication", client_cert, client_key, "hotsite", "reload"),
        )
        for target, config, table, cert, key, unit, action in plan:
            with Session(target) as s:
                cert_path, key_path = _tls_paths(s.read(config), table, f"{target.host}:{config}")
                staged = [
                    (s.put_beside(cert.read_bytes(), cert_path, "0644"), cert_path),
                    (s.put_beside(key.read_bytes(), key_path, "0640"), key_path),
                ]
                s.must(
                    "install certificate",
                    "; ".join(f"mv -f {shlex.quote(a)} {shlex.quote(b)}" for a, b in staged),
                )
                step = s.run(action, f"systemctl is-active --quiet {unit} && systemctl {action} {unit}")
                done[target.host] = {
                    "certificate": cert_path,
                    "key": key_path,
                    "unit": unit,
                    action + "ed" if action == "reload" else "restarted": step.exit_code == 0,
                }
    return done
