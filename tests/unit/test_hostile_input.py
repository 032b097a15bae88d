"""Pure and socket-level checks of the hardening: roles, masking, config limits, the bounded server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import api, configcheck, httpd, roles
from appliance.api import ApiServer, Caller
from appliance.errors import ApiError
from appliance.redact import mask_text
from tests.support import configs

# ---------------------------------------------------------------------------
# Roles


POLICY = roles.RolePolicy(
    operator_uids=frozenset({1500}),
    operator_gids=frozenset({900}),
    read_only_uids=frozenset({1600}),
    read_only_gids=frozenset({800}),
    service_uid=999,
)


@pytest.mark.parametrize(
    ("caller", "role"),
    [
        (Caller(1, 0, 0), "operator"),
        (Caller(1, 999, 999), "operator"),
        (Caller(1, 1500, 1500), "operator"),
        (Caller(1, 1700, 1700, (800, 900)), "operator"),
        (Caller(1, 1700, 800), "read-only"),
        (Caller(1, 1700, 1700, (800,)), "read-only"),
        (Caller(1, 1600, 1600), "read-only"),
        (Caller(1, 1700, 1700, (10, 20)), None),
    ],
)
def test_role_comes_from_peer_credentials(caller: Caller, role: str | None) -> None:
    assert POLICY.role(caller) == role


def test_read_only_may_read_and_nothing_else() -> None:
    reader = Caller(1, 1700, 800)
    for method in ("status", "trunks", "probes", "incidents", "events", "replication.status"):
        assert POLICY.refusal(reader, method) is None
    for method in ("failover", "failback", "maintenance", "ack", "page_test", "replication.promote", "new"):
        assert "read-only role" in (POLICY.refusal(reader, method) or ""), method
    assert "no role" in (POLICY.refusal(Caller(1, 1700, 1700), "status") or "")


# ---------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("http://user:pw@host/x", "http://user:***@host/x"),
        ("see https://a:b@h:1/p?apikey=XYZ&n=1", "see https://a:***@h:1/p?apikey=***&n=1"),
        ("GET /x?token=abc&access_token=def", "GET /x?token=***&access_token=***"),
        ("http://user@host/", "http://user@host/"),
        ("plain words = fine", "plain words = fine"),
    ],
)
def test_credentials_inside_urls_are_masked(text: str, masked: str) -> None:
    assert mask_text(text) == masked


@given(
    st.text(max_size=40),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="@/&#'\"*"),
        min_size=1,
        max_size=20,
    ),
)
def test_a_url_password_never_survives(prefix: str, password: str) -> None:
    out = mask_text(f"{prefix} https://u:{password}@h/p?apikey={password}")
    assert f":{password}@" not in out and f"apikey={password}" not in out


# ---------------------------------------------------------------------------
# Config limits


def test_depth_is_measured_without_recursion() -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    assert configcheck.check_depth({"a": deep}) is not None
    assert configcheck.check_depth({"a": {"b": [1, 2]}}) is None
    assert configcheck.tolerant_depth_scan("a = " + "[" * 40)
    assert not configcheck.tolerant_depth_scan("[[a.b]]\nx = [[1], [2]]\n[c]\n")


def test_special_and_large_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="a FIFO"):
        configcheck.read_text(fifo)
    with pytest.raises(ValueError, match="character device"):
        configcheck.read_text(Path("/dev/zero"))
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (configcheck.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ValueError, match="at most"):
        configcheck.read_text(big)


# ---------------------------------------------------------------------------
# Control API: malformed requests get a clear error, never a traceback


async def _params(caller: Caller, params: dict[str, Any]) -> Any:
    return int(params["n"]) + 1  # a str or a list is the caller's mistake


def test_malformed_control_requests_get_clear_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad: list[str] = []

    async def raw(payload: bytes) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / api.SOCKET_NAME))
        writer.write(payload)
        await writer.drain()
        data = await reader.read()
        writer.close()
        return json.loads(data)

    async def scenario() -> None:
        server = ApiServer(tmp_path, {"n": _params}, on_bad_request=bad.append)
        await server.start()
        try:
            nested = b'{"method": "n", "params": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}\n"
            assert "expected one JSON line" in (await raw(b"[" * 50_000 + b"\n"))["error"]
            assert (await raw(nested))["ok"] is False
            assert (
                "bad parameters for 'n'" in (await raw(b'{"method": "n", "params": {"n": [1]}}\n'))["error"]
            )
            assert "bad parameters" in (await raw(b'{"method": "n", "params": {}}\n'))["error"]
            assert (await raw(b'{"method": "n", "params": {"n": "41"}}\n'))["result"] == 42
        finally:
            await server.close()

    asyncio.run(scenario())
    assert "Traceback" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)


def test_cli_says_so_when_the_backlog_is_full(tmp_path: Path) -> None:
    path = tmp_path / api.SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)  # never accepts: the backlog fills at once
    held = []
    try:
        with pytest.raises(ApiError) as info:
            for _ in range(64):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                try:
                    client.connect(str(path))
                except BlockingIOError:
                    client.close()
                    break
                held.append(client)
            api.call(tmp_path, "status", timeout=1)
        assert "too busy" in str(info.value) or "did not answer" in str(info.value)
    finally:
        for client in held:
            client.close()
        listener.close()


# ---------------------------------------------------------------------------
# The bounded HTTP server


def test_idle_connections_are_evicted_oldest_first_and_the_newcomer_is_served() -> None:
    seen: list[str] = []

    async def handle(request: httpd.Request, identity: str) -> httpd.Response:
        return httpd.Response(200, f"hello {identity}".encode())

    def auth(request: httpd.Request) -> str | httpd.Response | None:
        return "tok" if request.headers.get("authorization") == "Bearer t" else None

    async def scenario() -> None:
        limits = httpd.Limits(max_pending=8, max_pending_per_peer=4, head_timeout_s=30)
        server = httpd.BoundedHttpServer(
            "127.0.0.1", 0, handle, authenticate=auth, limits=limits, on_outcome=seen.append
        )
        await server.start()
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
        await asyncio.sleep(0.2)
        assert server.pending <= 4
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 10)
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"hello tok")
        for _, w in idle:
            w.close()
        writer.close()
        await server.stop()

    asyncio.run(scenario())
    assert seen.count("evicted") >= 16 and "ok" in seen


def test_the_body_is_not_read_before_authentication_and_heads_are_bounded() -> None:
    async def handle(request: httpd.Request, identity: str) -> httpd.Response:
        return httpd.Response(200, request.body)

    async def scenario() -> None:
        server = httpd.BoundedHttpServer("127.0.0.1", 0, handle, authenticate=lambda r: None)
        await server.start()

        async def exchange(data: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(data)
            with_eof = reader.read()
            reply = await asyncio.wait_for(with_eof, 10)
            writer.close()
            return reply

        assert (await exchange(b"POST / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n")).startswith(
            b"HTTP/1.1 401"
        )
        assert (await exchange(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n")).startswith(
            b"HTTP/1.1 431"
        )
        assert (await exchange(b"\x00garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        await server.stop()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------
# Credentials that would travel in clear


SITES = configs.TWO_SITES


def test_config_check_warns_about_every_credential_in_clear() -> None:
    from appliance import config

    cfg = config.parse(
        '[metrics]\nlisten = "0.0.0.0:9477"\n'
        '[failover]\nwitness = "http://10.0.0.9:8080/vote"\nwitness_token_file = "/t"\n'
        '[coordination]\nbackend = "etcd"\nendpoints = ["http://10.0.0.7:2379", "http://10.0.0.8:2379",'
        ' "http://10.0.0.6:2379"]\ncredentials_file = "/c"\n'
        '[channels.mail]\ntype = "smtp"\nhost = "m"\nstarttls = false\nusername = "u"\npassword_file = "/p"\n'
        'from_addr = "a@b.cd"\n'
        '[channels.hook]\ntype = "webhook"\nurl = "http://u:pw@10.0.0.5/x?apikey=1"\nsecret_file = "/s"\n'
        + SITES
    )
    found = "\n".join(cfg.warnings())
    for expected in (
        "channels.mail.starttls: false with a password_file",
        "channels.hook.url: plain http:// with a secret_file",
        "channels.hook.url: the URL holds a user name or password",
        "failover.witness: plain http://: votes and its token travel in clear",
        "coordination.endpoints: 'http://10.0.0.7:2379' is plain http:// and the etcd password",
        "metrics.listen: 0.0.0.0:9477 is reachable from the network without TLS",
    ):
        assert expected in found, found


def test_an_open_receiver_is_a_problem_unless_written_then_a_warning() -> None:
    from appliance import config
    from appliance.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config.parse('[paging]\nalertmanager_listen = "127.0.0.1:9478"\n' + SITES)
    assert any(p.startswith("paging.alertmanager_token_file: required") for p in info.value.problems)
    cfg = config.parse(
        '[paging]\nalertmanager_listen = "127.0.0.1:9478"\nalertmanager_allow_unauthenticated = true\n'
        + SITES
    )
    assert any("accepts alerts from anyone" in w for w in cfg.warnings())
    with pytest.raises(ConfigError, match="problem"):
        config.parse('[appliance]\nruntime_dir = ""\n' + SITES)


def test_the_witness_wants_tls_and_a_token_unless_told_otherwise() -> None:
    from appliance.errors import ConfigError
    from failover import witness

    with pytest.raises(ConfigError) as info:
        witness.load_settings(None, {"listen": "127.0.0.1:8443", "primary": ["tcp://10.0.0.1:5060"]})
    text = "\n".join(info.value.problems)
    assert "tls_cert_file and tls_key_file are required" in text
    loaded = witness.load_settings(
        None,
        {
            "listen": "127.0.0.1:8443",
            "primary": ["tcp://10.0.0.1:5060"],
            "allow_plain_http": True,
            "token_file": "/t",
        },
    )
    assert loaded.allow_plain_http and not loaded.allow_unauthenticated
    with pytest.raises(ConfigError, match="problem"):
        witness.load_settings(
            None, {"listen": "127.0.0.1:8443", "primary": ["tcp://10.0.0.1:5060"], "allow_plain_http": True}
        )


def test_a_vote_without_our_nonce_is_refused() -> None:
    from failover import witness

    doc = {"version": 1, "witness": "w", "primary_alive": False, "age_s": 0.1, "nonce": "old"}
    kwargs: dict[str, Any] = {
        "max_age_s": 5,
        "rtt_s": 0,
        "received_mono": 1,
        "received_wall": 1,
        "source": "w",
    }
    replayed = witness.interpret(200, json.dumps(doc).encode(), nonce="new", **kwargs)
    assert replayed.primary_alive is None and "nonce" in replayed.detail
    fresh = witness.interpret(200, json.dumps({**doc, "nonce": "new"}).encode(), nonce="new", **kwargs)
    assert fresh.primary_alive is False


def test_a_trickling_client_is_cut_at_the_head_deadline() -> None:
    async def handle(request: httpd.Request, identity: str) -> httpd.Response:
        return httpd.Response(200)

    async def scenario() -> float:
        limits = httpd.Limits(head_timeout_s=0.5)
        server = httpd.BoundedHttpServer("127.0.0.1", 0, handle, authenticate=lambda r: "x", limits=limits)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = asyncio.get_running_loop().time()
        reply = b""
        for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100:  # one byte every 0.1 s
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                reply = await asyncio.wait_for(reader.read(4096), 0.1)
            except TimeoutError:
                continue
            break
        elapsed = asyncio.get_running_loop().time() - started
        writer.close()
        await server.stop()
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        return elapsed

    # Each byte arrives well within any per-read timeout; the deadline still ends it.
    assert asyncio.run(scenario()) < 5.0
