"""The replica's end: check every path and mode, stage, put in place atomically, keep old versions."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.logs import kv
from appliance.replication import validate
from appliance.replication.files.delta import DELTA_MIN, delta_layout
from appliance.replication.files.scan import Entry, TreeScanner, digest_stable
from appliance.replication.protocol import ProtocolError
from appliance.replication.safepath import Beneath, parse_relpath

log = logging.getLogger("hotsite.appliance.replication.files")


STAGING = ".hotsite-staging"
DEFAULT_FILE_MODE_MASK = 0o7002  # never setuid, setgid, sticky or world-writable at the replica


class StagedFile:
    """A file arriving in parts: written to ``<staging>/<sha256>.part``, hashed as it comes.

    It takes its real name, the only one ``have`` announces and ``apply`` uses, once whole and
    matching its SHA-256; until then nothing of it is visible in the tree.
    """

    def __init__(self, staging: Path, sha256: str, size: int) -> None:
        self.sha256, self.size = sha256, size
        self.path = staging / sha256
        self.part = staging / f"{sha256}.part"
        self._file = open(self.part, "wb")  # noqa: SIM115 - written part by part, closed by finish/discard
        self._hasher = hashlib.sha256()
        self.written = 0

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.written or self.written + len(data) > self.size:
            raise ProtocolError(
                f"part at byte {offset} (+{len(data)}) of {self.sha256[:12]} does not follow byte"
                f" {self.written} of {self.size}",
                "malformed",
            )
        self._file.write(data)
        self._hasher.update(data)
        self.written += len(data)

    def finish(self) -> None:
        """Keep it (fsync, rename to its hash) if whole and matching; else discard it and raise."""
        got = self._hasher.hexdigest()
        if self.written != self.size or got != self.sha256:
            self.discard()
            raise ProtocolError(
                f"file {self.sha256[:12]} arrived as {self.written} of {self.size} bytes with SHA-256"
                f" {got[:12]}: discarded",
                "checksum",
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.part, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.part.unlink(missing_ok=True)


class FilesReplica:
    """The backup's copy of a file tree; see the module docstring for the contract."""

    def __init__(
        self,
        root: Path,
        *,
        keep: int = 5,
        post_change_command: list[str] | None = None,
        clock: Callable[[], float] = time.time,
        file_mode_mask: int = DEFAULT_FILE_MODE_MASK,
    ) -> None:
        self.root = root
        self.file_mode_mask = file_mode_mask  # mode bits never applied, whatever the source sends
        self.refused: dict[str, str] = {}  # path -> why the filesystem refused it, last change set
        self.versions = Path(str(root) + ".hotsite-versions")
        self.staging = root / STAGING
        self.keep = keep
        self.command = post_change_command or []
        self._clock = clock
        self.applied_at: float | None = None
        self.observed_at: float | None = None
        self.last_command: dict[str, Any] = {}

    def open(self) -> None:
        """Create the tree and staging area; drop what a cut session left half-written there."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True, mode=0o700)
        for p in self.staging.iterdir():
            if not _is_sha256(p.name):
                p.unlink(missing_ok=True)

    def manifest(self) -> dict[str, str]:
        return {rel: e.sha256 for rel, e in TreeScanner(self.root).scan(full=True).items()}

    def have(self) -> set[str]:
        hashes = set(self.manifest().values())
        if self.staging.exists():
            hashes.update(p.name for p in self.staging.iterdir() if _is_sha256(p.name))
        return hashes

    def block_map(self) -> dict[str, list[Any]]:
        """rel -> [sha256, block hashes] of each large file, for the agent to send deltas against."""
        out: dict[str, list[Any]] = {}
        for rel, entry in TreeScanner(self.root).scan(full=True).items():
            if entry.size >= DELTA_MIN:
                got = digest_stable(self.root / rel, blocks=True)
                if got is not None and got.blocks is not None:
                    out[rel] = [got.sha256, got.blocks]
        return out

    def begin(self, sha256: str, size: int) -> StagedFile:
        """A staging file for content arriving in parts (FILE_BEGIN)."""
        _check_sha256(sha256, "staged file")
        if size < 0:
            raise ProtocolError(f"file {sha256[:12]} announced with negative size {size}", "malformed")
        self.staging.mkdir(exist_ok=True, mode=0o700)
        return StagedFile(self.staging, sha256, size)

    def stage_delta(self, header: dict[str, Any], body: bytes) -> None:
        """Rebuild a file from our version of it plus the blocks sent, block by block into staging;
        kept only if the result's SHA-256 is the announced one."""
        parts, sha, base, size, block, indices = validate.delta(header)
        rel = "/".join(parts)
        layout = delta_layout(size, block, indices, len(body))
        staged = self.staging / base  # the base may itself be staged, not yet applied
        out = self.begin(sha, size)
        view = memoryview(body)
        try:
            with self._open_base(staged, parts) as f:
                for start in range(0, size, block):
                    length = min(block, size - start)
                    at = layout.get(start // block)
                    if at is not None:
                        out.write(start, bytes(view[at : at + length]))
                    else:
                        out.write(start, os.pread(f.fileno(), length, start).ljust(length, b"\0"))
            out.finish()
        except (OSError, ProtocolError):
            out.discard()
            raise ProtocolError(
                f"delta for {rel} does not rebuild {sha[:12]}: we no longer have version {base[:12]}",
                "malformed",
            ) from None
        except BaseException:
            out.discard()
            raise

    def _open_base(self, staged: Path, parts: tuple[str, ...]) -> Any:
        """Our version a delta applies to: staged, or in the tree (opened beneath the root)."""
        if staged.is_file():
            return open(staged, "rb")  # noqa: SIM115 - the caller's with closes it
        with Beneath(self.root) as tree:
            return os.fdopen(tree.open_read(parts), "rb")

    def stage(self, sha256: str, data: bytes) -> None:
        _check_sha256(sha256, "staged file")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ProtocolError(f"file content does not match its hash {sha256[:12]}", "checksum")
        path = self.staging / sha256
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def apply(self, files: dict[str, tuple[str, int, int]]) -> dict[str, int]:
        """Make the tree equal ``files`` (path -> sha256, mode, size); return counts of changes.

        Every path is checked (:func:`safepath.parse_relpath`) before anything is touched, and every
        file is reached from a descriptor of the root without following a symlink. Modes are masked
        with ``file_mode_mask``. Deletions go first, so a directory the source replaced by a file (or
        the reverse) is out of the way. A file the filesystem refuses (a name too long for it, say)
        is left out and reported in ``refused`` (path -> error); the rest is applied.
        """
        keep_bits = 0o7777 & ~self.file_mode_mask
        wanted = {rel: (validate.sha256(sha, rel), mode & keep_bits) for rel, (sha, mode, _) in files.items()}
        paths = {rel: parse_relpath(rel) for rel in wanted}
        current = TreeScanner(self.root).scan(full=True)
        counts = {"written": 0, "deleted": 0, "mode": 0, "same": 0}
        self.refused = {}
        self._stage_from_tree(files, current)
        for rel, (sha, _mode) in wanted.items():
            if not (rel in current and current[rel].sha256 == sha) and not (self.staging / sha).exists():
                raise ProtocolError(f"content {sha[:12]} for {rel[:200]} never arrived", "malformed")
        with Beneath(self.root) as tree:
            for rel in current:
                if rel not in wanted:
                    gone = parse_relpath(rel)
                    self._keep_version(tree, gone)
                    counts["deleted"] += tree.unlink(gone)
                    tree.prune_empty_dirs(gone)
            for rel, (sha, mode) in wanted.items():
                try:
                    counts[self._put(tree, paths[rel], sha, mode, current.get(rel))] += 1
                except OSError as exc:
                    if exc.errno not in _REFUSED_NAME:
                        raise  # the disk, not this name (full, read-only, I/O error): the session retries
                    self.refused[rel] = exc.strerror or str(exc)
                    log.warning(
                        "file not applied", extra=kv(root=self.root, path=rel[:300], error=self.refused[rel])
                    )
            os.fsync(tree.fd)
        for p in self.staging.iterdir():
            p.unlink(missing_ok=True)
        self.applied_at = self._clock()
        del counts["same"]
        if any(counts.values()) and self.command:
            self._run_command()
        return counts

    def _put(self, tree: Beneath, parts: tuple[str, ...], sha: str, mode: int, old: Entry | None) -> str:
        """One file of the manifest in place; which count it adds to ("written", "mode" or "same")."""
        if old is not None and old.sha256 == sha:
            if old.mode == mode:
                return "same"
            tree.chmod(parts, mode)
            return "mode"
        staged = self.staging / sha
        if old is not None:
            self._keep_version(tree, parts)
        with open(staged, "rb") as src:
            tree.install(src.fileno(), parts, mode)
        return "written"

    def _stage_from_tree(self, files: dict[str, tuple[str, int, int]], current: dict[str, Entry]) -> None:
        """Content that is already in the tree (a rename, a copy, a swap) is staged before anything
        is written: read from its old place while the change set is being applied, the second
        half of a swap would copy a file this change set had already overwritten. A hard link
        keeps the old content whatever is renamed over its path."""
        by_hash = {e.sha256: rel for rel, e in current.items()}
        with Beneath(self.root) as tree:
            for rel, (sha, _mode, _size) in files.items():
                staged = self.staging / sha
                unchanged = rel in current and current[rel].sha256 == sha
                if unchanged or staged.exists() or sha not in by_hash:
                    continue
                here = parse_relpath(by_hash[sha])
                if tree.link_out(here, str(staged)):
                    continue
                with contextlib.suppress(OSError), Beneath(self.staging) as staging:
                    fd = tree.open_read(here)
                    try:
                        staging.install(fd, (sha,), 0o600)
                    finally:
                        os.close(fd)

    def _keep_version(self, tree: Beneath, parts: tuple[str, ...]) -> None:
        """Hard-link the file at ``parts`` into the versions tree as ``<name>.<time>`` and keep the
        newest ``keep`` of that file (its own versions only: ``ivr`` is not ``ivr.conf``)."""
        if self.keep <= 0:
            return
        directory = self.versions.joinpath(*parts[:-1])
        stem = version_stem(parts[-1])
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tree.link_out(parts, str(directory / f"{stem}.{self._clock():.6f}"))
            mine = sorted(p for p in directory.iterdir() if is_version_of(p.name, stem))
        except OSError as exc:
            where = "/".join(parts)[:300]
            log.warning("version not kept", extra=kv(root=self.root, path=where, error=str(exc)))
            return
        for stale in mine[: -self.keep]:
            stale.unlink(missing_ok=True)

    def _run_command(self) -> None:
        started = time.monotonic()
        try:
            done = subprocess.run(self.command, cwd=self.root, capture_output=True, timeout=60, check=False)
            self.last_command = {"rc": done.returncode, "stderr": done.stderr.decode(errors="replace")[-500:]}
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.last_command = {"rc": None, "error": str(exc)}
        self.last_command["seconds"] = round(time.monotonic() - started, 3)
        level = logging.INFO if self.last_command.get("rc") == 0 else logging.WARNING
        log.log(level, "post-change command ran", extra=kv(root=self.root, **self.last_command))


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _check_sha256(value: str, what: str) -> None:
    """Content hashes name files in the staging area: anything else could be a path."""
    if not _is_sha256(value):
        raise ProtocolError(f"{what} hash {value[:80]!r} is not a SHA-256 (64 hex digits)", "malformed")


# What the filesystem says about one name (or what is at it), not about the disk as a whole.
_REFUSED_NAME = frozenset(
    {
        errno.ENAMETOOLONG,
        errno.EILSEQ,
        errno.EINVAL,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EPERM,
        errno.EACCES,
        errno.ENOTEMPTY,
        errno.EEXIST,
    }
)
_VERSION_TIME = re.compile(r"\.\d+\.\d{6}")
_NAME_MAX = 255


def version_stem(name: str) -> str:
    """What a kept version of ``name`` is called before its ``.<time>`` suffix: the name itself, or,
    if the suffix would not fit the filesystem's 255 bytes, a shortened name and a hash of it."""
    if len(os.fsencode(name)) + 18 <= _NAME_MAX:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.fsdecode(os.fsencode(name)[:200]) + "~" + digest


def is_version_of(candidate: str, stem: str) -> bool:
    """``candidate`` is ``<stem>.<seconds>.<microseconds>``: exactly, so ``ivr`` does not claim
    ``ivr.conf``'s versions (nor ``ivr.1``'s)."""
    return candidate.startswith(stem) and _VERSION_TIME.fullmatch(candidate, len(stem)) is not None
