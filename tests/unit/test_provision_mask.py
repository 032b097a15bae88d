"""Secrets in a diagnostics bundle: which keys are masked, which paths are only listed."""

from __future__ import annotations

import tomllib

import pytest

from provisioning.remote import MASK, is_secret_key, mask_config, mask_config_text, secret_paths
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("smtp_password", True),
        ("api-token", True),
        ("sim_pin", True),
        ("pin", True),
        ("routing_key", True),
        ("secret", True),
        ("client-secret", True),
        ("apikey", True),
        ("password_file", False),
        ("pin_file", False),
        ("tls_key_file", False),  # paths, listed not read
        ("keep_versions", False),
        ("kamailio_set", False),
        ("ping_interval", False),
        ("host", False),
        ("spinner", False),
        ("monkey", False),
    ],
)
def test_secret_keys_are_recognised_by_their_words(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_masking_parsed_and_raw_config_agree_and_keep_paths() -> None:
    text = """# site config
[channels.email]
type = "smtp"
password_file = "/etc/hotsite/secrets/smtp"
password = "hunter2"
[channels.hook]
token = 'abc'
"key" = "k"
[[contacts]]
name = "A"
pin = "1234"
"""
    masked = mask_config_text(text)
    assert "hunter2" not in masked and "abc" not in masked and "1234" not in masked and '"k"' not in masked
    assert "/etc/hotsite/secrets/smtp" in masked and "# site config" in masked
    parsed = tomllib.loads(masked)
    assert parsed == mask_config(tomllib.loads(text))
    assert parsed["channels"]["email"]["password"] == MASK
    assert secret_paths(tomllib.loads(text)) == {"channels.email.password_file": "/etc/hotsite/secrets/smtp"}


def test_the_example_config_lists_its_secret_files() -> None:
    example = tomllib.loads((REPO / "appliance/examples/hotsite.example.toml").read_text())
    paths = secret_paths(example)
    assert paths["channels.sms.pin_file"] == "/etc/hotsite/secrets/sim-pin"
    assert paths["replication.tls_key_file"] == "/etc/hotsite/secrets/appliance.key"
    assert mask_config(example) == example  # the example holds no inline secret
