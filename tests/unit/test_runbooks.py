"""Issue 19: every alert has a summary, a description and a runbook in the repository.

5 of 24 alerts had a description and none a ``runbook_url``. Each alert now points at
``docs/runbooks/<alert>.md``; this checks the file exists, says what the alert means, what to
check and what to run, and that every ``hotsite`` command it tells a technician to type is a
real command with real options (a renamed command would otherwise rot the runbook silently).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from appliance.cli.main import cli

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "prometheus" / "hotsite.rules.yml"
RUNBOOKS = REPO / "docs" / "runbooks"
SECTIONS = ("## What it means", "## What to check", "## What to run")


def _alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def _commands(text: str) -> list[str]:
    """The ``hotsite …`` commands quoted in the runbook's "What to run" section."""
    run = text.split(SECTIONS[2], 1)[1]
    return [c for c in re.findall(r"`([^`]+)`", run) if c.startswith("hotsite ")]


def unknown_in(command: str) -> list[str]:
    """Words of *command* that the CLI does not know: a subcommand or an option."""
    words = shlex.split(command)[1:]
    cmd: click.Command = cli
    while isinstance(cmd, click.Group) and words and not words[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), words[0])
        if sub is None:
            return [words[0]]
        cmd, words = sub, words[1:]
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    return [w for w in words if w.startswith("-") and w not in known]


def test_every_alert_has_a_summary_a_description_and_its_runbook_file() -> None:
    alerts = _alerts()
    assert len(alerts) >= 29
    for rule in alerts:
        notes = rule["annotations"]
        assert notes.get("summary") and notes.get("description"), rule["alert"]
        assert notes["runbook_url"] == f"docs/runbooks/{rule['alert']}.md", rule["alert"]
        assert (REPO / notes["runbook_url"]).is_file(), f"{rule['alert']}: no {notes['runbook_url']}"


@pytest.mark.parametrize("path", sorted(RUNBOOKS.glob("*.md")), ids=lambda p: p.stem)
def test_each_runbook_says_what_it_means_what_to_check_and_what_to_run(path: Path) -> None:
    text = path.read_text()
    assert text.startswith(f"# {path.stem}\n")
    for heading in SECTIONS:
        body = text.split(heading, 1)[1].split("\n## ", 1)[0] if heading in text else ""
        assert body.strip(), f"{path.name}: {heading!r} missing or empty"
    assert _commands(text), f"{path.name}: no hotsite command to run"
    assert path.stem in {r["alert"] for r in _alerts()}, f"{path.name}: no alert of that name"


def test_every_hotsite_command_in_a_runbook_exists() -> None:
    bad = {(p.name, c): unknown_in(c) for p in RUNBOOKS.glob("*.md") for c in _commands(p.read_text())}
    assert {k: v for k, v in bad.items() if v} == {}


def test_a_renamed_command_or_option_is_caught() -> None:
    assert unknown_in("hotsite replication status") == []
    assert unknown_in("hotsite replication stats") == ["stats"]
    assert unknown_in("hotsite events --kind site --sinse 1h") == ["--sinse"]
