"""Schemas of the messages a replica and the agent receive: checked before anything is used.

Every field is checked for its type and range here, so that what the
handlers get cannot raise somewhere deep (``os.chmod`` with a mode of
2**40 raises OverflowError; a path of ``""`` names the root itself). A
failure is a :class:`ProtocolError` naming the field and what is expected;
the receiving side counts it, logs it, shows it in ``replication status``
and starts a new session. Limits:

- a mode is an integer 0..0o7777 (permission bits, setuid/setgid/sticky);
  the replica then masks it with its ``file_mode_mask``;
- a size is an integer 0..2**53 (what JSON carries exactly);
- a content hash is a SHA-256 in lowercase hex (it names files in staging);
- a path is what :func:`appliance.replication.safepath.parse_relpath` accepts;
- a time is a finite number.
"""

from __future__ import annotations

import math
from typing import Any

from appliance.replication.protocol import ProtocolError
from appliance.replication.safepath import parse_relpath

MAX_MODE = 0o7777
MAX_SIZE = 2**53
MAX_NAME = 256  # a stream's name in a HELLO


def _bad(what: str, value: Any, expected: str) -> ProtocolError:
    shown = repr(value)
    return ProtocolError(f"{what}: {shown[:80]} is not {expected}", "malformed")


def integer(header: dict[str, Any], key: str, low: int, high: int, what: str = "") -> int:
    value: Any = header.get(key)
    if type(value) is not int or not low <= value <= high:
        raise _bad(what or key, value, f"an integer {low}..{high}")
    return value


def number(header: dict[str, Any], key: str, what: str = "") -> float:
    value: Any = header.get(key)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(what or key, value, "a finite number")
    return float(value)


def sha256(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise _bad(what, value, "a SHA-256 (64 lowercase hex digits)")
    return value


def manifest(header: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """FILES_MANIFEST's ``files``: path -> [sha256, mode, size], every one checked."""
    files = header.get("files")
    if not isinstance(files, dict):
        raise _bad("manifest files", files, "an object of path -> [sha256, mode, size]")
    out: dict[str, tuple[str, int, int]] = {}
    for rel, entry in files.items():
        parse_relpath(rel)
        if not isinstance(entry, list) or len(entry) != 3:
            raise _bad(f"manifest entry {rel[:80]!r}", entry, "[sha256, mode, size]")
        fields = {"mode": entry[1], "size": entry[2]}
        out[rel] = (
            sha256(entry[0], f"manifest entry {rel[:80]!r} sha256"),
            integer(fields, "mode", 0, MAX_MODE, f"manifest entry {rel[:80]!r} mode"),
            integer(fields, "size", 0, MAX_SIZE, f"manifest entry {rel[:80]!r} size"),
        )
    return out


def delta(header: dict[str, Any]) -> tuple[tuple[str, ...], str, str, int, int, list[int]]:
    """FILE_DELTA: (path components, sha256, base sha256, size, block, block indices)."""
    blocks = header.get("blocks")
    if not isinstance(blocks, list) or any(type(i) is not int or i < 0 for i in blocks):
        raise _bad("delta blocks", blocks, "a list of block indices")
    return (
        parse_relpath(header.get("path")),
        sha256(header.get("sha256"), "delta sha256"),
        sha256(header.get("base"), "delta base"),
        integer(header, "size", 0, MAX_SIZE),
        integer(header, "block", 1, 64 * 1024 * 1024),
        blocks,
    )


def files_hello(header: dict[str, Any]) -> tuple[set[str], dict[str, tuple[str, list[str]]]]:
    """A files replica's HELLO: the contents it has, and its large files' block hashes."""
    have = header.get("have", [])
    if not isinstance(have, list):
        raise _bad("hello have", have, "a list of SHA-256")
    blocks = header.get("blocks") or {}
    if not isinstance(blocks, dict):
        raise _bad("hello blocks", blocks, "an object of path -> [sha256, [block hash...]]")
    known: dict[str, tuple[str, list[str]]] = {}
    for rel, entry in blocks.items():
        parse_relpath(rel)
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], list):
            raise _bad(f"hello blocks {rel[:80]!r}", entry, "[sha256, [block hash...]]")
        if not all(isinstance(d, str) and len(d) <= 64 for d in entry[1]):
            raise _bad(f"hello blocks {rel[:80]!r}", entry[1][:3], "a list of block hashes")
        known[rel] = (sha256(entry[0], f"hello blocks {rel[:80]!r}"), list(entry[1]))
    return {sha256(h, "hello have") for h in have}, known


def hello_common(header: dict[str, Any]) -> tuple[str, str, int]:
    """Any HELLO: (stream, compression, rate_bytes_s)."""
    stream, compression = header.get("stream", ""), header.get("compression", "none")
    if not isinstance(stream, str) or len(stream) > 4096:
        raise _bad("hello stream", stream, "a stream name or path")
    if not isinstance(compression, str) or len(compression) > 16:
        raise _bad("hello compression", compression, "zstd, zlib or none")
    rate = header.get("rate_bytes_s") or 0
    rate = integer({"rate": rate}, "rate", 0, 2**40, "hello rate_bytes_s")
    return stream, compression, rate
