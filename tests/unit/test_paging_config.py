"""Paging configuration: every mistake named by key path, value and expectation."""

from __future__ import annotations

import pytest

from appliance import config
from appliance.errors import ConfigError
from appliance.paging import commands, settings
from appliance.paging.oncall import on_call
from tests.support import configs

BASE = configs.valid(
    """
[[contacts]]
name = "Zhang Wei"
phone = "+8613800138000"
[[contacts]]
name = "Li Na"
phone = "+8613900139000"
wake_for = "warning"
[channels.sms]
type = "gsm"
device = "/dev/ttyUSB2"
""",
    primary_sbc="10.0.0.1",
)

GOOD = (
    BASE
    + """
[paging]
channels = ["sms"]
severity_policies = { warning = "quiet" }
[paging.night]
start = "22:00"
end = "07:00"
timezone = "Asia/Shanghai"
[paging.rotations.primary]
contacts = ["Zhang Wei", "Li Na"]
start = 2026-03-02T09:00:00+08:00
[[paging.overrides]]
rotation = "primary"
contact = "Li Na"
start = 2026-03-03T00:00:00+08:00
end = 2026-03-04T00:00:00+08:00
[paging.policies.default]
[[paging.policies.default.steps]]
targets = ["rotation:primary"]
[[paging.policies.default.steps]]
targets = ["Li Na"]
escalate_after_s = 600
channels = ["sms"]
[paging.policies.quiet]
repeat = 0
[[paging.policies.quiet.steps]]
targets = ["Li Na"]
"""
)


def test_a_good_paging_config_builds_a_roster() -> None:
    cfg = config.parse(GOOD)
    assert settings.problems(cfg) == []
    roster = settings.roster(cfg)
    assert roster.contacts["Li Na"].wake_for == "warning"
    assert roster.policy_for("warning").name == "quiet" and roster.policy_for("critical").name == "default"  # type: ignore[union-attr]
    start = cfg.paging.rotations["primary"].start.timestamp()
    assert on_call(roster, "primary", start + 3600) == "Zhang Wei"
    assert on_call(roster, "primary", start + 86400) == "Li Na"  # the override
    assert roster.night is not None and roster.night.start_minute == 22 * 60
    assert roster.policies["default"].steps[1].channels == ("sms",)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "[paging]\nrate_limit_per_hour = 0\n",
            "paging.rate_limit_per_hour: 0: expected greater than or equal to 1",
        ),
        (
            '[paging]\nnight = { start = "25:00", end = "07:00" }\n',
            "paging.night.start: '25:00': expected a time such as 22:00",
        ),
        (
            '[paging]\nnight = { start = "22:00", end = "07:00", timezone = "Mars/Base" }\n',
            "timezone 'Mars/Base' is not a known zone",
        ),
        (
            "[paging.rotations.r]\ncontacts = []\nstart = 2026-03-02T09:00:00Z\n",
            "paging.rotations.r.contacts: a list: List should have at least 1 item",
        ),
        (
            '[paging.rotations.r]\ncontacts = ["Li Na"]\nstart = 2026-03-02T09:00:00\n',
            "paging.rotations.r.start",
        ),
        (
            '[[paging.overrides]]\nrotation = "r"\ncontact = "Li Na"\nstart = 2026-03-02T09:00:00Z\nend = 2026-03-01T09:00:00Z\n',
            "must be after start",
        ),
        (
            "[paging.policies.p]\nsteps = []\n",
            "paging.policies.p.steps: a list: List should have at least 1 item",
        ),
        ("[paging.policies.p]\nstep = []\n", "paging.policies.p.step: unknown key"),
        ('[paging]\nseverity_policies = { urgent = "p" }\n', "paging.severity_policies.urgent"),
        (
            '[[contacts]]\nname = "X"\nwake_for = "never"\n',
            "contacts[2].wake_for: 'never': expected 'info', 'warning', 'error' or 'critical'",
        ),
        (
            '[channels.mail]\ntype = "smtp"\nhost = "m"\nfrom_addr = "a@b.c"\ntimeout_s = 0\n',
            "channels.mail.timeout_s: 0",
        ),
    ],
)
def test_schema_mistakes(extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(BASE + extra)
    assert any(expected in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            '[paging.rotations.r]\ncontacts = ["Nobody"]\nstart = 2026-03-02T09:00:00Z\n',
            "paging.rotations.r.contacts[0]: 'Nobody' is not a contact (known: Li Na, Zhang Wei)",
        ),
        (
            '[[paging.overrides]]\nrotation = "r"\ncontact = "Li Na"\nstart = 2026-03-02T09:00:00Z\nend = 2026-03-03T09:00:00Z\n',
            "paging.overrides[0].rotation: 'r' is not a rotation",
        ),
        (
            '[paging.policies.default]\n[[paging.policies.default.steps]]\ntargets = ["rotation:nope"]\n',
            "paging.policies.default.steps[0].targets[0]: 'rotation:nope' names no rotation",
        ),
        (
            '[paging.policies.default]\n[[paging.policies.default.steps]]\ntargets = ["Li Na"]\nchannels = ["fax"]\n',
            "paging.policies.default.steps[0].channels[0]: 'fax' is not a channel (known: sms)",
        ),
        ('[paging]\nchannels = ["email"]\n', "paging.channels[0]: 'email' is not a channel"),
        (
            '[paging]\ndefault_policy = "gone"\n[paging.policies.other]\n[[paging.policies.other.steps]]\ntargets = ["Li Na"]\n',
            "paging: policy 'gone' is used but not defined",
        ),
        ('[[contacts]]\nname = "Li Na"\n', "contacts: the name 'Li Na' is used twice"),
    ],
)
def test_cross_reference_mistakes(extra: str, expected: str) -> None:
    # The config loader runs these checks itself: `hotsite config check` names each one.
    with pytest.raises(ConfigError) as info:
        config.parse(BASE + extra)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    ("text", "verb", "ref"),
    [
        ("ACK 42", "ack", "42"),
        ("ack42", "ack", "42"),
        (" Ack #7 ", "ack", "7"),
        ("ok 3", "ack", "3"),
        ("4821", "ack", "4821"),
        ("#12", "ack", "12"),
        ("确认 5", "ack", "5"),
        ("STATUS", "status", ""),
        ("status", "status", ""),
        ("?", "status", ""),
        ("状态", "status", ""),
        ("hello", "unknown", ""),
        ("ACK", "unknown", ""),
        ("ACK 42 and 43", "ack", "42"),
        ("", "unknown", ""),
    ],
)
def test_sms_commands(text: str, verb: str, ref: str) -> None:
    assert commands.parse(text) == commands.Command(verb, ref)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "ref", "number"),
    [
        ("ACK 8 4821", "4821", "8"),
        ("ack #8 4821", "4821", "8"),
        ("8 4821", "4821", "8"),
        ("8/4821", "4821", "8"),
        ("ACK 4821", "4821", ""),
        ("ACK 8", "8", ""),
    ],
)
def test_sms_ack_with_number_and_code(text: str, ref: str, number: str) -> None:
    assert commands.parse(text) == commands.Command("ack", ref, number)


@pytest.mark.parametrize(
    ("given", "country", "e164"),
    [
        ("+86 138-0013-8000", "", "+8613800138000"),
        ("008613800138000", "", "+8613800138000"),
        ("13800138000", "86", "+8613800138000"),
        ("0138 0013 8000", "86", "+8613800138000"),
        ("13800138000", "", "13800138000"),
        ("+8613800138000", "44", "+8613800138000"),
    ],
)
def test_phone_numbers_are_normalised(given: str, country: str, e164: str) -> None:
    from appliance.paging.oncall import normalise_phone

    assert normalise_phone(given, country) == e164


def test_a_number_with_the_country_code_but_no_plus_matches() -> None:
    from appliance.paging.oncall import Contact, Roster

    roster = Roster(contacts={"z": Contact("z", "+8613800138000")}, country_code="86")
    for form in ("8613800138000", "13800138000", "+86 13800138000", "0086 138 0013 8000"):
        assert roster.by_phone(form) is not None, form
    assert roster.by_phone("13900139000") is None
    assert Roster(contacts=roster.contacts).by_phone("13800138000") is None  # no country code: E.164 only


@pytest.mark.parametrize("value", ["abc", "0", "+1234", "86 "])
def test_country_code_is_validated(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(BASE + f'\n[paging]\ncountry_code = "{value}"\n')
    assert any("paging.country_code" in p and "country calling code" in p for p in err.value.problems), (
        err.value.problems
    )


def test_each_channel_type_is_built_by_its_line_in_the_table() -> None:
    cfg = config.parse(
        BASE
        + '[channels.mail]\ntype = "smtp"\nhost = "mail.example.com"\nfrom_addr = "hotsite@example.com"\n'
        + '[channels.hook]\ntype = "webhook"\nurl = "https://hooks.example.com/x"\n'
    )
    built = settings.build_channels(cfg)
    assert {name: type(ch).__name__ for name, ch in built.items()} == {
        "sms": "GsmChannel",
        "mail": "SmtpChannel",
        "hook": "WebhookChannel",
    }
    assert sorted(settings.CHANNEL_BUILDERS) == ["gsm", "smtp", "webhook"]
