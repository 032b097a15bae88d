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


def describe_identity(cert: Path, ca: Path) -> str:
    """Which certificate this end presents and which CA it trusts, for error messages."""
    subject, issuer = _names(cert)
    return f"this end presents {cert} ({subject}, issued by {issuer}) and trusts the CA in {ca}"


def _names(cert: Path) -> tuple[str, str]:
    """(subject, issuer) of a PEM certificate, or what could not be read."""
    try:
        from cryptography import x509

        c = x509.load_pem_x509_certificate(cert.read_bytes())
        return c.subject.rfc4514_string(), c.issuer.rfc4514_string()
    except Exception as exc:  # only for a message: never fail because of it
        return f"unreadable: {exc}", "?"


def explain_handshake_error(
    exc: BaseException, *, peer: str, identity: str, expected_name: str | None
) -> str:
    """A TLS failure in words: what the other end did, which certificate, which CA, which name.

    ``expected_name``: the name the peer's certificate must carry (the
    client's ``server_name``), None on the server side.
    """
    reason = getattr(exc, "reason", None) or type(exc).__name__
    verify = getattr(exc, "verify_message", None)
    text = f"TLS handshake with {peer} failed: {verify or reason}"
    hints = {
        "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not signed by the CA this end trusts,"
        " or it has expired" + (f", or it does not name {expected_name!r}" if expected_name else ""),
        "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA that signed this end's certificate",
        "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected this end's certificate",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and got none",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer presented no certificate (mutual TLS is required)",
        "WRONG_VERSION_NUMBER": "the peer does not speak TLS on this port",
        "CLOSED_AFTER_HANDSHAKE": "the peer hung up before answering: it most likely refused this end's"
        " certificate (its log says why)",
    }
    hint = next((h for key, h in hints.items() if key in str(reason) or key in str(exc)), "")
    if verify and "Hostname mismatch" in verify and expected_name:
        hint = f"the peer's certificate does not name {expected_name!r} (server_name)"
    return f"{text}{'; ' + hint if hint else ''}; {identity}" + (
        f"; the peer's certificate must name {expected_name!r}" if expected_name else ""
    )
