"""``hotsite``: the technician's command line.

A thin client of the daemon's control API: every read goes through the
socket, so the CLI shows exactly what the daemon believes. Only ``run``
(the daemon itself), ``config check`` and ``lab`` work without a daemon.

Exit status: 0 ok, 1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from appliance import __version__, logs, timefmt
from appliance import config as config_mod
from appliance.cli import render, table
from appliance.cli.context import Context, fail, pass_ctx
from appliance.cli.group import RootGroup
from appliance.cli.options import When, echo_json
from appliance.errors import ConfigError, HotsiteError
from monitoring.probes import kinds
from monitoring.targets import parse_url as parse_target

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=RootGroup, context_settings=CONTEXT)
@click.option(
    "--config",
    "-c",
    envvar=config_mod.ENV_VAR,
    metavar="FILE",
    help=f"Configuration file [default: {config_mod.DEFAULT_PATH}; env {config_mod.ENV_VAR}].",
)
@click.option(
    "--runtime-dir",
    envvar="HOTSITE_RUNTIME_DIR",
    metavar="DIR",
    help="Where the daemon's control socket is [default: the config's appliance.runtime_dir].",
)
@click.option(
    "--local", "local_time", is_flag=True, help="Show times in local time instead of UTC (labelled)."
)
@click.option("--plain", is_flag=True, help="Plain-text tables even on a terminal (as when piped).")
@click.version_option(__version__, prog_name="hotsite")
@click.pass_context
def cli(
    ctx: click.Context, config: str | None, runtime_dir: str | None, local_time: bool, plain: bool
) -> None:
    """hotsite: the disaster-recovery site's appliance.

    \b
    Examples:
      hotsite status               what the daemon sees now
      hotsite status --json        the same, for scripts
      hotsite config check /etc/hotsite/hotsite.toml
      hotsite lab demo             the one-machine lab with a live view
    """
    timefmt.set_local(local_time)
    table.set_plain(plain)
    ctx.obj = Context(config, runtime_dir)


@cli.command()
@click.option(
    "--config", "-c", "config_after", metavar="FILE", help="Configuration file (also accepted before 'run')."
)
@pass_ctx
def run(ctx: Context, config_after: str | None) -> None:
    """Run the daemon in the foreground (systemd starts it this way).

    SIGTERM stops it cleanly; SIGHUP reloads the configuration, keeping the
    old one if the new one is invalid.
    """
    from appliance.app import Appliance

    if config_after:
        ctx.config_path = Path(config_after)

    try:
        config = config_mod.load(ctx.config_path)
    except ConfigError as exc:
        fail(exc)
    logs.setup(config.appliance.log_level, config.appliance.log_format)
    # Everything the daemon creates (state, replicas, snapshots) is its own: 0600/0700 unless
    # it says otherwise (the control socket is 0660 on purpose). SECURITY.md.
    os.umask(0o077)
    try:
        asyncio.run(Appliance(config, ctx.config_path).main())
    except HotsiteError as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--events", default=8, show_default=True, help="How many recent events to show.")
@pass_ctx
def status(ctx: Context, as_json: bool, events: int) -> None:
    """Sites, trunks, the failover state and the last events.

    \b
    Example:
      hotsite status --json | jq '.trunks[] | select(.state != "up")'
    """
    result = ctx.call("status", events=events)
    if as_json:
        echo_json(result)
    else:
        render.print_status(result)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
def trunks(ctx: Context, as_json: bool) -> None:
    """Carrier trunks: state, RTT, last SIP code, since when, and why."""
    result = ctx.call("trunks")
    if as_json:
        echo_json(result)
    else:
        render.print_targets(result, title="Trunks")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
def probes(ctx: Context, as_json: bool) -> None:
    """Every probe target (trunks, SBCs, site checks) with its judged state."""
    result = ctx.call("probes")
    if as_json:
        echo_json(result)
    else:
        render.print_targets(result, title="Probes")


def _probe_help() -> str:
    """The ``probe`` command's help, its TARGET forms read from the kind table."""
    forms = "".join(f"\n  {form}" for form in kinds.url_forms())
    return (
        "Probe TARGET now, like ping; no daemon needed. Exit 0 if it answered.\n\n"
        f"\b\nTARGET forms:{forms}\n"
        "\b\nExamples:\n"
        "  hotsite probe sip:10.0.0.1:5060\n"
        "  hotsite probe 'sip:sbc.example.com;transport=tls' -n 10 -i 0.2\n"
        "  hotsite probe https://10.0.0.6/health --json"
    )


class _ProbeCommand(click.Command):
    """Its help lists the TARGET forms of the kind table as the table is when help is asked."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.help = _probe_help()
        super().format_help_text(ctx, formatter)


@cli.command(cls=_ProbeCommand, help=_probe_help())
@click.argument("target")
@click.option("--count", "-n", default=4, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--interval", "-i", default=1.0, show_default=True, type=click.FloatRange(0.01, 3600))
@click.option("--timeout", "-W", default=1.0, show_default=True, type=click.FloatRange(0.01, 60))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per probe, then a summary.")
def probe(target: str, count: int, interval: float, timeout: float, as_json: bool) -> None:
    """Probe TARGET now, like ping (help: :func:`_probe_help`)."""
    from monitoring.probe_command import run_probes

    try:
        parsed = parse_target(target)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="TARGET") from None
    answered = run_probes(parsed, count=count, interval=interval, timeout=timeout, as_json=as_json)
    sys.exit(0 if answered else 1)


@cli.command("events")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--limit", default=50, show_default=True, help="How many events, newest first.")
@click.option("--kind", help="Only this kind or kind prefix, e.g. 'probe' or 'operator.note'.")
@click.option(
    "--since", type=When(), metavar="WHEN", help="Only events since WHEN: 90s, 15m, 2h, 1d or ISO 8601."
)
@click.option("--incident", type=int, metavar="ID", help="Only events about paging incident ID.")
@click.option("--subject", help="Only events about this subject, e.g. 'trunk:carrier-a' or 'primary'.")
@pass_ctx
def events_cmd(
    ctx: Context,
    as_json: bool,
    limit: int,
    kind: str | None,
    since: float | None,  # a Unix time (When)
    incident: int | None,
    subject: str | None,
) -> None:
    """Read the audit log: who did what, when.

    \b
    Examples:
      hotsite events --kind failover --since 1h
      hotsite events --incident 42
      hotsite events --subject trunk:carrier-a --json
    """
    params: dict[str, Any] = {"limit": limit}
    if incident is not None and subject:
        raise click.UsageError("give --incident or --subject, not both")
    if incident is not None:
        params["subject"] = f"incident:{incident}"
    elif subject:
        params["subject"] = subject
    if kind:
        params["kind"] = kind
    if since is not None:
        params["since"] = since
    result = ctx.call("events", **params)
    if as_json:
        echo_json(result)
    else:
        render.print_events(result)


@cli.command("logs")
@click.option("--since", default="1 hour ago", show_default=True, help="Passed to journalctl.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--unit", default="hotsite", show_default=True, help="The systemd unit.")
def logs_cmd(since: str, follow: bool, unit: str) -> None:
    """The daemon's own log lines (journald), e.g. to see why a probe failed.

    The audit log (who did what) is `hotsite events`; this is the daemon's diagnostic log.
    """
    import shutil
    import subprocess

    journalctl = shutil.which("journalctl")
    if journalctl is None:
        fail(HotsiteError("no journalctl here: the daemon logs to stderr; see its service manager's log"))
    args = [journalctl, "-u", unit, "--since", since, "--no-pager", "-o", "cat"] + (["-f"] if follow else [])
    sys.exit(subprocess.call(args))


@cli.command()
@click.argument("text", nargs=-1, required=True)
@pass_ctx
def note(ctx: Context, text: tuple[str, ...]) -> None:
    """Add a note to the audit log (e.g. "replaced PSU 2 in rack B3")."""
    event = ctx.call("note", text=" ".join(text))
    click.echo(f"noted as event {event['id']} by {event['actor']}")


@cli.command()
@pass_ctx
def reload(ctx: Context) -> None:
    """Ask the daemon to re-read its configuration (like SIGHUP)."""
    ctx.call("reload")
    click.echo("reload requested; 'hotsite events --kind config' shows the result")


@cli.group()
def config() -> None:
    """Validate and inspect configuration files."""


@config.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
@click.option(
    "--unit",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="UNIT",
    help="Also list what this systemd unit (and UNIT.d/*.conf) forbids that FILE needs.",
)
@pass_ctx
def config_check(ctx: Context, file: Path | None, as_json: bool, unit: Path | None) -> None:
    """Validate FILE (default: the --config file); exit 2 on any mistake.

    Every mistake is listed with its key path, the bad value and what is
    expected. Files the config names (modem device, secrets) must exist.
    With --unit, every feature the unit's sandbox would forbid is a mistake
    too, naming the unit setting to change (exit 2 as well).
    """
    from appliance import systemd_unit

    path = file or ctx.config_path
    try:
        cfg = config_mod.load(path)
        problems = config_mod.check_environment(cfg)
        problems += systemd_unit.check_file(unit, cfg) if unit else []
        warnings = cfg.warnings()
    except ConfigError as exc:
        if as_json:
            click.echo(
                json.dumps({"ok": False, "file": str(path), "error": exc.message, "problems": exc.problems})
            )
            sys.exit(exc.exit_code)
        fail(exc)
    if as_json:
        click.echo(
            json.dumps({"ok": not problems, "file": str(path), "problems": problems, "warnings": warnings})
        )
    else:
        for problem in problems:
            click.echo(f"  {problem}", err=True)
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
        if not problems:
            click.echo(
                f"{path}: ok ({len(cfg.sites)} sites, {len(cfg.trunks)} trunks, {len(cfg.contacts)} contacts)"
            )
    if problems:
        if not as_json:
            click.echo(f"hotsite: error: {path}: {len(problems)} problem(s)", err=True)
        sys.exit(2)


def _register_subgroups() -> None:
    from appliance.cli import failover, paging, provision
    from appliance.cli.lab import lab
    from appliance.cli.replication import replication, source
    from appliance.cli.report import completion, report
    from appliance.cli.testcall import testcall
    from appliance.cli.top import top
    from appliance.cli.unit import unit
    from appliance.cli.witness import witness

    cli.add_command(lab)
    cli.add_command(witness)
    cli.add_command(source)
    cli.add_command(replication)
    cli.add_command(top)
    cli.add_command(unit)
    cli.add_command(report)
    cli.add_command(completion)
    cli.add_command(testcall)
    for command in (*failover.COMMANDS, *paging.COMMANDS, *provision.COMMANDS):
        cli.add_command(command)


_register_subgroups()


def main() -> None:
    cli(prog_name="hotsite")


if __name__ == "__main__":
    main()
