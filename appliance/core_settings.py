"""The appliance's own sections of ``hotsite.toml``: ``[appliance]``, ``[metrics]``, ``[kamailio]``.

Base layer: they configure parts every feature stands on (the daemon, the
``/metrics`` listener, the Kamailio RPC client of :mod:`appliance.kamailio`),
so they live below the features, with the schema toolkit of
:mod:`appliance.fields`. The root :class:`appliance.config.Config` composes
:class:`CoreSettings` with the features' sections.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from appliance.fields import DirPath, HttpUrl, ListenAddress, Name, ProbeSeconds, Section, SipAddress


class ApplianceSection(Section):
    name: str = Field(default_factory=socket.gethostname)
    site: Name | None = None  # where this appliance stands (a key of [sites]); default: the first backup
    state_dir: DirPath = Path("/var/lib/hotsite")
    runtime_dir: DirPath = Path("/run/hotsite")
    socket_group: str | None = None
    # Roles on the control socket (appliance/roles.py): root and the service user are operators.
    operator_groups: list[str] = []
    operator_uids: list[int] = []
    read_only_groups: list[str] = []
    read_only_uids: list[int] = []
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"
    watchdog: bool = True


def _bcrypt_hash(value: str) -> str:
    if not re.match(r"^\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}$", value):
        raise ValueError("expected a bcrypt hash such as the one `htpasswd -nBC 10 USER` prints")
    return value


class MetricsSection(Section):
    """``/metrics``; TLS and basic auth optional, the Prometheus exporter-toolkit way."""

    enabled: bool = True
    listen: ListenAddress = "127.0.0.1:9477"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    basic_auth_users: dict[str, Annotated[str, AfterValidator(_bcrypt_hash)]] = {}

    @model_validator(mode="after")
    def _pair(self) -> MetricsSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        return self

    def server_options(self) -> dict[str, Any]:
        return {
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
            "basic_auth_users": dict(self.basic_auth_users),
        }


class KamailioSection(Section):
    sip: SipAddress | None = None  # where the carrier edge takes SIP: the drill's test call goes there
    rpc_url: HttpUrl | None = None
    rpc_socket: Path | None = None
    rpc_timeout_s: ProbeSeconds = 2.0
    dispatcher_list: Path | None = None
    usage_interval_s: ProbeSeconds = 5.0  # how often calls in progress are read


class CoreSettings(Section):
    """The root keys the appliance itself owns."""

    appliance: ApplianceSection = ApplianceSection()
    metrics: MetricsSection = MetricsSection()
    kamailio: KamailioSection = KamailioSection()


def problems(cfg: Any) -> list[str]:
    """Nothing beyond the schema: the appliance's own keys are checked where they are read."""
    return []


def warnings(cfg: Any) -> list[str]:
    return []
