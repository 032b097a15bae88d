"""Replication's section of the appliance's ``hotsite.toml``: ``[replication]`` and its streams.

Not to be confused with :mod:`appliance.replication.settings`, the source
agent's own ``source.toml`` at the primary: this module is the replica
side's settings, composed into the appliance's root config
(:class:`appliance.config.Config`) through :class:`ReplicationSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from appliance.fields import Name, Seconds, Section, address

AgentAddress = Annotated[str, address(7450)]


class StreamSection(Section):
    """One replicated stream. ``source`` is the stream's name (or path) in the source agent's config."""

    kind: Literal["sqlite", "files"]
    source: str = Field(min_length=1)
    replica: Path
    rpo_budget_s: Seconds = 5.0
    post_change_command: list[str] = []  # files: run (argv, no shell) after a change was applied
    # files: mode bits never applied at the replica, whatever the source sends (default: setuid,
    # setgid, sticky, world-write); see appliance/replication/REPLICATION.md, "What the replica trusts"
    file_mode_mask: int = Field(default=0o7002, ge=0, le=0o7777)
    snapshot_interval_s: float = Field(default=3600.0, ge=0, le=86400)  # sqlite: 0 = no snapshots
    # sqlite: the most disk one transaction's journal may take (0: up to the database's size)
    journal_limit_mb: int = Field(default=0, ge=0, le=1 << 24)


class ReplicationSection(Section):
    """Where the source agent is, how to reach it (mutual TLS), and what it streams."""

    source_agent: AgentAddress | None = None
    server_name: str | None = None  # name in the agent's certificate; default: the host of source_agent
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    compression: Literal["none", "zlib", "zstd"] = "zlib"
    bandwidth_limit_bytes_s: int = Field(default=0, ge=0)  # 0 = unlimited
    keep_versions: int = Field(default=5, ge=0, le=1000)  # old file versions and database snapshots kept
    streams: dict[Name, StreamSection] = {}

    @model_validator(mode="after")
    def _tls_when_streaming(self) -> ReplicationSection:
        if self.streams:
            missing = [
                k
                for k in ("source_agent", "tls_cert_file", "tls_key_file", "tls_ca_file")
                if getattr(self, k) is None
            ]
            if missing:
                raise ValueError(
                    f"streams are configured but {', '.join(missing)} missing (mutual TLS is required)"
                )
        return self


class ReplicationSettings(Section):
    """The root key replication owns."""

    replication: ReplicationSection = ReplicationSection()


def problems(cfg: Any) -> list[str]:
    """Nothing beyond the validators above (disk room is an environment check: ``budget.space_problems``)."""
    return []


def warnings(cfg: Any) -> list[str]:
    return []
