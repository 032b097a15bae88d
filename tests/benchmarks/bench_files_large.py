"""Config-file replication of one large file: time and resident-memory growth on each end.

Run: .venv/bin/python -m tests.benchmarks.bench_files_large [--mb 200] [--max-message-mb 256]
Prints figures. Not part of `make test`.

The source agent runs in a child process, the replica's client in this one,
over TLS on loopback (zlib, as the daemon's default). Each process samples
its own VmRSS every 2 ms from the moment the client connects until the file
is in place; the figure is the peak minus the RSS at connect. With the
file streamed in parts both should stay within a few MiB whatever the file
size; a file sent as one message costs about its size on each end (several
times that while it is encoded, compressed and decoded).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from appliance.replication import protocol
from appliance.replication.files import FilesReplica, FilesStreamClient
from appliance.replication.source import ServedStream, SourceAgent
from tests.support import replication_rig

MIB = 1024 * 1024


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRss:
    """Samples this process's RSS in a thread; ``growth`` is the peak over the RSS at start."""

    def __init__(self) -> None:
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            self._stop.wait(0.002)

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss()) - self.start


def agent_main(src: str, certs: str, max_message: int, ports: Any, results: Any, done: Any) -> None:
    c = Path(certs)

    async def run() -> None:
        agent = SourceAgent(
            [ServedStream("prompts", "files", Path(src))],
            heartbeat_s=0.5,
            max_message=max_message,
            ssl_context=replication_rig.server_ctx(c),
        )
        await agent.start()
        sampler = PeakRss()
        ports.put(agent.port)
        while not done.is_set():
            await asyncio.sleep(0.05)
        growth = sampler.growth()
        await asyncio.sleep(0.5)  # the session's end records its largest message
        results.put((growth, agent.largest_body))
        await agent.stop()

    asyncio.run(run())


async def replicate(dst: Path, certs: Path, port: int, max_message: int, size: int) -> tuple[float, int]:
    kwargs: dict[str, Any] = {}
    if max_message != protocol.MAX_MESSAGE:
        kwargs["max_message"] = max_message
    client = FilesStreamClient(
        "prompts",
        "prompts",
        FilesReplica(dst),
        host="127.0.0.1",
        port=port,
        server_name="source",
        ssl_context=replication_rig.client_ctx(certs),
        **kwargs,
    )
    sampler = PeakRss()
    started = time.monotonic()
    task = asyncio.create_task(client.run())
    while client.change_sets == 0:
        if time.monotonic() - started > 300:
            raise RuntimeError(f"not replicated after 300 s; client: {client.stats}")
        await asyncio.sleep(0.01)
    seconds = time.monotonic() - started
    growth = sampler.growth()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert (dst / "archive.bin").stat().st_size == size, "replica's copy has the wrong size"
    return seconds, growth


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--max-message-mb", type=int, default=protocol.MAX_MESSAGE // MIB)
    args = parser.parse_args()
    max_message = args.max_message_mb * MIB
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs = tmp / "tls"
        replication_rig.pki(certs)
        src, dst = tmp / "prompts", tmp / "replica" / "prompts"
        src.mkdir()
        with open(src / "archive.bin", "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(MIB))
        ctx = mp.get_context("spawn")
        ports, results, done = ctx.Queue(), ctx.Queue(), ctx.Event()
        child = ctx.Process(target=agent_main, args=(str(src), str(certs), max_message, ports, results, done))
        child.start()
        port = ports.get(timeout=30)
        seconds, replica_growth = asyncio.run(replicate(dst, certs, port, max_message, args.mb * MIB))
        done.set()
        agent_growth, largest_body = results.get(timeout=30)
        child.join(10)
        same = _sha(src / "archive.bin") == _sha(dst / "archive.bin")
    print(f"file: {args.mb} MiB random, max_message {args.max_message_mb} MiB, TLS+zlib on loopback")
    print(f"time to replicate: {seconds:.2f} s ({args.mb / seconds:.0f} MiB/s); byte-identical: {same}")
    print(
        f"agent RSS growth:   {agent_growth / MIB:.1f} MiB (largest message body {largest_body / MIB:.2f} MiB)"
    )
    print(f"replica RSS growth: {replica_growth / MIB:.1f} MiB")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    main()
