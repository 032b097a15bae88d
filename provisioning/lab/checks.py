"""Small, dependency-free reachability checks the lab uses to decide "ready".

Kept apart from hotsite's real probes (monitoring/probes/) on purpose: the lab
must be able to say whether *it* works without trusting the code under test.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import uuid
from typing import Any


def sip_options(addr: str, port: int, *, timeout: float = 1.0, bind: str | None = None) -> str:
    """Send one UDP OPTIONS and return the status line of the reply.

    Raises TimeoutError when nothing answers, OSError on socket errors.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.bind((bind or "0.0.0.0", 0))
        s.connect((addr, port))
        lip, lport = s.getsockname()
        tag = uuid.uuid4().hex
        msg = (
            f"OPTIONS sip:{addr}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {lip}:{lport};branch=z9hG4bK{tag[:16]};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:lab-check@{lip}>;tag={tag[:8]}\r\n"
            f"To: <sip:{addr}:{port}>\r\n"
            f"Call-ID: {tag}@{lip}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "User-Agent: hotsite-lab\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        s.send(msg.encode())
        while True:
            data = s.recv(65535).decode(errors="replace")
            if tag in data:  # ignore stray replies to someone else
                return data.split("\r\n", 1)[0]


def http_get(addr: str, port: int, path: str, *, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(addr, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def jsonrpc(
    addr: str, port: int, path: str, method: str, params: list[Any] | None = None, *, timeout: float = 2.0
) -> Any:
    """Call Kamailio's JSON-RPC over HTTP; returns ``result`` or raises RuntimeError."""
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params or [], "id": 1})
    conn = http.client.HTTPConnection(addr, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
    if "error" in data:
        raise RuntimeError(f"{method}: {data['error']}")
    return data.get("result")


def dispatcher_flags(result: Any) -> dict[int, dict[str, str]]:
    """{set id: {uri: FLAGS}} from a dispatcher.list result."""
    out: dict[int, dict[str, str]] = {}
    for rec in (result or {}).get("RECORDS", []):
        s = rec.get("SET", {})
        out[int(s.get("ID", 0))] = {
            t["DEST"]["URI"]: t["DEST"]["FLAGS"] for t in s.get("TARGETS", []) if "DEST" in t
        }
    return out


def tls_handshake(
    addr: str, port: int, *, ca: str, cert: str, key: str, server_name: str, timeout: float = 1.0
) -> str:
    """A mutual-TLS handshake as the appliance makes it; returns the server's TLS version.

    Raises OSError (ssl.SSLError is one) when the port is closed or the handshake fails.
    """
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    with (
        socket.create_connection((addr, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        return str(tls.version())
