"""``hotsite top``'s pure parts: sparklines, the 80x24 rendering of a recorded snapshot, the keys."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import timefmt
from appliance.cli.top import SPARK, RttHistory, Screen, gather, loss_window, plain, sparkline
from appliance.errors import HotsiteError

STATUS: dict[str, Any] = {
    "appliance": {"name": "dr-appliance-1", "version": "0.1", "uptime_s": 3600},
    "sites": [
        {
            "name": "primary",
            "role": "primary",
            "verdict": "down",
            "verdict_since_s": 95,
            "why": ["site:primary:sbc down since 12:00"],
            "calls_in_progress": 0,
        },
        {
            "name": "backup",
            "role": "backup",
            "verdict": "up",
            "verdict_since_s": 86400,
            "why": [],
            "calls_in_progress": 37,
        },
    ],
    "trunks": [
        {"name": "trunk-a", "state": "up", "rtt_ms": 12.5, "last_code": 200, "calls_in_progress": 20},
        {
            "name": "trunk-b",
            "state": "down",
            "rtt_ms": None,
            "last_code": None,
            "last_result": "timeout",
            "calls_in_progress": None,
        },
    ],
    "failover": {
        "state": "failover_pending",
        "since_s": 40,
        "routing": "normal",
        "epoch": 3,
        "waiting_for": "an operator's approval (hotsite approve)",
        "witness": {"primary_alive": False},
        "last_decision": "primary down",
    },
}
INCIDENTS = {
    "active": [
        {
            "id": 7,
            "short_code": "4821",
            "severity": "critical",
            "status": "open",
            "opened_at": 1000.0,
            "summary": "Primary site down: failover waits for approval",
        },
        {
            "id": 5,
            "short_code": "1190",
            "severity": "error",
            "status": "acked",
            "opened_at": 900.0,
            "summary": "trunk:trunk-b is down",
        },
    ]
}
ONCALL = {"rotations": [{"rotation": "telephony", "on_call": "Li Wei"}]}
REPLICATION = {
    "streams": [
        {
            "name": "customers",
            "lag_s": 7.5,
            "rpo_budget_s": 5,
            "over_budget": True,
            "connected": True,
            "mode": "streaming",
            "last_error": None,
        }
    ]
}


class Recorded:
    """The daemon's API, played back from recorded answers; records what was asked."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, method: str, **params: Any) -> Any:
        self.calls.append((method, params))
        answer = self.answers.get(method.replace(".", "_"))
        if isinstance(answer, HotsiteError):
            raise answer
        return answer


def _recorded(**extra: Any) -> Recorded:
    answers = {"status": STATUS, "incidents": INCIDENTS, "oncall": ONCALL, "replication_status": REPLICATION}
    return Recorded(**(answers | extra))


def test_sparkline_scales_to_its_window_and_marks_gaps() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], 8) == SPARK
    assert sparkline([5, None, 5], 3) == f"{SPARK[3]} {SPARK[3]}"
    assert sparkline([None, None], 4) == "  "
    assert sparkline(list(range(100)), 10) == sparkline(list(range(90, 100)), 10)
    assert sparkline([1, 9], 2, ascii_only=True).isascii()


@given(st.lists(st.one_of(st.none(), st.floats(0, 1e4)), max_size=50), st.integers(1, 30))
def test_sparkline_is_never_wider_than_asked(values: list[float | None], width: int) -> None:
    line = sparkline(values, width)
    assert len(line) == min(width, len(values))
    assert set(line) <= set(SPARK) | {" "}


def test_plain_snapshot_fits_80x24_and_says_what_matters() -> None:
    fetch = _recorded()
    history = RttHistory()
    for rtt in (10.0, 12.0, 30.0, 12.5):
        snap = gather(fetch, 1100.0)
        snap.status["trunks"][0]["rtt_ms"] = rtt  # type: ignore[index]
        history.add(snap)
    text = plain(snap, history, width=80)
    lines = text.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, text
    assert [line for line in lines if line != line.rstrip()] == []  # issue 19: no padding into pipes
    for needed in (
        "dr-appliance-1",
        "failover_pending",
        "waiting for: an operator's approval",
        "primary lost",
        "DOWN",
        "trunk-a",
        "12.5",
        "timeout",
        "customers",
        "7.5",
        "#",
        "4821",
        "on call: telephony: Li Wei",
    ):
        assert needed in text, (needed, text)
    assert any(c in text for c in SPARK[1:]), "an RTT sparkline"
    assert history.of("trunk-b") == [None] * 4


def test_a_part_that_fails_is_named_not_fatal() -> None:
    fetch = _recorded(replication_status=HotsiteError("replication is starting; try again"))
    snap = gather(fetch, 1100.0)
    assert snap.replication is None and "starting" in snap.errors["replication"]
    assert "replication: replication is starting" in plain(snap, RttHistory())


def test_keys_ack_the_oldest_open_incident_and_confirm_a_drill() -> None:
    fetch = _recorded(ack={"incident": 7, "acked_by": "tech"}, drill={"decision": "drill started"})
    screen = Screen(fetch, clock=lambda: 1100.0)
    screen.refresh()
    assert screen.key("a")
    assert ("ack", {"id": "7"}) in fetch.calls  # #5 is already acknowledged
    assert screen.message == "acknowledged #7"
    assert screen.key("d") and "y to confirm" in screen.message
    assert not any(m == "drill" for m, _ in fetch.calls)
    assert screen.key("x") and screen.message == "drill not started"
    assert screen.key("d") and screen.key("y")
    assert ("drill", {}) in fetch.calls and screen.message == "drill: drill started"
    assert not screen.key("q")


@pytest.mark.parametrize("refused", ["a drill is only possible in primary_active"])
def test_a_refused_drill_shows_the_daemons_reason(refused: str) -> None:
    fetch = _recorded(drill=HotsiteError(refused))
    screen = Screen(fetch, clock=lambda: 1100.0)
    screen.key("d")
    screen.key("y")
    assert screen.message == f"error: drill: {refused}"


def test_the_data_loss_window_is_the_lag_until_a_promotion_records_it() -> None:
    """Issue 19: what a takeover would lose now, per stream; once promoted, what it did lose."""
    live: list[dict[str, Any]] = [
        {"name": "crm", "lag_s": 0.42, "over_budget": False},
        {"name": "dialplans", "lag_s": None, "over_budget": True},
    ]
    line, style = loss_window(live)
    assert line == "data-loss window (a takeover now would lose): crm 0.4s, dialplans ?"
    assert style == "bold red"  # a stream never in sync is over any budget
    promoted = {"at": 1000.0, "data_loss_window_s": 3.14}
    cut: list[dict[str, Any]] = [
        {"name": "crm", "lag_s": 30.0, "over_budget": True, "promoted": promoted},
        {"name": "dialplans", "lag_s": 12.25, "over_budget": True, "connected": False},
    ]
    line, _ = loss_window(cut)
    assert line == f"data-loss window: crm 3.1s at promotion {timefmt.clock(1000.0)}, dialplans 12.2s"
    screen = plain(gather(_recorded(replication_status={"streams": cut}), 1100.0), RttHistory())
    row = next(x for x in screen.splitlines() if x.startswith("crm "))
    assert "PROMOTED" in row and " 30.0 " not in row  # a promoted copy has no lag to show
    assert line in screen


def test_a_trunk_whose_calls_fail_shows_its_asr_channels_and_the_evidence() -> None:
    status = json_copy(STATUS)
    status["trunks"][0] |= {
        "state": "degraded",
        "why": "calls failing: ASR 5% over 40 attempts in 300 s, top failure 503 (30)",
        "kpis": {"asr_pct": 5.0, "calls": "failing", "channels": 30},
    }
    snap = gather(_recorded(status=status), 1100.0)
    text = plain(snap, RttHistory(), width=80)
    lines = text.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, text
    row = next(line for line in lines if line.startswith("trunk-a"))
    assert "20/30" in row and "5%" in row and "DEGRADED" in row and "calls failing" in row, text


def json_copy(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))
