"""hotsite's systemd unit: what a configuration needs of it, checked and rendered.

The daemon runs under a sandbox (``ProtectSystem=strict``, a closed device
policy, a short list of address families and capabilities). Every one of
those settings forbids something a configuration may ask for: a netlink
actuator's gratuitous ARP opens an ``AF_PACKET`` socket; the Kamailio
actuator replaces its dispatcher list through a temporary file beside it; a
replica lives wherever ``replica`` says; the GSM modem is a character
device. A unit that forbids one of them does not fail at start but at the
moment that feature is used — during a failover, or the page about it.

So the needs are computed from the configuration in one place,
:func:`needs`, and used twice: :func:`check` reads a unit (and its drop-ins)
and names, for every need it forbids, the unit setting to change
(``hotsite config check --unit FILE``); :func:`render` writes the unit that
grants exactly those needs (``hotsite unit render``, the appliance role, the
image build). ``images/systemd/hotsite.service`` is :func:`render` of the
example configuration.

Hook commands (``type = "hook"``, ``post_change_command``) run inside the
same sandbox; what they write is not known to hotsite, so a hook that writes
outside the paths below needs a drop-in of its own.
"""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import os
import pwd
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.config import Config, GsmChannelSettings, KamailioActuatorSettings, NetlinkActuatorSettings
from appliance.errors import ConfigError

DIRECTORY_SETTINGS = ("StateDirectory=", "RuntimeDirectory=", "CacheDirectory=", "LogsDirectory=")
BASE_FAMILIES = ("AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK")
# Directories a udev-named modem (images/udev/99-hotsite-modem.rules.j2) can point to:
# USB serial drivers (option, qcserial: ttyUSB) and CDC ACM (ttyACM).
UDEV_MODEM_CLASSES = ("char-ttyUSB", "char-ttyACM")
DEFAULT_VENV = Path("/opt/hotsite")
DEFAULT_CONFIG = Path("/etc/hotsite/hotsite.toml")


@dataclass(frozen=True)
class WrittenPath:
    """A directory the daemon must be able to write, and the config key that makes it so."""

    path: PurePosixPath
    key: str
    why: str


@dataclass
class Needs:
    """What a configuration asks of the unit; each item keeps the reason (a config key)."""

    families: dict[str, str] = field(default_factory=dict)
    capabilities: dict[str, str] = field(default_factory=dict)
    writes: list[WrittenPath] = field(default_factory=list)
    devices: dict[str, PurePosixPath] = field(default_factory=dict)  # config key -> device path


def needs(config: Config) -> Needs:
    """Everything ``config`` makes the daemon do that a sandbox can forbid."""
    out = Needs()
    for family in BASE_FAMILIES:
        out.families[family] = "the control socket, sd_notify, probes, link events and name lookups"
    for name, actuator in config.actuators.items():
        key = f"actuators.{name}"
        if isinstance(actuator, NetlinkActuatorSettings):
            out.capabilities["CAP_NET_ADMIN"] = f"{key} (type netlink) adds and removes {actuator.address}"
            if actuator.garp_count > 0:
                why = f"{key} (type netlink) sends gratuitous ARP (garp_count = {actuator.garp_count})"
                out.families["AF_PACKET"] = f"{why} on an AF_PACKET socket"
                out.capabilities["CAP_NET_RAW"] = f"{why} on a raw packet socket"
        elif isinstance(actuator, KamailioActuatorSettings):
            _kamailio_writes(config, key, actuator, out)
    for site, section in config.sites.items():
        for check_name, check in section.checks.items():
            if check.url.lower().startswith("icmp://") and "CAP_NET_RAW" not in out.capabilities:
                out.capabilities["CAP_NET_RAW"] = (
                    f"sites.{site}.checks.{check_name} pings {check.url} (a raw socket where "
                    "net.ipv4.ping_group_range leaves out the service's group)"
                )
    appliance = config.appliance
    out.writes.append(
        WrittenPath(PurePosixPath(appliance.state_dir), "appliance.state_dir", "the SQLite state")
    )
    out.writes.append(
        WrittenPath(PurePosixPath(appliance.runtime_dir), "appliance.runtime_dir", "the control socket")
    )
    for name, stream in config.replication.streams.items():
        replica = PurePosixPath(stream.replica)
        out.writes.append(
            WrittenPath(
                replica.parent,
                f"replication.streams.{name}.replica",
                f"{replica} and its {replica.name}.hotsite* directories are made beside it",
            )
        )
    for name, channel in config.channels.items():
        if isinstance(channel, GsmChannelSettings):
            out.devices[f"channels.{name}.device"] = PurePosixPath(channel.device)
    return out


def _kamailio_writes(config: Config, key: str, actuator: KamailioActuatorSettings, out: Needs) -> None:
    listed = config.kamailio.dispatcher_list
    if listed is not None:
        path = PurePosixPath(listed)
        out.writes.append(
            WrittenPath(
                path.parent,
                "kamailio.dispatcher_list",
                f"{path} is replaced through a temporary file in {path.parent} (with its .token file)",
            )
        )
    if actuator.token_file is not None:
        token = PurePosixPath(actuator.token_file)
        out.writes.append(
            WrittenPath(token.parent, f"{key}.token_file", f"{token} is replaced through a temporary file")
        )


# --------------------------------------------------------------------- reading


@dataclass
class Unit:
    """The ``[Service]`` settings of a unit file and its drop-ins, every assignment in order."""

    source: str
    settings: dict[str, list[str]] = field(default_factory=dict)

    def last(self, name: str, default: str = "") -> str:
        values = self.settings.get(name, [])
        return values[-1] if values else default

    def values(self, name: str) -> list[str]:
        """A list setting: space-separated words of every assignment; an empty one resets."""
        words: list[str] = []
        for value in self.settings.get(name, []):
            words = [] if not value else words + value.split()
        return words


def read_unit(path: Path) -> Unit:
    """``path`` then its drop-ins (``path.d/*.conf``, in name order), as systemd reads them."""
    unit = Unit(str(path))
    _parse_into(unit, path.read_text())
    dropins = Path(str(path) + ".d")
    if dropins.is_dir():
        for conf in sorted(dropins.glob("*.conf")):
            _parse_into(unit, conf.read_text())
            unit.source += f" + {conf.name}"
    return unit


def parse_unit(text: str, source: str = "<unit>") -> Unit:
    unit = Unit(source)
    _parse_into(unit, text)
    return unit


def _parse_into(unit: Unit, text: str) -> None:
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service" and "=" in line:
            name, value = line.split("=", 1)
            unit.settings.setdefault(name.strip(), []).append(value.strip())


# --------------------------------------------------------------------- checking


def _set_state(unit: Unit, name: str) -> tuple[bool, set[str]] | None:
    """An allow/deny list (``RestrictAddressFamilies=``, capability sets): None = unrestricted,
    else (allowing, items): allowing=True lists what is allowed, False what is denied."""
    state: tuple[bool, set[str]] | None = None
    for value in unit.settings.get(name, []):
        if not value:
            state = None
            continue
        invert = value.startswith("~")
        words = set(value.lstrip("~").split())
        if words == {"none"}:
            state = (True, set())
        elif state is None:
            state = (not invert, words)
        elif state[0] != invert:  # same sense: add
            state = (state[0], state[1] | words)
        else:
            state = (state[0], state[1] - words)
    return state


def _allows(state: tuple[bool, set[str]] | None, item: str) -> bool:
    if state is None:
        return True
    allowing, items = state
    return (item in items) == allowing


def check_file(path: Path, config: Config) -> list[str]:
    """:func:`check` and :func:`check_host` of the unit file ``path`` (and its drop-ins), each
    problem prefixed with it: what `hotsite config check --unit` prints, run on the target host."""
    try:
        unit = read_unit(path)
    except FileNotFoundError:
        raise ConfigError(f"unit file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"unit file {path} cannot be read: {exc}") from None
    problems = check(unit, config) + check_host(unit, config)
    return [f"unit {unit.source}: {problem}" for problem in problems]


def check_host(unit: Unit, config: Config) -> list[str]:
    """What this host's file system makes of the unit: ``ReadWritePaths=`` that do not exist
    (the unit would not start), written directories its User cannot write by owner and mode."""
    problems = _missing_paths(unit)
    for written in needs(config).writes:
        what, setting = access(unit, written.path)
        if what == "writable" and not setting.startswith(DIRECTORY_SETTINGS):  # those systemd chowns
            problems += _owner_problems(unit, written)
    return problems


def check(unit: Unit, config: Config) -> list[str]:
    """Every need of ``config`` that ``unit`` forbids, each naming the unit setting to change."""
    wanted = needs(config)
    return (
        _check_families(unit, wanted)
        + _check_capabilities(unit, wanted)
        + _check_writes(unit, wanted)
        + _check_devices(unit, wanted)
    )


def _check_families(unit: Unit, wanted: Needs) -> list[str]:
    state = _set_state(unit, "RestrictAddressFamilies")
    return [
        f"{why}: the unit's RestrictAddressFamilies= leaves out {family}; add {family} to it"
        for family, why in wanted.families.items()
        if not _allows(state, family)
    ]


def _ping_sockets_cover(unit: Unit) -> bool:
    """Whether this host lets the unit's group send ICMP echo without CAP_NET_RAW."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ping_group_range").read_text().split())
        gid = grp.getgrnam(unit.last("Group") or unit.last("User") or "root").gr_gid
    except (OSError, ValueError, KeyError):
        return False
    return low <= gid <= high


def _check_capabilities(unit: Unit, wanted: Needs) -> list[str]:
    bounding = _set_state(unit, "CapabilityBoundingSet")
    ambient = _set_state(unit, "AmbientCapabilities")
    root = unit.last("User", "root") in ("root", "0")
    problems = []
    for cap, why in wanted.capabilities.items():
        if cap == "CAP_NET_RAW" and "AF_PACKET" not in wanted.families and _ping_sockets_cover(unit):
            continue  # ICMP only, and ping sockets serve the group here
        if not _allows(bounding, cap):
            problems.append(f"{why}: needs {cap}, which the unit's CapabilityBoundingSet= leaves out; add it")
        if not root and (ambient is None or not _allows(ambient, cap)):
            problems.append(
                f"{why}: needs {cap}, which User={unit.last('User')} only has through "
                "AmbientCapabilities=; add it there"
            )
    return problems


def _rules(unit: Unit) -> list[tuple[PurePosixPath, str, str]]:
    """(path, access, setting) for every path the unit's sandbox decides; most specific wins."""
    rules: list[tuple[PurePosixPath, str, str]] = []
    protect = unit.last("ProtectSystem", "no")
    if protect == "strict":
        rules.append((PurePosixPath("/"), "read-only", "ProtectSystem=strict"))
        rules += [(PurePosixPath(p), "writable", "API file system") for p in ("/dev", "/proc", "/sys")]
    elif protect in ("yes", "true", "full"):
        ro = ["/usr", "/boot", "/efi"] + (["/etc"] if protect == "full" else [])
        rules += [(PurePosixPath(p), "read-only", f"ProtectSystem={protect}") for p in ro]
    home = unit.last("ProtectHome", "no")
    if home in ("yes", "true", "read-only", "tmpfs"):
        access = "inaccessible" if home in ("yes", "true") else "read-only"
        rules += [(PurePosixPath(p), access, f"ProtectHome={home}") for p in ("/home", "/root", "/run/user")]
    if unit.last("PrivateTmp", "no") in ("yes", "true"):
        rules += [(PurePosixPath(p), "private", "PrivateTmp=yes") for p in ("/tmp", "/var/tmp")]
    for name, base in (
        ("StateDirectory", "/var/lib"),
        ("RuntimeDirectory", "/run"),
        ("CacheDirectory", "/var/cache"),
        ("LogsDirectory", "/var/log"),
    ):
        for word in unit.values(name):
            rules.append((PurePosixPath(base) / word.split(":")[0], "writable", f"{name}={word}"))
    for name, access in (
        ("ReadWritePaths", "writable"),
        ("ReadOnlyPaths", "read-only"),
        ("InaccessiblePaths", "inaccessible"),
    ):
        for word in unit.values(name):
            rules.append((PurePosixPath(word.lstrip("-+")), access, f"{name}={word}"))
    return rules


def access(unit: Unit, path: PurePosixPath) -> tuple[str, str]:
    """How the unit's sandbox leaves ``path``: (writable|read-only|inaccessible|private, by which setting)."""
    best: tuple[int, str, str] = (-1, "writable", "no file-system sandbox")
    for prefix, what, setting in _rules(unit):
        if path == prefix or prefix in path.parents:
            depth = len(prefix.parts)
            if depth >= best[0]:
                best = (depth, what, setting)
    return best[1], best[2]


def _check_writes(unit: Unit, wanted: Needs) -> list[str]:
    problems = []
    for written in wanted.writes:
        what, setting = access(unit, written.path)
        if what == "writable":
            continue
        if what == "private":
            problems.append(
                f"{written.key}: {written.why}; {written.path} is private to the service under "
                f"{setting}: no other process sees what it writes there; choose a path outside "
                "/tmp and /var/tmp"
            )
            continue
        problems.append(
            f"{written.key}: {written.why}; {setting} makes {written.path} {what}: "
            f"add ReadWritePaths={written.path} to the unit"
        )
    return problems


def _missing_paths(unit: Unit) -> list[str]:
    """A ``ReadWritePaths=`` entry (without ``-``) that does not exist stops the unit starting."""
    return [
        f"ReadWritePaths={word}: {word} does not exist here, so the unit would not start"
        f" (status 226/NAMESPACE); create it, or write ReadWritePaths=-{word}"
        for word in unit.values("ReadWritePaths")
        if not word.startswith("-") and not os.path.exists(word.lstrip("+"))
    ]


def _user_groups(unit: Unit, user: pwd.struct_passwd) -> set[int]:
    gids = {user.pw_gid}
    for name in [unit.last("Group"), *unit.values("SupplementaryGroups")]:
        with contextlib.suppress(KeyError):
            gids.add(grp.getgrnam(name).gr_gid) if name else None
    gids |= {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    return gids


def _owner_problems(unit: Unit, written: WrittenPath) -> list[str]:
    """The unit lets the daemon write ``written.path``; can its User, by the directory's owner and mode?"""
    try:
        user = pwd.getpwnam(unit.last("User", "root"))
    except KeyError:
        return []  # not this host's user (checked on a build machine): nothing to judge
    if user.pw_uid == 0:
        return []
    path = Path(written.path)
    while not path.exists() and path != path.parent:
        path = path.parent  # the daemon makes the missing part: it needs the nearest existing one
    st = path.stat()
    if st.st_uid == user.pw_uid:
        allowed = bool(st.st_mode & stat.S_IWUSR)
    elif st.st_gid in _user_groups(unit, user):
        allowed = bool(st.st_mode & stat.S_IWGRP)
    else:
        allowed = bool(st.st_mode & stat.S_IWOTH)
    if allowed:
        return []
    owner = f"{_name(pwd.getpwuid, st.st_uid)}:{_name(grp.getgrgid, st.st_gid)}"
    return [
        f"{written.key}: {written.why}; {path} is {owner} mode {stat.S_IMODE(st.st_mode):04o}, which"
        f" User={user.pw_name} cannot write (not a unit setting: give it to {user.pw_name}, or a group"
        " of its with g+w)"
    ]


def _name(lookup: Any, number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def _device_classes(path: PurePosixPath) -> list[str]:
    """The ``DeviceAllow=char-NAME`` classes that may hold ``path``, by its name or its node."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISCHR(st.st_mode):
        major = os.major(st.st_rdev)
        return [f"char-{name}" for number, name in _proc_devices() if number == major]
    real = PurePosixPath(os.path.realpath(path))
    if real.parent == PurePosixPath("/dev/pts"):
        return ["char-pts"]
    match = re.fullmatch(r"(tty[A-Za-z]+)[0-9]+", real.name)
    if match:
        return [f"char-{match.group(1)}"]
    return list(UDEV_MODEM_CLASSES) if st is None else []


def _proc_devices() -> list[tuple[int, str]]:
    try:
        text = Path("/proc/devices").read_text()
    except OSError:
        return []
    out, in_char = [], False
    for line in text.splitlines():
        if line.startswith("Character devices"):
            in_char = True
        elif line.startswith("Block devices"):
            in_char = False
        elif in_char and line.strip():
            number, name = line.split(None, 1)
            out.append((int(number), name.strip()))
    return out


def _device_allowed(unit: Unit, path: PurePosixPath) -> bool:
    entries = unit.settings.get("DeviceAllow", [])
    allowed: list[tuple[str, str]] = []
    for value in entries:
        if not value:
            allowed = []
            continue
        spec, _, perms = value.partition(" ")
        allowed.append((spec, perms.strip() or "rwm"))
    policy = unit.last("DevicePolicy", "auto")
    if policy == "auto" and not allowed:
        return True
    real = os.path.realpath(path)
    classes = _device_classes(path)
    if "char-pts" in classes and policy != "strict":
        return True  # closed (and auto with DeviceAllow=) add char-pts themselves
    for spec, perms in allowed:
        if not {"r", "w"} <= set(perms):
            continue
        if spec in (str(path), real):
            return True
        if any(fnmatch.fnmatch(c, spec) for c in classes):
            return True
    return False


def _check_devices(unit: Unit, wanted: Needs) -> list[str]:
    problems = []
    for key, path in wanted.devices.items():
        if _device_allowed(unit, path):
            continue
        classes = (
            " or ".join(f"DeviceAllow={c} rw" for c in _device_classes(path)) or f"DeviceAllow={path} rw"
        )
        problems.append(
            f"{key}: the modem {path} is a device the unit's DeviceAllow= (DevicePolicy="
            f"{unit.last('DevicePolicy', 'auto')}) does not allow read-write; add {classes}"
        )
    return problems


# --------------------------------------------------------------------- rendering

HARDENING = """\
NoNewPrivileges=yes
UMask=0077

ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
ProtectProc=invisible
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
# A call outside the filter fails with EPERM (logged by the daemon) instead of killing it.
SystemCallErrorNumber=EPERM
DevicePolicy=closed
"""


def _directory_settings(config: Config) -> tuple[list[str], list[PurePosixPath]]:
    """StateDirectory=/RuntimeDirectory= for the configured state and runtime directories where
    systemd can own them (one level under /var/lib and /run), else ReadWritePaths."""
    lines, extra = [], []
    for name, base, path in (
        ("StateDirectory", "/var/lib", config.appliance.state_dir),
        ("RuntimeDirectory", "/run", config.appliance.runtime_dir),
    ):
        posix = PurePosixPath(path)
        if posix.parent == PurePosixPath(base):
            mode = "0700" if name == "StateDirectory" else "0755"
            lines += [f"{name}={posix.name}", f"{name}Mode={mode}"]
        else:
            extra.append(posix)
    return lines, extra


def _read_write_paths(config: Config, wanted: Needs, extra: Iterable[PurePosixPath]) -> list[PurePosixPath]:
    """Directories outside the State/Runtime directories, none listed under another."""
    covered = {PurePosixPath(config.appliance.state_dir), PurePosixPath(config.appliance.runtime_dir)} - set(
        extra
    )
    paths = sorted(set(extra) | {w.path for w in wanted.writes})
    out: list[PurePosixPath] = []
    for path in paths:
        if any(path == c or c in path.parents for c in covered | set(out)):
            continue
        out.append(path)
    return out


def _device_lines(wanted: Needs) -> list[str]:
    classes: list[str] = []
    for path in wanted.devices.values():
        for c in _device_classes(path) or [str(path)]:
            if c not in classes and c != "char-pts":  # DevicePolicy=closed allows ptys itself
                classes.append(c)
    return [f"DeviceAllow={c} rw" for c in classes]


def _supplementary_groups(config: Config, wanted: Needs) -> list[str]:
    """dialout for the modem's tty (root:dialout unless the udev rule made it group hotsite);
    the socket group, since handing the control socket to a group takes membership (chgrp)."""
    groups, why = [], []
    if wanted.devices:
        groups.append("dialout")
    if config.appliance.socket_group:
        groups.append(config.appliance.socket_group)
        group = config.appliance.socket_group
        why.append(f"# {group}: to hand the control socket to the CLI group (SECURITY.md).")
    return [*why, f"SupplementaryGroups={' '.join(groups)}"] if groups else []


def render(config: Config, *, config_path: Path = DEFAULT_CONFIG, venv: Path = DEFAULT_VENV) -> str:
    """The unit that runs ``config``: its sandbox grants what :func:`needs` lists, nothing else."""
    wanted = needs(config)
    directories, extra = _directory_settings(config)
    rw = _read_write_paths(config, wanted, extra)
    caps = sorted(wanted.capabilities)
    families = [f for f in (*BASE_FAMILIES, "AF_PACKET") if f in wanted.families]
    groups = _supplementary_groups(config, wanted)
    lines = [
        "# hotsite appliance daemon. Rendered by `hotsite unit render` from the configuration it",
        "# runs: the paths, devices, address families and capabilities below are what that",
        "# configuration needs (appliance/systemd_unit.py); `hotsite config check --unit` checks",
        "# a hand-edited copy. Install to /etc/systemd/system/hotsite.service.",
        "[Unit]",
        "Description=hotsite disaster-recovery site appliance",
        "Documentation=file:///opt/hotsite/README.md",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={venv}/bin/hotsite --config {config_path} run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=always",
        "RestartSec=2",
        "WatchdogSec=30",
        "TimeoutStopSec=20",
        "",
        "User=hotsite",
        "Group=hotsite",
        *groups,
        *(f"# {c}: {wanted.capabilities[c]}." for c in caps),
        *([f"AmbientCapabilities={' '.join(caps)}"] if caps else []),
        f"CapabilityBoundingSet={' '.join(caps)}",
        *directories,
        "ConfigurationDirectory=hotsite",
        "# The config holds no secret (those are in secrets/, 0700): CLI users read it to find the socket.",
        "ConfigurationDirectoryMode=0755",
        *(f"# {w.key}: {w.why}." for w in wanted.writes if w.path in rw),
        *(f"ReadWritePaths={p}" for p in rw),
        "",
        HARDENING.rstrip("\n"),
        f"RestrictAddressFamilies={' '.join(families)}",
        *_device_lines(wanted),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"
