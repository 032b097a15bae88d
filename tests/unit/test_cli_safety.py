"""Issue 19, safety: destructive commands confirm like failover does; a mistyped --config is named (exit 2);
``run`` takes ``--config`` after the subcommand too."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.main import cli


def test_a_mistyped_config_path_is_reported_as_such(tmp_path: Path) -> None:
    missing = tmp_path / "hotsite.tmol"
    for args in (["status"], ["events", "--json"], ["incidents"], ["replication", "status"]):
        result = CliRunner().invoke(cli, ["--config", str(missing), *args])
        assert result.exit_code == 2, (args, result.output)
        said = result.stdout if "--json" in args else result.stderr  # under --json: JSON on stdout
        assert str(missing) in said and "does not exist" in said
        assert "not running" not in said


def test_a_mistyped_config_path_from_the_environment_too(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["status"], env={"HOTSITE_CONFIG": str(tmp_path / "nope.toml")})
    assert result.exit_code == 2 and "does not exist" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["replication", "promote", "customers"],
        ["replication", "demote", "customers", "--discard-local-writes"],
        ["remote", "push-config", "dr-1", "__FILE__"],
        ["remote", "rotate-credentials", "--appliance", "dr-1", "--source", "pri-1", "--ca-dir", "__DIR__"],
    ],
)
def test_destructive_commands_ask_first(args: list[str], tmp_path: Path) -> None:
    """Off a terminal without --yes: a usage error before anything is touched; on "no": aborted."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    args = [a.replace("__FILE__", str(cfg)).replace("__DIR__", str(tmp_path)) for a in args]
    base = ["--runtime-dir", str(tmp_path)]  # no daemon here: reaching it would fail with exit 1
    refused = CliRunner().invoke(cli, [*base, *args])
    assert refused.exit_code == 2 and "--yes" in refused.output, refused.output
    # On a terminal the question is asked; "n" aborts (exit 1) with nothing done.
    import appliance.cli.confirm as confirm_mod

    mp = pytest.MonkeyPatch()
    mp.setattr(confirm_mod, "on_terminal", lambda: True)
    mp.setattr(confirm_mod.click, "confirm", _answer_no)
    try:
        asked = CliRunner().invoke(cli, [*base, *args])
    finally:
        mp.undo()
    assert asked.exit_code == 1 and "Aborted" in asked.output, asked.output
    # --yes goes straight on (here to the missing daemon or host).
    went = CliRunner().invoke(cli, [*base, *args, "--yes"])
    assert "--yes" not in went.output and "Aborted" not in went.output


def _answer_no(question: str, abort: bool = False) -> bool:
    import click

    assert "?" in question
    if abort:
        raise click.Abort()
    return False


def test_demote_without_discarding_needs_no_confirmation(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--runtime-dir", str(tmp_path), "replication", "demote", "customers"])
    assert "--yes" not in result.output and result.exit_code == 1  # went to the (missing) daemon


def test_run_takes_config_after_the_subcommand(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    after = CliRunner().invoke(cli, ["run", "--config", str(missing)])
    assert after.exit_code == 2 and str(missing) in after.stderr and "does not exist" in after.stderr
    before = CliRunner().invoke(cli, ["--config", str(missing), "run"])
    assert before.exit_code == 2 and str(missing) in before.stderr
