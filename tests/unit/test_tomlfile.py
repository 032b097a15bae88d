"""One TOML loader and error describer: the source agent and the witness say mistakes as the appliance does."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from appliance.replication.settings import load_source_config
from failover.witness import load_settings

SOURCE = """
[source]
tls_cert_file = "/etc/hotsite/source.pem"
tls_key_file = "/etc/hotsite/source.key"
tls_ca_file = "/etc/hotsite/ca.pem"
heartbeat_s = 0
[streams.customers]
kind = "sqlite"
path = "/var/lib/crm/customers.db"
exclude = "*.swp"
colour = "blue"
"""


def problems_of(load: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load()  # type: ignore[operator]
    return info.value


def test_the_source_agent_names_each_key_its_value_and_the_keys_known_there(tmp_path: Path) -> None:
    path = tmp_path / "source.toml"
    path.write_text(SOURCE)
    error = problems_of(lambda: load_source_config(path))
    assert error.message == f"{path}: 3 problem(s) in the configuration"
    assert sorted(error.problems) == [
        "source.heartbeat_s: 0: expected greater than 0",
        "streams.customers.colour: unknown key (known keys here: exclude, kind, path)",
        "streams.customers.exclude: '*.swp': expected a valid list",
    ]


@pytest.mark.parametrize("load", [load_source_config, lambda p: load_settings(p, {}), config.load])
def test_every_file_reader_says_the_same_about_broken_toml_and_a_missing_file(
    tmp_path: Path, load: object
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[source\n")
    broken = problems_of(lambda: load(path))  # type: ignore[operator]
    assert broken.message.startswith(f"{path}: not valid TOML: ") or "not valid TOML" in broken.message
    assert broken.problems and broken.problems[0].startswith("TOML syntax: ")
    missing = problems_of(lambda: load(tmp_path / "missing.toml"))  # type: ignore[operator]
    assert "missing.toml does not exist" in missing.message


def test_the_witness_shows_list_items_as_the_appliance_does(tmp_path: Path) -> None:
    path = tmp_path / "witness.toml"
    path.write_text(
        'listen = "127.0.0.1:8443"\nprimary = ["ftp://x"]\nallow_plain_http = true\nallow_unauthenticated = true\n'
    )
    error = problems_of(lambda: load_settings(path, {}))
    assert error.message == f"{path}: 1 problem(s) in the witness settings"
    assert error.problems[0].startswith("primary[0]: 'ftp://x': ")
