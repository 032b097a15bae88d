"""Check a witness config as `hotsite witness --config FILE` would read it, then exit.

The role's `validate` for /etc/hotsite/witness.toml: a file the witness would
refuse never replaces the one in place. (`hotsite witness` has no --check of
its own.) Exit 0 when valid; else 1 and one line per problem on stderr.
Runs with the appliance virtualenv's Python, where hotsite is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.errors import ConfigError
from failover.witness import load_settings


def problems(path: Path) -> list[str]:
    """Every reason the witness would not start with this file (none: it would)."""
    try:
        settings = load_settings(path, {})
    except ConfigError as exc:
        return [exc.message, *exc.problems]
    files = {"token_file": settings.token_file, "tls_cert_file": settings.tls_cert_file}
    files["tls_key_file"] = settings.tls_key_file
    return [f"{key}: {value} does not exist" for key, value in files.items() if value and not value.is_file()]


if __name__ == "__main__":
    found = problems(Path(sys.argv[1]))
    for line in found:
        print(line, file=sys.stderr)
    sys.exit(1 if found else 0)
