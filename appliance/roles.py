"""Who may do what on the control socket: the read-only role and the operator role.

The socket's file mode decides who can connect at all (0660, group
``appliance.socket_group``); this module decides what a connected caller may
do, from the credentials the kernel reports for the peer (``SO_PEERCRED``:
uid and primary gid; ``SO_PEERGROUPS``: its supplementary groups), never
from anything the client says.

* **operator**: everything (failover, failback, approve, cancel, maintenance,
  drill, ack, page, note, promote, reload…). Root and the daemon's own user
  always; then ``appliance.operator_uids`` and members of
  ``appliance.operator_groups``.
* **read-only**: :data:`READ_ONLY_METHODS` (status, trunks, probes,
  incidents, events, on-call, replication status…): ``appliance.read_only_uids``
  and members of ``appliance.read_only_groups``.
* When neither list names anybody, members of ``socket_group`` are operators
  (the behaviour before roles existed; ``config check`` warns).
* Anybody else who managed to connect gets nothing.

A method not listed as read-only needs the operator role: a new method is
closed until somebody decides it is harmless.
"""

from __future__ import annotations

import grp
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from appliance.logs import kv

if TYPE_CHECKING:
    from appliance.api import Caller
    from appliance.core_settings import ApplianceSection

log = logging.getLogger(f"hotsite.{__name__}")

Role = Literal["operator", "read-only"]
READ_ONLY_METHODS = frozenset(
    {
        "ping",
        "status",
        "trunks",
        "probes",
        "events",
        "incidents",
        "oncall",
        "coordination.status",
        "replication.status",
        "replication.snapshots",
    }
)


@dataclass(frozen=True, slots=True)
class RolePolicy:
    operator_uids: frozenset[int] = frozenset()
    operator_gids: frozenset[int] = frozenset()
    read_only_uids: frozenset[int] = frozenset()
    read_only_gids: frozenset[int] = frozenset()
    service_uid: int = -1

    def role(self, caller: Caller) -> Role | None:
        groups = {caller.gid, *caller.groups}
        if caller.uid in (0, self.service_uid) or caller.uid in self.operator_uids:
            return "operator"
        if groups & self.operator_gids:
            return "operator"
        if caller.uid in self.read_only_uids or groups & self.read_only_gids:
            return "read-only"
        return None

    def refusal(self, caller: Caller, method: str) -> str | None:
        """None if ``caller`` may call ``method``; otherwise the reason, for the caller and the log."""
        role = self.role(caller)
        if role == "operator" or (role == "read-only" and method in READ_ONLY_METHODS):
            return None
        if role is None:
            return f"{caller.actor} has no role on this appliance (ask for the read-only or operator group)"
        return f"{method!r} needs the operator role; {caller.actor} has the read-only role"


def _gids(names: list[str], key: str) -> frozenset[int]:
    out = set()
    for name in names:
        try:
            out.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            log.error("configured group does not exist; ignored", extra=kv(key=key, group=name))
    return frozenset(out)


def policy_from(section: ApplianceSection) -> RolePolicy:
    operator_gids = _gids(section.operator_groups, "appliance.operator_groups")
    if section.socket_group and not _named(section):
        operator_gids = _gids([section.socket_group], "appliance.socket_group")
    return RolePolicy(
        operator_uids=frozenset(section.operator_uids),
        operator_gids=operator_gids,
        read_only_uids=frozenset(section.read_only_uids),
        read_only_gids=_gids(section.read_only_groups, "appliance.read_only_groups"),
        service_uid=os.geteuid(),
    )


def _named(section: ApplianceSection) -> bool:
    roles = (section.operator_groups, section.operator_uids, section.read_only_groups, section.read_only_uids)
    return any(roles)


def problems(section: ApplianceSection) -> list[str]:
    """Groups named in the config that do not exist on this machine."""
    out = []
    for key in ("socket_group", "operator_groups", "read_only_groups"):
        value = getattr(section, key)
        for i, name in enumerate([value] if isinstance(value, str) else value or []):
            try:
                grp.getgrnam(name)
            except KeyError:
                where = f"appliance.{key}" if isinstance(value, str) else f"appliance.{key}[{i}]"
                out.append(f"{where}: {name!r}: no such group on this machine")
    return out


def warnings(section: ApplianceSection) -> list[str]:
    if section.socket_group and not _named(section):
        return [
            f"appliance.socket_group: every member of {section.socket_group!r} is an operator (can move"
            " routing); name appliance.read_only_groups / operator_groups to separate the roles"
        ]
    return []
