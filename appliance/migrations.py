"""The schema of every component that keeps state in the appliance's database: the daemon's list.

Top layer: it names every feature's migrations, and the daemon opens its
store with :data:`COMPONENTS` (``appliance.app``); the store itself, below
the features, knows only the core's tables (:mod:`appliance.schema`).

Each component owns a list of migrations, applied in order, each in one
transaction together with the component's version in ``schema_versions``.
Components version independently, so two features can grow their tables
without renumbering each other's migrations. Never edit a released
migration: append a new one.
"""

from __future__ import annotations

from appliance.paging.schema import MIGRATIONS as PAGING
from appliance.replication.schema import MIGRATIONS as REPLICATION
from appliance.schema import MIGRATIONS as CORE  # the core's, defined beside the store

# component name -> its migrations. Register a new component with one line here.
COMPONENTS: dict[str, list[str]] = {
    "core": CORE,
    "paging": PAGING,
    "replication": REPLICATION,
}
