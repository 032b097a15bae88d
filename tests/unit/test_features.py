"""The feature table (appliance/features.py) is what the daemon really runs: metrics, routes, tables.

A real Appliance is started in-process (real store on disk, real control
socket, metrics listener off) and compared with the table: every metric its
registry holds is in the catalogue and every catalogued daemon metric is in
its registry; every control API method it answers is declared by exactly one
feature; and the store opened with the table's migrations has the same schema
as a state directory written before the table existed.
"""

from __future__ import annotations

import ast
import asyncio
import re
import shutil
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from appliance import api, config, features, migrations, roles
from appliance.app import Appliance
from appliance.errors import ApiError
from appliance.store import DB_NAME, Store
from monitoring import catalogue
from tests.conftest import REPO
from tests.support import configs

FIXTURE = REPO / "tests" / "fixtures" / "state-535440a"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, backend: str) -> config.Config:
    coordination = (
        f'[coordination]\nbackend = "etcd"\nrequest_timeout_s = 0.2\nendpoints = ["http://127.0.0.1:{_closed_port()}"]\n'
        if backend == "etcd"
        else ""
    )
    text = (
        f'[appliance]\nname = "a"\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
        "[metrics]\nenabled = false\n" + coordination
    )
    (tmp_path / "state").mkdir()
    (tmp_path / "run").mkdir()
    return configs.parse(text, primary_sbc="127.0.0.1:9", backup_sbc="127.0.0.1:9")


def _exposed(registry: CollectorRegistry) -> set[str]:
    """Metric names as /metrics shows them (counters with _total, infos with _info)."""
    return {f.name + catalogue.SUFFIX.get(f.type, "") for f in registry.collect()}


def _running(cfg: config.Config, tmp_path: Path, probe: Any) -> Any:
    """Start a real Appliance on ``cfg``, run ``probe(app)`` in a thread, stop it; return the result."""

    async def main() -> Any:
        app = Appliance(cfg, tmp_path / "hotsite.toml", registry=CollectorRegistry())
        try:
            await app.start()
            return await asyncio.to_thread(probe, app)
        finally:
            await app.stop()

    return asyncio.run(main())


def _daemon_entries(cfg: config.Config) -> set[str]:
    """The catalogue's names the daemon exposes with ``cfg``, per the feature table."""
    names: set[str] = set()
    for _feature, metrics in features.metric_sets():
        if metrics.program == features.DAEMON and metrics.when(cfg):
            registry = CollectorRegistry()
            metrics.make(registry)
            names |= _exposed(registry)
    return names


@pytest.mark.parametrize("backend", ["witness", "etcd"])
def test_the_catalogue_equals_a_running_daemons_registry(tmp_path: Path, backend: str) -> None:
    cfg = _config(tmp_path, backend)
    registry_names = _running(cfg, tmp_path, lambda app: _exposed(app.metrics.registry))
    catalogued = {e.name for e in catalogue.entries()}
    expected = _daemon_entries(cfg)
    assert expected <= catalogued
    assert registry_names - catalogued == set(), "registered by the daemon but not in METRICS.md"
    assert expected - registry_names == set(), "in the feature table but not registered by the daemon"
    assert registry_names == expected
    coordination = {n for n in registry_names if n.startswith("hotsite_coordination_")}
    if backend == "etcd":  # issue 17: these were in no catalogue
        assert len(coordination) >= 6 and coordination <= catalogued, coordination
    else:
        assert coordination == set()
    # What the daemon does not expose is another program's (the witness agent's), never a stray.
    others = catalogued - registry_names - {n for n in catalogued if n.startswith("hotsite_coordination_")}
    assert others and all(n.startswith("hotsite_witness_") for n in others), sorted(others)


def _known_methods(app: Appliance) -> set[str]:
    """The methods the running daemon answers, as it lists them to a caller naming an unknown one."""
    with pytest.raises(ApiError) as caught:
        api.call(app.config.appliance.runtime_dir, "no.such.method")
    listed = re.search(r"\(known: (.*)\)$", str(caught.value))
    assert listed is not None, caught.value
    return set(listed.group(1).split(", "))


def _service_routes(app: Appliance) -> dict[str, set[str]]:
    assert app.paging is not None and app.replication is not None
    return {"paging": set(app.paging.handlers()), "replication": set(app.replication.handlers())}


def test_every_api_route_comes_from_exactly_one_feature(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "witness")
    known, services = _running(cfg, tmp_path, lambda app: (_known_methods(app), _service_routes(app)))
    owners = features.route_owners()
    assert known == set(owners)
    assert {"status", "failover", "incidents", "replication.status", "coordination.status"} <= known
    for name, routes in services.items():  # the services' own handlers() are what the table declares
        assert routes == set(features.routes_of(name)), name
    with pytest.raises(KeyError, match="no feature 'nope' in the table"):
        features.routes_of("nope")


def _handler(caller: api.Caller, params: dict[str, Any]) -> Any:
    raise AssertionError("never called")


def test_two_features_claiming_one_route_are_refused_naming_both() -> None:
    a = features.Feature(
        "alpha", features.FEATURES[0].settings, features.FEATURES[0].checks, routes=("x", "y")
    )
    b = features.Feature("beta", features.FEATURES[1].settings, features.FEATURES[1].checks, routes=("y",))
    with pytest.raises(ValueError, match="'y' claimed by both features 'alpha' and 'beta'"):
        features.route_owners([a, b])
    with pytest.raises(ValueError, match="'y' claimed by both features 'alpha' and 'beta'"):
        features.route_table({"alpha": {"x": _handler, "y": _handler}, "beta": {"y": _handler}}, [a, b])
    with pytest.raises(ValueError, match="'y' claimed by both features 'alpha' and 'beta'"):
        features.route_table({"alpha": {"x": _handler}, "beta": {"y": _handler}}, [a, b])


def test_a_route_table_with_a_feature_left_out_or_an_undeclared_route_is_refused() -> None:
    a = features.Feature("alpha", features.FEATURES[0].settings, features.FEATURES[0].checks, routes=("x",))
    b = features.Feature("beta", features.FEATURES[1].settings, features.FEATURES[1].checks, routes=("z",))
    with pytest.raises(ValueError, match="feature 'beta' declares API routes but no handlers"):
        features.route_table({"alpha": {"x": _handler}}, [a, b])
    with pytest.raises(ValueError, match=r"feature 'alpha': handlers \['w'\] not declared"):
        features.route_table({"alpha": {"x": _handler, "w": _handler}, "beta": {"z": _handler}}, [a, b])
    with pytest.raises(ValueError, match=r"routes \['z'\] without a handler"):
        features.route_table({"alpha": {"x": _handler}, "beta": {}}, [a, b])
    with pytest.raises(ValueError, match="handlers for gamma: not in the feature table"):
        features.route_table({"alpha": {"x": _handler}, "beta": {"z": _handler}, "gamma": {}}, [a, b])
    assert set(features.route_table({"alpha": {"x": _handler}, "beta": {"z": _handler}}, [a, b])) == {
        "x",
        "z",
    }


def test_every_feature_is_in_the_root_config_once_in_table_order() -> None:
    assert config.Config.__bases__ == tuple(f.settings for f in features.FEATURES)
    assert [f.settings for f in config.FEATURES] == [f.settings for f in features.FEATURES]
    names = [f.name for f in features.FEATURES]
    assert len(names) == len(set(names))


def _schema(db: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    return [(t, n, s) for t, n, s in rows]


def _versions(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT component, version FROM schema_versions").fetchall())


@pytest.fixture
def old_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "old"
    shutil.copytree(FIXTURE, state)
    yield state


def test_the_tables_migrations_build_an_empty_store_as_the_old_code_did(
    tmp_path: Path, old_state: Path
) -> None:
    """Same components in the same order, same ids, and byte for byte the same schema on disk."""
    assert features.components() == migrations.COMPONENTS
    assert list(migrations.COMPONENTS) == ["core", "paging", "replication"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    Store.open(fresh, components=features.components()).close()
    assert _versions(fresh / DB_NAME) == _versions(old_state / DB_NAME)
    assert _schema(fresh / DB_NAME) == _schema(old_state / DB_NAME)
    Store.open(old_state, components=features.components()).close()  # and the old state opens as it is
    assert _schema(old_state / DB_NAME) == _schema(fresh / DB_NAME)


def test_two_features_claiming_one_component_are_refused_naming_both() -> None:
    core = features.FEATURES[0]
    twin = features.Feature("twin", core.settings, core.checks, migrations={"core": ["CREATE TABLE t (x)"]})
    with pytest.raises(ValueError, match="component 'core' claimed by both core and twin"):
        features.components([core, twin])


def _failover_answers(app: Appliance) -> list[str]:
    """What the failover feature's handlers answer over the real socket, refusals included."""
    run = app.config.appliance.runtime_dir
    answers = []
    for method, params in (("failover", {"to": "nowhere"}), ("maintenance", {"on": "yes"})):
        with pytest.raises(ApiError) as caught:
            api.call(run, method, params)
        answers.append(str(caught.value))
    reply = api.call(run, "maintenance", {"on": True, "reason": "feature table test"})
    answers.append(reply["failover"]["state"])
    answers.append(api.call(run, "coordination.status")["backend"])
    return answers


def test_the_failover_features_handlers_answer_through_the_socket(tmp_path: Path) -> None:
    answers = _running(_config(tmp_path, "witness"), tmp_path, _failover_answers)
    assert answers == [
        "--to must be 'backup' or the backup site 'backup', got 'nowhere'"
        " (with several backup sites, hotlines go where the plan sends them)",
        "on must be true or false",
        "maintenance",
        "witness",
    ]


def _cli_methods() -> set[str]:
    """Every control API method the CLI names: the string given to a ``call``/``_call`` function."""
    found: set[str] = set()
    for path in sorted((REPO / "appliance" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in ("call", "_call"):
                continue
            found |= {
                a.value for a in node.args[:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)
            }
    return found


def test_every_method_the_cli_and_the_roles_name_is_a_declared_route() -> None:
    """A renamed or dropped route cannot leave a CLI command or a role pointing at nothing."""
    routes = set(features.route_owners())
    cli = _cli_methods()
    assert {"status", "failover", "maintenance", "incidents", "page_test", "replication.promote"} <= cli
    assert cli - routes == set()
    assert set(roles.READ_ONLY_METHODS) - routes == set()
