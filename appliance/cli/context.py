"""What every ``hotsite`` command shares: where the daemon is, how to call it, how to fail.

Kept apart from ``main`` so command modules can import it without importing
the command tree itself.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import click

from appliance import api
from appliance import config as config_mod
from appliance.cli.options import fail
from appliance.errors import ConfigError, HotsiteError

DEFAULT_RUNTIME_DIR = Path("/run/hotsite")


class Context:
    def __init__(self, config: str | None, runtime_dir: str | None) -> None:
        self.config_path = config_mod.resolve_path(config)
        # Named by --config or HOTSITE_CONFIG (not the default): a missing file is a mistake to report.
        self.config_named = bool(config or os.environ.get(config_mod.ENV_VAR))
        self._runtime_dir = Path(runtime_dir) if runtime_dir else None

    @property
    def runtime_dir(self) -> Path:
        """Where the socket is: --runtime-dir, else the config's setting, else the default.

        Reads only that one key, so a broken config does not stop a technician
        from asking the running daemon what it is doing; a named file that is
        missing, though, is reported as such (exit 2), not as "daemon not running".
        """
        self.check_config_exists()
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

    def check_config_exists(self) -> None:
        """A --config (or HOTSITE_CONFIG) that names no file is a usage error, not "daemon not running"."""
        if self.config_named and not self.config_path.exists():
            named_by = f"named by --config or {config_mod.ENV_VAR}"
            fail(ConfigError(f"config file {self.config_path} does not exist ({named_by})"))


pass_ctx = click.make_pass_decorator(Context)
