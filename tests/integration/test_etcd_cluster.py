"""A real three-member etcd cluster on 127.0.0.1, and checks that it is one.

:class:`EtcdCluster` is used by the other etcd tests and the benchmark: each
member is an ``etcd`` process (Debian package ``etcd-server``) with its own
free ports and temp dir; ``pause``/``resume`` are SIGSTOP/SIGCONT (as
Patroni's own tests pause etcd), ``stop`` a SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
needs_etcd = pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="etcd not installed (apt: etcd-server)")


class EtcdCluster:
    def __init__(self, size: int = 3, *, base: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hotsite-etcd-", dir=base))
        self.names = [f"m{i}" for i in range(size)]
        self.client_port = {n: free_port() for n in self.names}
        self.peer_port = {n: free_port() for n in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()
        self.token = f"hotsite-test-{os.getpid()}-{int(time.time() * 1000)}"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.client_port[name]}"

    @property
    def endpoints(self) -> list[str]:
        return [self.url(n) for n in self.names]

    def start(self) -> None:
        for name in self.names:
            self.start_member(name)
        self.wait_healthy()

    def start_member(self, name: str) -> None:
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer_port[n]}" for n in self.names)
        peer = f"http://127.0.0.1:{self.peer_port[name]}"
        log = (self.dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [
                ETCD,
                f"--name={name}",
                f"--data-dir={self.dir / name}",
                f"--listen-client-urls={self.url(name)}",
                f"--advertise-client-urls={self.url(name)}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={initial}",
                f"--initial-cluster-token={self.token}",
                "--initial-cluster-state=new",
                "--heartbeat-interval=50",
                "--election-timeout=500",
                "--pre-vote=true",  # as the etcd role provisions it (3.4's default is false)
                "--quota-backend-bytes=67108864",
                "--log-level=error",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def health(self, name: str) -> bool:
        try:
            answer = httpx.get(self.url(name) + "/health", timeout=1.0, trust_env=False)
            return answer.status_code == 200 and answer.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd {name} exited: {(self.dir / f'{name}.log').read_text()[-2000:]}"
                    )
            if all(self.health(n) for n in self.names if n not in self.paused):
                return
            time.sleep(0.1)
        raise RuntimeError("etcd cluster not healthy in time")

    def raft_leader(self) -> str:
        for name in self.names:
            if name in self.paused:
                continue
            try:
                doc = httpx.post(
                    self.url(name) + "/v3/maintenance/status", json={}, timeout=1.0, trust_env=False
                ).json()
            except (httpx.HTTPError, ValueError):
                continue
            leader = doc.get("leader")
            members = httpx.post(
                self.url(name) + "/v3/cluster/member/list", json={}, timeout=1.0, trust_env=False
            )
            for member in members.json().get("members", []):
                if member.get("ID") == leader:
                    return str(member["name"])
        raise RuntimeError("no raft leader")

    def pause(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGCONT)
        self.paused.discard(name)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        for proc in self.procs.values():
            proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    c = EtcdCluster(3)
    try:
        c.start()
        yield c
    finally:
        c.close()


@needs_etcd
def test_three_members_form_one_cluster(cluster: EtcdCluster) -> None:
    listed = httpx.post(cluster.endpoints[0] + "/v3/cluster/member/list", json={}, trust_env=False).json()
    assert sorted(m["name"] for m in listed["members"]) == cluster.names
    assert cluster.raft_leader() in cluster.names


@needs_etcd
def test_a_paused_member_leaves_a_working_majority(cluster: EtcdCluster) -> None:
    victim = cluster.raft_leader()
    cluster.pause(victim)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if cluster.raft_leader() != victim:
                    break
            except RuntimeError:
                pass
            time.sleep(0.1)
        assert cluster.raft_leader() != victim
    finally:
        cluster.resume(victim)
    cluster.wait_healthy()
