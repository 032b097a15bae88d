"""Paths from the source, and file operations that stay beneath the replica's root.

The source agent names every file of a files stream by a path relative to
its tree. A compromised primary can send any string there, so a replica
never joins it to its root and hands the result to ``open``:

- :func:`parse_relpath` accepts only a plain relative path of safe
  components and refuses everything else (``""``, ``"."``, ``".."``, an
  absolute path, empty components as in ``a//b``, a NUL, our own
  ``.hotsite*`` names, which the source's scanner skips too). Nothing is normalised into
  acceptance: a path that is not already in normal form is refused.
- :class:`Beneath` walks to a file one component at a time from a
  descriptor of the root (``openat`` with ``O_NOFOLLOW | O_DIRECTORY``), so
  a symlink already in the tree, at any component, is never followed out
  of it; such a component is an error (or, where a directory is needed
  and the manifest says so, it is replaced, never followed).

A name the filesystem refuses (too long, say) raises ``OSError`` for that
file alone; the caller reports it and applies the rest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator

from appliance.replication.protocol import ProtocolError

MAX_PATH_CHARS = 4096  # PATH_MAX: no file of a real tree has a longer relative path
RESERVED_PREFIX = ".hotsite"  # our staging area, temporary files, versions
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def parse_relpath(rel: object) -> tuple[str, ...]:
    """The components of ``rel``; ProtocolError (reason "unsafe_path") unless it is a plain relative
    path of safe components, already in normal form."""
    if not isinstance(rel, str):
        raise ProtocolError(f"refusing unsafe path {rel!r} from the source: not a string", "unsafe_path")
    if not rel or len(rel) > MAX_PATH_CHARS:
        raise ProtocolError(f"refusing unsafe path of {len(rel)} characters from the source", "unsafe_path")
    if "\0" in rel:
        raise ProtocolError(f"refusing unsafe path {rel[:80]!r} from the source: a NUL", "unsafe_path")
    parts = tuple(rel.split("/"))
    for part in parts:
        if part in ("", ".", "..") or part.startswith(RESERVED_PREFIX):
            raise ProtocolError(f"refusing unsafe path {rel[:200]!r} from the source", "unsafe_path")
    try:
        os.fsencode(rel)
    except UnicodeError:
        raise ProtocolError(f"refusing unsafe path {rel[:80]!r}: not valid UTF-8", "unsafe_path") from None
    return parts


class Beneath:
    """Operations on files beneath ``root`` by descriptor, never following a symlink.

    Use as a context manager (it holds a descriptor of the root). Every method takes the
    components :func:`parse_relpath` returned.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.fd = os.open(self.root, _DIR_FLAGS)

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def parent(self, parts: tuple[str, ...], create: bool = False) -> Iterator[int]:
        """A descriptor of the directory holding ``parts[-1]``.

        ``create``: directories missing on the way are made (0755), and a component that is
        not a directory (a file the manifest no longer has there, a symlink) is removed and
        made a directory; without it, such a component raises ``NotADirectoryError``.
        """
        fd = os.dup(self.fd)
        try:
            for name in parts[:-1]:
                nxt = self._step(fd, name, create)
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _step(fd: int, name: str, create: bool) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            # ELOOP: a symlink (O_NOFOLLOW); ENOTDIR: a file or a symlink to a non-directory.
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not create:
                raise NotADirectoryError(errno.ENOTDIR, f"{name!r} is not a directory here") from None
            os.unlink(name, dir_fd=fd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=fd)
        return os.open(name, _DIR_FLAGS, dir_fd=fd)

    def lstat(self, parts: tuple[str, ...]) -> os.stat_result | None:
        """The entry's own stat (a symlink's, not its target's); None if it or its parent is missing."""
        try:
            with self.parent(parts) as pfd:
                return os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def open_read(self, parts: tuple[str, ...]) -> int:
        """A read descriptor of the regular file at ``parts`` (never through or at a symlink)."""
        with self.parent(parts) as pfd:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=pfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, f"{'/'.join(parts)} is not a regular file")
        return fd

    def chmod(self, parts: tuple[str, ...], mode: int) -> None:
        fd = self.open_read(parts)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def install(self, src_fd: int, parts: tuple[str, ...], mode: int) -> None:
        """Put a copy of ``src_fd``'s content at ``parts`` atomically (copied, fchmod, fsync, renamed).

        Whatever is at ``parts`` is replaced: a file, a symlink (the link itself, not its target),
        or a directory (with what it holds: the manifest has no file beneath it any more).
        """
        with self.parent(parts, create=True) as pfd:
            tmp = f"{RESERVED_PREFIX}-tmp-{secrets.token_hex(8)}"  # short: the real name may be 255 bytes
            out = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd
            )
            try:
                with os.fdopen(out, "wb") as fdst, os.fdopen(os.dup(src_fd), "rb") as fsrc:
                    fsrc.seek(0)
                    shutil.copyfileobj(fsrc, fdst, 1024 * 1024)
                    fdst.flush()
                    os.fchmod(fdst.fileno(), mode)
                    os.fsync(fdst.fileno())
                self._clear_dir(pfd, parts[-1])
                os.replace(tmp, parts[-1], src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=pfd)
                raise

    @staticmethod
    def _clear_dir(pfd: int, name: str) -> None:
        """A directory where a file must go (the source replaced a directory by a file) is removed."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=pfd)  # the fd-based rmtree: never follows a symlink out

    def unlink(self, parts: tuple[str, ...]) -> bool:
        """Remove the file at ``parts``; False if it (or its directory) was not there."""
        try:
            with self.parent(parts) as pfd:
                os.unlink(parts[-1], dir_fd=pfd)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def link_out(self, parts: tuple[str, ...], dest: str) -> bool:
        """Hard-link the file at ``parts`` to the absolute path ``dest`` (a kept version); the link
        itself is made, never its target's. False if it is not there."""
        try:
            with self.parent(parts) as pfd:
                st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    return False
                os.link(parts[-1], dest, src_dir_fd=pfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def prune_empty_dirs(self, parts: tuple[str, ...]) -> None:
        """Remove the directories holding ``parts`` that became empty, deepest first (the
        source ships no directories, only files: an empty one is not part of its tree)."""
        for depth in range(len(parts) - 1, 0, -1):
            try:
                with self.parent(parts[:depth]) as pfd:
                    os.rmdir(parts[depth - 1], dir_fd=pfd)
            except OSError:
                return
