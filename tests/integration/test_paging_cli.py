"""The paging CLI commands against a real control socket served by a real PagingService."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from appliance.api import ApiServer
from appliance.cli.main import Context
from appliance.cli.paging import COMMANDS
from appliance.migrations import COMPONENTS
from appliance.paging.channel import NullChannel
from appliance.paging.service import PagingService
from appliance.store import Store
from tests.integration.test_paging_service import make_config


@click.group()
@click.option("--runtime-dir")
@click.pass_context
def root(ctx: click.Context, runtime_dir: str) -> None:
    ctx.obj = Context(None, runtime_dir)


for command in COMMANDS:
    root.add_command(command)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, PagingService, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    store = Store.open(tmp_path / "state", components=COMPONENTS)
    runtime = tmp_path / "run"
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def start() -> None:
        svc = PagingService(
            make_config("/dev/null"),
            store,
            CollectorRegistry(),
            tick_s=3600,
            channels={"sms": NullChannel("sms"), "email": NullChannel("email", result="failed")},
        )
        await svc.start()
        server = ApiServer(runtime, svc.handlers())
        await server.start()
        holder.update(svc=svc, server=server)
        ready.set()

    thread = threading.Thread(
        target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True
    )
    thread.start()
    assert ready.wait(10)
    svc = holder["svc"]
    assert isinstance(svc, PagingService)
    yield runtime, svc, loop

    async def stop() -> None:
        await holder["server"].close()  # type: ignore[attr-defined]
        await svc.stop()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    store.close()


def test_incidents_ack_oncall_and_page_test(
    daemon: tuple[Path, PagingService, asyncio.AbstractEventLoop],
) -> None:
    runtime, svc, loop = daemon
    asyncio.run_coroutine_threadsafe(svc.raise_incident("trunk:a", "trunk a down", "critical"), loop).result(
        5
    )
    runner = CliRunner(env={"COLUMNS": "200"})

    def cli(*args: str) -> click.testing.Result:
        return runner.invoke(root, ["--runtime-dir", str(runtime), *args])

    result = cli("incidents", "--json")
    assert result.exit_code == 0, result.output
    active = json.loads(result.output)["active"]
    assert [(i["id"], i["status"], i["summary"]) for i in active] == [(1, "open", "trunk a down")]
    result = cli("incidents")
    assert result.exit_code == 0 and "trunk a down" in result.output
    # What became of each page is shown, not just who was meant to get it.
    for _ in range(100):
        result = cli("incidents")
        if "Zhang Wei: paged (sms)" in result.output:
            break
        time.sleep(0.05)
    assert "Zhang Wei: paged (sms)" in result.output, result.output
    result = cli("ack", "1")
    assert result.exit_code == 0 and "incident #1 acknowledged by uid=" in result.output
    result = cli("ack", "1")
    assert result.exit_code == 1 and "already acknowledged" in result.output
    result = cli("oncall", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["rotations"][0]["rotation"] == "primary"
    assert cli("oncall").exit_code == 0
    result = cli("page", "test", "Zhang Wei", "--message", "hello")
    assert result.exit_code == 0 and "sms: sent" in result.output and "email: failed" in result.output
    result = cli("page", "test", "Zhang Wei", "--channel", "email", "--json")
    assert result.exit_code == 1 and json.loads(result.output)["results"][0]["result"] == "failed"
    result = cli("page", "test", "Nobody")
    assert result.exit_code == 1 and "unknown contact" in result.output


def test_commands_without_a_daemon_fail_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(root, ["--runtime-dir", str(tmp_path), "incidents"])
    assert result.exit_code == 1 and "daemon is not running" in result.output
