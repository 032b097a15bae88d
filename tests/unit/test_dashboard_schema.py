"""Issue 19: the dashboards are checked against Grafana's own schema, so a misplaced key fails.

No Grafana server is packaged for Debian 12. grafana-foundation-sdk (PyPI) carries Grafana's
dashboard schema as generated types, one per panel plugin (``timeseries``, ``stat``,
``state-timeline``…). Reading a dashboard into those types and writing it back keeps
exactly the keys the schema knows: a key that comes back missing is one Grafana ignores,
like ``drawStyle`` under ``options`` (it belongs in ``fieldConfig.defaults.custom``), which
drew bars as lines and hid threshold lines on five panels.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

pytest.importorskip("grafana_foundation_sdk", reason="test dependency: pip install '.[test]'")

from grafana_foundation_sdk.cog import plugins as cog_plugins  # noqa: E402
from grafana_foundation_sdk.cog import runtime as cog_runtime  # noqa: E402
from grafana_foundation_sdk.models import dashboard as schema  # noqa: E402

from monitoring.grafana import build  # noqa: E402

cog_plugins.register_default_plugins()


def unknown_keys(data: Any, known: Any, path: str = "") -> list[str]:
    """Paths of keys in *data* that the schema's round trip (*known*) dropped."""
    if isinstance(data, dict):
        if not isinstance(known, dict):
            return [f"{path} (not an object in the schema)"]
        missing = [f"{path}.{k}" for k in data if k not in known]
        return missing + [
            p for k, v in data.items() if k in known for p in unknown_keys(v, known[k], f"{path}.{k}")
        ]
    if isinstance(data, list) and isinstance(known, list):
        return [
            p
            for i, (a, b) in enumerate(zip(data, known, strict=False))
            for p in unknown_keys(a, b, f"{path}[{i}]")
        ]
    return []


def schema_problems(board: dict[str, Any]) -> list[str]:
    """Keys of *board* that Grafana's dashboard schema (v10+) does not know, and unknown panel types."""
    problems = [f"panel {p.get('title')!r}: type {p['type']!r} unknown to the schema"
                for p in board["panels"] if cog_runtime.panelcfg_config(p["type"]) is None]  # fmt: skip
    round_trip = json.loads(
        json.dumps(schema.Dashboard.from_json(board).to_json(), default=lambda o: o.to_json())
    )
    return problems + unknown_keys(board, round_trip)


@pytest.mark.parametrize("name", sorted(build.BUILDERS))
def test_every_dashboard_fits_grafanas_schema(name: str) -> None:
    board = json.loads(build.build()[f"{name}.json"])
    assert schema_problems(board) == []


def test_bars_and_threshold_lines_are_where_grafana_reads_them() -> None:
    boards = [json.loads(text) for text in build.build().values()]
    styled = [p for b in boards for p in b["panels"] if p["fieldConfig"]["defaults"].get("custom")]
    assert any(p["fieldConfig"]["defaults"]["custom"].get("drawStyle") == "bars" for p in styled)
    assert any("thresholdsStyle" in p["fieldConfig"]["defaults"]["custom"] for p in styled)
    for p in (p for b in boards for p in b["panels"]):
        assert not {"drawStyle", "thresholdsStyle"} & set(p["options"]), p["title"]


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("options", "drawStyle"),
        ("options", "thresholdsStyle"),
        ("custom", "drawStyl"),
        ("panel", "fieldconfig"),
    ],
)
def test_a_mutated_panel_fails(where: str, key: str) -> None:
    """The check is not vacuous: the issue's misplaced keys, a typo and a wrongly cased key all fail."""
    board = json.loads(build.build()["hotsite-paging.json"])
    bad = copy.deepcopy(board)
    panel = next(p for p in bad["panels"] if p["type"] == "timeseries")
    target = {"options": panel["options"], "custom": panel["fieldConfig"]["defaults"].setdefault("custom", {}),
              "panel": panel}[where]  # fmt: skip
    target[key] = "bars"
    problems = schema_problems(bad)
    assert len(problems) == 1 and problems[0].endswith(f".{key}"), problems


def test_an_unknown_panel_type_fails() -> None:
    board = json.loads(build.build()["hotsite-host.json"])
    board["panels"][0]["type"] = "timeseriez"
    assert any("unknown to the schema" in p for p in schema_problems(board))
