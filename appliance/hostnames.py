"""The one host check: is this an IP address or a host name (RFC 1123 labels, 253 characters at most)?

Used for every address a config names (listeners, SBCs, probe targets), so a
name one part accepts is never refused by another.
"""

from __future__ import annotations

import ipaddress
import re

HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


def is_host(host: str) -> bool:
    """True for an IPv4 or IPv6 address (without brackets) or a host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return HOSTNAME_RE.match(host) is not None
    return True


def check_host(host: str) -> str:
    """``host`` if :func:`is_host`; else ValueError saying what it is not."""
    if not is_host(host):
        raise ValueError(f"{host!r} is neither an IP address nor a host name")
    return host
