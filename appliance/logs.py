"""The one logger setup: one line per event on stderr, key=value or JSON.

journald picks stderr up under systemd, so there is no file handling here.
Structured fields travel in ``extra={"kv": {...}}`` and are rendered after
the message. Values of keys that look like secrets are masked, so a
password or token passed by mistake never reaches the journal.

Every module logs as ``hotsite.<module>`` (``logging.getLogger(f"hotsite.{__name__}")``,
e.g. ``hotsite.failover.service``; a package split in modules keeps one name,
e.g. ``hotsite.failover.etcd``), so one ``hotsite`` logger holds all of
hotsite's and none of its libraries' (tests/unit/test_logger_names.py).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

from appliance.redact import mask_text

_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|pin|key|credential)", re.IGNORECASE)
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+%-]+$")
MASK = "***"


def mask(fields: dict[str, Any]) -> dict[str, Any]:
    """Secret-named keys masked whole; in other text values, URL passwords and secret query parameters."""
    return {
        k: (MASK if _SECRET_KEY.search(k) else mask_text(v) if isinstance(v, str) else v)
        for k, v in fields.items()
    }


def _kv_value(value: Any) -> str:
    text = str(value)
    return text if text and _BARE.match(text) else json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info logger=… msg="…" key=value …``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_text(record.getMessage()),
        }
        fields.update(mask(getattr(record, "kv", {}) or {}))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_text(record.getMessage()),
        }
        fields.update(mask(getattr(record, "kv", {}) or {}))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json.dumps(fields, ensure_ascii=False, default=str)


def setup(level: str = "info", fmt: str = "kv", stream: TextIO | None = None) -> None:
    """Configure the root logger; safe to call again (on reload) to change level or format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries chatter at INFO about every connection; keep the journal for our events.
    for noisy in ("httpx", "httpcore", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def kv(**fields: Any) -> dict[str, Any]:
    """``log.info("probe state changed", extra=kv(target=..., state=...))``"""
    return {"kv": fields}
