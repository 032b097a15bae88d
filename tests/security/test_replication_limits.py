"""The pure cores behind the replication limits: path acceptance (hypothesis), header depth and size,
inflation bounds, exact version matching, and the agent refusing a malformed HELLO over real TLS."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.replication import protocol, validate
from appliance.replication.files import is_version_of, version_stem
from appliance.replication.protocol import Msg, ProtocolError
from appliance.replication.safepath import Beneath, parse_relpath
from appliance.replication.source import ServedStream, SourceAgent
from tests.security.replication_support import until
from tests.support.replication_rig import client_ctx, pki, server_ctx

_TOKENS = st.sampled_from(["a", "b", "/", ".", "..", "\0", "é", ".hotsite", "-", " ", "\\", "~"])
_PATHS = st.one_of(st.lists(_TOKENS, max_size=12).map("".join), st.text(max_size=40))


@given(_PATHS)
@settings(max_examples=500, deadline=None)
def test_an_accepted_path_stays_beneath_the_root(rel: str) -> None:
    root = "/srv/replica/tree"
    try:
        parts = parse_relpath(rel)
    except ProtocolError as exc:
        assert exc.reason == "unsafe_path"
        return
    joined = os.path.normpath(os.path.join(root, *parts))
    assert joined.startswith(root + "/") and "/".join(parts) == rel
    assert not any(p in ("", ".", "..") or p.startswith(".hotsite") or "\0" in p for p in parts)


@pytest.mark.parametrize(
    "rel",
    ["", ".", "..", "../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "a/", "x\0y", ".hotsite-x"],
)
def test_unsafe_paths_are_refused(rel: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_relpath(rel)
    assert info.value.reason == "unsafe_path" and "unsafe path" in info.value.message


def test_schema_names_the_field_and_what_is_expected() -> None:
    sha = "a" * 64
    with pytest.raises(ProtocolError, match=r"mode: 1099511627776 is not an integer 0\.\.4095"):
        validate.manifest({"files": {"a": [sha, 2**40, 1]}})
    with pytest.raises(ProtocolError, match="size"):
        validate.manifest({"files": {"a": [sha, 0o644, -1]}})
    with pytest.raises(ProtocolError, match="SHA-256"):
        validate.manifest({"files": {"a": ["../../x", 0o644, 1]}})
    with pytest.raises(ProtocolError, match="finite"):
        validate.number({"observed_at": float("nan")}, "observed_at")
    with pytest.raises(ProtocolError, match="integer"):
        validate.manifest({"files": {"a": [sha, True, 1]}})  # a bool is not a mode
    assert validate.manifest({"files": {"d/a.conf": [sha, 0o4755, 3]}}) == {"d/a.conf": (sha, 0o4755, 3)}


async def _read(raw: bytes, limit: int = protocol.MAX_MESSAGE, header: int | None = None) -> protocol.Message:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await protocol.read_message(reader, limit, header)


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload), kind, zlib.crc32(payload)) + payload


def test_headers_are_bounded_in_depth_and_size() -> None:
    deep = b"{" + b'"a":{' * 9 + b"}" * 9 + b"}"
    with pytest.raises(ProtocolError, match="deeper"):
        asyncio.run(_read(_frame(Msg.HEARTBEAT, struct.pack(">I", len(deep)) + deep)))
    bomb = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ProtocolError, match="deeper"):
        asyncio.run(_read(_frame(Msg.HEARTBEAT, struct.pack(">I", len(bomb)) + bomb)))
    ok = json.dumps({"blocks": {"p": ["s", ["d"]]}}).encode()
    assert asyncio.run(_read(_frame(Msg.HELLO, struct.pack(">I", len(ok)) + ok))).header["blocks"]
    with pytest.raises(ProtocolError, match="header of .* exceeds"):
        asyncio.run(_read(_frame(Msg.HELLO, struct.pack(">I", len(ok)) + ok), header=len(ok) - 1))


@pytest.mark.parametrize("inflated", [1024 * 1024, 64 * 1024 * 1024])
def test_a_bomb_is_refused_beyond_the_limit(inflated: int) -> None:
    limit = 512 * 1024
    head = b"{}"
    packer = zlib.compressobj(9)
    payload = packer.compress(struct.pack(">I", len(head)) + head)
    payload += b"".join(packer.compress(bytes(1024 * 1024)) for _ in range(inflated // (1024 * 1024)))
    payload += packer.flush()
    assert len(payload) < limit
    with pytest.raises(ProtocolError) as info:
        asyncio.run(_read(_frame(Msg.KEEPALIVE | protocol.FLAG_ZLIB, payload), limit))
    assert info.value.reason == "too_long"
    # Just within the limit: accepted whole.
    body = os.urandom(1000) * 100
    msg = asyncio.run(_read(protocol.encode(Msg.FILE_DATA, {"x": 1}, body, "zlib"), limit))
    assert msg.body == body and msg.header == {"x": 1}


def test_versions_match_exactly() -> None:
    assert is_version_of("ivr.1796624368.275708", "ivr")
    assert not is_version_of("ivr.conf.1796624368.275708", "ivr")
    assert not is_version_of("ivr.1", "ivr") and not is_version_of("ivrx.1796624368.275708", "ivr")
    long_name = "é" * 200  # 400 bytes: the stem is shortened, and stays distinct per name
    stem = version_stem(long_name)
    assert len(os.fsencode(f"{stem}.1796624368.275708")) <= 255
    assert stem != version_stem("é" * 199 + "e") and version_stem("ivr") == "ivr"


def test_beneath_refuses_a_symlinked_component(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    with Beneath(root) as tree:
        with pytest.raises(NotADirectoryError):
            tree.open_read(("link", "secret"))
        assert tree.lstat(("link", "secret")) is None
        assert not tree.unlink(("link", "secret"))
    assert (outside / "secret").exists()


def test_the_agent_refuses_a_malformed_hello_and_serves_on(tmp_path: Path) -> None:
    certs = pki(tmp_path / "tls")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.conf").write_text("a")

    async def scenario() -> None:
        agent = SourceAgent([ServedStream("d", "files", src)], ssl_context=server_ctx(certs), heartbeat_s=0.2)
        await agent.start()
        try:
            for bad in (
                {"stream": "d", "rate_bytes_s": "fast"},
                {"stream": "d", "kind": "files", "have": [{"x": 1}]},
                {"stream": "d", "kind": "files", "blocks": {"../x": ["a" * 64, []]}},
                {"stream": ["d"]},
            ):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", agent.port, ssl=client_ctx(certs), server_hostname="source"
                )
                writer.write(protocol.encode(Msg.HELLO, bad))
                await writer.drain()
                while await reader.read(65536):  # the agent ends the session
                    pass
                writer.close()
            await until(lambda: agent.bad_messages == 4, what="four refusals")
            # A good replica is still served.
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", agent.port, ssl=client_ctx(certs), server_hostname="source"
            )
            writer.write(protocol.encode(Msg.HELLO, {"stream": "d", "kind": "files", "file_parts": True}))
            assert (await protocol.read_message(reader)).kind == Msg.WELCOME
            writer.close()
        finally:
            await agent.stop()

    asyncio.run(scenario())
