"""Target URLs and the targets a configuration names."""

from __future__ import annotations

import pytest

from appliance import config
from monitoring.targets import Target, from_config, parse_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sip:10.0.0.1", Target("sip:10.0.0.1", "sip", "10.0.0.1", 5060, "udp")),
        (
            "sip:10.0.0.1:5080;transport=TCP",
            Target("sip:10.0.0.1:5080;transport=TCP", "sip", "10.0.0.1", 5080, "tcp"),
        ),
        (
            "sip:sbc.example.com;transport=tls",
            Target("sip:sbc.example.com;transport=tls", "sip", "sbc.example.com", 5061, "tls"),
        ),
        (
            "sip:ping@[2001:db8::1]:5062",
            Target("sip:ping@[2001:db8::1]:5062", "sip", "2001:db8::1", 5062, "udp"),
        ),
        ("tcp://10.0.0.5:4000", Target("tcp://10.0.0.5:4000", "tcp", "10.0.0.5", 4000)),
        ("icmp://gw.example.com", Target("icmp://gw.example.com", "icmp", "gw.example.com")),
        (
            "https://cti.example.com:8443/health",
            Target(
                "https://cti.example.com:8443/health",
                "http",
                "cti.example.com",
                8443,
                url="https://cti.example.com:8443/health",
            ),
        ),
    ],
)
def test_target_urls(url: str, expected: Target) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "unknown target; expected sip:HOST:PORT;transport=udp|tcp|tls"),
        ("sip:10.0.0.1:99999", "port must be 1-65535, got '99999'"),
        ("sip:10.0.0.1;transport=sctp", "transport must be udp, tcp or tls, got 'sctp'"),
        ("tcp://10.0.0.1", "expected tcp://HOST:PORT"),
        ("tcp://bad host!:80", "is neither an IP address nor a host name"),
        ("icmp://", "no host"),
        ("http://:80/x", "no host"),
        ("http://h:0/x", "port must be 1-65535"),
    ],
)
def test_bad_target_urls_say_what_is_expected(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("(", r"\(")):
        parse_url(url)


CONFIG = """
[sites.primary]
role = "primary"
sbc = "10.0.0.1"
health_url = "http://10.0.0.1:8080/health"
kamailio_set = 1
[sites.primary.checks.acd]
url = "tcp://10.0.0.5:4000"
interval_s = 0.2
timeout_s = 0.1
[sites.primary.checks.cti]
url = "https://10.0.0.6/health"
expect_body = '"agents":\\s*[1-9]'
[sites.backup]
role = "backup"
sbc = "10.0.1.1:5070"
sbc_transport = "tcp"
kamailio_set = 2
[trunks.carrier-a]
address = "192.0.2.1"
accept_codes = [200, 404]
"""


def test_every_configured_target_with_stable_names() -> None:
    cfg = config.parse(CONFIG)
    targets = {t.name: t for t in from_config(cfg)}
    assert list(targets) == [
        "site:primary:sbc",
        "site:primary:http",
        "site:primary:acd",
        "site:primary:cti",
        "site:backup:sbc",
        "host:disk",
        "host:memory",
        "host:temperature",
        "trunk:carrier-a",
    ]
    assert targets["site:primary:acd"].interval_s == 0.2 and targets["site:primary:acd"].site == "primary"
    assert targets["site:primary:cti"].expect_body == '"agents":\\s*[1-9]'
    assert targets["site:backup:sbc"].transport == "tcp" and targets["site:backup:sbc"].port == 5070
    assert targets["trunk:carrier-a"].accept_codes == frozenset({200, 404})
    assert cfg.evidence_kinds("primary") == {"sip", "http", "tcp"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[trunks.x]\naddress = "192.0.2.2"\naccept_codes = [200, 408]\n', "408 is never accepted"),
        ('[trunks.x]\naddress = "192.0.2.2"\naccept_codes = [99]\n', "SIP status codes are 100-699, got 99"),
        (
            '[trunks.x]\naddress = "192.0.2.2"\ninterval_s = 0.05\n',
            "trunks.x.interval_s: 0.05: expected greater than or equal to 0.1",
        ),
        (
            '[trunks.x]\naddress = "192.0.2.2"\ntimeout_s = 2\n',
            "trunks.x: timeout_s (2.0) must not exceed interval_s (1.0)",
        ),
        (
            '[sites.primary.checks.gw]\nurl = "gopher://x"\n',
            "sites.primary.checks.gw.url: 'gopher://x': 'gopher://x': unknown target",
        ),
        (
            '[sites.primary.checks.gw]\nurl = "tcp://x:1"\nexpect_body = "ok"\n',
            "expect_body applies only to http(s):// checks",
        ),
        (
            '[sites.primary.checks.gw]\nurl = "http://x/"\nexpect_body = "("\n',
            "expect_body is not a valid regular expression",
        ),
    ],
)
def test_probe_settings_are_validated(extra: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(CONFIG + extra)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_too_little_evidence_is_a_warning() -> None:
    cfg = config.parse(CONFIG)
    warnings = cfg.warnings()
    assert any(w.startswith("sites.backup: 1 kind(s) of evidence (sip)") for w in warnings)
    assert not any(w.startswith("sites.primary") for w in warnings)
