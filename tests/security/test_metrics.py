"""The real daemon's ``/metrics`` under idle connections; TLS and basic auth the exporter-toolkit way."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import bcrypt
import httpx
import psutil
import pytest

from tests.conftest import MINIMAL, free_port
from tests.integration.daemon_helpers import RunningDaemon, wait_for

pytestmark = pytest.mark.slow


def config(tmp_path: Path, extra: str = "") -> tuple[Path, str]:
    port = free_port()
    text = MINIMAL.format(
        state=tmp_path / "state",
        run=tmp_path / "run",
        metrics_port=port,
        sbc_port=free_port(socket.SOCK_DGRAM),
    )
    text = text.replace("[metrics]\n", "[metrics]\n" + extra)
    path = tmp_path / "hotsite.toml"
    path.write_text(text)
    return path, f"127.0.0.1:{port}"


def test_idle_connections_do_not_cost_a_thread_each(tmp_path: Path) -> None:
    cfg, listen = config(tmp_path)
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    idle: list[socket.socket] = []
    try:
        daemon.wait_ready()
        proc = psutil.Process(daemon.proc.pid)
        before = proc.num_threads()
        host, port = listen.split(":")
        for _ in range(500):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        time.sleep(1.0)
        during = proc.num_threads()
        r = httpx.get(f"http://{listen}/metrics", timeout=10)
        print(f"metrics: 500 idle connections, daemon threads {before} -> {during}")
        assert r.status_code == 200 and "hotsite_build_info" in r.text
        assert during <= before + 8, f"{during - before} threads for 500 idle connections"
    finally:
        for sock in idle:
            sock.close()
        daemon.stop()


def test_basic_auth_and_tls_when_configured(tmp_path: Path) -> None:
    from tests.integration.test_witness_agent import self_signed

    cert, key = self_signed(tmp_path)
    key.chmod(0o600)
    hashed = bcrypt.hashpw(b"scrape-pass", bcrypt.gensalt(rounds=4)).decode()
    cfg, listen = config(
        tmp_path,
        f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\nbasic_auth_users = {{ prometheus = "{hashed}" }}\n',
    )
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        url = f"https://{listen}/metrics"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert client.get(url).status_code == 401
            assert client.get(url, auth=("prometheus", "wrong")).status_code == 401
            ok = wait_for(lambda: client.get(url, auth=("prometheus", "scrape-pass")), what="a scrape")
            assert ok.status_code == 200 and "hotsite_build_info" in ok.text
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{listen}/metrics", timeout=3).raise_for_status()
    finally:
        daemon.stop()
