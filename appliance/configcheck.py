"""What ``config check`` verifies beyond the schema: the files, the listeners, the secrets.

Why here and not in the schema: these rules look at the machine (does the
file exist, who may read it) or at several keys at once (a password sent
over a URL that is plain ``http://``). The schema stays pure; the daemon and
``config check`` call the same functions so that what ``check`` passes,
``run`` starts.

* :func:`read_text` reads a config file without ever hanging or exhausting
  memory: regular files only (a FIFO, ``/dev/zero`` or a directory is
  refused), at most :data:`MAX_CONFIG_BYTES`.
* :func:`check_depth` refuses documents nested deeper than
  :data:`MAX_DEPTH` (a deeply nested array otherwise overflows a parser's
  recursion).
* :func:`file_problems` checks every path the config names (every key that
  ends ``_file``, the modem device, the hook commands, the state and runtime
  directories): it exists, is of the right kind, the service user can read
  it, and a secret is not readable by others (mode no wider than 0640).
* :func:`problems` are mistakes that make ``run`` refuse to start (an
  unauthenticated receiver nobody asked for).
* :func:`warnings` names every credential that would travel in clear.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from appliance import roles
from appliance.fields import host_port
from appliance.paging.settings import SmtpChannelSettings, WebhookChannelSettings

if TYPE_CHECKING:
    from appliance.config import Config

MAX_CONFIG_BYTES = 1024 * 1024
MAX_DEPTH = 32
SERVICE_USER = "hotsite"
SECRET_MODE_MASK = 0o137  # bits a secret must not have: group write/exec, anything for others
SECRET_KEYS = ("token_file", "password_file", "secret_file", "pin_file", "key_file", "credentials_file")


def read_text(path: Path, what: str = "config file") -> str:
    """A config file's text; ValueError (with the reason) for anything but a small regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} {path} cannot be read: it is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{what} {path} is {info.st_size} bytes; at most {MAX_CONFIG_BYTES} are read")
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{what} {path} is larger than {MAX_CONFIG_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def check_depth(data: Any, limit: int = MAX_DEPTH) -> str | None:
    """The key path where ``data`` nests deeper than ``limit``, or None. Iterative: no recursion."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > limit:
            return where or "(top level)"
        if isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    return None


def tolerant_depth_scan(text: str, limit: int = MAX_DEPTH) -> bool:
    """True if the brackets of ``text`` (outside strings, roughly) nest deeper than ``limit``.

    A cheap guard run *before* the TOML parser, whose recursion a deeply
    nested inline array would exhaust. Over-counting inside strings can only
    refuse a pathological file, never accept a deep one.
    """
    depth = 0
    for char in text:
        if char in "[{":
            depth += 1
            if depth > limit + 2:  # a [[table]] header opens two brackets at once
                return True
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "\n":
            depth = depth if depth > 2 else 0  # headers close on their own line
    return False


# ---------------------------------------------------------------------------
# Files the config names


def _paths(model: BaseModel, where: str = "") -> Iterator[tuple[str, str, Any]]:
    """(key path, key name, value) of every field, depth first, through sections, dicts and lists."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{where}.{name}" if where else name
        yield path, name, value
        if isinstance(value, BaseModel):
            yield from _paths(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    yield from _paths(item, f"{path}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _paths(item, f"{path}[{i}]")


def _service_ids() -> tuple[int, set[int]] | None:
    """The service user's uid and groups when we are root and it exists; None: check as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return entry.pw_uid, set(os.getgrouplist(SERVICE_USER, entry.pw_gid))


def _can(info: os.stat_result, want: int, ids: tuple[int, set[int]] | None, path: Path) -> bool:
    """``want`` is a combination of 4 (read), 2 (write), 1 (execute), judged for the service user."""
    if ids is None:
        flags = (os.R_OK if want & 4 else 0) | (os.W_OK if want & 2 else 0) | (os.X_OK if want & 1 else 0)
        return os.access(path, flags)
    uid, gids = ids
    if uid == 0:
        return True
    shift = 6 if info.st_uid == uid else 3 if info.st_gid in gids else 0
    return (info.st_mode >> shift) & want == want


def file_problems(config: Config) -> list[str]:
    """Every named file: exists, right kind, usable by the service user; secrets not world-readable."""
    ids = _service_ids()
    who = SERVICE_USER if ids else "this user"
    out: list[str] = []
    for where, name, value in _paths(config):
        if isinstance(value, Path) and name.endswith("_file"):
            out += _one_file(where, value, ids, who, secret=name.endswith(SECRET_KEYS))
        elif name == "device" and isinstance(value, str | Path) and str(value).startswith("/"):
            out += _one_file(where, Path(value), ids, who, want=6, device=True)
        elif name in ("command", "post_change_command") and isinstance(value, list) and value:
            out += _command(where, str(value[0]), ids, who)
    out += roles.problems(config.appliance)
    for key in ("state_dir", "runtime_dir"):
        path: Path = getattr(config.appliance, key)
        if path.exists() and not path.is_dir():
            out.append(f"appliance.{key}: {str(path)!r} exists and is not a directory")
    return out


def _one_file(
    where: str,
    path: Path,
    ids: tuple[int, set[int]] | None,
    who: str,
    *,
    secret: bool = False,
    want: int = 4,
    device: bool = False,
) -> list[str]:
    try:
        info = path.stat()
    except FileNotFoundError:
        return [f"{where}: {str(path)!r} does not exist"]
    except OSError as exc:
        return [f"{where}: {str(path)!r} cannot be checked: {exc.strerror}"]
    if device:
        if not stat.S_ISCHR(info.st_mode):
            return [f"{where}: {str(path)!r} is not a character device"]
    elif not stat.S_ISREG(info.st_mode):
        return [f"{where}: {str(path)!r} is {_kind(info.st_mode)}; expected a regular file"]
    out = []
    if not _can(info, want, ids, path):
        verb = "read and write" if want == 6 else "read"
        out.append(f"{where}: {str(path)!r} exists but {who} cannot {verb} it")
    if secret and info.st_mode & SECRET_MODE_MASK:
        out.append(
            f"{where}: {str(path)!r} has mode {stat.S_IMODE(info.st_mode):04o}; a secret must be 0600"
            " or 0640 at most (chmod 0600, owned by the service user)"
        )
    return out


def _command(where: str, argv0: str, ids: tuple[int, set[int]] | None, who: str) -> list[str]:
    if "/" not in argv0:
        return []  # looked up in PATH when run
    path = Path(argv0)
    try:
        info = path.stat()
    except OSError:
        return [f"{where}[0]: {argv0!r} does not exist"]
    if not stat.S_ISREG(info.st_mode) or not _can(info, 1, ids, path):
        return [f"{where}[0]: {argv0!r} is not a program {who} can run"]
    return []


# ---------------------------------------------------------------------------
# Listeners and credentials


def problems(config: Config) -> list[str]:
    """Settings that make ``run`` refuse to start; named by key."""
    out = []
    paging = config.paging
    if (
        paging.alertmanager_listen
        and paging.alertmanager_token_file is None
        and not paging.alertmanager_allow_unauthenticated
    ):
        out.append(
            "paging.alertmanager_token_file: required with paging.alertmanager_listen (anyone who reaches"
            " the receiver could page the on-call contractor); set"
            " paging.alertmanager_allow_unauthenticated = true only if you really mean it"
        )
    return out


def warnings(config: Config) -> list[str]:
    """Valid settings that expose something: an open receiver, credentials in clear."""
    out = roles.warnings(config.appliance)
    paging = config.paging
    if paging.alertmanager_listen and paging.alertmanager_token_file is None:
        out.append(
            "paging.alertmanager_allow_unauthenticated: the Alertmanager receiver accepts alerts from anyone"
            f" who reaches {paging.alertmanager_listen}"
        )
    for name, channel in config.channels.items():
        if (
            isinstance(channel, SmtpChannelSettings)
            and channel.password_file is not None
            and not channel.starttls
        ):
            out.append(
                f"channels.{name}.starttls: false with a password_file: SMTP AUTH sends the password in clear"
            )
        if (
            isinstance(channel, WebhookChannelSettings)
            and _plain(channel.url)
            and channel.secret_file is not None
        ):
            out.append(f"channels.{name}.url: plain http:// with a secret_file: the secret travels in clear")
    witness = config.failover.witness
    if witness and _plain(witness):
        token = " and its token" if config.failover.witness_token_file else ""
        out.append(
            f"failover.witness: plain http://: votes{token} travel in clear and can be forged; use https://"
        )
    coordination = config.coordination
    plain = [url for url in coordination.endpoints if _plain(url)]
    if plain and coordination.credentials_file is not None:
        out.append(
            f"coordination.endpoints: {plain[0]!r} is plain http:// and the etcd password goes in clear"
        )
    for where, _name, value in _paths(config):
        if isinstance(value, str) and "://" in value and "@" in (urlsplit(value).netloc or ""):
            out.append(f"{where}: the URL holds a user name or password; put secrets in a *_file instead")
    metrics = config.metrics
    exposed = metrics.enabled and not _loopback(host_port(metrics.listen)[0])
    if exposed and getattr(metrics, "tls_cert_file", None) is None:
        out.append(f"metrics.listen: {metrics.listen} is reachable from the network without TLS")
    return out


def _plain(url: str) -> bool:
    return url.lower().startswith("http://") and not _loopback(urlsplit(url).hostname or "")


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
