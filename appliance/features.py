"""The feature table: every feature once, with all it brings to the daemon.

Top layer. A feature owns its settings (the root keys of ``hotsite.toml``
and its ``problems``/``warnings``), its metrics (classes that take a
``CollectorRegistry``), its tables (migrations, by component) and the control
API methods it answers. This module lists each feature once, and the rest of
the top is built from :data:`FEATURES`, so a feature cannot be half
registered:

- the root :class:`appliance.config.Config` and its checks (``config.FEATURES``);
- the store's migrations (:data:`appliance.migrations.COMPONENTS`);
- the metrics catalogue ``monitoring/METRICS.md`` (:mod:`monitoring.catalogue`),
  which a unit test compares with a running daemon's registry;
- the control API's route table (:func:`route_table`): the daemon hands in each
  feature's handlers, and a route answered by no feature, by two, or not
  declared here refuses to start.
"""

from __future__ import annotations

import tempfile
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from appliance import core_settings, schema
from appliance.api import Handler
from appliance.core_metrics import CoreMetrics
from appliance.fields import Section
from appliance.paging import schema as paging_schema
from appliance.paging import settings as paging_settings
from appliance.paging.metrics import PagingMetrics
from appliance.replication import replica_settings
from appliance.replication import schema as replication_schema
from appliance.replication.metrics import ReplicationMetrics
from failover import settings as failover_settings
from failover.etcd.metrics import CoordinationMetrics
from failover.metrics import FailoverMetrics
from failover.witness.metrics import WitnessMetrics
from monitoring import settings as monitoring_settings
from monitoring.kpi_monitor import CallKpiMetrics
from monitoring.metrics import Metrics as MonitoringMetrics
from monitoring.probes.host import HostCollector

DAEMON = "hotsite"  # the appliance daemon; other programs are named by their command


def _always(config: Any) -> bool:
    return True


@dataclass(frozen=True)
class MetricSet:
    """One metrics class of a feature, and when and where it is exposed."""

    make: Callable[[CollectorRegistry], object]  # registers the metrics on the registry it is given
    source: str  # the module that defines them (the catalogue's "defined in")
    when: Callable[[Any], bool] = _always  # the daemon exposes them only if this holds of its config
    program: str = DAEMON  # the program whose /metrics shows them

    @classmethod
    def of(cls, metrics: type, **kwargs: Any) -> MetricSet:
        return cls(metrics, metrics.__module__, **kwargs)


@dataclass(frozen=True)
class Feature:
    """One feature of the appliance: its settings, metrics, tables and control API methods."""

    name: str
    settings: type[Section]  # its root keys; the root Config inherits it
    checks: types.ModuleType  # its settings module: ``problems(cfg)`` and ``warnings(cfg)``
    metrics: tuple[MetricSet, ...] = ()
    migrations: Mapping[str, list[str]] = field(default_factory=dict)  # component -> its migrations
    routes: tuple[str, ...] = ()  # control API methods it answers


def _host(registry: CollectorRegistry) -> None:
    """The host collector as the catalogue sees it (the daemon builds it from ``[host]``)."""
    registry.register(HostCollector(Path(tempfile.gettempdir()), ["lo"]))


def _etcd(config: Any) -> bool:
    return bool(config.coordination.backend == "etcd")


# The one list. Order matters: the root config's bases and the store's components follow it.
FEATURES: tuple[Feature, ...] = (
    Feature(
        "core",
        core_settings.CoreSettings,
        core_settings,
        metrics=(MetricSet.of(CoreMetrics),),
        migrations={"core": schema.MIGRATIONS},
        routes=("ping", "status", "events", "note", "reload"),
    ),
    Feature(
        "monitoring",
        monitoring_settings.MonitoringSettings,
        monitoring_settings,
        metrics=(
            MetricSet.of(MonitoringMetrics),
            MetricSet.of(CallKpiMetrics),
            MetricSet(_host, HostCollector.__module__),
        ),
        routes=("probes", "trunks"),
    ),
    Feature(
        "failover",
        failover_settings.FailoverSettings,
        failover_settings,
        metrics=(
            MetricSet.of(FailoverMetrics),
            MetricSet.of(CoordinationMetrics, when=_etcd),
            MetricSet.of(WitnessMetrics, program="hotsite witness"),
        ),
        routes=("failover", "failback", "approve", "cancel", "maintenance", "drill", "coordination.status"),
    ),
    Feature(
        "paging",
        paging_settings.PagingSettings,
        paging_settings,
        metrics=(MetricSet.of(PagingMetrics),),
        migrations={"paging": paging_schema.MIGRATIONS},
        routes=("incidents", "ack", "oncall", "page_test"),
    ),
    Feature(
        "replication",
        replica_settings.ReplicationSettings,
        replica_settings,
        metrics=(MetricSet.of(ReplicationMetrics),),
        migrations={"replication": replication_schema.MIGRATIONS},
        routes=(
            "replication.status",
            "replication.verify",
            "replication.promote",
            "replication.demote",
            "replication.snapshots",
        ),
    ),
)


def components(features: Iterable[Feature] = FEATURES) -> dict[str, list[str]]:
    """Every feature's migrations by component, in table order (the store applies them so)."""
    found: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for feature in features:
        for component, steps in feature.migrations.items():
            if component in found:
                raise ValueError(
                    f"migration component {component!r} claimed by both {owner[component]} and {feature.name}"
                )
            found[component], owner[component] = steps, feature.name
    return found


def metric_sets(features: Iterable[Feature] = FEATURES) -> list[tuple[Feature, MetricSet]]:
    return [(feature, metrics) for feature in features for metrics in feature.metrics]


def routes_of(name: str, features: Iterable[Feature] = FEATURES) -> tuple[str, ...]:
    """The API methods feature ``name`` declares; KeyError naming the known features otherwise."""
    features = list(features)
    for feature in features:
        if feature.name == name:
            return feature.routes
    raise KeyError(f"no feature {name!r} in the table ({', '.join(f.name for f in features)})")


def route_owners(features: Iterable[Feature] = FEATURES) -> dict[str, str]:
    """route -> the feature answering it; ValueError naming both features if two claim one."""
    owners: dict[str, str] = {}
    for feature in features:
        for route in feature.routes:
            if route in owners:
                raise ValueError(
                    f"API route {route!r} claimed by both features {owners[route]!r} and {feature.name!r}"
                )
            owners[route] = feature.name
    return owners


def route_table(
    handlers: Mapping[str, Mapping[str, Handler]], features: Iterable[Feature] = FEATURES
) -> dict[str, Handler]:
    """The control API's routes from each feature's ``handlers`` (feature name -> method -> handler).

    Every feature of the table must hand in exactly the routes it declares: a
    feature left out, a handler nobody declared or a declared route nobody
    answers is a ValueError saying which, before the socket opens.
    """
    features = list(features)
    owners = route_owners(features)
    names = [f.name for f in features]
    stray = sorted(set(handlers) - set(names))
    if stray:
        raise ValueError(f"handlers for {', '.join(stray)}: not in the feature table ({', '.join(names)})")
    table: dict[str, Handler] = {}
    for feature in features:
        given = handlers.get(feature.name)
        if given is None:
            raise ValueError(f"feature {feature.name!r} declares API routes but no handlers were wired")
        for route in given:
            if owners.get(route) not in (None, feature.name):
                raise ValueError(
                    f"API route {route!r} claimed by both features {owners[route]!r} and {feature.name!r}"
                )
        undeclared = sorted(set(given) - set(feature.routes))
        unanswered = sorted(set(feature.routes) - set(given))
        if undeclared or unanswered:
            raise ValueError(
                f"feature {feature.name!r}: handlers {undeclared} not declared in its routes,"
                f" routes {unanswered} without a handler"
            )
        table.update(given)
    return table
