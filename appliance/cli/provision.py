"""``hotsite provision`` (Ansible through ansible-runner) and ``hotsite remote`` (fabric over SSH).

Both work without a daemon: they run on a technician's or contractor's
machine and act on other hosts. Exit status: 0 ok, 1 a host failed or was
unreachable, 2 a usage or configuration error (missing inventory, a config
the target refused).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from appliance.cli.confirm import confirm, yes_option
from appliance.cli.context import fail
from appliance.errors import HotsiteError

_STYLE = {"changed": "yellow", "failed": "red", "unreachable": "red", "skipped": "cyan", "ok": "green"}


def _echo_line(line: Any, verbose: bool) -> None:
    if line.status == "play":
        click.echo(click.style(f"== {line.text}", bold=True), err=True)
    elif line.status != "ok" or verbose:
        status = click.style(f"{line.status:<11}", fg=_STYLE.get(line.status))
        click.echo(f"  {status} {line.host:<16} {line.text}", err=True)


@click.command("provision")
@click.option(
    "--inventory", "-i", required=True, type=click.Path(path_type=Path), help="Ansible inventory file."
)
@click.option("--check", is_flag=True, help="Dry run: show what would change, change nothing.")
@click.option("--limit", "-l", metavar="PATTERN", help="Only these hosts or groups.")
@click.option(
    "--playbook",
    default="site.yml",
    show_default=True,
    type=click.Choice(["site.yml", "appliance.yml", "source.yml", "edge.yml", "witness.yml"]),
)
@click.option("--tags", "-t", metavar="TAGS", help="Only tasks with these tags, e.g. hotsite_config.")
@click.option("--extra-vars", "-e", "extra", multiple=True, metavar="KEY=VALUE", help="Override a variable.")
@click.option("--verbose", "-v", is_flag=True, help="Show unchanged tasks too.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def provision(
    inventory: Path,
    check: bool,
    limit: str | None,
    playbook: str,
    tags: str | None,
    extra: tuple[str, ...],
    verbose: bool,
    as_json: bool,
) -> None:
    """Install or update hotsite on the hosts of an inventory (Ansible, via ansible-runner).

    \b
    Groups the playbooks know: appliances, primary_sources, carrier_edges,
    witnesses (see provisioning/ansible/inventory.example.yml). Progress is one
    line per changed or failed task; the end is a summary of changed hosts.
    A second run on an unchanged inventory changes nothing.
    \b
    Examples:
      hotsite provision -i inventory.yml --check
      hotsite provision -i inventory.yml --limit appliances
      hotsite provision -i inventory.yml --tags hotsite_config   # only the config
    """
    from provisioning.runner import run_playbook

    extravars: dict[str, str] = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--extra-vars")
        extravars[key] = value
    try:
        result = run_playbook(
            inventory,
            playbook=playbook,
            check=check,
            limit=limit,
            extravars=extravars,
            tags=tags,
            on_line=lambda line: _echo_line(line, verbose),
        )
    except HotsiteError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        _print_summary(result, check)
    sys.exit(0 if result.ok else 1)


def _print_summary(result: Any, check: bool) -> None:
    hosts = result.progress.hosts
    verb = "would change" if check else "changed"
    click.echo(f"{'host':<20} {'ok':>4} {verb:>13} {'failed':>7} {'unreachable':>12} {'skipped':>8}")
    for name in sorted(hosts):
        h = hosts[name]
        click.echo(f"{name:<20} {h.ok:>4} {h.changed:>13} {h.failed:>7} {h.unreachable:>12} {h.skipped:>8}")
        for error in h.errors:
            click.echo(click.style(f"    {error}", fg="red"))
    if result.output_tail:
        click.echo(result.output_tail, err=True)
    changed = result.progress.changed_hosts
    state = "ok" if result.ok else f"FAILED ({result.status}, rc {result.rc})"
    click.echo(f"{state} in {result.elapsed_s:.1f}s; {verb}: {', '.join(changed) if changed else 'nothing'}")


# -- hotsite remote -----------------------------------------------------------------------


@click.group("remote")
@click.option("--user", "-u", default="root", show_default=True, help="SSH user (sudo -n when not root).")
@click.option("--port", "-p", default=22, show_default=True, type=click.IntRange(1, 65535))
@click.option("--identity", "-I", type=click.Path(exists=True, dir_okay=False), help="SSH private key file.")
@click.option(
    "--hotsite",
    "hotsite_bin",
    default="/opt/hotsite/bin/hotsite",
    show_default=True,
    help="The hotsite command on the remote host.",
)
@click.option(
    "--timeout", default=10.0, show_default=True, type=click.FloatRange(1, 600), help="SSH connect timeout."
)
@click.pass_context
def remote(
    ctx: click.Context, user: str, port: int, identity: str | None, hotsite_bin: str, timeout: float
) -> None:
    """Tasks on an appliance or the primary's source agent over SSH.

    \b
    Examples:
      hotsite remote diagnostics dr-appliance-1 -o diag.tar.gz
      hotsite remote push-config dr-appliance-1 new.toml
      hotsite remote rotate-credentials --appliance dr-appliance-1 --source primary-db --ca-dir ./ca
    """
    ctx.obj = {"user": user, "port": port, "identity": identity, "hotsite": hotsite_bin, "timeout_s": timeout}


def _target(ctx: click.Context, host: str) -> Any:
    from provisioning.remote import Target

    return Target(host=host, **ctx.obj)


@remote.command("diagnostics")
@click.argument("host")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Bundle file (.tar.gz)."
)
@click.option("--config", "config_path", default="/etc/hotsite/hotsite.toml", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def diagnostics(ctx: click.Context, host: str, output: Path | None, config_path: str, as_json: bool) -> None:
    """Collect a diagnostics bundle from HOST: config (secrets masked), logs, versions, status."""
    from provisioning.remote import collect_diagnostics

    output = output or Path(f"hotsite-diag-{host}-{time.strftime('%Y%m%dT%H%M%S')}.tar.gz")
    try:
        manifest = collect_diagnostics(_target(ctx, host), output, config_path=config_path)
    except HotsiteError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps({**manifest, "bundle": str(output)}, indent=2))
        return
    for step in manifest["steps"]:
        mark = "ok" if step["exit_code"] == 0 else f"exit {step['exit_code']}"
        click.echo(f"  {mark:<8} {step['name']}")
    click.echo(f"bundle: {output}")


@remote.command("push-config")
@click.argument("host")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dest", default="/etc/hotsite/hotsite.toml", show_default=True)
@click.option("--no-reload", is_flag=True, help="Install it but do not ask the daemon to reload.")
@yes_option
@click.pass_context
def push_config_cmd(ctx: click.Context, host: str, file: Path, dest: str, no_reload: bool, yes: bool) -> None:
    """Check FILE with `hotsite config check` on HOST, then install it and reload the daemon.

    Nothing changes on HOST when the check fails; its problems are listed (exit 2).
    """
    reload_text = "" if no_reload else " and reload its daemon"
    confirm(f"Replace {dest} on {host} with {file}{reload_text}?", yes)
    from provisioning.remote import push_config

    try:
        result = push_config(_target(ctx, host), file.read_bytes(), dest=dest, reload=not no_reload)
    except HotsiteError as exc:
        fail(exc)
    reloaded = {True: "daemon reloaded", False: "daemon not running: not reloaded", None: "not reloaded"}
    click.echo(
        f"{host}: {dest} installed (previous kept as {result['backup']}); {reloaded[result['reloaded']]}"
    )


@remote.command("rotate-credentials")
@click.option("--appliance", required=True, help="The backup site's appliance (replication client).")
@click.option("--source", "source_host", required=True, help="The primary's source agent host.")
@click.option(
    "--ca-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory with the replication CA's ca.pem and ca.key.",
)
@click.option("--client-name", default="backup-appliance", show_default=True)
@click.option("--server-name", default="primary-source", show_default=True)
@click.option(
    "--server-host", "server_hosts", multiple=True, help="Names/addresses in the source's certificate."
)
@click.option("--json", "as_json", is_flag=True)
@yes_option
@click.pass_context
def rotate_credentials(
    ctx: click.Context,
    appliance: str,
    source_host: str,
    ca_dir: Path,
    client_name: str,
    server_name: str,
    server_hosts: tuple[str, ...],
    as_json: bool,
    yes: bool,
) -> None:
    """Issue and install new replication certificates at both ends, then restart/reload them."""
    confirm(
        f"Replace the replication certificates on {appliance} and {source_host}?"
        " The replication link restarts with the new ones.",
        yes,
    )
    from provisioning.remote import rotate_replication_credentials

    try:
        result = rotate_replication_credentials(
            _target(ctx, appliance),
            _target(ctx, source_host),
            ca_dir,
            client_name=client_name,
            server_name=server_name,
            server_hosts=server_hosts,
        )
    except HotsiteError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for host, what in result.items():
            click.echo(f"{host}: new certificate {what['certificate']}, key {what['key']}")


COMMANDS = (provision, remote)
