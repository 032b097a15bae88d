"""Config files larger than one message stream in bounded parts (FILE_BEGIN, FILE_PART..., FILE_END):
the replica's copy is exact, no message exceeds the limit, renames stay atomic and versions are kept;
a file rewritten while being sent never shows torn, and a cut session leaves no half file."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.replication import protocol
from appliance.replication.files import (
    BLOCK,
    DELTA_MIN,
    STAGING,
    BlockHasher,
    FilesReplica,
    FilesStreamClient,
    StagedFile,
    block_digests,
    plan_send,
)
from appliance.replication.protocol import ProtocolError
from appliance.replication.source import ServedStream, SourceAgent
from tests.integration.test_replication_link import certs
from tests.support import replication_rig

__all__ = ["certs"]  # the fixture, re-exported for pytest

LIMIT = 1024 * 1024
MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FilesRig:
    """An agent serving ``src`` with a lowered message limit, and replicas of it at ``dst``."""

    def __init__(self, tmp: Path, certs: Path, bandwidth: int = 0) -> None:
        self.src, self.dst, self.certs = tmp / "prompts", tmp / "replica" / "prompts", certs
        self.src.mkdir()
        self.scratch = tmp / "scratch"  # outside the served tree: a half-written temp is never scanned
        self.scratch.mkdir()
        self.agent = SourceAgent(
            [ServedStream("prompts", "files", self.src)],
            heartbeat_s=0.2,
            rescan_s=1.0,
            max_message=LIMIT,
            bandwidth_limit_bytes_s=bandwidth,
            ssl_context=replication_rig.server_ctx(certs),
        )
        self.client: FilesStreamClient | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> FilesStreamClient:
        if not self.agent.serving:
            await self.agent.start()
        c = self.certs
        self.client = FilesStreamClient(
            "prompts",
            "prompts",
            FilesReplica(self.dst, keep=3),
            host="127.0.0.1",
            port=self.agent.port,
            server_name="source",
            ssl_context=replication_rig.client_ctx(c),
            max_message=LIMIT,  # the client refuses (and reports) any larger message
        )
        self.task = asyncio.create_task(self.client.run())
        return self.client

    async def stop_client(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def close(self) -> None:
        await self.stop_client()
        await self.agent.stop()

    async def equal(self, rel: str, timeout: float = 30) -> bool:
        for _ in range(int(timeout / 0.05)):
            a, b = self.src / rel, self.dst / rel
            if b.exists() and b.stat().st_size == a.stat().st_size and b.read_bytes() == a.read_bytes():
                return True
            await asyncio.sleep(0.05)
        return False

    def replace(self, rel: str, data: bytes) -> None:
        """Replace a source file atomically, as an editor or a deploy tool would."""
        tmp = self.scratch / rel
        tmp.write_bytes(data)
        os.replace(tmp, self.src / rel)

    def staging_leftovers(self) -> list[str]:
        staging = self.dst / STAGING
        return sorted(p.name for p in staging.iterdir()) if staging.exists() else []

    def part_bytes(self) -> int:
        staging = self.dst / STAGING
        parts = list(staging.glob("*.part")) if staging.exists() else []
        return max((p.stat().st_size for p in parts if p.exists()), default=0)


class Watch:
    """Hashes the replica's copy of a file over and over, recording every content it ever showed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError):  # not there yet: nothing shown
                self.seen.add(sha(self.path.read_bytes()))
            self._stop.wait(0.005)

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join()
        return self.seen


async def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> bool:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False


def test_plan_send_keeps_small_files_whole_and_deltas_within_a_message() -> None:
    chunk = protocol.file_chunk_bytes(LIMIT)
    assert chunk <= LIMIT - protocol.HEADER_ROOM
    assert plan_send(100, None, LIMIT) == "data"
    assert plan_send(chunk, None, LIMIT) == "data"
    assert plan_send(chunk + 1, None, LIMIT) == "chunked"
    assert plan_send(20 * MIB, [3], LIMIT) == "delta"
    # Under half the file, but more blocks than one message carries: the whole file, in parts.
    assert plan_send(20 * MIB, list(range(32)), LIMIT) == "chunked"
    assert plan_send(20 * MIB, list(range(32)), protocol.MAX_MESSAGE) == "delta"
    # More than half the file changed: whole.
    assert plan_send(2 * MIB, list(range(17)), protocol.MAX_MESSAGE) == "chunked"
    assert plan_send(DELTA_MIN - 1, [0], protocol.MAX_MESSAGE) == "data"
    # A replica that does not know FILE_PART (older version): one message, as before.
    assert plan_send(5 * MIB, None, protocol.MAX_MESSAGE, parts=False) == "data"


def test_block_hasher_matches_block_digests_whatever_the_pieces() -> None:
    data = os.urandom(5 * BLOCK + 123)
    for piece in (1000, BLOCK, 3 * BLOCK + 7, len(data)):
        hasher = BlockHasher()
        for i in range(0, len(data), piece):
            hasher.update(data[i : i + piece])
        assert hasher.result() == block_digests(data), piece


def test_staged_file_is_kept_only_whole_and_matching(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    good = StagedFile(tmp_path, sha(data), len(data))
    good.write(0, data[:100_000])
    with pytest.raises(ProtocolError):
        good.write(200_000, data[200_000:])  # a gap: refused
    good.write(100_000, data[100_000:])
    good.finish()
    assert (tmp_path / sha(data)).read_bytes() == data and not list(tmp_path.glob("*.part"))

    bad = StagedFile(tmp_path, sha(b"something else"), len(data))
    bad.write(0, data)
    with pytest.raises(ProtocolError) as err:
        bad.finish()
    assert err.value.reason == "checksum"
    assert sorted(p.name for p in tmp_path.iterdir()) == [sha(data)]  # nothing of it stayed


def test_file_larger_than_the_message_limit_streams_in_parts(tmp_path: Path, certs: Path) -> None:
    rig = FilesRig(tmp_path, certs)
    big = rig.src / "archive.bin"
    first = os.urandom(20 * MIB)  # incompressible: the parts are as large as the limit allows
    big.write_bytes(first)
    for i in range(50):
        (rig.src / f"menu{i}.conf").write_text(f"[menu{i}]\nexten => s,1,Playback(welcome{i})\n")

    async def scenario() -> None:
        client = await rig.start()
        assert await rig.equal("archive.bin")
        assert all([await rig.equal(f"menu{i}.conf", 1) for i in range(50)])
        assert client.chunked_files == 1  # the small files went as one message each
        assert not client.stats.last_error

        # Replaced whole at the source: the replica only ever shows the old or the new content.
        second = os.urandom(20 * MIB)
        watch = Watch(rig.dst / "archive.bin")
        rig.replace("archive.bin", second)
        assert await rig.equal("archive.bin")
        assert watch.stop() <= {sha(first), sha(second)}
        assert client.chunked_files == 2
        versions = list(Path(str(rig.dst) + ".hotsite-versions").glob("archive.bin.*"))
        assert [v.read_bytes() == first for v in versions] == [True]

        # Edited in place: a delta that fits one message goes as a delta...
        third = second[: 5 * MIB] + b"edited!" + second[5 * MIB + 7 :]
        rig.replace("archive.bin", third)
        assert await rig.equal("archive.bin")
        assert (client.deltas, client.chunked_files) == (1, 2)
        # ...one larger than a message (2 MiB changed) goes whole, in parts.
        fourth = third[: 8 * MIB] + os.urandom(2 * MIB) + third[10 * MIB :]
        rig.replace("archive.bin", fourth)
        assert await rig.equal("archive.bin")
        assert (client.deltas, client.chunked_files) == (1, 3)
        assert not client.stats.last_error and client.rejected_files == 0
        assert rig.staging_leftovers() == []
        await rig.close()
        assert 0 < rig.agent.largest_body <= LIMIT - protocol.HEADER_ROOM

    asyncio.run(scenario())


def test_file_rewritten_while_sent_never_shows_torn(tmp_path: Path, certs: Path) -> None:
    rig = FilesRig(tmp_path, certs, bandwidth=6 * MIB)  # about two seconds a copy
    big = rig.src / "archive.bin"
    big.write_bytes(os.urandom(12 * MIB))
    final = os.urandom(12 * MIB)

    async def scenario() -> None:
        client = await rig.start()
        watch = Watch(rig.dst / "archive.bin")
        assert await wait_for(lambda: rig.part_bytes() >= 2 * MIB)
        with open(big, "r+b") as f:  # in place: the agent's read goes on in the same file
            f.write(final)
        assert await rig.equal("archive.bin")
        assert watch.stop() == {sha(final)}  # never the torn mix, never the abandoned version
        assert client.aborted_files >= 1 and client.rejected_files == 0
        assert not client.stats.last_error
        assert rig.staging_leftovers() == []
        await rig.close()
        assert 0 < rig.agent.largest_body <= LIMIT

    asyncio.run(scenario())


def test_cut_mid_file_leaves_no_half_file_and_the_next_session_resends(tmp_path: Path, certs: Path) -> None:
    rig = FilesRig(tmp_path, certs, bandwidth=4 * MIB)
    data = os.urandom(8 * MIB)
    (rig.src / "archive.bin").write_bytes(data)

    async def scenario() -> None:
        await rig.start()
        assert await wait_for(lambda: rig.part_bytes() >= MIB)
        await rig.stop_client()  # the session ends mid-file
        assert not (rig.dst / "archive.bin").exists()
        assert rig.staging_leftovers() == []
        # A replica killed mid-file leaves its part behind: the next session drops it.
        (rig.dst / STAGING / f"{sha(data)}.part").write_bytes(data[:1000])
        client = await rig.start()
        assert await rig.equal("archive.bin")
        assert client.stats.bytes_received > len(data)  # sent again, whole
        assert client.chunked_files == 1
        assert rig.staging_leftovers() == []
        await rig.close()

    asyncio.run(scenario())


def test_a_swap_of_two_files_in_one_change_set_keeps_both_contents(tmp_path: Path) -> None:
    """a <-> b in one change set: both contents are already in the tree, and each must be read
    before the other is overwritten."""
    replica = FilesReplica(tmp_path / "tree", keep=2)
    replica.open()
    (tmp_path / "tree" / "a.txt").write_bytes(b"dial plan A\n")
    (tmp_path / "tree" / "b.txt").write_bytes(b"dial plan B\n")
    sha_a, sha_b = (hashlib.sha256(c).hexdigest() for c in (b"dial plan A\n", b"dial plan B\n"))
    counts = replica.apply({"a.txt": (sha_b, 0o644, 12), "b.txt": (sha_a, 0o644, 12)})
    assert counts["written"] == 2
    assert (tmp_path / "tree" / "a.txt").read_bytes() == b"dial plan B\n"
    assert (tmp_path / "tree" / "b.txt").read_bytes() == b"dial plan A\n"
    assert not any(replica.staging.iterdir())


class FreezableProxy:
    """A TCP relay on loopback that can stop carrying bytes without closing anything, as a path
    that drops every packet does (no netem here)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                await self.open.wait()
                w.write(data)
                await w.drain()
        w.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        await self.open.wait()
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(cr, sw), self._pipe(sr, cw))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_a_silent_path_is_noticed_and_the_next_session_catches_up(tmp_path: Path, certs: Path) -> None:
    rig = FilesRig(tmp_path, certs)
    (rig.src / "routes.conf").write_text("route 1\n")

    async def scenario() -> None:
        await rig.agent.start()
        proxy = FreezableProxy(rig.agent.port)
        port = await proxy.start()
        c = rig.certs
        client = FilesStreamClient(
            "prompts",
            "prompts",
            FilesReplica(rig.dst),
            host="127.0.0.1",
            port=port,
            server_name="source",
            ssl_context=replication_rig.client_ctx(c),
            idle_timeout_s=1.0,
        )
        task = asyncio.create_task(client.run())
        try:
            assert await rig.equal("routes.conf", 10)
            proxy.open.clear()  # the path drops everything; the agent's heartbeats never arrive
            assert await wait_for(lambda: not client.stats.connected, 5), "silence not noticed"
            assert "TimeoutError" in (client.stats.last_error or "")
            (rig.src / "routes.conf").write_text("route 2\n")
            proxy.open.set()
            assert await rig.equal("routes.conf", 15)
            assert client.stats.sessions >= 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            proxy.close()
            await rig.agent.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "kind, header, field",
    [
        (protocol.Msg.FILE_BEGIN, {"sha256": "0" * 64}, "size"),  # no size
        (protocol.Msg.FILE_BEGIN, {"sha256": "0" * 64, "size": "lots"}, "size"),
        (protocol.Msg.FILE_DATA, {}, "sha256"),  # no sha256
    ],
)
def test_a_message_with_a_missing_or_bad_field_is_malformed_not_a_crash(
    tmp_path: Path, kind: int, header: dict[str, object], field: str
) -> None:
    replica = FilesReplica(tmp_path / "tree")
    client = FilesStreamClient("prompts", "prompts", replica, host="127.0.0.1", port=1, ssl_context=None)
    replica.open()
    with pytest.raises(ProtocolError) as err:
        asyncio.run(client._dispatch(protocol.Message(kind, header, b"", 0)))
    # The error names the field at fault, so the operator's log says what the peer got wrong.
    assert err.value.reason == "malformed" and field in err.value.message
