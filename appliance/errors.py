"""The one exception tree of hotsite.

Every error a user can cause or meet (bad config, daemon not running, port in
use, lab trouble) is a :class:`HotsiteError` carrying one human line and the
exit status the CLI turns it into. Anything else is a bug and may traceback.
"""

from __future__ import annotations


class HotsiteError(Exception):
    """An expected failure: one clear line for the user, and an exit status."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(HotsiteError):
    """The configuration is missing, unreadable or invalid (exit status 2).

    ``problems`` holds one line per mistake, each naming the key path, the bad
    value and what was expected.
    """

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class DaemonNotRunning(HotsiteError):
    """The CLI could not reach the daemon's control socket."""


class ApiError(HotsiteError):
    """The daemon answered a control request with an error."""


class StateError(HotsiteError):
    """The state store cannot be opened, is locked by another daemon, or is damaged."""


class StartupError(HotsiteError):
    """The daemon cannot start: a port is in use, a directory is not writable…"""
