"""A fencing token kept in a file: read it, raise it, never lower it.

The actuators whose world has no place of its own for the token (netlink:
the kernel; Kamailio: its htables die with a restart) keep the newest token
obeyed in a small file. Two rules make it a fence:

* it is written atomically (temp file, fsync, rename, fsync of the
  directory): a crash leaves the old token or the new one, never half;
* it never goes down: :func:`raise_token` writes under an exclusive lock on
  ``<file>.lock`` and only a larger token, so a former leader's write held in
  flight by a pause cannot undo a newer leader's fence.

The lock is waited for at most ``wait_s`` (:class:`TimeoutError` after it): a
former leader paused *inside* the critical section keeps the lock until it
runs again, and a new leader's fence must fail within its time limit and be
retried, not block a worker thread that nothing can cancel. The actuators
wait half their time limit for it, so that their error names the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_POLL_S = 0.01


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


@contextlib.contextmanager
def _locked(token_path: Path, wait_s: float) -> Iterator[None]:
    """Hold ``<token file>.lock`` exclusively; TimeoutError if another holder keeps it ``wait_s``."""
    token_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with token_path.with_name(token_path.name + ".lock").open("a") as held:
        while True:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"the lock of {token_path} stayed held by another writer for {wait_s:g}s"
                        " (a paused process?)"
                    ) from None
                time.sleep(LOCK_POLL_S)
        yield


def raise_token(path: Path, token: int, *, wait_s: float = 5.0) -> int:
    """Record ``token`` unless the file holds a newer one; returns the newest now recorded."""
    with _locked(path, wait_s):
        current = read_token(path)
        if token > current:
            write_atomically(path, f"{token}\n")
        return max(token, current)


def write_if_newest(token_path: Path, token: int, path: Path, data: str, *, wait_s: float = 5.0) -> int:
    """Write ``path`` atomically only if ``token_path`` holds no token newer than ``token``.

    Under the same lock as :func:`raise_token`, so a fence cannot come between
    the check and the write: a write a pause held in flight lands before the
    fence or not at all. Returns the newest token recorded (the write happened
    only if that is not above ``token``).
    """
    with _locked(token_path, wait_s):
        current = read_token(token_path)
        if current <= token:
            write_atomically(path, data)
        return current
