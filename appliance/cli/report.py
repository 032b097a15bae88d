"""``hotsite report incident|drill ID`` and ``hotsite completion bash|zsh``.

Reports read the audit log through the daemon's ``events`` API (the newest 10 000 events)
and build the timeline locally (``appliance.reports``). ``--events FILE`` takes a saved
``hotsite events --json --limit 10000`` instead, so a report can be written on another
machine or after the appliance is gone.

Register with ``cli.add_command(report)`` and ``cli.add_command(completion)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from appliance import api
from appliance.errors import HotsiteError
from appliance.reports import render
from appliance.reports.timeline import Kind, build

EVENTS_LIMIT = 10000


def _events(events_file: Path | None) -> list[dict[str, Any]]:
    if events_file is not None:
        try:
            data = json.loads(events_file.read_text())
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{events_file}: {exc}", param_hint="--events") from None
        if not isinstance(data, list) or not all(isinstance(e, dict) and "kind" in e for e in data):
            raise click.BadParameter(f"{events_file}: not a list of events", param_hint="--events")
        return data
    ctx = click.get_current_context().find_root().obj
    return api.call(ctx.runtime_dir, "events", {"limit": EVENTS_LIMIT}, timeout=30.0)


def _report(kind: Kind, ref: str, fmt: str, output: Path | None, events_file: Path | None) -> None:
    try:
        timeline = build(_events(events_file), ref, kind)
    except HotsiteError as exc:
        click.echo(f"hotsite: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    if fmt == "json":
        text = json.dumps(timeline.to_json(), indent=2) + "\n"
    else:
        text = render.markdown(timeline) if fmt == "md" else render.html_page(timeline)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"{kind} report written to {output} ({len(timeline.entries)} entries)", err=True)


_format = click.option(
    "--format",
    "fmt",
    type=click.Choice(["md", "html", "json"]),
    default="md",
    show_default=True,
    help="Markdown, a self-contained HTML page with a timeline chart, or JSON.",
)
_output = click.option(
    "--output", "-o", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Write to FILE."
)
_events_opt = click.option(
    "--events",
    "events_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read events from a saved 'hotsite events --json' instead of the daemon.",
)


@click.group()
def report() -> None:
    """Reports for the operations team and the risk office, from the audit log."""


@report.command("incident")
@click.argument("ref", metavar="ID")
@_format
@_output
@_events_opt
def report_incident(ref: str, fmt: str, output: Path | None, events_file: Path | None) -> None:
    """Timeline of an incident: detection, verdict, decision, runbook steps, pages, acks, data loss.

    ID is the audit event id of the failover decision (hotsite events --kind failover.decision),
    or #N for incident N of hotsite incidents.

    \b
    Examples:
      hotsite report incident 1234
      hotsite report incident '#7' --format html -o incident-7.html
      hotsite events --json --limit 10000 > events.json
      hotsite report incident 1234 --events events.json
    """
    _report("incident", ref, fmt, output, events_file)


@report.command("drill")
@click.argument("ref", metavar="ID")
@_format
@_output
@_events_opt
def report_drill(ref: str, fmt: str, output: Path | None, events_file: Path | None) -> None:
    """Timeline of a drill: each check with its duration and result, and the expected RTO.

    ID is the audit event id of the drill's result (hotsite events --kind failover.drill)
    or of the decision that started it.

    \b
    Examples:
      hotsite report drill 2051
      hotsite report drill 2051 --format html -o drill-2024-q3.html
    """
    _report("drill", ref, fmt, output, events_file)


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for hotsite.

    \b
    Examples:
      hotsite completion bash > /etc/bash_completion.d/hotsite
      echo 'eval "$(hotsite completion zsh)"' >> ~/.zshrc
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # click knows bash, zsh and fish
    root = click.get_current_context().find_root()
    comp = cls(root.command, {}, root.info_name or "hotsite", "_HOTSITE_COMPLETE")
    click.echo(comp.source())
