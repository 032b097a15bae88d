"""Mutual TLS for the replication link: both ends show a certificate from the same private CA.

The source agent is the server (it sits at the primary and serves
streams); the appliance is the client. ``allowed_clients`` narrows the
accepted client certificates to named ones (by common name or DNS SAN).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError


def _load(ctx: ssl.SSLContext, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS files cannot be loaded (cert {cert}, key {key}, CA {ca}): {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    return _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, ca)


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    return _load(ctx, cert, key, ca)


def peer_names(peercert: dict[str, Any] | None) -> set[str]:
    names: set[str] = set()
    if not peercert:
        return names
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(value)
    return names
