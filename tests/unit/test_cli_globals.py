"""Issue 19: global options after the subcommand, and ``--json`` failures as JSON on stdout.

``hotsite status --config FILE`` was a usage error (group options only before the
subcommand), and a usage error under ``--json`` printed a usage text no script parses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.group import hoist_globals
from appliance.cli.main import cli


@pytest.mark.parametrize(
    ("args", "hoisted"),
    [
        (["status", "--config", "F"], ["--config", "F", "status"]),
        (["status", "--json", "-c", "F", "--local"], ["-c", "F", "--local", "status", "--json"]),
        (
            ["replication", "status", "--runtime-dir=D", "--plain"],
            ["--runtime-dir=D", "--plain", "replication", "status"],
        ),
        (
            ["--local", "events", "--config", "F", "--kind", "site"],
            ["--local", "--config", "F", "events", "--kind", "site"],
        ),
        # A subcommand's own --config keeps its meaning; run has one too.
        (["source", "--config", "S"], ["source", "--config", "S"]),
        (["remote", "diagnostics", "--config", "S"], ["remote", "diagnostics", "--config", "S"]),
        # After "--" nothing is an option; an unknown command is left for click to report.
        (["note", "--", "--local"], ["note", "--", "--local"]),
        (["statuz", "--config", "F"], ["statuz", "--config", "F"]),
    ],
)
def test_global_options_are_moved_before_the_subcommand(args: list[str], hoisted: list[str]) -> None:
    assert hoist_globals(cli, args) == hoisted


def test_config_after_the_subcommand_is_the_config_used(tmp_path: Path) -> None:
    """A missing --config file is exit 2 and named, wherever the option is written."""
    missing = tmp_path / "nope.toml"
    runner = CliRunner()
    for args in (["--config", str(missing), "status"], ["status", "--config", str(missing)]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert str(missing) in result.stderr, args


def test_local_after_the_subcommand_is_accepted(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["events", "--local", "--config", "/dev/null", "--runtime-dir", str(tmp_path)]
    )
    assert result.exit_code == 1, result.output  # parsed; only the daemon is missing
    assert "no such option" not in result.output.lower()


@pytest.mark.parametrize(
    "args",
    [
        ["events", "--json", "--since", "an hour"],  # a bad value (click's own error)
        ["events", "--json", "--no-such-option"],  # a usage error
        ["status", "--json"],  # the daemon is not running (the command's own error)
        ["replication", "status", "--json"],
    ],
)
def test_json_failures_are_one_json_object_on_stdout_and_a_non_zero_exit(
    args: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(cli, ["--config", "/dev/null", "--runtime-dir", str(tmp_path), *args])
    assert result.exit_code != 0
    error = json.loads(result.stdout)
    assert error["ok"] is False and error["error"] and error["exit_code"] == result.exit_code
    assert result.stderr == ""


def test_without_json_a_usage_error_stays_text_on_stderr(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--runtime-dir", str(tmp_path), "events", "--since", "an hour"])
    assert result.exit_code == 2 and result.stdout == ""
    assert "neither a duration" in result.stderr
