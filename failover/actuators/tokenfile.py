"""A fencing token kept in a file: read it, raise it, never lower it.

The actuators whose world has no place of its own for the token (netlink:
the kernel; Kamailio: its htables die with a restart) keep the newest token
obeyed in a small file. Two rules make it a fence:

* it is written atomically (temp file, fsync, rename, fsync of the
  directory): a crash leaves the old token or the new one, never half;
* it never goes down: :func:`raise_token` writes under an exclusive lock on
  ``<file>.lock`` and only a larger token, so a former leader's write held in
  flight by a pause cannot undo a newer leader's fence.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: str) -> None:
    """Temp file in the same directory, fsync, keep mode and owner, rename, fsync the directory."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if st is not None:
            os.chmod(tmp, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)  # Kamailio runs as its own user and must read it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_token(path: Path) -> int:
    """The token in ``path`` (0 when the file does not exist); ValueError if it holds something else."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        raise ValueError(f"token file {path} holds {text[:40]!r}, not a number")
    return int(text)


def raise_token(path: Path, token: int) -> int:
    """Record ``token`` unless the file holds a newer one; returns the newest now recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        current = read_token(path)
        if token > current:
            write_atomically(path, f"{token}\n")
        return max(token, current)


def write_if_newest(token_path: Path, token: int, path: Path, data: str) -> int:
    """Write ``path`` atomically only if ``token_path`` holds no token newer than ``token``.

    Under the same lock as :func:`raise_token`, so a fence cannot come between
    the check and the write: a write a pause held in flight lands before the
    fence or not at all. Returns the newest token recorded (the write happened
    only if that is not above ``token``).
    """
    token_path.parent.mkdir(parents=True, exist_ok=True)
    with token_path.with_name(token_path.name + ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        current = read_token(token_path)
        if current <= token:
            write_atomically(path, data)
        return current
