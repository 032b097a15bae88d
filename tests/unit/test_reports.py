"""Incident and drill reports rendered from recorded audit-log events (the shapes the daemon writes)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.reports import render
from appliance.reports.timeline import ReportError, build, parse_ref

T = 1_700_000_000.0
DATA: dict[str, Any] = {}  # typed start for decision data (its "from" key is a keyword)


def ev(
    i: int, dt: float, kind: str, subject: str = "", message: str = "", actor: str = "daemon", **data: Any
) -> dict[str, Any]:
    return {
        "id": i,
        "at": T + dt,
        "kind": kind,
        "actor": actor,
        "subject": subject,
        "message": message,
        "data": data,
    }


EVENTS = [
    ev(
        1, -900, "probe.state", "trunk:trunk-a", "trunk:trunk-a up -> down", state="down", was="up"
    ),  # older trouble
    ev(2, -880, "probe.state", "trunk:trunk-a", "trunk:trunk-a down -> up", state="up", was="down"),
    ev(
        10,
        0.0,
        "probe.state",
        "site:primary:sbc",
        "site:primary:sbc up -> down: timeout",
        state="down",
        was="up",
    ),
    ev(11, 0.2, "site.verdict", "primary", "site primary up -> down", verdict="down", was="up"),
    ev(
        12,
        3.4,
        "failover.decision",
        "failing_over",
        "primary down 3s, witness agrees: failing over",
        **DATA
        | {
            "from": "primary_degraded",
            "to": "failing_over",
            "routing": "failover",
            "epoch": 4,
            "event": "Tick",
        },
    ),
    ev(13, 3.4, "failover.runbook.failover", "epoch 4", "failover runbook started: primary down"),
    ev(14, 3.5, "failover.page", "primary-down", "Primary site down: failing over"),
    ev(
        15, 3.6, "paging.opened", "incident:7", "Primary site down: failing over", key="failover:primary-down"
    ),
    ev(16, 3.9, "paging.page_sent", "incident:7", "page to Lab On-Call: sms sent", page=1, attempts=1),
    ev(17, 4.1, "replication.promoted", "customers", "", stream="customers", data_loss_window_s=0.42),
    ev(
        18,
        4.6,
        "failover.runbook.failover.done",
        "epoch 4",
        "failover routing applied and verified (kamailio, replication)",
        ok=True,
        routing="failover",
        duration_s=1.2,
        steps=[
            {
                "actuator": "kamailio",
                "action": "apply",
                "ok": True,
                "duration_s": 0.7,
                "detail": "failover verified",
            },
            {
                "actuator": "replication",
                "action": "apply",
                "ok": True,
                "duration_s": 0.5,
                "detail": "failover verified",
            },
        ],
    ),
    ev(
        19,
        4.6,
        "failover.decision",
        "backup_active",
        "failover done",
        **DATA
        | {
            "from": "failing_over",
            "to": "backup_active",
            "routing": "failover",
            "epoch": 4,
            "event": "RunbookDone",
        },
    ),
    ev(
        20,
        95.0,
        "paging.acked",
        "incident:7",
        "acknowledged by Li Wei via sms",
        actor="sms:Li Wei",
        actor_name="x",
        via="sms",
        after_s=91.4,
    ),
    ev(21, 400.0, "paging.resolved", "incident:7", "resolved: primary back"),
    ev(22, 5000.0, "probe.state", "trunk:trunk-b", "unrelated later trouble", state="down", was="up"),
    # a drill
    ev(
        30,
        9000.0,
        "failover.decision",
        "drill",
        "drill started by tech",
        actor="uid:1000",
        **DATA
        | {"from": "primary_active", "to": "drill", "routing": "normal", "epoch": 4, "event": "Command"},
    ),
    ev(
        31,
        9002.5,
        "failover.drill",
        "",
        "4/5 checks passed, expected RTO 9.2s; failed: witness answers",
        actor="uid:1000",
        started_at=T + 9000.0,
        finished_at=T + 9002.5,
        ok=False,
        production_routing_touched=False,
        expected_rto={"detection_s": 1.9, "hold_down_s": 3, "runbook_s": 0.3, "total_s": 5.2},
        checks=[
            {"name": "backup site up", "ok": True, "detail": "backup is up", "duration_s": 0.001},
            {"name": "witness answers", "ok": False, "detail": "no answer <script>", "duration_s": 2.0},
            {"name": "test call through the backup path", "ok": True, "detail": "200 OK", "duration_s": 0.4},
        ],
    ),
]


def test_refs() -> None:
    assert parse_ref("123") == ("event", 123)
    assert parse_ref("#7") == ("incident", 7) == parse_ref("incident:7")
    with pytest.raises(ReportError):
        parse_ref("seven")


def test_incident_timeline_from_the_decision() -> None:
    t = build(reversed(EVENTS), "12", "incident")  # the API returns newest first
    assert t.start == T and t.end == T + 400.0  # from detection to the resolve
    ids = {e.event_id for e in t.entries}
    assert {10, 11, 12, 16, 17, 18, 20, 21} <= ids and not {1, 2, 22, 30, 31} & ids
    steps = [e for e in t.entries if e.category == "runbook" and e.title.startswith("apply")]
    assert [(s.title, s.duration_s) for s in steps] == [("apply kamailio", 0.7), ("apply replication", 0.5)]
    assert steps[0].at == pytest.approx(T + 3.4) and steps[1].at == pytest.approx(T + 4.1)
    f = t.figures
    assert f["decision_after_detection_s"] == pytest.approx(3.4)
    assert f["routing_changed_after_detection_s"] == pytest.approx(4.6)
    assert f["runbook_s"] == pytest.approx(1.2) and f["runbook_ok"] is True
    assert f["acknowledged_after_s"] == pytest.approx(91.4)
    assert f["data_loss_window"] == {"customers": "0.420 s"}
    assert [e.at for e in t.entries] == sorted(e.at for e in t.entries)


VERIFIED = ev(
    23,
    70.0,
    "failover.verification",
    "epoch 4",
    "failover NOT verified by calls: 95566 not answered at ivr: 503 Service Unavailable; 95588 at backup",
    epoch=4,
    ok=False,
    hotlines=[
        {"hotline": "vip", "number": "95588", "destination": "backup", "ok": True, "answered_at": T + 9.25,
         "detail": "95588 at backup (PDD 4 ms, MOS 4.41)", "pdd_ms": 4.0, "mos": 4.41},
        {"hotline": "cards", "number": "95566", "destination": "ivr", "ok": False, "answered_at": None,
         "detail": "95566 not answered at ivr: 503 Service Unavailable"},
    ],
)  # fmt: skip


def test_the_report_shows_each_hotlines_first_good_call_after_the_change() -> None:
    t = build([*EVENTS, VERIFIED], "12", "incident")
    calls = [e for e in t.entries if e.category == "call"]
    assert [(c.title, c.ok, c.at) for c in calls] == [
        ("call 95588 answered at backup", True, T + 9.25),  # at the answer, not when it was recorded
        ("call 95566 FAILED", False, T + 70.0),
    ]
    assert t.figures["verified_by_calls"] is False
    assert t.figures["first_good_call_after_detection"] == {
        "95588": "9.2 s (PDD 4 ms, MOS 4.41)",
        "95566": "none: 95566 not answered at ivr: 503 Service Unavailable",
    }
    md = render.markdown(t)
    assert "first good call after detection, per hotline: 95588 9.2 s (PDD 4 ms, MOS 4.41)" in md
    assert "| call | call 95566 FAILED |" in md
    assert "call" in render.svg(t)  # a lane of its own in the chart


def test_incident_by_paging_number_gives_the_same_story() -> None:
    by_incident = build(EVENTS, "#7", "incident")
    assert by_incident.end == T + 400.0
    assert {e.event_id for e in by_incident.entries} >= {16, 20, 21}


def test_markdown_report() -> None:
    md = render.markdown(build(EVENTS, "12", "incident"))
    assert md.startswith("# Incident report: primary down 3s")
    assert "| apply kamailio |" in md and "0.700 s" in md
    assert "data-loss window: customers 0.420 s" in md
    assert "acknowledged after: 91.4 s" in md
    assert "routing changed after detection (RTO): 4.600 s" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| time")]
    assert len(rows) == len(build(EVENTS, "12", "incident").entries)


def test_html_is_self_contained_with_an_svg_chart_and_escaped_text() -> None:
    page = render.html_page(build(EVENTS, "31", "drill"))
    assert "<svg" in page and "<script" not in page.replace("&lt;script", "")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "no external assets"
    assert "no answer &lt;script&gt;" in page
    chart = page[page.index("<svg") : page.index("</svg>") + 6]
    root = ET.fromstring(chart)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}rect")) >= 1 + 3 + 1  # background, three checks, the drill span
    assert root.findall(f"{ns}circle"), "the decision instant"


def test_drill_report_from_its_result_or_its_decision() -> None:
    t = build(EVENTS, "31", "drill")
    assert t == build(EVENTS, "30", "drill")
    checks = [e for e in t.entries if e.category == "check" and e.title != "drill finished"]
    assert [(c.title, c.ok) for c in checks] == [
        ("backup site up", True),
        ("witness answers", False),
        ("test call through the backup path", True),
    ]
    assert t.figures["checks_passed"] == "2/3" and t.figures["ok"] is False
    assert t.figures["expected_rto_s"] == 5.2 and t.figures["production_routing_touched"] is False
    assert "drill passed: no" in render.markdown(t)


@pytest.mark.parametrize(
    ("ref", "kind", "why"),
    [
        ("999", "incident", "not within the events"),
        ("#9", "incident", "incident #9"),
        ("10", "drill", "probe.state event"),
        ("22", "drill", "probe.state"),
    ],
)
def test_bad_anchors_are_named(ref: str, kind: str, why: str) -> None:
    with pytest.raises(ReportError, match=why):
        build(EVENTS, ref, kind)  # type: ignore[arg-type]


def _cli() -> Any:
    from appliance.cli.main import cli
    from appliance.cli.report import completion, report

    cli.add_command(report)
    cli.add_command(completion)
    return cli


def test_cli_from_a_saved_event_file(tmp_path: Path) -> None:
    saved = tmp_path / "events.json"
    saved.write_text(json.dumps(EVENTS))
    out = tmp_path / "r.html"
    runner = CliRunner()
    result = runner.invoke(
        _cli(), ["report", "incident", "#7", "--events", str(saved), "--format", "html", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    result = runner.invoke(_cli(), ["report", "drill", "12", "--events", str(saved)])
    assert result.exit_code == 1 and "no drill result" in result.output
    result = runner.invoke(_cli(), ["report", "drill", "31", "--events", str(saved), "--format", "json"])
    assert json.loads(result.output)["figures"]["checks_passed"] == "2/3"


def test_completion_scripts() -> None:
    runner = CliRunner()
    bash = runner.invoke(_cli(), ["completion", "bash"], prog_name="hotsite")
    assert bash.exit_code == 0 and "_HOTSITE_COMPLETE=bash_complete" in bash.output
    zsh = runner.invoke(_cli(), ["completion", "zsh"], prog_name="hotsite")
    assert zsh.exit_code == 0 and "#compdef hotsite" in zsh.output
