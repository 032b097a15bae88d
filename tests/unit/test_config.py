"""Config validation: every mistake named with its key, value and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from tests.conftest import REPO
from tests.support import configs

BASE = configs.TWO_SITES


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert info.value.exit_code == 2
    return info.value.problems


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            '[appliance]\nnme = "x"\n',
            "appliance.nme: unknown key (known keys here: log_format, log_level, name,",
        ),
        (
            '[appliance]\nlog_level = "loud"\n',
            "appliance.log_level: 'loud': expected 'debug', 'info', 'warning' or 'error'",
        ),
        (
            '[metrics]\nlisten = "1.2.3.4"\n',
            "metrics.listen: '1.2.3.4': expected host:port, e.g. 127.0.0.1:9477",
        ),
        (
            '[metrics]\nlisten = "127.0.0.1:70000"\n',
            "metrics.listen: '127.0.0.1:70000': port must be 1-65535, got '70000'",
        ),
        ('[trunks.a]\nadress = "10.0.0.9"\n', "trunks.a.address: required key is missing"),
        (
            '[trunks.a]\naddress = "no such host!"\n',
            "trunks.a.address: 'no such host!': 'no such host!' is neither an IP address nor a host name",
        ),
        ('[trunks.A]\naddress = "10.0.0.9"\n', "trunks.A: 'A': expected a lower-case name"),
        (
            "[probes]\ninterval_s = 0.5\ntimeout_s = 1\n",
            "probes: timeout_s (1.0) must not exceed interval_s (0.5)",
        ),
        ("[probes]\nrise = 0\n", "probes.rise: 0: expected greater than or equal to 1"),
        ('[probes]\ninterval_s = "fast"\n', "probes.interval_s: 'fast': expected a valid number"),
        ('[failover]\npolicy = "yolo"\n', "failover.policy: 'yolo': expected 'auto', 'confirm' or 'manual'"),
        (
            '[failover]\nwitness = "ftp://w"\n',
            "failover.witness: 'ftp://w': expected an http:// or https:// URL",
        ),
        (
            '[[contacts]]\nname = "Li"\nphone = "12345"\n',
            "contacts[0].phone: '12345': expected an E.164 phone number such as +8613800138000",
        ),
        (
            '[[contacts]]\nname = "Li"\nemail = "li-at-example"\n',
            "contacts[0].email: 'li-at-example': expected an e-mail address",
        ),
        (
            '[[contacts]]\nname = "Li"\nskills = ["juggling"]\n',
            "contacts[0].skills[0]: 'juggling': expected 'telephony', 'network', 'power', 'data' or 'facilities'",
        ),
        (
            '[channels.sms]\ntype = "gsm"\ndevice = "/dev/x"\nbaud = 1\n',
            "channels.sms.baud: 1: expected 9600, 19200",
        ),
        (
            '[channels.sms]\ntype = "gsm"\ndevise = "/dev/x"\n',
            "channels.sms.devise: unknown key (known keys here: baud, device, health_s, pin_file, poll_s, prompt_timeout_s, retries, send_timeout_s, smsc, status_reports, type)",
        ),
        (
            '[channels.x]\ntype = "pigeon"\n',
            "channels.x.type: 'pigeon': Input tag 'pigeon' found using 'type' does not match any of the expected tags: 'gsm', 'smtp', 'webhook'",
        ),
        ('[channels.mail]\ntype = "smtp"\nhost = "h"\n', "channels.mail.from_addr: required key is missing"),
        (
            '[replication.streams.db]\nkind = "mysql"\nsource = "x"\nreplica = "/r"\n',
            "replication.streams.db.kind: 'mysql': expected 'sqlite' or 'files'",
        ),
        ("[appliance\nname = 1\n", "TOML syntax: "),
    ],
)
def test_each_mistake_is_named_with_key_value_and_expectation(extra: str, expected: str) -> None:
    found = problems(BASE + extra)
    assert any(expected in p for p in found), found


def test_all_mistakes_are_reported_at_once() -> None:
    found = problems(BASE + '[appliance]\nnme = 1\nlog_level = "x"\n[probes]\nrise = 0\n')
    assert len(found) == 3


@pytest.mark.parametrize(
    ("sites", "expected"),
    [
        (
            '[sites.a]\nrole = "backup"\nsbc = "10.0.0.1"\nkamailio_set = 1\n',
            "expected exactly one site with role 'primary', found 0",
        ),
        (
            '[sites.a]\nrole = "primary"\nsbc = "10.0.0.1"\nkamailio_set = 1\n',
            "expected at least one site with role 'backup'",
        ),
        (
            '[sites.a]\nrole = "primary"\nsbc = "10.0.0.1"\nkamailio_set = 1\n'
            '[sites.b]\nrole = "backup"\nsbc = "10.0.0.2"\nkamailio_set = 1\n',
            "sites.b.kamailio_set 1 is already used by sites.a",
        ),
        ("", "sites: required key is missing"),
    ],
)
def test_site_rules(sites: str, expected: str) -> None:
    found = problems(sites)
    assert any(expected in p for p in found), found


def test_defaults_and_normalised_addresses() -> None:
    cfg = config.parse(BASE)
    assert cfg.sites["backup"].sbc == "10.0.0.2:5060"
    assert cfg.primary[0] == "primary"
    assert cfg.probes.rise == 2 and cfg.probes.fall == 3
    assert cfg.appliance.state_dir == Path("/var/lib/hotsite")


def test_auto_without_witness_is_flagged() -> None:
    cfg = config.parse(BASE + '[failover]\npolicy = "auto"\n')
    assert any("degrades to 'confirm'" in w for w in cfg.warnings())
    cfg = config.parse(BASE + '[failover]\npolicy = "auto"\nwitness = "http://w:1/v"\n')
    assert not any("degrades" in w for w in cfg.warnings())


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load(directory)


def test_environment_check_names_missing_modem_and_secret(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o600)
    cfg = config.parse(
        BASE
        + f'[channels.sms]\ntype = "gsm"\ndevice = "{tmp_path / "ttyUSB9"}"\n'
        + f'[channels.mail]\ntype = "smtp"\nhost = "h"\nfrom_addr = "a@b.cd"\npassword_file = "{secret}"\n'
    )
    found = config.check_environment(cfg)
    assert found == [f"channels.sms.device: '{tmp_path / 'ttyUSB9'}' does not exist"]


def test_path_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.resolve_path(None) == config.DEFAULT_PATH
    monkeypatch.setenv(config.ENV_VAR, "/tmp/env.toml")
    assert config.resolve_path(None) == Path("/tmp/env.toml")
    assert config.resolve_path("/tmp/cli.toml") == Path("/tmp/cli.toml")


@pytest.mark.parametrize(
    "path",
    [REPO / "appliance/examples/hotsite.example.toml", REPO / "provisioning/lab/hotsite-lab.toml"],
)
def test_shipped_configs_are_valid(path: Path) -> None:
    config.load(path)
