"""The real daemon process: start, status, reload, stop, systemd notifications, bad input.

These need no lab: the SBC targets point at a closed loopback port, so the
daemon sees them down, which is all these lifecycle tests care about.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tomllib
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, metrics, wait_for


@pytest.fixture
def cfg(tmp_path: Path, minimal_config_text: str) -> Path:
    path = tmp_path / "hotsite.toml"
    path.write_text(minimal_config_text)
    return path


def _listen(cfg: Path) -> str:
    return str(tomllib.loads(cfg.read_text())["metrics"]["listen"])


def test_status_metrics_reload_and_clean_stop(cfg: Path, tmp_path: Path) -> None:
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        status = daemon.status()
        assert [s["name"] for s in status["sites"]] == ["primary", "backup"]
        assert status["appliance"]["pid"] == daemon.proc.pid
        assert "probes" in status["appliance"]["tasks"]
        started = json.loads(hotsite("events", "--json", "--kind", "daemon", config=cfg).stdout)
        assert started[0]["kind"] == "daemon.start" and started[0]["data"]["pid"] == daemon.proc.pid
        # Nothing answers on the SBC port: the targets are judged down.
        wait_for(lambda: all(s["state"] == "down" for s in daemon.status()["sites"]), what="sites down")
        text = metrics(_listen(cfg))
        assert re.search(r'^hotsite_build_info\{.*version="', text, re.M)
        assert 'hotsite_probe_up{kind="sip",target="site:primary:sbc"} 0.0' in text
        assert re.search(
            r'hotsite_probe_failures_total\{reason="(unreachable|timeout)",target="site:primary:sbc"\} [1-9]',
            text,
        )

        # An invalid config on SIGHUP is rejected and the old one kept.
        good = cfg.read_text()
        cfg.write_text(good + '\n[trunks.x]\nadress = "1.2.3.4"\n')
        daemon.signal(signal.SIGHUP)
        wait_for(
            lambda: hotsite("events", "--json", "--kind", "config", config=cfg).stdout.count(
                "config.reload_rejected"
            ),
            what="reload rejected",
        )
        assert daemon.status()["trunks"] == []
        assert 'hotsite_config_reloads_total{result="rejected"} 1.0' in metrics(_listen(cfg))

        # A valid one is applied: the new trunk appears.
        cfg.write_text(good + f'\n[trunks.carrier-x]\naddress = "127.0.0.1:{free_port(socket.SOCK_DGRAM)}"\n')
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: [t["name"] for t in daemon.status()["trunks"]] == ["carrier-x"], what="new trunk")
    finally:
        code = daemon.stop()
    assert code == 0
    assert not (tmp_path / "run" / "hotsite.sock").exists()
    assert "Traceback" not in daemon.log.read_text()


def test_note_records_the_kernel_reported_user(cfg: Path, tmp_path: Path) -> None:
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        proc = hotsite("note", "replaced", "PSU 2", config=cfg)
        assert proc.returncode == 0, proc.stderr
        events = json.loads(hotsite("events", "--json", "--kind", "operator", config=cfg).stdout)
        assert events[0]["message"] == "replaced PSU 2"
        assert events[0]["actor"].startswith(f"uid={os.getuid()}(")
    finally:
        daemon.stop()


def test_systemd_notifications(cfg: Path, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(10)
    daemon = RunningDaemon(
        cfg,
        tmp_path / "daemon.log",
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
    )

    def expect(field: str) -> str:
        while True:
            message = listener.recv(4096).decode()
            if field in message.split("\n"):
                return message

    try:
        ready = expect("READY=1")
        assert f"MAINPID={daemon.proc.pid}" in ready
        expect("WATCHDOG=1")
        expect("WATCHDOG=1")  # keeps pinging
        daemon.signal(signal.SIGHUP)
        expect("RELOADING=1")
        expect("READY=1")
    finally:
        daemon.signal(signal.SIGTERM)
        expect("STOPPING=1")
        assert daemon.stop() == 0
        listener.close()


def _one_error_line(proc: object, code: int, pattern: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    stderr = proc.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    assert re.search(pattern, stderr), stderr


def test_second_daemon_on_the_same_state_is_refused(cfg: Path, tmp_path: Path) -> None:
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        second = hotsite("run", config=cfg)
        _one_error_line(
            second,
            1,
            rf"^hotsite: error: another hotsite daemon \(pid {daemon.proc.pid}\) is already using the state directory",
        )
    finally:
        daemon.stop()


def test_metrics_port_in_use_is_one_clear_line(cfg: Path) -> None:
    host, port = _listen(cfg).split(":")
    with socket.socket() as busy:
        busy.bind((host, int(port)))
        busy.listen()
        proc = hotsite("run", config=cfg)
    _one_error_line(
        proc,
        1,
        rf"^hotsite: error: metrics listener {host}:{port} cannot be opened: Address already in use\n$",
    )


def test_bad_config_exits_2_naming_each_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[appliance]\nnme = "x"\n[sites.p]\nrole = "primary"\nsbc = "10.0.0.1:99999"\nkamailio_set = 1\n'
    )
    for args in (["run"], ["config", "check"]):
        proc = hotsite(*args, config=bad)
        _one_error_line(proc, 2, r"^hotsite: error: .*bad.toml: 2 problem\(s\)")
        assert "appliance.nme: unknown key" in proc.stderr
        assert "sites.p.sbc: '10.0.0.1:99999': port must be 1-65535" in proc.stderr
    missing = hotsite("config", "check", str(tmp_path / "nope.toml"))
    _one_error_line(missing, 2, r"config file .*nope.toml does not exist")


def test_config_check_names_an_unreadable_modem(cfg: Path) -> None:
    cfg.write_text(cfg.read_text() + '\n[channels.sms]\ntype = "gsm"\ndevice = "/dev/ttyNOPE9"\n')
    proc = hotsite("config", "check", str(cfg))
    _one_error_line(proc, 2, r"channels.sms.device: '/dev/ttyNOPE9' does not exist")
    ok = hotsite("config", "check", "--json", "appliance/examples/hotsite.example.toml")
    assert json.loads(ok.stdout)["problems"]  # its secrets and modem are not on this machine


def test_cli_without_daemon_says_so(cfg: Path) -> None:
    proc = hotsite("status", config=cfg)
    _one_error_line(
        proc, 1, r"^hotsite: error: the hotsite daemon is not running \(no answer on .*hotsite.sock\)"
    )


def test_usage_errors_exit_2() -> None:
    assert hotsite("no-such-command").returncode == 2
    assert hotsite("status", "--no-such-flag").returncode == 2


def test_probes_and_trunks_commands(cfg: Path, tmp_path: Path) -> None:
    cfg.write_text(
        cfg.read_text() + f'\n[trunks.carrier-x]\naddress = "127.0.0.1:{free_port(socket.SOCK_DGRAM)}"\n'
    )
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        probes = json.loads(hotsite("probes", "--json", config=cfg).stdout)
        assert [p["target"] for p in probes] == [
            "site:primary:sbc",
            "site:backup:sbc",
            "host:disk",
            "host:memory",
            "host:temperature",
            "trunk:carrier-x",
        ]
        assert all(p["interval_s"] == 0.2 and p["timeout_s"] == 0.15 for p in probes if p["kind"] == "sip")
        assert next(p for p in probes if p["target"] == "host:disk")["interval_s"] == 5.0
        trunks = json.loads(hotsite("trunks", "--json", config=cfg).stdout)
        assert [(t["name"], t["kind"], t["transport"]) for t in trunks] == [("carrier-x", "sip", "udp")]
        human = hotsite("trunks", config=cfg)
        assert human.returncode == 0 and "trunk:carrier-x" in human.stdout
    finally:
        daemon.stop()


def test_one_shot_probe_needs_no_daemon() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        ok = hotsite("probe", f"tcp://127.0.0.1:{server.getsockname()[1]}", "-n", "2", "-i", "0.1", "--json")
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    assert [line.get("ok") for line in lines[:2]] == [True, True]
    assert lines[-1]["summary"]["answered"] == 2
    dead = hotsite("probe", f"sip:127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "-n", "1", "-W", "0.3")
    assert dead.returncode == 1 and "unreachable" in dead.stdout and "100.0% loss" in dead.stdout
    bad = hotsite("probe", "gopher://x")
    assert bad.returncode == 2 and "unknown target" in bad.stderr


def test_a_broken_modem_is_an_incident(cfg: Path, tmp_path: Path) -> None:
    from tests.support.modem import ModemEmulator

    modem = ModemEmulator(sim="absent").start()
    cfg.write_text(
        cfg.read_text()
        + '\n[[contacts]]\nname = "Li"\nphone = "+8613900139000"\n'
        + f'\n[channels.sms]\ntype = "gsm"\ndevice = "{modem.path}"\nhealth_s = 1\nprompt_timeout_s = 1\n'
    )
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        incident = wait_for(
            lambda: next(
                (
                    i
                    for i in json.loads(hotsite("incidents", "--json", config=cfg).stdout)["active"]
                    if "channel:sms" in i["keys"]
                ),
                None,
            ),
            timeout=20,
            what="modem incident",
        )
        assert "paging channel sms (gsm) is down" in incident["summary"]
    finally:
        daemon.stop()
        modem.stop()


def test_events_filter_by_subject_and_incident(cfg: Path, tmp_path: Path) -> None:
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        wait_for(lambda: all(s["state"] == "down" for s in daemon.status()["sites"]), what="sites down")
        about = json.loads(hotsite("events", "--json", "--subject", "site:primary:sbc", config=cfg).stdout)
        assert about and all(e["subject"] == "site:primary:sbc" for e in about)
        none = json.loads(hotsite("events", "--json", "--incident", "999", config=cfg).stdout)
        assert none == []
        both = hotsite("events", "--incident", "1", "--subject", "x", config=cfg)
        assert both.returncode == 2 and "not both" in both.stderr
    finally:
        daemon.stop()
