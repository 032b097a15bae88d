"""Configuration-file streams: directories of dial plans, IVR and routing tables, prompts.

Split by side of the wire, like the SQLite stream (``source.py`` / ``client.py``):

* source: :mod:`~.scan` (the tree's content hashes, reads that notice a file
  changing under them), :mod:`~.watch` (inotify, or polling), :mod:`~.serve`
  (the session: send what the replica lacks, commit with the manifest);
* both: :mod:`~.delta` (fixed-block deltas of large files);
* replica: :mod:`~.replica` (check, stage, put in place, keep versions) and
  :mod:`~.client` (connect, receive, apply, reconnect).

Source side: the tree is watched with inotify (:class:`InotifyWatcher`,
through ``asyncinotify``); an event (after a 30 ms quiet period, so a file
written in pieces is read once) triggers a cheap ``stat`` comparison of the
tree, and every ``rescan_s`` a full re-hash runs anyway, because watches
overflow (``IN_Q_OVERFLOW``) or cannot be added (``max_user_watches``):
then the watcher says "changed" and, if it cannot watch at all, falls back
to polling (:class:`PollingWatcher`, a ``stat`` comparison every 0.2 s,
also used with ``watch = false``). Files are content-hashed (SHA-256), and
a file that changed while it was read (size, mtime or inode moved) is read
again next time rather than shipped half-old. Only contents the replica
does not have are sent; a rename costs no transfer. A change set ends with
the whole manifest, which commits it.

Replica side: every path and mode is checked first (``validate.py``,
``safepath.py``: see REPLICATION.md, "What the replica trusts"); contents are
staged (write, fsync); files gone at the source are deleted, then each file is
put in place by rename (atomic), reached from a descriptor of the root without
following symlinks, with its mode masked by ``file_mode_mask``; the
replaced or deleted versions are kept (newest ``keep`` per file, matched
exactly) under ``<replica>.hotsite-versions``; an optional command runs
after each applied change set (argv, no shell), like csync2's action hooks.

Deltas: a file of ``DELTA_MIN`` bytes or more that the replica already has
an older version of (at the same path) is sent as the ``BLOCK``-sized blocks
whose hashes differ from that version's (the replica lists its large files'
block hashes when it connects; the agent remembers what it sent since), if
that is less than half the file; the replica rebuilds the new content from
its copy plus those blocks and checks its SHA-256 before staging it. Fixed
blocks, not rsync's rolling hash: in-place edits and appends (a routing
table, a log-like prompt index) travel as deltas; an insertion near the
start shifts every block and the file goes whole. A delta whose blocks
would not fit one message goes whole too.

Large files: a file that does not fit one message (``protocol.file_chunk_bytes``
of the receiver's limit, 1 MiB at most) travels as FILE_BEGIN {sha256, size},
FILE_PART bodies of one chunk each, FILE_END. The agent reads it a chunk at a
time, hashing as it goes, and sends FILE_ABORT instead of FILE_END if the
bytes it read are not the scanned version (the hash differs, or size or mtime
moved): the change set is then not committed and the next scan ships the new
content. The replica writes the parts to ``<sha256>.part`` in its staging
area, hashing as they come, and gives it its real name (which ``have``
announces and ``apply`` uses) only once it is whole and its SHA-256 is the
announced one; anything else is discarded (a cut session leaves a ``.part``
that the next session's ``open`` removes). Hashing, deltas, staging and
putting files in place all go a chunk at a time: neither end holds a whole
large file in memory.
"""

from __future__ import annotations

from appliance.replication.files.client import FilesStreamClient
from appliance.replication.files.delta import (
    BLOCK,
    DELTA_MIN,
    READ_CHUNK,
    BlockHasher,
    apply_delta,
    block_digests,
    changed_blocks,
    delta_layout,
    plan_send,
)
from appliance.replication.files.replica import (
    DEFAULT_FILE_MODE_MASK,
    STAGING,
    FilesReplica,
    StagedFile,
    is_version_of,
    version_stem,
)
from appliance.replication.files.scan import Digest, Entry, TreeScanner, digest_stable, read_stable
from appliance.replication.files.serve import FilesSource, serve_files
from appliance.replication.files.watch import (
    ChangeWatcher,
    InotifyWatcher,
    PollingWatcher,
    make_watcher,
)

__all__ = [
    "BLOCK",
    "DEFAULT_FILE_MODE_MASK",
    "DELTA_MIN",
    "READ_CHUNK",
    "STAGING",
    "BlockHasher",
    "ChangeWatcher",
    "Digest",
    "Entry",
    "FilesReplica",
    "FilesSource",
    "FilesStreamClient",
    "InotifyWatcher",
    "PollingWatcher",
    "StagedFile",
    "TreeScanner",
    "apply_delta",
    "block_digests",
    "changed_blocks",
    "delta_layout",
    "digest_stable",
    "is_version_of",
    "make_watcher",
    "plan_send",
    "read_stable",
    "serve_files",
    "version_stem",
]
