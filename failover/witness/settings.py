"""``hotsite witness`` settings: the agent's own small TOML file, or its command line."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator

from appliance import tomlfile
from appliance.errors import ConfigError
from appliance.fields import ListenAddress, ProbeSeconds, ProbeTimeout, Section
from appliance.secretfile import read_secret
from monitoring.health import Thresholds
from monitoring.probes import kinds
from monitoring.targets import Target, parse_url

log = logging.getLogger("hotsite.failover.witness")


def _target_url(value: str) -> str:
    target = parse_url(value)  # ValueError names what is wrong and what is expected
    if not kinds.get(target.kind).evidence:
        raise ValueError(f"{value!r}: a witness probes {kinds.url_labels(evidence_only=True)} targets")
    return value


TargetUrl = Annotated[str, AfterValidator(_target_url)]


class WitnessSettings(Section):
    """What ``hotsite witness`` reads from ``--config`` (top-level keys) or its options."""

    name: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$"
    )
    listen: ListenAddress
    primary: list[TargetUrl] = Field(min_length=1, max_length=16)
    interval_s: ProbeSeconds = 1.0
    timeout_s: ProbeTimeout = 0.8
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)
    token_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # TLS and a token by default: plain HTTP or an open /vote only when written here (warned at start).
    allow_plain_http: bool = False
    allow_unauthenticated: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"

    @model_validator(mode="after")
    def _consistent(self) -> WitnessSettings:
        if self.tls_cert_file is None and not self.allow_plain_http:
            raise ValueError(
                "tls_cert_file and tls_key_file are required (the witness serves HTTPS);"
                " set allow_plain_http = true (--allow-plain-http) to serve plain HTTP"
            )
        if self.token_file is None and not self.allow_unauthenticated:
            raise ValueError(
                "token_file is required (voters present a bearer token);"
                " set allow_unauthenticated = true (--allow-unauthenticated) to let anyone ask"
            )
        if self.timeout_s > self.interval_s:
            raise ValueError(f"timeout_s ({self.timeout_s}) must not exceed interval_s ({self.interval_s})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        if len(set(self.primary)) != len(self.primary):
            raise ValueError("primary: the same target URL is listed twice")
        return self

    def targets(self) -> list[Target]:
        return [parse_url(url, display_name(url)) for url in self.primary]

    def thresholds(self) -> Thresholds:
        return Thresholds(rise=self.rise, fall=self.fall)


def load_settings(path: Path | None, overrides: dict[str, Any]) -> WitnessSettings:
    """The TOML file (if any), then the command-line values on top; every mistake at once.

    Read and described like the appliance's own config (:mod:`appliance.tomlfile`).
    """
    data = tomlfile.read(path, "witness config") if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v not in (None, (), [])})
    source = str(path) if path is not None else "command line"
    return tomlfile.validate(WitnessSettings, data, source, "witness settings")


def read_token(path: Path) -> str:
    """A bearer token from its file (:func:`appliance.secretfile.read_secret`): one word of visible ASCII."""
    form = "one non-empty word of printable ASCII"
    token = read_secret(path, "token file", encoding="ascii", form=form)
    if not token or any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise ConfigError(f"token file {path}: expected {form}")
    return token


def display_name(url: str) -> str:
    """The URL as shown in evidence and metric labels, without any ``user:password@``."""
    if "://" not in url:
        return url
    netloc = urlsplit(url).netloc
    return url.replace(netloc, netloc.rsplit("@", 1)[1], 1) if "@" in netloc else url
