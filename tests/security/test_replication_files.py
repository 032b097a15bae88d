"""A compromised primary against the replica of a files stream: what it sends is never trusted.

Each attack goes over real mutual TLS to a real :class:`FilesStreamClient` applying to a real tree
(the hostile side is :class:`HostileAgent`); ordinary changes go through the real source agent.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import pytest

from appliance.replication.files import FilesReplica, FilesStreamClient
from appliance.replication.source import ServedStream, SourceAgent
from tests.security.replication_support import HostileAgent, cancel, listing, manifest, until
from tests.support.replication_rig import client_ctx, pki, server_ctx

HOSTILE_PATHS = [
    "",
    ".",
    "..",
    "../outside.conf",
    "a/../../outside.conf",
    "ABSOLUTE",  # replaced by an absolute path under the test's directory
    "a//b.conf",
    "./a.conf",
    "a/.",
    "nul\0.conf",
    ".hotsite-staging/x",
    "sub/.hotsite-versions/x",
]


def _client(replica: FilesReplica, port: int, certs: Path) -> FilesStreamClient:
    return FilesStreamClient(
        "dialplans",
        "dialplans",
        replica,
        host="127.0.0.1",
        port=port,
        server_name="source",
        ssl_context=client_ctx(certs),
        idle_timeout_s=10,
    )


@pytest.mark.parametrize("hostile", HOSTILE_PATHS)
def test_hostile_manifest_entry_writes_nothing_outside_the_root(tmp_path: Path, hostile: str) -> None:
    certs = pki(tmp_path / "tls")
    if hostile == "ABSOLUTE":
        hostile = str(tmp_path / "absolute.conf")
    root = tmp_path / "replica" / "dialplans"
    versions = Path(str(root) + ".hotsite-versions")

    async def scenario() -> None:
        agent = HostileAgent(certs)
        agent.script = manifest({hostile: (b"owned\n", 0o644), "fine.conf": (b"[fine]\n", 0o644)})
        await agent.start()
        replica = FilesReplica(root)
        replica.open()
        before = listing(tmp_path, skip=(root, versions))
        client = _client(replica, agent.port, certs)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: bool(client.stats.last_error) or task.done(), what="refusal")
            assert listing(tmp_path, skip=(root, versions)) == before, (
                "something was written outside the tree"
            )
            assert not task.done(), "the client task died"
            assert not (root / "fine.conf").exists(), "a refused change set is refused whole"
            assert "unsafe path" in client.stats.last_error
            assert client.stats.malformed_messages >= 1
            # The stream is alive: the next change set is applied.
            agent.script = manifest({"good.conf": (b"[good]\n", 0o640)})
            await until(lambda: client.change_sets == 1, what="the next change set")
            assert not task.done()
        finally:
            await cancel(task)
            await agent.stop()
        assert listing(tmp_path, skip=(root, versions)) == before, "something was written outside the tree"
        assert listing(root) - {".hotsite-staging"} == {"good.conf"}

    asyncio.run(scenario())


def test_modes_are_masked(tmp_path: Path) -> None:
    """setuid, setgid, sticky and world-write never reach the replica (a configured mask, too)."""
    certs = pki(tmp_path / "tls")
    src = tmp_path / "source"
    src.mkdir()
    modes = {"suid": 0o4755, "sgid": 0o2775, "sticky": 0o1777, "world": 0o666, "plain": 0o640}
    for name, mode in modes.items():
        (src / name).write_text(name)
        os.chmod(src / name, mode)
    assert stat.S_IMODE((src / "suid").stat().st_mode) == 0o4755  # the primary really has them

    async def scenario() -> None:
        agent = SourceAgent(
            [ServedStream("dialplans", "files", src)], heartbeat_s=0.2, ssl_context=server_ctx(certs)
        )
        await agent.start()
        default, strict = tmp_path / "r1" / "dialplans", tmp_path / "r2" / "dialplans"
        clients = [
            _client(FilesReplica(default), agent.port, certs),
            _client(FilesReplica(strict, file_mode_mask=0o7022), agent.port, certs),
        ]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            for root in (default, strict):
                await until(lambda r=root: all((r / n).exists() for n in modes), what="the tree")  # type: ignore[misc]
        finally:
            for t in tasks:
                await cancel(t)
            await agent.stop()
        got = {n: stat.S_IMODE((default / n).stat().st_mode) for n in modes}
        assert got == {"suid": 0o755, "sgid": 0o775, "sticky": 0o775, "world": 0o664, "plain": 0o640}
        got = {n: stat.S_IMODE((strict / n).stat().st_mode) for n in modes}
        assert got == {"suid": 0o755, "sgid": 0o755, "sticky": 0o755, "world": 0o644, "plain": 0o640}

    asyncio.run(scenario())


def test_symlink_in_the_tree_is_never_followed_out(tmp_path: Path) -> None:
    certs = pki(tmp_path / "tls")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.conf").write_text("precious\n")
    root = tmp_path / "replica" / "dialplans"
    root.mkdir(parents=True)
    os.symlink(outside, root / "link")  # a directory symlink already in the tree
    os.symlink(outside / "target.conf", root / "leaf.conf")  # and a file symlink

    async def scenario() -> None:
        agent = HostileAgent(certs)
        agent.script = manifest(
            {
                "link/evil.conf": (b"owned\n", 0o644),
                "leaf.conf": (b"new\n", 0o644),
                "ok.conf": (b"ok\n", 0o644),
            }
        )
        await agent.start()
        client = _client(FilesReplica(root), agent.port, certs)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: (root / "ok.conf").exists() or task.done(), what="the change set")
            assert not task.done()
        finally:
            await cancel(task)
            await agent.stop()
        assert sorted(os.listdir(outside)) == ["target.conf"], "written through a symlink out of the tree"
        assert (outside / "target.conf").read_text() == "precious\n"
        assert not (root / "link").is_symlink() and (root / "link" / "evil.conf").read_bytes() == b"owned\n"
        assert not (root / "leaf.conf").is_symlink() and (root / "leaf.conf").read_bytes() == b"new\n"

    asyncio.run(scenario())


def test_file_and_directory_swaps_and_long_names_do_not_block_the_stream(tmp_path: Path) -> None:
    """Ordinary changes at a real primary: a file becomes a directory and the reverse, a 250-character
    name (its kept versions too); a name this filesystem refuses is reported for that file alone."""
    certs = pki(tmp_path / "tls")
    src = tmp_path / "source"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "inner.conf").write_text("inner\n")
    (src / "file").write_text("file\n")
    long_name = "n" * 250
    (src / long_name).write_text("long v1\n")
    root = tmp_path / "replica" / "dialplans"

    def same() -> bool:
        want = {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}
        got = {
            str(p.relative_to(root)): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and ".hotsite" not in str(p)
        }
        return want == got

    async def scenario() -> None:
        agent = SourceAgent(
            [ServedStream("dialplans", "files", src)],
            heartbeat_s=0.2,
            rescan_s=1.0,
            ssl_context=server_ctx(certs),
        )
        await agent.start()
        replica = FilesReplica(root, keep=3)
        client = _client(replica, agent.port, certs)
        task = asyncio.create_task(client.run())
        try:
            await until(same, what="the first sync")
            # Swap: "dir" becomes a file, "file" becomes a directory; the long name is edited.
            (src / "dir" / "inner.conf").unlink()
            (src / "dir").rmdir()
            (src / "dir").write_text("now a file\n")
            (src / "file").unlink()
            (src / "file").mkdir()
            (src / "file" / "inside.conf").write_text("now a directory\n")
            (src / long_name).write_text("long v2\n")
            await until(same, what="the swap")
            sessions = client.stats.sessions
            assert not task.done() and sessions == 1, client.stats.last_error
            kept = [p.name for p in versions_of(root).iterdir() if p.name.startswith("n" * 100)]
            assert len(kept) == 1, "the long name's old version was kept"
        finally:
            await cancel(task)
            await agent.stop()

    asyncio.run(scenario())


def versions_of(root: Path) -> Path:
    return Path(str(root) + ".hotsite-versions")


def is_version_of(name: str, of: str) -> bool:
    return re.fullmatch(re.escape(of) + r"\.\d+\.\d{6}", name) is not None


def test_a_name_the_filesystem_refuses_is_reported_alone(tmp_path: Path) -> None:
    certs = pki(tmp_path / "tls")
    root = tmp_path / "replica" / "dialplans"
    too_long = "x" * 300  # legal in the manifest, longer than this filesystem's 255 bytes

    async def scenario() -> None:
        agent = HostileAgent(certs)
        agent.script = manifest(
            {too_long: (b"a\n", 0o644), "a.conf": (b"a\n", 0o644), "b/c.conf": (b"c\n", 0o644)}
        )
        await agent.start()
        client = _client(FilesReplica(root), agent.port, certs)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: (root / "b" / "c.conf").exists() or task.done(), what="the rest applied")
            assert not task.done()
            assert client.stats.refused_files == 1
            assert (
                "not applied" in client.stats.last_error and "File name too long" in client.stats.last_error
            )
        finally:
            await cancel(task)
            await agent.stop()

    asyncio.run(scenario())


def test_versions_are_matched_exactly(tmp_path: Path) -> None:
    """``ivr`` keeps its own versions: ``ivr.conf``'s are not counted as (and pruned as) its."""
    certs = pki(tmp_path / "tls")
    src = tmp_path / "source"
    src.mkdir()
    (src / "ivr").write_text("ivr v0\n")
    (src / "ivr.conf").write_text("conf v0\n")
    root = tmp_path / "replica" / "dialplans"

    async def scenario() -> None:
        agent = SourceAgent(
            [ServedStream("dialplans", "files", src)], heartbeat_s=0.2, ssl_context=server_ctx(certs)
        )
        await agent.start()
        client = _client(FilesReplica(root, keep=2), agent.port, certs)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: (root / "ivr.conf").exists(), what="the first sync")
            for i in range(1, 4):
                (src / "ivr.conf").write_text(f"conf v{i}\n")
                await until(lambda i=i: (root / "ivr.conf").read_text() == f"conf v{i}\n", what=f"conf v{i}")  # type: ignore[misc]
            (src / "ivr").write_text("ivr v1\n")  # pruning ivr's versions must leave ivr.conf's alone
            await until(lambda: (root / "ivr").read_text() == "ivr v1\n", what="ivr v1")
            await until(lambda: client.change_sets == 5, what="the last change set")
        finally:
            await cancel(task)
            await agent.stop()
        names = os.listdir(versions_of(root))
        ivr = sorted(n for n in names if is_version_of(n, "ivr"))
        conf = sorted(n for n in names if is_version_of(n, "ivr.conf"))
        assert len(ivr) == 1 and (versions_of(root) / ivr[0]).read_text() == "ivr v0\n"
        assert len(conf) == 2 and len(names) == 3

    asyncio.run(scenario())
