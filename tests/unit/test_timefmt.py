"""Issue 19: one rule for times in text and JSON, one parser for every --since/--at."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from appliance import timefmt
from appliance.cli.main import cli

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    timefmt.set_local(False)
    yield
    timefmt.set_local(False)


def test_text_times_are_utc_and_labelled() -> None:
    assert timefmt.clock(NOW) == "08:00:00 UTC"
    assert timefmt.clock(NOW + 0.25, ms=True) == "08:00:00.250 UTC"
    assert timefmt.stamp(NOW) == "2027-01-15 08:00:00 UTC"
    assert timefmt.stamp(NOW, seconds=False) == "2027-01-15 08:00 UTC"
    assert timefmt.since(NOW - 12, NOW) == "since 07:59:48 UTC (12 s)"


def test_local_time_is_labelled_with_its_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    import time

    time.tzset()
    try:
        timefmt.set_local(True)
        assert timefmt.clock(NOW) == "16:00:00 +08:00"
        assert timefmt.parse_iso("2027-01-15T16:00:00") == NOW  # a zone-less time is local with --local
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0 s"), (12.7, "12 s"), (119, "119 s"), (240, "4 min"), (7500, "2 h 05 min"),
     (3 * 86400 + 4 * 3600, "3 d 4 h"), (-3, "0 s")],
)  # fmt: skip
def test_ages_read_as_ages(seconds: float | None, text: str) -> None:
    assert timefmt.age(seconds) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("3600", 3600), ("250ms", 0.25),
     ("2 h", 7200)],
)  # fmt: skip
def test_one_duration_parser(text: str, seconds: float) -> None:
    assert timefmt.parse_duration(text) == seconds
    assert timefmt.parse_when(text, NOW) == NOW - seconds


@pytest.mark.parametrize("text", ["", "yesterday-ish", "1x", "h2", "2h-"])
def test_what_is_not_a_time_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        timefmt.parse_when(text, NOW)


def test_iso_times_are_utc_unless_they_carry_a_zone() -> None:
    assert timefmt.parse_when("2027-01-15T08:00", NOW) == NOW
    assert timefmt.parse_when("2027-01-15T08:00:00Z", NOW) == NOW
    assert timefmt.parse_when("2027-01-15T16:00:00+08:00", NOW) == NOW
    assert timefmt.parse_when(str(NOW), 0, allow_epoch=True) == NOW  # --at takes a Unix time too


def test_json_times_are_rfc3339_and_the_number_is_kept_as_epoch() -> None:
    doc = {"at": NOW, "opened_at": NOW + 0.5, "resolved_at": None, "since_s": 12.0, "id": 1_900_000_000,
           "rotations": [{"until": NOW, "next": [{"from": NOW}]}], "verdict_since": 1710.5}  # fmt: skip
    out = timefmt.json_times(doc)
    assert out["at"] == "2027-01-15T08:00:00.000Z" and out["at_epoch"] == NOW
    assert out["opened_at"] == "2027-01-15T08:00:00.500Z" and out["opened_at_epoch"] == NOW + 0.5
    assert out["resolved_at"] is None and "resolved_at_epoch" not in out
    assert out["since_s"] == 12.0 and out["id"] == 1_900_000_000  # durations and ids are not times
    assert out["rotations"][0]["until"] == "2027-01-15T08:00:00.000Z"
    assert out["rotations"][0]["next"][0]["from_epoch"] == NOW
    assert dt.datetime.fromisoformat(out["at"]).timestamp() == NOW
    json.dumps(out)


def test_events_since_takes_an_hour_not_only_seconds(tmp_path: object) -> None:
    """`events --since 1h` was a usage error (exit 2); now it parses and only the daemon is missing (exit 1)."""
    runner = CliRunner()
    base = ["--config", "/dev/null", "--runtime-dir", str(tmp_path)]
    result = runner.invoke(cli, [*base, "events", "--since", "1h"])
    assert result.exit_code == 1, result.output
    bad = runner.invoke(cli, [*base, "events", "--since", "an hour"])
    assert bad.exit_code == 2 and "neither a duration" in bad.output


def test_errors_are_json_on_stdout_with_json(tmp_path: object) -> None:
    """Issue 19: with --json a failure is a JSON object where the script reads (stdout), exit non-zero."""
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", "/dev/null", "--runtime-dir", str(tmp_path), "events", "--json"])
    assert result.exit_code == 1
    error = json.loads(result.stdout)
    assert error["ok"] is False and error["exit_code"] == 1 and error["error"]
    assert result.stderr == ""
