"""Time as people read it, and as they type it: one module for every command.

Why one module: before it, ``events`` printed UTC, ``incidents`` and ``oncall``
printed local time without saying so, ``--since`` took seconds only while
``restore --at`` took ISO, and monotonic clock readings leaked into text
(``down since 1710.5``). The rules here are the whole contract:

* **Text** shows wall-clock times in UTC, always labelled (``21:57:31 UTC``),
  unless the operator asked for local time (``hotsite --local``), which is
  labelled with its offset (``21:57:31 +08:00``). Durations read as ages:
  ``12 s``, ``4 min``, ``2 h 05 min``, ``3 d 4 h``.
* **JSON** carries RFC 3339 strings; a numeric Unix time is kept only under a
  name ending in ``_epoch`` (see :func:`json_times`).
* **Input**: every ``--since`` / ``--at`` takes a duration back from now
  (``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``, a bare number of seconds) or an
  ISO 8601 time (a time without a zone is UTC, or local with ``--local``);
  ``--at`` also takes a Unix time.

A monotonic reading is never a time of day: convert it with
:func:`wall_from_monotonic` before it reaches text.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

_local = False

# Keys that carry a Unix time in API results: ``at``, ``*_at``, and the
# on-call and override boundaries.
_TIME_KEYS = frozenset({"at", "until", "from", "start", "end", "since"})
_PLAUSIBLE_EPOCH = 946_684_800.0  # 2000-01-01: anything smaller is not a Unix time (e.g. a monotonic value)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|secs|m|min|mins|h|hr|hrs|d|day|days|w)?", re.IGNORECASE)
_UNIT_S = {
    "ms": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0,
}  # fmt: skip


def set_local(local: bool) -> None:
    """Show local time instead of UTC in text (the global ``--local`` option)."""
    global _local
    _local = local


def is_local() -> bool:
    return _local


def _zone() -> dt.tzinfo | None:
    return None if _local else dt.UTC


def _label(moment: dt.datetime) -> str:
    if not _local:
        return "UTC"
    offset = moment.strftime("%z")  # +0800
    return f"{offset[:3]}:{offset[3:]}" if offset else "local"


def _moment(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, _zone()).astimezone(None if _local else dt.UTC)


def clock(ts: float | None, *, ms: bool = False) -> str:
    """``21:57:31 UTC`` (or ``21:57:31.250 UTC`` with *ms*): a time of day, labelled with its zone."""
    if ts is None:
        return "-"
    moment = _moment(ts)
    text = f"{moment:%H:%M:%S}" + (f".{moment.microsecond // 1000:03d}" if ms else "")
    return f"{text} {_label(moment)}"


def stamp(ts: float | None, *, seconds: bool = True) -> str:
    """``2026-05-01 21:57:31 UTC``: a date and time, labelled with its zone."""
    if ts is None:
        return "-"
    moment = _moment(ts)
    text = f"{moment:%Y-%m-%d %H:%M:%S}" if seconds else f"{moment:%Y-%m-%d %H:%M}"
    return f"{text} {_label(moment)}"


def age(seconds: float | None) -> str:
    """``12 s``, ``4 min``, ``2 h 05 min``, ``3 d 4 h``: how long, to a useful precision."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def since(ts: float | None, now: float) -> str:
    """``since 21:57:31 UTC (4 min)``: when something began and how long ago."""
    if ts is None:
        return "-"
    return f"since {clock(ts)} ({age(now - ts)})"


def wall_from_monotonic(mono: float, now_mono: float, now_wall: float) -> float:
    """The Unix time of a monotonic reading, given one (monotonic, wall) pair read together."""
    return now_wall - (now_mono - mono)


def rfc3339(ts: float | None) -> str | None:
    """``2026-05-01T21:57:31.250Z``: the JSON form of a Unix time (always UTC)."""
    if ts is None:
        return None
    text = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _is_time_key(key: str) -> bool:
    return key in _TIME_KEYS or key.endswith("_at")


def json_times(value: Any) -> Any:
    """A copy of an API result for ``--json`` output: Unix times as RFC 3339, the number kept as ``*_epoch``.

    Only keys that name a time (``at``, ``*_at``, ``until``, ``from``, ``start``,
    ``end``, ``since``) holding a plausible Unix time are converted, so counters
    and durations (``*_s``) pass through untouched.
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if (
                isinstance(key, str)
                and _is_time_key(key)
                and isinstance(item, int | float)
                and not isinstance(item, bool)
                and item >= _PLAUSIBLE_EPOCH
            ):
                out[key] = rfc3339(float(item))
                out[f"{key}_epoch"] = item
            else:
                out[key] = json_times(item)
        return out
    if isinstance(value, list | tuple):
        return [json_times(item) for item in value]
    return value


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``, ``250ms`` or a bare number, else ValueError."""
    compact = text.strip()
    if not compact:
        raise ValueError("an empty duration")
    total, pos = 0.0, 0
    for match in _DURATION.finditer(compact):
        if match.start() != pos or (match.group(2) is None and match.end() != len(compact)):
            break
        total += float(match.group(1)) * _UNIT_S[(match.group(2) or "s").lower()]
        pos = match.end()
        while pos < len(compact) and compact[pos] == " ":
            pos += 1
    if pos != len(compact):
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 1d, 1h30m)")
    return total


def parse_iso(text: str) -> float:
    """The Unix time of an ISO 8601 time; one without a zone is UTC, or local with ``--local``."""
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    moment = dt.datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC) if not _local else moment.astimezone()
    return moment.timestamp()


def parse_when(text: str, now: float, *, allow_epoch: bool = False) -> float:
    """The Unix time meant by a ``--since`` / ``--at`` value: a duration back from *now*, or an ISO time.

    With *allow_epoch*, a number of at least a billion is a Unix time rather
    than a duration (``--at 1714550400``); otherwise a bare number is seconds.
    """
    raw = text.strip()
    try:
        number = float(raw)
    except ValueError:
        number = None
    if number is not None:
        return number if allow_epoch and number >= 1e9 else now - number
    try:
        return now - parse_duration(raw)
    except ValueError:
        pass
    try:
        return parse_iso(raw)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (90s, 15m, 2h, 1d) nor an ISO 8601 time (2026-05-01T08:00Z)"
        ) from None
