"""The source agent's own small config file (``/etc/hotsite/source.toml`` at the primary).

Separate from the appliance's ``hotsite.toml`` because it runs on another
machine with other files; validated with the same rules (unknown keys are
errors, secrets only as ``*_file`` paths).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from appliance.config import ListenAddress, Name, Section
from appliance.errors import ConfigError


class SourceStream(Section):
    kind: Literal["sqlite", "files"]
    path: Path
    exclude: list[str] = []  # glob patterns (files streams), e.g. "*.swp"


class SourceAgentSection(Section):
    listen: ListenAddress = "0.0.0.0:7450"
    tls_cert_file: Path
    tls_key_file: Path
    tls_ca_file: Path
    allowed_clients: list[str] = []  # client certificate names (CN or DNS SAN); empty: any the CA signed
    poll_interval_s: float = Field(default=0.01, gt=0, le=5)
    heartbeat_s: float = Field(default=0.5, gt=0, le=60)
    rescan_s: float = Field(default=30.0, gt=0, le=86400)
    bandwidth_limit_bytes_s: int = Field(default=0, ge=0)


class SourceConfig(Section):
    source: SourceAgentSection
    streams: dict[Name, SourceStream]


def load_source_config(path: Path) -> SourceConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"source agent config {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"source agent config {path} cannot be read: {exc}") from None
    try:
        return SourceConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors(include_url=False)]
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the configuration", problems) from None


def _describe(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    value = err.get("input")
    return f"{where}: {message}" if isinstance(value, dict) else f"{where}: {value!r}: {message}"
