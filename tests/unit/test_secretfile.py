"""The one secret-file reader: one trimming rule for every password, token, PIN and key file."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.paging.settings import read_secret as paging_secret
from appliance.secretfile import read_secret
from failover.etcd import read_credentials
from failover.witness import read_token


@pytest.mark.parametrize(
    ("content", "secret"),
    [(b"s3cret\n", "s3cret"), (b"s3cret\r\n", "s3cret"), (b"  s3cret \t\n\n", "s3cret"), (b"", "")],
)
def test_surrounding_whitespace_is_not_part_of_a_secret(tmp_path: Path, content: bytes, secret: str) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    assert read_secret(path, "channels.mail.password_file") == secret


def test_a_second_line_is_refused_not_cut(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"first\nsecond\n")
    with pytest.raises(ConfigError) as info:
        read_secret(path, "channels.mail.password_file")
    assert info.value.message == f"channels.mail.password_file: {path}: expected one line (the secret alone)"


@pytest.mark.parametrize(
    ("content", "error"),
    [(None, "does not exist"), (b"caf\xc3\xa9\n", "expected printable ASCII")],
)
def test_an_unreadable_secret_names_the_key_and_the_file(
    tmp_path: Path, content: bytes | None, error: str
) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=error) as info:
        read_secret(path, "failover.witness_token_file", encoding="ascii")
    assert info.value.message.startswith(f"failover.witness_token_file: {path}")


def test_every_reader_follows_the_same_rule(tmp_path: Path) -> None:
    """The paging channels', the witness's and etcd's secrets, each with a CRLF and a stray space."""
    (tmp_path / "pin").write_bytes(b" 1234\r\n")
    (tmp_path / "token").write_bytes(b" s3cr3t-T0ken\r\n")
    (tmp_path / "etcd").write_bytes(b" root:s3cret\r\n")
    assert paging_secret(tmp_path / "pin", "channels.sms.pin_file") == "1234"
    assert read_token(tmp_path / "token") == "s3cr3t-T0ken"
    assert read_credentials(tmp_path / "etcd") == ("root", "s3cret")
    for name in ("pin", "token", "etcd"):
        (tmp_path / name).write_bytes(b"one\ntwo\n")
    for read in (
        lambda: paging_secret(tmp_path / "pin", "channels.sms.pin_file"),
        lambda: read_token(tmp_path / "token"),
        lambda: read_credentials(tmp_path / "etcd"),
    ):
        with pytest.raises(ConfigError, match="expected one line"):
            read()
