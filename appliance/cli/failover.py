"""Operator commands that move (or hold) call routing. All audited with the calling user.

Commands that move routing ask for confirmation on a terminal; scripts pass
``--yes``. A command the engine refuses (the primary is up, a runbook is
running…) prints the engine's reason and exits 1. Accepted, the command exits 0
once the runbook has *started*; with ``--wait SECONDS`` it waits for the runbook
and exits 0 only if the routing ended where it was asked to go, 1 if the runbook
failed (rolled back or held) or was still running after SECONDS.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from appliance.cli.context import Context, fail, pass_ctx
from appliance.errors import StateError
from failover.engine import RUNNING


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError("not on a terminal: add --yes to confirm")
    click.confirm(question, abort=True)


def _show(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(result["decision"])
    state = result["failover"]
    click.echo(f"state {state['state']}, routing {state['routing']}, epoch {state['epoch']}")


def _wait(ctx: Context, started: dict[str, Any], wanted: str, timeout_s: float | None) -> dict[str, Any]:
    """Until the runbook the command started is over; StateError unless routing is ``wanted``.

    The engine's epoch tells its runbook from a later one. After it, the routing
    says how it ended: ``wanted``, rolled back, or ``unknown`` (held). The state
    may already have moved on (a failover with the primary up goes on to
    ``failback_pending``), so the routing is what is checked.
    """
    view = started["failover"]
    if timeout_s is None or view["state"] not in RUNNING:
        return view
    deadline = time.monotonic() + timeout_s
    while view["state"] in RUNNING and view["epoch"] == started["failover"]["epoch"]:
        if time.monotonic() > deadline:
            fail(StateError(f"the runbook (epoch {view['epoch']}) was still running after {timeout_s:g}s"))
        time.sleep(0.2)
        view = ctx.call("status", events=0)["failover"]
    if view["routing"] != wanted or view["state"] == "held":
        last = view.get("last_runbook") or {}
        where = f"state {view['state']}, routing {view['routing']}"
        fail(StateError(f"the runbook failed: {where}: {last.get('detail', '')}"))
    return view


yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
wait_option = click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Wait for the runbook; exit 1 if it failed or is still running after SECONDS.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
reason_option = click.option("--reason", "-r", default="", help="Why: recorded in the audit log and pages.")


@click.command("failover")
@click.option("--to", "to", default="backup", show_default=True, help="The site to move routing to.")
@reason_option
@click.option("--force", is_flag=True, help="Even if the primary is judged up (a planned move).")
@wait_option
@yes_option
@json_option
@pass_ctx
def failover_cmd(
    ctx: Context, to: str, reason: str, force: bool, wait_s: float | None, yes: bool, as_json: bool
) -> None:
    """Move call routing to the backup site now: fence the primary, route every hotline by plan.

    \b
    Example:
      hotsite failover --to backup --reason "primary PBX room flooded" --wait 60
    """
    _confirm(f"Move call routing to {to}? Calls stop going to the primary.", yes)
    result = ctx.call("failover", to=to, reason=reason, force=force)
    result["failover"] = _wait(ctx, result, "failover", wait_s)
    _show(result, as_json)


@click.command()
@reason_option
@click.option("--force", is_flag=True, help="Even if the primary is not judged up.")
@wait_option
@yes_option
@json_option
@pass_ctx
def failback(ctx: Context, reason: str, force: bool, wait_s: float | None, yes: bool, as_json: bool) -> None:
    """Return call routing to the primary site."""
    _confirm("Return call routing to the primary site?", yes)
    result = ctx.call("failback", reason=reason, force=force)
    result["failover"] = _wait(ctx, result, "normal", wait_s)
    _show(result, as_json)


@click.command()
@reason_option
@yes_option
@json_option
@pass_ctx
def approve(ctx: Context, reason: str, yes: bool, as_json: bool) -> None:
    """Approve the pending failover (or failback) the engine is waiting for."""
    _confirm("Approve the pending routing change?", yes)
    _show(ctx.call("approve", reason=reason), as_json)


@click.command()
@reason_option
@json_option
@pass_ctx
def cancel(ctx: Context, reason: str, as_json: bool) -> None:
    """Cancel a pending failover or failback (nothing moves)."""
    _show(ctx.call("cancel", reason=reason), as_json)


@click.command()
@click.argument("switch", type=click.Choice(["on", "off"]))
@reason_option
@json_option
@pass_ctx
def maintenance(ctx: Context, switch: str, reason: str, as_json: bool) -> None:
    """Maintenance on: no automatic failover or failback until it is switched off."""
    _show(ctx.call("maintenance", on=switch == "on", reason=reason), as_json)


@click.command()
@json_option
@pass_ctx
def drill(ctx: Context, as_json: bool) -> None:
    """Start a non-disruptive DR drill: readiness checks, production routing untouched."""
    _show(ctx.call("drill"), as_json)


COMMANDS = (failover_cmd, failback, approve, cancel, maintenance, drill)
