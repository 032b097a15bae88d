"""The witness's pure parts: settings, the view it forms, the vote it serves, how the appliance reads it."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import config as config_mod
from appliance.clock import SimulatedClock
from appliance.errors import ConfigError
from failover import witness as w
from failover.thirdvote import NullVoter, Vote
from monitoring.health import TargetHealth, Thresholds
from monitoring.probes.base import ProbeResult
from tests.support import configs

SIP = "sip:10.1.0.10:5060"
HTTP = "http://10.1.0.10/health"
POLICY = Thresholds(rise=2, fall=3)

# ---------------------------------------------------------------------------
# Settings


def settings_problems(
    overrides: dict[str, object], toml: str | None = None, tmp: Path | None = None
) -> list[str]:
    path = None
    if toml is not None:
        assert tmp is not None
        path = tmp / "witness.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        w.load_settings(path, overrides)
    assert info.value.exit_code == 2
    return info.value.problems


GOOD = {"listen": "127.0.0.1:8080", "primary": [SIP], "allow_plain_http": True, "allow_unauthenticated": True}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"primary": [SIP]}, "listen: required key is missing"),
        ({"listen": "127.0.0.1:8080"}, "primary: required key is missing"),
        ({**GOOD, "listen": "127.0.0.1"}, "listen: '127.0.0.1': expected host:port, e.g. 127.0.0.1:9477"),
        ({**GOOD, "primary": ["ftp://x"]}, "primary[0]: 'ftp://x': 'ftp://x': unknown target; expected sip:"),
        ({**GOOD, "primary": ["sip:10.0.0.1:99999"]}, "port must be 1-65535"),
        ({**GOOD, "primary": [SIP, SIP]}, "the same target URL is listed twice"),
        ({**GOOD, "rise": 0}, "rise: 0: expected greater than or equal to 1"),
        ({**GOOD, "interval_s": 0.01}, "interval_s: 0.01: expected greater than or equal to 0.1"),
        ({**GOOD, "interval_s": 0.5, "timeout_s": 1.0}, "timeout_s (1.0) must not exceed interval_s (0.5)"),
        ({**GOOD, "tls_cert_file": "/x.pem"}, "give both tls_cert_file and tls_key_file, or neither"),
        ({**GOOD, "name": "has space"}, "name: 'has space': String should match pattern"),
        (
            {**GOOD, "lisen": "x"},
            "lisen: unknown key (known keys here: allow_plain_http, allow_unauthenticated, fall,",
        ),
    ],
)
def test_settings_mistakes_are_named(overrides: dict[str, object], expected: str) -> None:
    problems = settings_problems(overrides)
    assert any(expected in p for p in problems), problems


def test_settings_from_toml_with_options_on_top(tmp_path: Path) -> None:
    path = tmp_path / "witness.toml"
    path.write_text(
        f'name = "edge-1"\nlisten = "0.0.0.0:8080"\nprimary = ["{SIP}", "{HTTP}"]\nfall = 5\n'
        "allow_plain_http = true\nallow_unauthenticated = true\n"
    )
    loaded = w.load_settings(path, {"fall": 2, "interval_s": None, "primary": []})
    assert (loaded.name, loaded.listen, loaded.fall, loaded.interval_s) == ("edge-1", "0.0.0.0:8080", 2, 1.0)
    assert [t.kind for t in loaded.targets()] == ["sip", "http"]


def test_settings_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        w.load_settings(tmp_path / "absent.toml", {})
    assert settings_problems({}, toml="listen = [", tmp=tmp_path)[0].startswith("TOML syntax")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("", "non-empty"),
        ("two words\n", "one non-empty word"),
        ("caf\xe9\n", "printable ASCII"),
        (None, "exist"),
    ],
)
def test_token_file_problems(tmp_path: Path, content: str | None, error: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError, match=error):
        w.read_token(path)


def test_token_file_is_one_stripped_word(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  s3cr3t-T0ken \n")
    assert w.read_token(tmp_path / "token") == "s3cr3t-T0ken"


def test_display_name_hides_credentials() -> None:
    assert w.display_name("http://ops:pw@10.0.0.1:8080/health") == "http://10.0.0.1:8080/health"
    assert w.display_name(HTTP) == HTTP
    assert w.display_name(SIP) == SIP


# ---------------------------------------------------------------------------
# The view: probe results -> primary_alive


def result(target: str, ok: bool, at: float) -> ProbeResult:
    return ProbeResult(target, ok, at, 0.001 if ok else None, 200 if ok else None, "ok" if ok else "timeout")


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ((), None),
        (("unknown",), None),
        (("unknown", "down"), None),
        (("up", "down"), True),
        (("unknown", "up"), True),
        (("down", "down"), False),
        (("down",), False),
    ],
)
def test_primary_alive_rule(states: tuple[str, ...], expected: bool | None) -> None:
    healths = [TargetHealth(f"t{i}", state=s) for i, s in enumerate(states)]  # type: ignore[arg-type]
    assert w.primary_alive(healths) is expected


def run_rounds(rounds: list[tuple[bool, bool]], clock: SimulatedClock) -> list[w.WitnessView]:
    targets = w.WitnessSettings(
        listen="127.0.0.1:1", allow_plain_http=True, allow_unauthenticated=True, primary=[SIP, HTTP]
    ).targets()
    view = w.new_view(targets, clock.time())
    views = []
    for sip_ok, http_ok in rounds:
        clock.advance(1.0)
        results = [result(SIP, sip_ok, clock.monotonic()), result(HTTP, http_ok, clock.monotonic())]
        view = w.fold_round(view, results, POLICY, now_wall=clock.time(), now_mono=clock.monotonic())
        views.append(view)
    return views


def test_rise_then_fall_with_since_and_age() -> None:
    clock = SimulatedClock()
    start = clock.time()
    views = run_rounds([(True, True)] * 2 + [(False, True)] * 3 + [(False, False)] * 3, clock)
    assert [v.primary_alive for v in views] == [None, True, True, True, True, True, True, False]
    assert views[0].since == start  # unknown since the start
    assert views[1].since == start + 2.0  # alive since the second success
    assert views[6].since == start + 2.0  # the SBC down alone does not change the belief
    assert views[7].since == start + 8.0
    doc = w.render_vote(views[7], name="edge", now_mono=clock.monotonic() + 0.25)
    assert doc["primary_alive"] is False and doc["age_s"] == 0.25 and doc["checked_at"] == start + 8.0
    assert [(e["target"], e["state"], e["reason"]) for e in doc["evidence"]] == [
        (SIP, "down", "timeout"),
        (HTTP, "down", "timeout"),
    ]
    json.dumps(doc, allow_nan=False)  # what /vote serves must be strict JSON


def test_unprobed_view_renders_nulls() -> None:
    view = w.new_view(
        w.WitnessSettings(
            listen="127.0.0.1:1", allow_plain_http=True, allow_unauthenticated=True, primary=[SIP]
        ).targets(),
        1.8e9,
    )
    doc = w.render_vote(view, name="edge", now_mono=5.0)
    assert (doc["primary_alive"], doc["checked_at"], doc["age_s"], doc["since"]) == (None, None, None, 1.8e9)
    assert doc["evidence"][0]["reason"] == "not_probed"


def test_result_for_a_stranger_is_refused() -> None:
    view = w.new_view(
        w.WitnessSettings(
            listen="127.0.0.1:1", allow_plain_http=True, allow_unauthenticated=True, primary=[SIP]
        ).targets(),
        0.0,
    )
    with pytest.raises(ValueError, match="does not probe"):
        w.fold_round(view, [result("sip:9.9.9.9", True, 1.0)], POLICY, now_wall=1.0, now_mono=1.0)


def reference_state(history: list[bool]) -> str:
    """Rise/fall by hand: the state set by the last run of rise successes or fall failures."""
    state, run, last = "unknown", 0, None
    for ok in history:
        run = run + 1 if ok == last else 1
        last = ok
        if ok and run >= POLICY.rise:
            state = "up"
        elif not ok and run >= POLICY.fall:
            state = "down"
    return state


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=30))
def test_alive_if_any_target_up_and_dead_only_if_all_down(rounds: list[tuple[bool, bool]]) -> None:
    views = run_rounds(rounds, SimulatedClock())
    for i, view in enumerate(views):
        states = {reference_state([r[k] for r in rounds[: i + 1]]) for k in (0, 1)}
        expected = True if "up" in states else False if states == {"down"} else None
        assert view.primary_alive is expected, (rounds[: i + 1], states)
        if i and view.primary_alive != views[i - 1].primary_alive:
            assert view.since == view.checked_at  # since moves exactly when the belief changes
        elif i:
            assert view.since == views[i - 1].since


# ---------------------------------------------------------------------------
# interpret: what the appliance makes of an answer


def answer(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "version": 1,
        "witness": "edge",
        "primary_alive": True,
        "since": 1.8e9,
        "checked_at": 1.8e9,
        "age_s": 0.4,
        "evidence": [{"target": SIP, "state": "up", "reason": "ok"}],
    }
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def judge(status: int, body: bytes, *, wall: float = 1.8e9 + 1, rtt: float = 0.1) -> Vote:
    return w.interpret(
        status, body, max_age_s=5.0, rtt_s=rtt, received_mono=100.0, received_wall=wall, source="witness:x"
    )


@pytest.mark.parametrize(
    ("status", "body", "alive", "detail"),
    [
        (200, answer(), True, "edge sees the primary: sip:10.1.0.10:5060 up"),
        (200, answer(primary_alive=False), False, "edge sees the primary down"),
        (200, answer(primary_alive=None), None, "witness cannot tell yet"),
        (200, answer(primary_alive=None, age_s=None, checked_at=None), None, "not judged the primary yet"),
        (200, answer(age_s=4.95), None, "stale: older than 5s"),
        (200, answer(age_s=-1), None, "invalid age_s: -1"),
        (200, answer(age_s=math.inf), None, "invalid age_s: inf"),
        (200, answer(age_s=None, checked_at=1.8e9 - 10), None, "stale: older than 5s"),
        (200, answer(age_s=None, checked_at=1.8e9 + 60), None, "clock is more than 5s ahead of ours"),
        (200, answer(age_s=None, checked_at=None), None, "neither age_s nor checked_at"),
        (200, answer(age_s="0.1"), None, "invalid age_s: '0.1'"),
        (200, answer(age_s=10**400), None, "invalid age_s: 1000"),
        (200, answer(primary_alive=1), None, "invalid primary_alive: 1"),
        (200, answer(primary_alive="yes"), None, "invalid primary_alive: 'yes'"),
        (200, answer(primary_alive=...), None, "has no primary_alive"),
        (200, answer(version=2), None, "version 2, expected 1"),
        (200, answer(version=True), None, "version True"),
        (200, b"[1, 2]", None, "not a JSON object"),
        (200, b"\xff\xfe garbage", None, "not JSON"),
        (200, b"[" * 100_000, None, "not JSON"),
        (200, b'{"version": 1, "primary_alive": true, "age_s": NaN}', None, "invalid age_s: nan"),
        (401, b"", None, "refused our token (HTTP 401)"),
        (503, answer(), None, "answered HTTP 503"),
    ],
)
def test_interpret_table(status: int, body: bytes, alive: bool | None, detail: str) -> None:
    vote = judge(status, body)
    assert vote.primary_alive is alive, vote
    assert detail in vote.detail, vote.detail


def test_witness_wall_clock_does_not_matter_when_it_reports_its_age() -> None:
    # The witness's wall clock is an hour behind ours: its own elapsed time still says fresh.
    vote = judge(200, answer(checked_at=1.8e9 - 3600, since=1.8e9 - 3600, age_s=0.2))
    assert vote.primary_alive is True
    assert vote.at == pytest.approx(100.0 - 0.3)  # formed age_s + our round trip ago
    assert vote.source == "witness:edge"


def test_detail_is_stable_while_the_view_is() -> None:
    # The engine reports a vote when (primary_alive, detail) changes: the age must not make every poll new.
    assert judge(200, answer(age_s=0.1)).detail == judge(200, answer(age_s=3.0), rtt=0.5).detail
    assert judge(200, answer(age_s=6)).detail == judge(200, answer(age_s=60)).detail


def test_control_characters_from_the_witness_are_neutralised() -> None:
    vote = judge(200, answer(witness="ev\nil", evidence=[{"target": "a\x1b[2J", "state": "up"}] * 50))
    assert vote.primary_alive is True
    assert "\n" not in vote.detail and "\x1b" not in vote.detail and len(vote.detail) <= w.MAX_DETAIL_CHARS


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from([1, 1, 1, 2, "1", True, None]),
        "primary_alive": st.sampled_from([True, False, None, 0, 1, "true"]),
        "age_s": st.one_of(
            st.floats(), st.integers(), st.integers(min_value=10**300), st.none(), st.text(max_size=3)
        ),
        "checked_at": st.one_of(st.floats(), st.none()),
        "witness": JSON,
        "evidence": JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=999), st.binary(max_size=512))
def test_any_bytes_give_a_vote(status: int, body: bytes) -> None:
    vote = judge(status, body)
    assert vote.primary_alive in (True, False, None)
    assert isinstance(vote.detail, str) and len(vote.detail) <= w.MAX_DETAIL_CHARS


@settings(max_examples=300, deadline=None)
@given(FIELDS, st.floats(min_value=0, max_value=10))
def test_any_json_gives_a_vote_and_only_a_fresh_well_formed_one_counts(
    doc: dict[str, object], rtt: float
) -> None:
    vote = judge(200, json.dumps(doc).encode(), rtt=rtt)
    if vote.primary_alive is not None:
        assert type(doc["version"]) is int and doc["version"] == 1
        assert type(doc["primary_alive"]) is bool and doc["primary_alive"] is vote.primary_alive
        age = doc.get("age_s")
        if age is None:
            assert 1.8e9 + 1 - float(doc["checked_at"]) <= 5.0  # type: ignore[arg-type]
        else:
            assert type(age) in (int, float) and math.isfinite(age) and 0 <= age + rtt <= 5.0  # type: ignore[arg-type, operator]


# ---------------------------------------------------------------------------
# voter_from_config


BASE = configs.TWO_SITES


def test_no_witness_gives_the_null_voter() -> None:
    voter = w.voter_from_config(config_mod.parse(BASE), clock=SimulatedClock())
    assert isinstance(voter, NullVoter)
    assert asyncio.run(voter.vote()).primary_alive is None


def test_witness_url_gives_the_http_voter() -> None:
    cfg = config_mod.parse(
        BASE + '[failover]\nwitness = "http://127.0.0.1:1/vote"\nwitness_timeout_s = 0.5\n'
    )
    voter = w.voter_from_config(cfg, clock=SimulatedClock())
    assert isinstance(voter, w.HttpWitnessVoter)
    assert (voter.url, voter.timeout_s, voter.max_age_s) == (
        "http://127.0.0.1:1/vote",
        0.5,
        w.DEFAULT_MAX_AGE_S,
    )
    asyncio.run(voter.close())
