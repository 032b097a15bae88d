"""The schema toolkit every settings module builds on: field types, :class:`Section`, the error describer.

Base layer: it imports nothing of hotsite but the standard library and
pydantic, so every feature's ``settings.py`` can use it without reaching up
to the root config. Durations are plain seconds in keys ending ``_s``;
addresses are ``host:port``. Secrets are never inline: keys ending ``_file``
name a file that holds them.
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
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


def is_host(host: str) -> bool:
    """An IP address or a well-formed host name (the one host check: config keys and target URLs)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME_RE.match(host))
    return True


def _check_host(host: str) -> str:
    if not is_host(host):
        raise ValueError(f"{host!r} is neither an IP address nor a host name")
    return host


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


# ---------------------------------------------------------------------------
# Error reporting: one line per mistake, named by the key path the user wrote.


def describe(err: Any, root: type[BaseModel]) -> str:
    """One pydantic error as ``key.path: value: what is expected``, the path as written in the file."""
    parts, _ = _walk(err["loc"], root)
    where = ".".join(parts) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        _, parent_model = _walk(err["loc"][:-1], root)
        known = sorted(parent_model.model_fields) if _is_model(parent_model) else []
        hint = f" (known keys here: {', '.join(known)})" if known else ""
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    if kind == "union_tag_invalid":
        return f"{where}.type: {err['input'].get('type')!r}: {message}"
    if isinstance(err.get("input"), dict):
        return f"{where}: {message}"
    return f"{where}: {_show(err.get('input'))}: {message}"


def _walk(loc: Iterable[Any], root: type[BaseModel]) -> tuple[list[str], Any]:
    """Follow an error location through the schema.

    Returns the key path as the user wrote it (pydantic inserts the tag of a
    discriminated union, e.g. ``channels.sms.gsm.baud``; the file says
    ``channels.sms.baud``) and the annotation found at its end.
    """
    parts: list[str] = []
    model: Any = root
    for part in loc:
        if part == "[key]":  # pydantic's marker for an invalid table name
            continue
        if isinstance(model, _Tagged):
            model = model.by_tag(str(part))
            continue
        if isinstance(part, int) and parts:
            parts[-1] += f"[{part}]"
        else:
            parts.append(str(part))
        model = _descend(model, part) if model is not None else None
    return parts, model


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _descend(annotation: Any, part: Any) -> Any:
    annotation = _unwrap(annotation)
    if _is_model(annotation):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field else None
    origin = typing.get_origin(annotation)
    if origin in (dict, list):
        inner = _unwrap(typing.get_args(annotation)[-1])
        members = _union_members(inner)
        if len(members) > 1:
            # A discriminated union keyed by "type": the error loc names the tag next.
            return _Tagged(members)
        return inner
    return None


class _Tagged:
    def __init__(self, members: list[Any]) -> None:
        self.members = members

    def by_tag(self, tag: str) -> Any:
        for member in self.members:
            field = member.model_fields.get("type")
            if field is not None and tag in typing.get_args(field.annotation):
                return member
        return None


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    members = _union_members(annotation)
    non_none = [m for m in members if m is not type(None)]
    if len(members) > 1 and len(non_none) == 1:
        return _unwrap(non_none[0])
    return annotation


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]
