"""Write TOML from plain data: how inventory variables become ``hotsite.toml``.

Python reads TOML (tomllib) but does not write it, and the appliance's config
is TOML while Ansible's inventory is YAML. This writer covers what a config
holds: tables, arrays of tables, strings, integers, floats, booleans, dates
and lists of those. Output is deterministic (keys in the order given), so a
second Ansible run renders the same bytes and reports no change.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


class TomlError(ValueError):
    """A value TOML cannot hold (None, a set, NaN…), named by its key path."""


def dumps(data: Mapping[str, Any]) -> str:
    """Serialise ``data`` (a mapping) as a TOML document."""
    if not isinstance(data, Mapping):
        raise TomlError(f"(top level): expected a mapping, got {type(data).__name__}")
    lines: list[str] = []
    _table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(k: object, path: list[str]) -> str:
    if not isinstance(k, str):
        raise TomlError(f"{'.'.join(path) or '(top level)'}: key {k!r} is not a string")
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _is_table(v: object) -> bool:
    return isinstance(v, Mapping)


def _is_table_array(v: object) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _value(v: object, path: list[str]) -> str:
    where = ".".join(path)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise TomlError(f"{where}: {v} cannot be written (hotsite's config takes finite numbers)")
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, datetime.datetime | datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x, [*path, str(i)]) for i, x in enumerate(v)) + "]"
    if isinstance(v, Mapping):
        items = ", ".join(f"{_key(k, path)} = {_value(x, [*path, str(k)])}" for k, x in v.items())
        return "{ " + items + " }" if items else "{}"
    if v is None:
        raise TomlError(f"{where}: null has no TOML form; leave the key out instead")
    raise TomlError(f"{where}: a {type(v).__name__} has no TOML form")


def _table(lines: list[str], path: list[str], data: Mapping[str, Any]) -> None:
    header = ".".join(_key(p, path) for p in path)
    scalars = [(k, v) for k, v in data.items() if not _is_table(v) and not _is_table_array(v)]
    if path and (scalars or not any(_is_table(v) or _is_table_array(v) for v in data.values())):
        lines += ["", f"[{header}]"]
    for k, v in scalars:
        lines.append(f"{_key(k, path)} = {_value(v, [*path, k])}")
    for k, v in data.items():
        if _is_table(v):
            _table(lines, [*path, k], v)
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{'.'.join(_key(p, path) for p in [*path, k])}]]"]
                _array_item(lines, [*path, k], item)


def _array_item(lines: list[str], path: list[str], item: Mapping[str, Any]) -> None:
    for k, v in item.items():
        if not _is_table(v) and not _is_table_array(v):
            lines.append(f"{_key(k, path)} = {_value(v, [*path, k])}")
    for k, v in item.items():
        if _is_table(v):
            _table(lines, [*path, k], v)
        elif _is_table_array(v):
            for sub in v:
                lines += ["", f"[[{'.'.join(_key(p, path) for p in [*path, k])}]]"]
                _array_item(lines, [*path, k], sub)
