"""Actuators built from ``[actuators.<name>]`` sections, in the order the config lists them.

The order is the runbook's order (and rollback runs it backwards), so a
config that lists ``kamailio`` first fences the primary before anything
else moves. Each section's ``type`` picks the class; an unknown type is a
:class:`~appliance.errors.ConfigError` naming the known ones (the schema
already refuses it at load time; this guards configs built in code).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from appliance.errors import ConfigError
from appliance.kamailio import KamailioRpc
from appliance.logs import kv
from failover.actuators.base import Actuator
from failover.actuators.hook import HookActuator
from failover.actuators.kamailio import KamailioActuator
from failover.actuators.netlink import NetlinkActuator
from failover.settings import FailoverConfig as Config

log = logging.getLogger(f"hotsite.{__name__}")


def _kamailio(name: str, section: Any, config: Config, rpc: KamailioRpc | None) -> Actuator:
    owns = rpc is None
    if rpc is None:
        rpc = KamailioRpc.from_config(config.kamailio)
    if rpc is None:
        raise ConfigError(
            f"actuators.{name}: type 'kamailio' needs kamailio.rpc_url or kamailio.rpc_socket",
            [f"actuators.{name}: type 'kamailio' needs kamailio.rpc_url or kamailio.rpc_socket"],
        )
    if config.kamailio.dispatcher_list is None:
        log.warning(
            "kamailio.dispatcher_list not set: a Kamailio restart or dispatcher.reload forgets the fence",
            extra=kv(actuator=name),
        )
    return KamailioActuator(
        rpc,
        dispatcher_list=config.kamailio.dispatcher_list,
        fenced_table=section.fenced_table or None,
        token_file=section.token_file,
        probing=section.probing,
        timeout_s=section.timeout_s,
        name=name,
        owns_rpc=owns,
    )


def _netlink(name: str, section: Any, config: Config, rpc: KamailioRpc | None) -> Actuator:
    return NetlinkActuator(
        section.address,
        section.interface,
        serve_on=section.serve_on,
        garp_count=section.garp_count,
        garp_interval_s=section.garp_interval_s,
        routes=section.routes,
        name=name,
        # The fencing token survives a restart: an older decision never touches the kernel again.
        token_file=config.appliance.state_dir / "actuators" / f"{name}.token",
    )


def _hook(name: str, section: Any, config: Config, rpc: KamailioRpc | None) -> Actuator:
    return HookActuator(
        command=section.command or None,
        url=section.url,
        secret_file=section.secret_file,
        timeout_s=section.timeout_s,
        verify=section.verify,
        name=name,
    )


BUILDERS: dict[str, Callable[[str, Any, Config, KamailioRpc | None], Actuator]] = {
    "kamailio": _kamailio,
    "netlink": _netlink,
    "hook": _hook,
}


def build_actuators(config: Config, *, kamailio_rpc: KamailioRpc | None = None) -> list[Actuator]:
    """One actuator per ``[actuators.<name>]``, in config order.

    ``kamailio_rpc``: share the daemon's client (then the caller closes it);
    otherwise each Kamailio actuator opens its own from ``[kamailio]`` and
    closes it in ``close()``.
    """
    built = []
    for name, section in config.actuators.items():
        kind = getattr(section, "type", None)
        builder = BUILDERS.get(str(kind))
        if builder is None:
            line = f"actuators.{name}.type: unknown type {kind!r} (known: {', '.join(sorted(BUILDERS))})"
            raise ConfigError(line, [line])
        built.append(builder(name, section, config, kamailio_rpc))
    return built
