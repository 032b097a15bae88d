"""The schema of every component that keeps state in the appliance's database: the daemon's list.

Top layer: built from the feature table (:data:`appliance.features.FEATURES`:
each feature names its own tables' migrations, in its own ``schema.py``), and
the daemon opens its store with :data:`COMPONENTS` (``appliance.app``); the
store itself, below the features, knows only the core's tables
(:mod:`appliance.schema`).

Each component owns a list of migrations, applied in order, each in one
transaction together with the component's version in ``schema_versions``.
Components version independently, so two features can grow their tables
without renumbering each other's migrations. Never edit a released
migration: append a new one.
"""

from __future__ import annotations

from appliance.features import components
from appliance.schema import MIGRATIONS as CORE  # noqa: F401 - the core's alone (tests open bare stores with it)

# component name -> its migrations: core, paging, replication (the feature table's order).
COMPONENTS: dict[str, list[str]] = components()
