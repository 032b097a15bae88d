"""The schema toolkit every settings module builds on: field types, :class:`Section`, the error describer.

Base layer: it imports nothing of hotsite but the floor (host names, the TOML describer) and
pydantic, so every feature's ``settings.py`` can use it without reaching up
to the root config. Durations are plain seconds in keys ending ``_s``;
addresses are ``host:port``. Secrets are never inline: keys ending ``_file``
name a file that holds them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# The one host check and the one error describer, re-exported for the settings modules.
from appliance.hostnames import check_host, is_host  # noqa: F401
from appliance.tomlfile import describe  # noqa: F401

_E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _split_host_port(value: str, default_port: int | None) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or host.count(":") and not host.startswith("["):
        # No port given (or a bare IPv6 address).
        host, port_text = value, ""
    host = host.strip("[]")
    if not port_text:
        if default_port is None:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9477")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


def _check_host(host: str) -> str:
    return check_host(host)


def address(default_port: int | None) -> Any:
    """A ``host:port`` field; ``default_port`` fills in a missing port (None: the port is required)."""

    def check(value: str) -> str:
        host, port = _split_host_port(value, default_port)
        _check_host(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    return AfterValidator(check)


def match(pattern: re.Pattern[str], expected: str) -> Any:
    """A string field that must match ``pattern``; the error says ``expected``."""

    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(f"expected {expected}")
        return value

    return AfterValidator(check)


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _not_empty_path(value: Path) -> Path:
    if str(value) in ("", "."):
        raise ValueError("expected a directory path, not an empty string")
    return value


SipAddress = Annotated[str, address(5060)]
ListenAddress = Annotated[str, address(None)]
Phone = Annotated[str, match(_E164_RE, "an E.164 phone number such as +8613800138000")]
Email = Annotated[str, match(_EMAIL_RE, "an e-mail address such as ops@example.com")]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
Seconds = Annotated[float, Field(gt=0, le=86400)]
Name = Annotated[str, match(_NAME_RE, "a lower-case name: letters, digits, '-' or '_'")]
DirPath = Annotated[Path, AfterValidator(_not_empty_path)]
ProbeSeconds = Annotated[float, Field(ge=0.1, le=3600)]
ProbeTimeout = Annotated[float, Field(ge=0.01, le=3600)]
InterfaceName = Annotated[str, match(re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$"), "an interface name")]
Dialled = Annotated[str, match(re.compile(r"^\+?[0-9*#]{2,32}$"), "a dialled number such as 95588")]


def host_port(address: str) -> tuple[str, int]:
    """Split a validated ``host:port`` into its parts."""
    host, port = _split_host_port(address, None)
    return host, port


class Section(BaseModel):
    """Base of every config section: strict about keys, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
