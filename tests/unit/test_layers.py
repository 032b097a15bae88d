"""The layer contract (tests/support/layers.py, ARCHITECTURE.md): imports run one way, no cycles.

Checked on the source tree as it is, and on a copy with a planted upward
import and a planted cycle, so the check itself is shown to fail when it must.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import layers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def found() -> list[layers.Import]:
    return layers.imports(ROOT)


def test_every_module_has_a_layer() -> None:
    assert layers.unplaced(layers.modules(ROOT)) == []


def test_no_import_goes_up_a_layer(found: list[layers.Import]) -> None:
    assert layers.upward(found) == []


def test_no_module_cycle(found: list[layers.Import]) -> None:
    assert layers.cycles(found) == []


def test_feature_packages_never_import_each_other_both_ways(found: list[layers.Import]) -> None:
    assert layers.feature_cycles(found) == []


def test_known_debt_is_still_real(found: list[layers.Import]) -> None:
    """An allowance nobody needs any more is removed, so the list only shrinks."""
    edges = {(imp.source, imp.target) for imp in found}
    assert [pair for pair in layers.ALLOWED_UPWARD if pair not in edges] == []
    runtime = {(imp.source, imp.target) for imp in found if imp.runs}
    for group in layers.ALLOWED_CYCLES:
        members = sorted(group)
        assert any((a, b) in runtime for a in members for b in members if a != b), members


def test_the_root_config_is_not_imported_by_a_feature(found: list[layers.Import]) -> None:
    """The 7-file circle through appliance.config is gone: features read their sections only."""
    below_top = [
        f"{imp.source}:{imp.line}"
        for imp in found
        if imp.target == "appliance.config" and layers.layer_of(imp.source) != len(layers.LAYERS) - 1
    ]
    assert below_top == []


def _not_python(folder: str, names: list[str]) -> list[str]:
    return [
        n for n in names if not n.endswith(".py") and not (Path(folder) / n).is_dir() or n == "__pycache__"
    ]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in layers.PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc", "__pycache__")
        )
    return tmp_path


def _plant(tree: Path, module: str, line: str, in_function: bool = False) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    text = f"\n\ndef _planted() -> None:\n    {line}\n" if in_function else f"\n{line}\n"
    path.write_text(path.read_text() + text)


@pytest.mark.parametrize(
    ("module", "line", "in_function", "expected"),
    [
        ("appliance.errors", "from appliance.app import Daemon", False, "appliance.errors:"),
        ("monitoring.health", "import failover.engine", True, "monitoring.health:"),
        ("failover.plans", "from appliance import config", False, "failover.plans:"),
        ("appliance.clock", "from monitoring import scheduler", True, "appliance.clock:"),
    ],
)
def test_a_planted_upward_import_is_caught(
    tree: Path, module: str, line: str, in_function: bool, expected: str
) -> None:
    _plant(tree, module, line, in_function)
    found = layers.upward(layers.imports(tree))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_planted_cycle_is_caught_even_behind_a_function_level_import(tree: Path) -> None:
    _plant(tree, "failover.routing", "from failover import plans", in_function=True)
    assert ["failover.plans", "failover.routing"] in layers.cycles(layers.imports(tree))


def test_a_planted_sideways_loop_between_features_is_caught(tree: Path) -> None:
    _plant(tree, "appliance.replication.checksum", "import appliance.paging.pdu")
    _plant(tree, "appliance.paging.pdu", "import appliance.replication.checksum", in_function=True)
    assert layers.feature_cycles(layers.imports(tree)) == [["appliance.paging", "appliance.replication"]]


def test_a_new_module_outside_every_layer_is_caught(tree: Path) -> None:
    (tree / "appliance" / "newthing.py").write_text("X = 1\n")
    assert layers.unplaced(layers.modules(tree)) == ["appliance.newthing"]
