"""The one configuration loader and the root model it fills: ``hotsite.toml``.

Why a schema: a technician editing ``/etc/hotsite/hotsite.toml`` at 3 a.m.
must be told exactly which key is wrong, what value it holds and what is
expected, for every mistake at once, before the daemon acts on it. Every
section forbids unknown keys, because a misspelt key silently ignored is a
setting silently not applied.

Top layer: each feature owns its sections in its own ``settings`` module
(:mod:`appliance.core_settings`, :mod:`monitoring.settings`,
:mod:`failover.settings`, :mod:`appliance.paging.settings`,
:mod:`appliance.replication.replica_settings`); the feature table
(:data:`appliance.features.FEATURES`, here as :data:`FEATURES`) lists them
once, the root :class:`Config` is composed of their ``*Settings`` classes,
and their ``problems``/``warnings`` are collected from the same list. Only the
checks that tie two features' sections together live here.

Durations are plain seconds in keys ending ``_s``; addresses are
``host:port``. Secrets are never inline: keys ending ``_file`` name a file
that holds them, so the config can be shown, logged and bundled safely.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator

from appliance import configcheck, core_settings, features

# Re-exported for the top layer and the tests, which name sections as ``config.X`` (features
# import them from their own settings module: the layer contract forbids importing this one).
from appliance.core_settings import ApplianceSection, KamailioSection, MetricsSection  # noqa: F401
from appliance.errors import ConfigError
from appliance.fields import (  # noqa: F401
    Email,
    HttpUrl,
    ListenAddress,
    Name,
    Phone,
    ProbeSeconds,
    ProbeTimeout,
    Seconds,
    Section,
    SipAddress,
    describe,
    host_port,
)
from appliance.paging import settings as paging_settings
from appliance.paging.settings import (  # noqa: F401
    ChannelSettings,
    ContactSection,
    EscalationPolicySection,
    EscalationStepSection,
    GsmChannelSettings,
    NightSection,
    OverrideSection,
    PagingSection,
    RotationSection,
    SmtpChannelSettings,
    WebhookChannelSettings,
)
from appliance.replication import replica_settings
from appliance.replication.budget import space_problems
from appliance.replication.replica_settings import ReplicationSection, StreamSection  # noqa: F401
from failover import plans
from failover import settings as failover_settings
from failover.settings import (  # noqa: F401
    ActuatorSettings,
    CoordinationSection,
    DestinationSection,
    FailoverSection,
    HookActuatorSettings,
    HotlineSection,
    KamailioActuatorSettings,
    NetlinkActuatorSettings,
)
from monitoring import settings as monitoring_settings
from monitoring.settings import (  # noqa: F401
    CheckSection,
    HostSection,
    ProbesSection,
    SiteSection,
    TestcallsSection,
    TrunkSection,
)

DEFAULT_PATH = Path("/etc/hotsite/hotsite.toml")
ENV_VAR = "HOTSITE_CONFIG"


@dataclass(frozen=True)
class Feature:
    """One feature's part of the config: its root keys, and its checks beyond the schema."""

    settings: type[Section]
    problems: Callable[[Any], list[str]]
    warnings: Callable[[Any], list[str]]


# Every feature's part of the config, from the one feature table (appliance.features). The root
# model below inherits exactly these settings classes, in this order (checked when this module
# loads): a feature cannot be half registered.
FEATURES: tuple[Feature, ...] = tuple(
    Feature(f.settings, f.checks.problems, f.checks.warnings) for f in features.FEATURES
)


class Config(
    core_settings.CoreSettings,
    monitoring_settings.MonitoringSettings,
    failover_settings.FailoverSettings,
    paging_settings.PagingSettings,
    replica_settings.ReplicationSettings,
):
    """The whole appliance configuration (the root of ``hotsite.toml``)."""

    @model_validator(mode="after")
    def _testcalls_name_known_hotlines_and_trunks(self) -> Config:
        t = self.testcalls
        for key, names, known in (("hotlines", t.hotlines, self.hotlines), ("trunks", t.trunks, self.trunks)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(
                    f"testcalls.{key} names {', '.join(map(repr, unknown))}: expected names of [{key}.*]"
                    f" ({', '.join(known) or 'none defined'})"
                )
        if t.hotlines and self.kamailio.sip is None:
            raise ValueError(
                "testcalls.hotlines needs kamailio.sip: the carrier edge the test calls go through"
            )
        if t.trunks and t.number is None and not self.hotlines:
            raise ValueError("testcalls.trunks needs testcalls.number (or a hotline) to dial through them")
        return self

    @model_validator(mode="after")
    def _my_site_is_a_site(self) -> Config:
        if self.appliance.site is not None and self.appliance.site not in self.sites:
            raise ValueError(
                f"appliance.site {self.appliance.site!r} is not a site"
                f" (known: {', '.join(sorted(self.sites))})"
            )
        return self

    @property
    def my_site(self) -> str:
        """The site this appliance stands at (``appliance.site``, else the first backup site)."""
        return self.appliance.site or plans.backup_site(self)

    def problems(self) -> list[str]:
        """Cross-references the schema cannot see; each feature keeps its own rules."""
        found = [line for feature in FEATURES for line in feature.problems(self)]
        return found + configcheck.problems(self)

    def warnings(self) -> list[str]:
        """Settings that are valid but will not do what they seem to say."""
        notes = [line for feature in FEATURES for line in feature.warnings(self)]
        return notes + configcheck.warnings(self)


if Config.__bases__ != tuple(feature.settings for feature in FEATURES):  # pragma: no cover
    raise ImportError("appliance.config: Config's bases and FEATURES list different features")

# The order root keys are validated, walked and reported in (``config check`` lists problems in
# it): the order the example file documents them, as before the sections moved into the features.
# Composition alone would order them by feature, last base first.
KEY_ORDER = (
    "appliance", "metrics", "sites", "trunks", "probes", "host", "failover", "hotlines", "destinations",
    "actuators", "kamailio", "contacts", "channels", "paging", "replication", "coordination", "testcalls",
    "callkpis",
)  # fmt: skip


def _order_root_keys() -> None:
    fields = Config.__pydantic_fields__
    if sorted(KEY_ORDER) != sorted(fields):  # pragma: no cover - a feature added a root key
        raise ImportError(f"appliance.config: KEY_ORDER must list every root key once: {sorted(fields)}")
    Config.__pydantic_fields__ = {key: fields[key] for key in KEY_ORDER}
    Config.model_rebuild(force=True)


_order_root_keys()


# ---------------------------------------------------------------------------
# Loading and error reporting


def resolve_path(cli_value: str | os.PathLike[str] | None) -> Path:
    """``--config`` wins over ``$HOTSITE_CONFIG``, which wins over the default."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load(path: Path) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` listing every mistake.

    Never hangs or exhausts memory on what ``path`` turns out to be (a FIFO,
    ``/dev/zero``, a huge or deeply nested file): see :mod:`appliance.configcheck`.
    """
    try:
        text = configcheck.read_text(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return parse(text, source=str(path))


def parse(text: str, source: str = "<config>") -> Config:
    limit = configcheck.MAX_DEPTH
    too_deep = f"{source}: nested deeper than {limit} levels; a hotsite config never needs that"
    if configcheck.tolerant_depth_scan(text):
        raise ConfigError(too_deep, [f"(top level): nested deeper than {limit} levels"])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}", [f"TOML syntax: {exc}"]) from None
    except (RecursionError, MemoryError):
        raise ConfigError(too_deep, [f"(top level): nested deeper than {limit} levels"]) from None
    deep = configcheck.check_depth(data)
    if deep is not None:
        raise ConfigError(too_deep, [f"{deep}: nested deeper than {limit} levels"])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors(include_url=False)]
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the configuration", problems) from None
    problems = config.problems()
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the configuration", problems)
    return config


def check_environment(config: Config) -> list[str]:
    """Problems a schema cannot see: every file the config names (``appliance.configcheck``), and
    replicas without room for their largest transaction (``replication.budget``)."""
    streams = config.replication.streams.items()
    sqlite = {n: (s.replica, s.journal_limit_mb) for n, s in streams if s.kind == "sqlite"}
    return configcheck.file_problems(config) + space_problems(sqlite)


def _describe(err: Any) -> str:
    return describe(err, Config)
