"""The one secret-file reader: every ``*_file`` that holds a password, token, PIN or key is read here.

One trimming rule for all of them: the secret is the file's text with
surrounding whitespace removed (so the usual trailing newline, a CRLF, an
editor's stray space do not end up in a password), and it is one line: a line
break inside is refused rather than silently cut, because a secret that is
silently different from the file is one that fails far from its cause. What a
secret must look like beyond that (a word of printable ASCII, ``user:password``)
is its user's check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from appliance.errors import ConfigError


def read_secret(
    path: Path,
    what: str,
    *,
    encoding: Literal["utf-8", "ascii"] = "utf-8",
    form: str = "the secret alone",
) -> str:
    """The secret in ``path`` (may be empty); ConfigError naming ``what``, the file and ``form`` otherwise."""
    try:
        text = path.read_bytes().decode(encoding)
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what}: {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        kind = "printable ASCII" if encoding == "ascii" else "UTF-8 text"
        raise ConfigError(f"{what}: {path}: expected {kind}") from None
    secret = text.strip()
    if "\n" in secret or "\r" in secret:
        raise ConfigError(f"{what}: {path}: expected one line ({form})")
    return secret
