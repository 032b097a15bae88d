"""Attacks on the Alertmanager receiver of the real daemon (``paging.alertmanager_listen``).

Each test starts ``hotsite run`` as a subprocess on loopback and attacks it the
way someone on the management LAN could.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import MINIMAL, free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for

pytestmark = pytest.mark.slow

ALERT = {
    "version": "4",
    "status": "firing",
    "groupKey": "g",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "VpnDown", "severity": "critical"},
            "annotations": {"summary": "call this number and read out the VPN code"},
            "fingerprint": "f00d",
        }
    ],
}


def write_config(tmp_path: Path, paging: str) -> tuple[Path, str]:
    listen = f"127.0.0.1:{free_port()}"
    text = MINIMAL.format(
        state=tmp_path / "state",
        run=tmp_path / "run",
        metrics_port=free_port(),
        sbc_port=free_port(socket.SOCK_DGRAM),
    )
    path = tmp_path / "hotsite.toml"
    path.write_text(text + f'\n[paging]\nalertmanager_listen = "{listen}"\n' + paging)
    return path, listen


def test_a_receiver_without_a_token_does_not_start_unless_written_and_config_check_says_so(
    tmp_path: Path,
) -> None:
    cfg, listen = write_config(tmp_path, "")
    check = hotsite("config", "check", str(cfg))
    assert check.returncode == 2 and "paging.alertmanager_token_file" in check.stderr, check.stderr
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        # Today's daemon starts and takes anyone's alert; it must refuse to start instead.
        deadline = time.monotonic() + 20
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            try:
                r = httpx.post(f"http://{listen}/alertmanager", json=ALERT, timeout=2)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            pytest.fail(f"an unauthenticated receiver accepted an alert: HTTP {r.status_code} {r.text}")
        assert daemon.proc.poll() == 2, daemon.log.read_text()
        assert "paging.alertmanager_token_file" in daemon.log.read_text()
    finally:
        daemon.stop()

    open_cfg, _ = write_config(tmp_path, "alertmanager_allow_unauthenticated = true\n")
    check = hotsite("config", "check", str(open_cfg))
    assert check.returncode == 0, check.stderr
    assert "warning: paging.alertmanager_allow_unauthenticated" in check.stderr


def test_a_header_flood_before_authentication_does_not_grow_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "token").chmod(0o600)
    cfg, listen = write_config(tmp_path, f'alertmanager_token_file = "{tmp_path / "token"}"\n')
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        rss = psutil.Process(daemon.proc.pid).memory_info().rss
        host, port = listen.split(":")
        line = b"X-Flood-%08d: " + b"a" * 1000 + b"\r\n"
        sent = 0
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /alertmanager HTTP/1.1\r\nHost: x\r\n")
            try:
                for i in range(64 * 1024):  # 64 MiB of distinct headers, no token
                    sock.sendall(line % i)
                    sent += 1
            except OSError:
                pass  # refused mid-way: the point of the fix
        grown = psutil.Process(daemon.proc.pid).memory_info().rss - rss
        print(f"header flood: {sent} header lines sent, daemon RSS grew {grown / 2**20:.1f} MiB")
        assert grown < 24 * 2**20, f"the daemon grew {grown / 2**20:.0f} MiB reading unauthenticated headers"
        ok = httpx.post(
            f"http://{listen}/alertmanager", json=ALERT, headers={"Authorization": "Bearer s3cret-token"}
        )
        assert ok.status_code == 200, ok.text
        metrics_listen = re.search(r'\[metrics\]\nlisten = "([^"]+)"', cfg.read_text())
        assert metrics_listen is not None
        scraped = httpx.get(f"http://{metrics_listen[1]}/metrics").text
        assert 'hotsite_http_requests_total{listener="alertmanager",outcome="too_large"} 1.0' in scraped
    finally:
        daemon.stop()


def test_the_ack_actor_is_the_tokens_name_never_the_requests(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "token").chmod(0o600)
    cfg, listen = write_config(
        tmp_path,
        f'alertmanager_token_file = "{tmp_path / "token"}"\nalertmanager_token_name = "noc-alertmanager"\n',
    )
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    auth = {"Authorization": "Bearer s3cret-token"}
    try:
        daemon.wait_ready()
        assert httpx.post(f"http://{listen}/alertmanager", json=ALERT, headers=auth).status_code == 200

        def incident() -> dict[str, object] | None:
            out = hotsite("incidents", "--json", config=cfg)
            rows = json.loads(out.stdout)["active"] if out.returncode == 0 else []
            return next((i for i in rows if "VpnDown" in str(i.get("summary"))), None)

        found = wait_for(incident, what="the alert's incident")
        r = httpx.post(
            f"http://{listen}/ack/{found['id']}", json={"actor": "CEO of the bank"}, headers=auth, timeout=5
        )
        assert r.status_code == 200, r.text
        acked = wait_for(lambda: (i := incident()) and i.get("acked_by") and i, what="the ack")
        assert acked["acked_by"] == "webhook:noc-alertmanager"
    finally:
        daemon.stop()
