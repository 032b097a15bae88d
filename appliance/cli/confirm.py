"""One rule for commands that destroy or move something: ask on a terminal, refuse silently-run scripts.

The same rule as ``failover``/``failback``/``approve`` (``appliance.cli.failover``):
on a terminal the command asks; off one it refuses unless ``--yes`` was given
(exit 2, a usage error), so a script never changes what it did not mean to.
"""

from __future__ import annotations

import sys

import click

yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")


def confirm(question: str, yes: bool) -> None:
    """Return if confirmed (or *yes*); abort (exit 1) on "no"; a usage error off a terminal without --yes."""
    if yes:
        return
    if not on_terminal():
        raise click.UsageError("not on a terminal: add --yes to confirm")
    click.confirm(question, abort=True)


def on_terminal() -> bool:
    """Whether someone can answer: stdin is a terminal."""
    return sys.stdin.isatty()
