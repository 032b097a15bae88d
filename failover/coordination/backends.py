"""The one table of coordination backends: ``[coordination] backend`` -> the class that implements it.

Adding a backend: a module in this package implementing
:class:`~failover.coordination.base.Coordination` with a ``from_config``
classmethod, one line here, and its name in the section's ``backend`` field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from appliance.errors import ConfigError
from failover.coordination.base import Coordination, Recorder
from failover.coordination.etcd import Etcd
from failover.coordination.witness import WitnessOnly

if TYPE_CHECKING:
    from failover.settings import FailoverConfig as Config

Factory = Callable[..., Coordination]

BACKENDS: dict[str, Factory] = {
    "witness": WitnessOnly.from_config,
    "etcd": Etcd.from_config,
}


def from_config(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    record: Recorder = lambda kind, message, data: None,
) -> Coordination:
    """The backend ``config.coordination.backend`` names; ConfigError naming the known ones otherwise."""
    backend = config.coordination.backend
    make = BACKENDS.get(backend)
    if make is None:
        known = ", ".join(repr(name) for name in BACKENDS)
        raise ConfigError(
            f"coordination.backend: {backend!r} is not a known backend; expected one of {known}"
        )
    return make(config, registry=registry or CollectorRegistry(), record=record)
