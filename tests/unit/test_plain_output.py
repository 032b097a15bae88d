"""Issue 19: off a terminal, tables are plain text: no boxes, no trailing blanks, fit the width, whole words."""

from __future__ import annotations

import pytest
from rich.table import Table

from appliance import timefmt
from appliance.cli import table
from appliance.cli.render import events_table, status_view, targets_table

BOX = set("┏━┃│┓┗┛┡┩└┘─╇╈┼├┤┬┴═║")
NOW = 1_800_000_000.0
WHY = "3 consecutive failures, last timeout: no answer to OPTIONS within 1.0 s from sip:10.77.0.21:5060"


def target(name: str) -> dict[str, object]:
    return {"target": name, "kind": "sip", "address": "sip:10.77.0.21:5060;transport=udp", "state": "down",
            "pending": False, "since_s": 12.4, "rtt_ms": None, "last_code": None, "reason": WHY}  # fmt: skip


def status() -> dict[str, object]:
    return {
        "appliance": {"version": "0.1.0", "name": "dr-lab", "uptime_s": 5400},
        "failover": {"state": "backup_active", "policy": "auto"},
        "sites": [{"name": "primary", "role": "primary", "verdict": "down", "verdict_since_s": 12, "sbc": "sbc",
                   "state": "down", "rtt_ms": None,
                   "why": ["site:primary:http down since 07:59:48 UTC (12 s)", "sbc down since 07:59:48 UTC (12 s)",
                           "2 independent kinds of evidence agree (http, sip)"]}],
        "trunks": [{"name": "trunk-a", "address": "sip:10.77.0.21:5060", "state": "up", "since_s": 700,
                    "rtt_ms": 0.4, "last_code": 200, "reason": "3 consecutive successes"}],
        "events": [{"id": 41, "at": NOW, "kind": "failover.decision", "actor": "engine",
                    "message": "primary judged down: " + WHY}],
    }  # fmt: skip


def check(text: str, width: int) -> None:
    assert not BOX & set(text), text
    for line in text.splitlines():
        assert line == line.rstrip(), f"trailing blanks: {line!r}"
        assert len(line) <= width, f"{len(line)} > {width}: {line!r}"
    words = set(WHY.split()) - {"s"}
    pieces = set(text.split())
    assert "consecuti" not in pieces and "ve" not in pieces
    assert words & pieces


@pytest.mark.parametrize("width", [80, 120, 200])
def test_status_events_and_targets_render_plain_within_the_width(width: int) -> None:
    timefmt.set_local(False)
    for renderable in (status_view(status()), events_table(status()["events"]),  # type: ignore[arg-type]
                       targets_table([target("trunk:a"), target("site:primary:sbc")], "Probes")):  # fmt: skip
        check(table.to_plain(renderable, width), width)


def test_a_plain_table_keeps_its_columns_aligned_and_titled() -> None:
    t = Table(title="On call")
    for c in ("rotation", "on call", "until"):
        t.add_column(c)
    t.add_row("first-line", "Zhang Wei", "2027-01-15 08:00 UTC")
    t.add_row("escalation", "Li Na", "-")
    lines = table.to_plain(t, 80).splitlines()
    assert lines[0] == "On call"
    assert lines[1].index("on call") == lines[2].index("Zhang Wei") == lines[3].index("Li Na")
    assert lines[2].endswith("2027-01-15 08:00 UTC")


def test_the_event_time_is_labelled_and_utc() -> None:
    timefmt.set_local(False)
    assert "2027-01-15 08:00:00 UTC" in table.to_plain(events_table(status()["events"]), 200)  # type: ignore[arg-type]


def test_plain_is_chosen_off_a_terminal_on_a_dumb_one_and_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm")
    table.set_plain(False)
    assert not table.plain_wanted(Tty())
    assert table.plain_wanted(object())
    monkeypatch.setenv("TERM", "dumb")
    assert table.plain_wanted(Tty())
    monkeypatch.setenv("TERM", "xterm")
    table.set_plain(True)
    try:
        assert table.plain_wanted(Tty())
    finally:
        table.set_plain(False)


def test_a_word_longer_than_the_width_is_the_only_thing_ever_cut() -> None:
    lines = table.layout(["a", "b"], [["x", "y" * 100]], 40)
    assert all(len(line) <= 40 for line in lines)


def test_the_monotonic_detector_catches_the_issues_example() -> None:
    """The lab test's check is not vacuous: the line from the issue is caught, human times are not."""
    from tests.support.surfaces import monotonic_leaks

    assert monotonic_leaks("site:primary:http down since 1710.5", 1700, 1720) == [
        "site:primary:http down since 1710.5"
    ]
    assert monotonic_leaks("site:primary:http down since 1710", 1700, 1720)
    human = "down since 21:57:31 UTC (12 s), sip:10.77.0.21:1710, v0.1.1710, 2026-12-07, +8613800001710"
    assert monotonic_leaks(human, 1700, 1720) == []
