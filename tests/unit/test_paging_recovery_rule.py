"""The recovery rule of the send state machine (PAGING.md), as a property over every phase a
row can be left in: resend only what certainly never left, call sent only what fully did."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from appliance.paging.outbox import Row

PHASES = ["", "claimed", "handed", "command", "prompt", "pdu", "answered", "error"]


def row(phase: str, sent: int, total: int) -> Row:
    return Row(
        1,
        "d",
        1,
        "c",
        "trigger",
        "t",
        "r",
        (),
        "sending",
        1,
        0.0,
        0.0,
        "error",
        None,
        phase,
        "sms",
        sent,
        total,
    )


def outcome(r: Row) -> str:
    if r.answered_in_full:
        return "sent"
    return "uncertain" if r.may_have_gone_out else "resent"


@given(st.sampled_from(PHASES), st.integers(0, 5), st.integers(1, 5))
def test_resend_only_what_never_left_and_sent_only_what_fully_did(phase: str, sent: int, total: int) -> None:
    sent = min(sent, total)
    result = outcome(row(phase, sent, total))
    if result == "resent":
        assert sent == 0 and phase not in ("pdu", "handed"), (
            "a page that may have left is never resent silently"
        )
    if result == "sent":
        assert sent == total, "sent means every part had its +CMGS"
    if phase in ("pdu", "handed") and sent < total:
        assert result == "uncertain"
    if 0 < sent < total:
        assert result == "uncertain", "part of a long text went out"


def test_the_phase_table() -> None:
    assert outcome(row("claimed", 0, 0)) == "resent"
    assert outcome(row("command", 0, 1)) == "resent"
    assert outcome(row("prompt", 0, 1)) == "resent"
    assert outcome(row("error", 0, 1)) == "resent"
    assert outcome(row("pdu", 0, 1)) == "uncertain"
    assert outcome(row("handed", 0, 1)) == "uncertain"
    assert outcome(row("answered", 1, 1)) == "sent"
    assert outcome(row("command", 1, 2)) == "uncertain"
