"""Test calls in the configuration, the targets they make and how their results judge a trunk."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import config
from appliance.cli.main import cli
from appliance.errors import ConfigError
from monitoring.health import TargetHealth, Thresholds, observe, with_calls
from monitoring.probes.testcall import CallResult
from monitoring.targets import from_config
from tests.support import configs

BASE = configs.valid(
    """
[trunks.trunk-a]
address = "10.0.0.11:5060"

[hotlines.vip]
number = "95588"
failover = ["backup"]

[hotlines.cards]
number = "95566"
failover = ["backup"]

[kamailio]
sip = "10.0.0.10:5060"
""",
    backup_sbc="10.0.0.2:5060",
)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    return info.value.problems


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            '[testcalls]\nhotlines = ["vip", "gold"]\n',
            "testcalls.hotlines names 'gold': expected names of [hotlines.*] (vip, cards)",
        ),
        (
            '[testcalls]\ntrunks = ["trunk-z"]\n',
            "testcalls.trunks names 'trunk-z': expected names of [trunks.*]",
        ),
        (
            "[testcalls]\ninterval_s = 10\nsetup_timeout_s = 10\n",
            "must be at least setup_timeout_s + duration_s + 5 (18)",
        ),
        (
            '[testcalls]\ncaller = "ops"\n',
            "testcalls.caller: 'ops': expected the test caller's number, digits",
        ),
        ("[testcalls]\nmin_mos = 5\n", "testcalls.min_mos: 5"),
        (
            '[testcalls]\nanswer_header = "X Site"\n',
            "testcalls.answer_header: 'X Site': expected a SIP header name",
        ),
        ("[testcalls]\nmax_concurrent = 0\n", "testcalls.max_concurrent: 0"),
    ],
)
def test_each_mistake_names_the_key_and_what_is_expected(extra: str, expected: str) -> None:
    found = problems(BASE + extra)
    assert any(expected in p for p in found), found


def test_hotline_calls_need_the_carrier_edge() -> None:
    text = BASE.replace('[kamailio]\nsip = "10.0.0.10:5060"\n', "") + '[testcalls]\nhotlines = ["vip"]\n'
    assert any("testcalls.hotlines needs kamailio.sip" in p for p in problems(text))


def test_targets_for_hotlines_and_trunks() -> None:
    cfg = config.parse(BASE + '[testcalls]\nhotlines = ["cards"]\ntrunks = ["trunk-a"]\ncaller = "10086"\n')
    targets = {t.name: t for t in from_config(cfg) if t.kind == "testcall"}
    assert set(targets) == {"testcall:cards", "testcall:trunk:trunk-a"}
    hotline, trunk = targets["testcall:cards"], targets["testcall:trunk:trunk-a"]
    assert hotline.call is not None and trunk.call is not None
    assert (hotline.host, hotline.port, hotline.call.number, hotline.call.caller) == (
        "10.0.0.10",
        5060,
        "95566",
        "10086",
    )
    assert (trunk.host, trunk.trunk, trunk.call.number) == (
        "10.0.0.11",
        "trunk-a",
        "95588",
    )  # the first hotline
    assert hotline.call.peers["10.0.0.2:5060"] == "site:backup"
    assert hotline.interval_s == 300 and hotline.timeout_s == 36  # twice one call's budget (10 + 3 + 5)


def test_no_test_calls_unless_asked() -> None:
    assert not [t for t in from_config(config.parse(BASE)) if t.kind == "testcall"]


def _observe(health: TargetHealth, result: CallResult, at: float) -> TargetHealth:
    result.started = at
    return observe(health, result.to_probe(), Thresholds(rise=1, fall=2))


def test_a_trunk_whose_calls_fail_is_degraded_with_the_evidence() -> None:
    options = TargetHealth("trunk:trunk-a", state="up", why="2 consecutive successes")
    calls = TargetHealth("testcall:trunk:trunk-a", kind="testcall")
    rejected = CallResult(
        "testcall:trunk:trunk-a", "95566", reason="rejected", code=503, status="503 Service Unavailable"
    )
    calls = _observe(calls, rejected, 1.0)
    assert with_calls(options, calls) == ("up", "2 consecutive successes")  # one failed call is a blip
    calls = _observe(calls, rejected, 2.0)
    state, why = with_calls(options, calls)
    assert state == "degraded"
    assert why == "calls failing: 2 failed test call(s), last 95566: 503 Service Unavailable"
    silent = CallResult("testcall:trunk:trunk-a", "95566", reason="no_audio", code=200, status="200 OK")
    silent_calls = _observe(calls, silent, 3.0)  # the published why stays; the trunk's says the latest
    assert (
        with_calls(options, silent_calls)[1]
        == "calls failing: 3 failed test call(s), last 95566: no audio (0 RTP packets received)"
    )
    good = CallResult(
        "testcall:trunk:trunk-a", "95566", ok=True, reason="ok", code=200, answered_by="trunk:trunk-a"
    )
    calls = _observe(calls, good, 4.0)
    assert with_calls(options, calls)[0] == "up" and calls.why.startswith("calls ok: 1 good test call(s)")


def test_a_trunk_down_on_options_stays_down_whatever_its_calls() -> None:
    options = TargetHealth("trunk:trunk-a", state="down", why="3 consecutive failures, last timeout")
    calls = TargetHealth("testcall:trunk:trunk-a", kind="testcall", state="down", why="calls failing")
    assert with_calls(options, calls) == ("down", "3 consecutive failures, last timeout")
    assert with_calls(options, None)[0] == "down"


def test_cli_names_unknown_hotlines_and_trunks(tmp_path: Path) -> None:
    path = tmp_path / "hotsite.toml"
    path.write_text(BASE)
    runner = CliRunner()
    unknown = runner.invoke(cli, ["--config", str(path), "testcall", "gold"])
    assert (
        unknown.exit_code == 2
        and "'gold' is no hotline name or number (known: vip (95588), cards (95566))" in (unknown.output)
    )
    bad_trunk = runner.invoke(cli, ["--config", str(path), "testcall", "vip", "--via", "trunk-z"])
    assert bad_trunk.exit_code == 2 and "unknown trunk 'trunk-z' (known: trunk-a)" in bad_trunk.output
