"""The root command group: global options in any position, and ``--json`` failures as JSON.

Two things a technician and a script expect from ``systemctl``/``kubectl`` that plain click
does not do:

* ``hotsite status --config FILE`` (global options after the subcommand). Click accepts
  group options only before the subcommand; :func:`hoist_globals` moves them in front,
  unless the subcommand defines an option of the same name itself (``source --config``,
  ``remote diagnostics --config`` keep their own meaning).
* ``hotsite events --since 'an hour' --json`` failing with a JSON object on stdout and a
  non-zero exit, not a usage text a script cannot parse. Errors the commands raise
  themselves go through :func:`appliance.cli.options.echo_error`; this catches click's own
  (usage errors, bad values) for the same treatment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click


def _takes_value(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and not param.is_flag and not param.count


def _option_names(command: click.Command) -> dict[str, click.Parameter]:
    return {name: p for p in command.params for name in (*p.opts, *p.secondary_opts) if name.startswith("-")}


def hoist_globals(group: click.Group, args: Sequence[str]) -> list[str]:
    """*args* with *group*'s own options moved before the subcommand path, where click reads them."""
    args = list(args)
    globals_ = _option_names(group)
    front: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":  # options already in front
        param = globals_.get(args[i].split("=", 1)[0])
        i += 2 if param is not None and _takes_value(param) and "=" not in args[i] else 1
    front, rest = args[:i], args[i:]
    command: click.Command = group
    path: list[str] = []
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        if sub is None:
            break
        command, path, rest = sub, [*path, rest[0]], rest[1:]
    if command is group:
        return args
    own = _option_names(command)
    moved: list[str] = []
    kept: list[str] = []
    j = 0
    while j < len(rest):
        word = rest[j]
        if word == "--":
            kept += rest[j:]
            break
        name = word.split("=", 1)[0]
        param = globals_.get(name)
        if param is None or name in own:
            kept.append(word)
            j += 1
            continue
        width = 2 if _takes_value(param) and "=" not in word else 1
        moved += rest[j : j + width]
        j += width
    return [*front, *moved, *path, *kept]


def json_error(message: str, exit_code: int) -> None:
    """One failure as a script reads it: a JSON object on stdout."""
    click.echo(json.dumps({"ok": False, "error": message, "exit_code": exit_code}))


class RootGroup(click.Group):
    """``hotsite`` itself: see the module docstring."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = hoist_globals(self, sys.argv[1:] if args is None else args)
        if not standalone_mode or "--json" not in argv:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            json_error(exc.format_message(), exc.exit_code)
            sys.exit(exc.exit_code)
        except click.Abort:
            json_error("aborted", 1)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)
