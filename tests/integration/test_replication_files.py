"""Config-file streams: many small files, large files, renames, deletions, modes, versions, post-change
command, a file replaced while being read."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from pathlib import Path

from appliance.replication.files import FilesReplica, FilesStreamClient, TreeScanner, read_stable
from appliance.replication.source import ServedStream, SourceAgent
from tests.support import replication_rig


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in root.rglob("*")
        if p.is_file() and ".hotsite" not in str(p.relative_to(root))
    }


def test_file_tree_sync(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    src, dst = tmp_path / "dialplans", tmp_path / "replica" / "dialplans"
    (src / "ivr").mkdir(parents=True)
    for i in range(300):
        (src / "ivr" / f"menu{i}.conf").write_text(f"[menu{i}]\nexten => s,1,Playback(welcome{i})\n")
    (src / "prompts.bin").write_bytes(os.urandom(3_000_000))
    (src / "routing.tbl").write_text("vip 100\n")
    os.chmod(src / "routing.tbl", 0o640)
    marker = tmp_path / "hook-ran"

    async def wait_equal(client: FilesStreamClient, timeout: float = 10) -> bool:
        for _ in range(int(timeout / 0.1)):
            if dst.exists() and tree(src) == tree(dst):
                return True
            await asyncio.sleep(0.1)
        return False

    async def scenario() -> None:
        agent = SourceAgent(
            [ServedStream("dialplans", "files", src)],
            heartbeat_s=0.2,
            rescan_s=1.0,
            ssl_context=replication_rig.server_ctx(certs),
        )
        await agent.start()
        replica = FilesReplica(
            dst, keep=2, post_change_command=[sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
        )
        client = FilesStreamClient(
            "dialplans",
            "dialplans",
            replica,
            host="127.0.0.1",
            port=agent.port,
            server_name="source",
            ssl_context=replication_rig.client_ctx(certs),
        )
        task = asyncio.create_task(client.run())
        assert await wait_equal(client)
        assert stat.S_IMODE((dst / "routing.tbl").stat().st_mode) == 0o640
        received = client.stats.bytes_received
        # A rename costs no content transfer; a deletion propagates; an edit keeps the old version.
        os.rename(src / "prompts.bin", src / "prompts-v2.bin")
        (src / "ivr" / "menu7.conf").unlink()
        (src / "routing.tbl").write_text("vip 200\n")
        assert await wait_equal(client)
        assert client.stats.bytes_received - received < 100_000
        versions = list((Path(str(dst) + ".hotsite-versions")).glob("routing.tbl.*"))
        assert versions and versions[0].read_text() == "vip 100\n"
        assert marker.exists()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await agent.stop()

    asyncio.run(scenario())


def test_file_replaced_while_read_is_not_shipped_half_old(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 1000)
    real_read = os.read

    got = read_stable(path)
    assert got is not None and got[0] == b"a" * 1000
    # Replace the file between the open and the final stat: read_stable must refuse the content.
    original_fstat = os.fstat

    def fstat_then_replace(fd: int) -> os.stat_result:
        st = original_fstat(fd)
        tmp = tmp_path / "new"
        tmp.write_bytes(b"b" * 10)
        os.replace(tmp, path)
        return st

    os.fstat = fstat_then_replace
    try:
        assert read_stable(path) is None
    finally:
        os.fstat = original_fstat
    assert real_read is os.read
    assert TreeScanner(tmp_path).scan()["f"].size == 10
