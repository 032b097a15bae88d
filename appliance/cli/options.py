"""Options every command shares the meaning of: ``--since``/``--at`` values and ``--json`` output.

One parameter type (:class:`When`) reads every ``--since`` and ``--at`` the
same way (``90s``, ``15m``, ``2h``, ISO 8601; see :mod:`appliance.timefmt`),
and :func:`echo_json` is the one way a read command prints JSON, so times in
JSON are RFC 3339 everywhere (the Unix time kept as ``*_epoch``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, NoReturn

import click

from appliance import timefmt
from appliance.errors import ConfigError, HotsiteError


class When(click.ParamType):
    """A point in time: a duration back from now (``90s``, ``15m``, ``2h``, ``1d``) or ISO 8601.

    Converts to a Unix time. With ``epoch=True`` a number of at least a
    billion is taken as a Unix time itself (``--at 1714550400``).
    """

    name = "WHEN"

    def __init__(self, *, epoch: bool = False) -> None:
        self.epoch = epoch

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return timefmt.parse_when(str(value), time.time(), allow_epoch=self.epoch)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def echo_json(result: Any) -> None:
    """Print an API result as JSON for scripts, with times as RFC 3339 strings (and ``*_epoch``)."""
    click.echo(json.dumps(timefmt.json_times(result), indent=2))


def json_requested() -> bool:
    """Whether the command being run was given ``--json`` (errors then go out as JSON too)."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.params.get("as_json") or ctx.params.get("json"):
            return True
        ctx = ctx.parent
    return False


def echo_error(message: str, exit_code: int, problems: list[str] | tuple[str, ...] = ()) -> None:
    """Report a failure: under ``--json`` as a JSON object on stdout, where the script reads the
    answer (the exit status says it failed); otherwise as text on stderr."""
    if json_requested():
        error = {"ok": False, "error": message, "exit_code": exit_code}
        if problems:
            error["problems"] = list(problems)
        click.echo(json.dumps(error))
        return
    click.echo(f"hotsite: error: {message}", err=True)
    for problem in problems:
        click.echo(f"  {problem}", err=True)


def fail(exc: HotsiteError) -> NoReturn:
    """Report *exc* (on stderr, or as JSON on stdout under ``--json``) and exit with its status.

    The one way every ``hotsite`` command (the daemon's CLI, ``source``, ``witness``) gives up.
    """
    echo_error(exc.message, exc.exit_code, exc.problems if isinstance(exc, ConfigError) else ())
    sys.exit(exc.exit_code)
