"""``hotsite incidents | ack | oncall | page test``: the paging commands, thin clients of the daemon.

Register with ``cli.add_command(incidents)``, ``ack``, ``oncall`` and ``page``
(``appliance.cli.main``). The context object is main's ``Context``; it is
reached through click so this module does not import main (no import cycle).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.table import Table

from appliance import api, timefmt
from appliance.cli import table as table_out
from appliance.cli.options import echo_error, echo_json
from appliance.errors import HotsiteError

PAGE_TEST_TIMEOUT_S = 300.0  # a real modem may take a minute per channel


def _call(method: str, timeout: float = api.CLIENT_TIMEOUT_S, **params: Any) -> Any:
    ctx = click.get_current_context().find_root().obj
    try:
        return api.call(ctx.runtime_dir, method, params, timeout=timeout)
    except HotsiteError as exc:
        echo_error(exc.message, exc.exit_code)
        sys.exit(exc.exit_code)


def _when(ts: float | None) -> str:
    """A date and time with its zone (UTC unless ``hotsite --local``): rotations are written in any zone."""
    return timefmt.stamp(ts, seconds=False)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--limit", default=10, show_default=True, help="How many resolved incidents to show.")
def incidents(as_json: bool, limit: int) -> None:
    """Open and acknowledged incidents, and the last resolved ones.

    \b
    Example:
      hotsite incidents --json | jq '.active[] | select(.status == "open")'
    """
    result = _call("incidents", limit=limit)
    if as_json:
        echo_json(result)
        return
    table = Table(title="Active incidents", title_justify="left")
    for column in ("id", "code", "severity", "status", "opened", "summary", "paged", "acked by"):
        table.add_column(column, overflow="fold")
    for i in result["active"]:
        table.add_row(
            str(i["id"]),
            i["short_code"],
            i["severity"],
            i["status"],
            _when(i["opened_at"]),
            i["summary"],
            "; ".join(f"{p['contact']}: {p['line']}" for p in i.get("pages", []))
            or ", ".join(i["paged"])
            or "-",
            i["acked_by"] or "-",
        )
    table_out.emit(table if result["active"] else "No active incidents.")
    if result["recent"]:
        recent = Table(title="Recently resolved", title_justify="left")
        for column in ("id", "severity", "opened", "resolved", "summary"):
            recent.add_column(column, overflow="fold")
        for i in result["recent"]:
            recent.add_row(
                str(i["id"]), i["severity"], _when(i["opened_at"]), _when(i["resolved_at"]), i["summary"]
            )
        table_out.emit(recent)
    held = result.get("held", 0)
    table_out.emit(
        f"outbox: {result['outbox_depth']} page(s) waiting" + (f", {held} held by a limit" if held else "")
    )


@click.command()
@click.argument("incident")
def ack(incident: str) -> None:
    """Acknowledge INCIDENT (its number or the short code in the page): escalation stops."""
    result = _call("ack", id=incident)
    click.echo(f"incident #{result['incident']} acknowledged by {result['acked_by']}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def oncall(as_json: bool) -> None:
    """Who is on call now in each rotation, the next handovers and overrides."""
    result = _call("oncall")
    if as_json:
        echo_json(result)
        return
    table = Table(title="On call" + (" (night hours)" if result["night"] else ""), title_justify="left")
    for column in ("rotation", "on call", "until", "then", "overrides"):
        table.add_column(column, overflow="fold")
    for r in result["rotations"]:
        then = ", ".join(f"{n['contact']} from {_when(n['from'])}" for n in r["next"][:2])
        overrides = ", ".join(f"{o['contact']} {_when(o['start'])}-{_when(o['end'])}" for o in r["overrides"])
        table.add_row(r["rotation"], r["on_call"] or "-", _when(r["until"]), then, overrides or "-")
    table_out.emit(table if result["rotations"] else "No rotations configured.")


@click.group()
def page() -> None:
    """Send pages by hand."""


@page.command("test")
@click.argument("contact")
@click.option("--message", "-m", help="Text to send [default: a test notice].")
@click.option("--channel", help="Only this channel [default: every channel that can reach CONTACT].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def page_test(contact: str, message: str | None, channel: str | None, as_json: bool) -> None:
    """Send a real test page to CONTACT through each channel and report what happened.

    Exit status 1 if no channel delivered it.
    """
    params: dict[str, Any] = {"contact": contact}
    if message:
        params["message"] = message
    if channel:
        params["channel"] = channel
    result = _call("page_test", timeout=PAGE_TEST_TIMEOUT_S, **params)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for r in result["results"]:
            click.echo(f"{r['channel']}: {r['result']} {r['detail']}".rstrip())
    if not any(r["result"] == "sent" for r in result["results"]):
        sys.exit(1)


COMMANDS = (incidents, ack, oncall, page)
