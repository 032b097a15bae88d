"""Config trees are watched with inotify: a change reaches the replica in well under a second although
the full rescan is 30 s away, an idle tree is not scanned at all, and new directories are watched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from appliance.replication.files import FilesReplica, FilesStreamClient, InotifyWatcher, make_watcher
from appliance.replication.source import ServedStream, SourceAgent
from tests.support import replication_rig


async def _visible(path: Path, text: str, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if path.exists() and path.read_text() == text:
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    return None


def test_change_is_shipped_without_waiting_for_the_rescan(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    src, dst = tmp_path / "etc", tmp_path / "replica" / "etc"
    (src / "ivr").mkdir(parents=True)
    (src / "ivr" / "menu.conf").write_text("v1\n")

    async def scenario() -> None:
        agent = SourceAgent(
            [ServedStream("etc", "files", src)],
            heartbeat_s=0.2,
            rescan_s=30.0,
            ssl_context=replication_rig.server_ctx(certs),
        )
        await agent.start()
        client = FilesStreamClient(
            "etc",
            "etc",
            FilesReplica(dst),
            host="127.0.0.1",
            port=agent.port,
            server_name="source",
            ssl_context=replication_rig.client_ctx(certs),
        )
        task = asyncio.create_task(client.run())
        try:
            assert await _visible(dst / "ivr" / "menu.conf", "v1\n", 5) is not None
            # Idle: heartbeats flow, but nothing is scanned (a poller would scan 5 times a second).
            scans = agent.file_scans
            await asyncio.sleep(1.0)
            assert agent.file_scans == scans
            assert client.stats.connected
            # An edit: at the replica within a second, long before the 30 s rescan.
            (src / "ivr" / "menu.conf").write_text("v2\n")
            took = await _visible(dst / "ivr" / "menu.conf", "v2\n", 1.0)
            assert took is not None and took < 1.0
            # A directory made after the start is watched too.
            (src / "prompts" / "fr").mkdir(parents=True)
            (src / "prompts" / "fr" / "welcome.txt").write_text("bonjour\n")
            assert await _visible(dst / "prompts" / "fr" / "welcome.txt", "bonjour\n", 1.0) is not None
            (src / "prompts" / "fr" / "welcome.txt").write_text("salut\n")
            assert await _visible(dst / "prompts" / "fr" / "welcome.txt", "salut\n", 1.0) is not None
            # A deletion.
            (src / "ivr" / "menu.conf").unlink()
            for _ in range(100):
                if not (dst / "ivr" / "menu.conf").exists():
                    break
                await asyncio.sleep(0.01)
            assert not (dst / "ivr" / "menu.conf").exists()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await agent.stop()

    asyncio.run(scenario())


def test_watcher_reports_changes_times_out_quietly_and_degrades_to_polling(tmp_path: Path) -> None:
    async def scenario() -> None:
        watcher = make_watcher(tmp_path, watch=True, poll_s=0.01)
        assert isinstance(watcher, InotifyWatcher)
        try:
            assert await watcher.wait(0.1) is False
            (tmp_path / "a").write_text("x")
            assert await watcher.wait(1.0) is True
            assert await watcher.wait(0.05) is False  # the burst was taken as one change
            watcher.degraded = True  # what a full max_user_watches leads to
            t0 = time.monotonic()
            assert await watcher.wait(5.0) is True
            assert time.monotonic() - t0 < 0.5
        finally:
            watcher.close()
            watcher.close()
        polling = make_watcher(tmp_path, watch=False, poll_s=0.01)
        assert not isinstance(polling, InotifyWatcher)
        assert await polling.wait(1.0) is True

    asyncio.run(scenario())


def test_no_change_is_lost_to_a_wait_that_times_out(tmp_path: Path) -> None:
    """The agent waits for changes with short timeouts (heartbeats) over and over: a timeout that
    lands just after inotify's events were read from the kernel must not lose them (seen: 6 of
    300 edits unnoticed until the next full rescan; this test failed 3 runs in 4 on that code)."""
    from appliance.replication.files import InotifyWatcher

    conf = tmp_path / "routes.conf"
    conf.write_text("0")

    async def scenario() -> int:
        watcher = InotifyWatcher(tmp_path)
        watcher.QUIET_S = 0.001  # a short quiet period: many rounds in little time (the race is the same)
        lost = 0
        try:
            for i in range(1500):
                conf.write_text(str(i))
                for _ in range(400):
                    if await watcher.wait(0.0002):
                        break
                else:
                    lost += 1
                while await watcher.wait(0.001):  # the rest of this edit's events
                    pass
        finally:
            watcher.close()
        return lost

    assert asyncio.run(scenario()) == 0
