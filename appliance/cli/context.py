"""What every ``hotsite`` command shares: where the daemon is, how to call it, how to fail.

Kept apart from ``main`` so command modules can import it without importing
the command tree itself.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import click

from appliance import api
from appliance import config as config_mod
from appliance.errors import ConfigError, HotsiteError

DEFAULT_RUNTIME_DIR = Path("/run/hotsite")


def fail(exc: HotsiteError) -> NoReturn:
    """Report *exc* on stderr (as JSON under ``--json``) and exit with its status."""
    from appliance.cli.options import echo_error

    echo_error(exc.message, exc.exit_code, exc.problems if isinstance(exc, ConfigError) else ())
    sys.exit(exc.exit_code)


class Context:
    def __init__(self, config: str | None, runtime_dir: str | None) -> None:
        self.config_path = config_mod.resolve_path(config)
        self._runtime_dir = Path(runtime_dir) if runtime_dir else None

    @property
    def runtime_dir(self) -> Path:
        """Where the socket is: --runtime-dir, else the config's setting, else the default.

        Reads only that one key, so a broken config does not stop a technician
        from asking the running daemon what it is doing.
        """
        if self._runtime_dir:
            return self._runtime_dir
        try:
            data = tomllib.loads(self.config_path.read_text())
            return Path(data["appliance"]["runtime_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return DEFAULT_RUNTIME_DIR

    def call(self, method: str, **params: Any) -> Any:
        try:
            return api.call(self.runtime_dir, method, params)
        except HotsiteError as exc:
            fail(exc)


pass_ctx = click.make_pass_decorator(Context)
