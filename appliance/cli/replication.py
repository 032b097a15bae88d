"""``hotsite source`` (the agent at the primary) and ``hotsite replication …`` (at the backup).

``source`` runs without a daemon (it *is* the daemon at the primary). The
``replication`` commands are thin clients of the appliance daemon's API,
except ``restore``, which copies a kept snapshot without one.
Exit status: 0 ok, 1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from appliance import logs, timefmt
from appliance.cli.confirm import confirm, yes_option
from appliance.cli.options import echo_error, echo_json, fail
from appliance.errors import ConfigError, HotsiteError


@click.command("source")
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/hotsite/source.toml"),
    show_default=True,
    help="The source agent's config.",
)
@click.option("--check", is_flag=True, help="Validate the config and the served paths, then exit.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def source(config_path: Path, check: bool, log_level: str) -> None:
    """Run the source agent at the primary: serve its database and config files over mutual TLS.

    \b
    Example /etc/hotsite/source.toml:
      [source]
      listen = "0.0.0.0:7450"
      tls_cert_file = "/etc/hotsite/tls/source.pem"
      tls_key_file = "/etc/hotsite/tls/source.key"
      tls_ca_file = "/etc/hotsite/tls/ca.pem"
      allowed_clients = ["backup-appliance"]
      [streams.customers]
      kind = "sqlite"
      path = "/srv/callcentre/customers.db"
      [streams.dialplans]
      kind = "files"
      path = "/etc/asterisk"
    """
    from appliance.config import host_port
    from appliance.replication.settings import load_source_config, served_path_problems
    from appliance.replication.source import ServedStream, SourceAgent
    from appliance.replication.tls import server_context

    try:
        cfg = load_source_config(config_path)
        s = cfg.source
        ctx = server_context(s.tls_cert_file, s.tls_key_file, s.tls_ca_file)
        problems = served_path_problems(cfg)
        if problems:
            raise ConfigError(f"{config_path}: {len(problems)} problem(s)", problems)
    except HotsiteError as exc:
        fail(exc)
        return
    if check:
        click.echo(f"{config_path}: ok ({len(cfg.streams)} streams)")
        return
    logs.setup(log_level)
    host, port = host_port(s.listen)
    from appliance.replication.tls import describe_identity

    agent = SourceAgent(
        [ServedStream(n, st.kind, st.path, tuple(st.exclude)) for n, st in cfg.streams.items()],
        ssl_context=ctx,
        host=host,
        port=port,
        allowed_clients=s.allowed_clients,
        poll_interval_s=s.poll_interval_s,
        heartbeat_s=s.heartbeat_s,
        rescan_s=s.rescan_s,
        watch=s.watch,
        bandwidth_limit_bytes_s=s.bandwidth_limit_bytes_s,
        checkpoint_frames=s.checkpoint_frames,
        restart_frames=s.restart_frames,
        peer_timeout_s=s.peer_timeout_s,
        max_hello_bytes=s.max_hello_bytes,
        checkpoint_busy_ms=s.checkpoint_busy_ms,
    )
    agent.tls_identity = describe_identity(s.tls_cert_file, s.tls_ca_file)
    try:
        asyncio.run(agent.serve_forever())
    except OSError as exc:
        fail(HotsiteError(f"cannot listen on {s.listen}: {exc.strerror}"))
    except KeyboardInterrupt:
        pass


@click.group("replication")
def replication() -> None:
    """Replication of the primary's database and config files to this backup site.

    \b
    Examples:
      hotsite replication status            position, lag, last checksum match per stream
      hotsite replication verify customers  checksum at both ends, same position
      hotsite replication restore customers --at 2026-05-01T08:00 --output /tmp/customers.db
    """


def _ctx() -> Any:
    from appliance.cli.context import Context

    return click.get_current_context().find_object(Context)


def _call(method: str, **params: Any) -> Any:
    ctx = _ctx()
    if ctx is None:  # used outside the hotsite group (tests): default runtime dir
        from appliance import api
        from appliance.cli.context import DEFAULT_RUNTIME_DIR

        try:
            return api.call(DEFAULT_RUNTIME_DIR, method, params)
        except HotsiteError as exc:
            fail(exc)
    return ctx.call(method, **params)


def _age(ts: float | None) -> str:
    return "-" if ts is None else f"{max(0.0, time.time() - ts):.1f}s ago"


def _seeding(result: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Streams whose initial sync is under way: name -> (pages done, pages in all)."""
    out = {}
    for s in result.get("streams", []):
        done, total = (list(s.get("seed_progress") or [0, 0]) + [0, 0])[:2]
        if total and done < total:
            out[str(s["name"])] = (int(done), int(total))
    return out


SHOW_BAR_AFTER_S = 2.0


def follow_seed(
    fetch: Any, first: dict[str, Any], *, terminal: bool, interval: float = 0.5, plain_every: float = 2.0
) -> dict[str, Any]:
    """Follow an initial sync until it ends; returns the last status.

    On a terminal: nothing for the first ``SHOW_BAR_AFTER_S`` seconds (a
    short sync needs no bar), then a rich progress bar per stream. Off a
    terminal (a log, a pipe): one plain line per stream every
    ``plain_every`` seconds, which a log keeps readably.
    """
    result = first
    started = time.monotonic()
    while _seeding(result) and time.monotonic() - started < SHOW_BAR_AFTER_S and terminal:
        time.sleep(interval)
        result = fetch()
    if not _seeding(result):
        return result
    if not terminal:
        while seeding := _seeding(result):
            for name, (done, total) in seeding.items():
                click.echo(f"{name}: initial sync {done}/{total} pages ({100 * done / total:.0f}%)")
            time.sleep(plain_every)
            result = fetch()
        return result
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pages"),
        TimeRemainingColumn(),
    ) as bar:
        tasks: dict[str, Any] = {}
        while seeding := _seeding(result):
            for name, (done, total) in seeding.items():
                if name not in tasks:
                    tasks[name] = bar.add_task(f"{name} initial sync", total=total)
                bar.update(tasks[name], completed=done, total=total)
            for name, task in tasks.items():
                if name not in seeding:
                    bar.update(task, completed=bar.tasks[task].total)
            time.sleep(interval)
            result = fetch()
        for task in tasks.values():
            bar.update(task, completed=bar.tasks[task].total)
    return result


@replication.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--follow/--no-follow",
    default=None,
    help="Follow an initial sync to its end [default: on a terminal, yes].",
)
def status_cmd(as_json: bool, follow: bool | None) -> None:
    """Per stream: position, lag (seconds, bytes), last checksum match, link state.

    During an initial sync, on a terminal, a progress bar (after 2 s) until it ends;
    off a terminal with --follow, a plain progress line per stream every 2 s.
    """
    result = _call("replication.status")
    if as_json:
        echo_json(result)
        return
    terminal = sys.stdout.isatty()
    if (terminal if follow is None else follow) and _seeding(result):
        result = follow_seed(lambda: _call("replication.status"), result, terminal=terminal)
    for s in result["streams"]:
        lag = "-" if s.get("lag_s") is None else f"{s['lag_s']:.3f}s"
        line = (
            f"{s['name']:<14} {s['kind']:<6} {_link_word(s):<5} lag {lag:>9}"
            f" {s.get('lag_bytes', 0):>9}B  pos {s.get('position') or '-'}"
        )
        if s.get("over_budget"):
            line += f"  OVER BUDGET ({s['rpo_budget_s']}s)"
        click.echo(line)
        verify = s.get("last_verify") or {}
        if verify:
            click.echo(
                f"{'':<14} last verify: {'match' if verify.get('ok') else 'MISMATCH'}"
                f" {_age(verify.get('at'))}"
            )
        if s.get("damaged") and not s.get("promoted"):
            click.echo(f"{'':<14} DAMAGED at rest (not promotable without --force-damaged): {s['damaged']}")
        if s.get("promoted"):
            click.echo(f"{'':<14} PROMOTED: {json.dumps(s['promoted'])}")
        if s.get("seed_progress") and s["seed_progress"][1] and s["seed_progress"][0] < s["seed_progress"][1]:
            done, total = s["seed_progress"]
            width = 30
            filled = int(width * done / total)
            click.echo(f"{'':<14} initial sync [{'#' * filled}{'.' * (width - filled)}] {done}/{total} pages")
        if s.get("last_error") and not s.get("damaged"):
            click.echo(f"{'':<14} error: {s['last_error']}")
    if not result["streams"]:
        click.echo("no replication streams configured")


@replication.command("verify")
@click.argument("stream")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--timeout",
    type=click.FloatRange(1, 86400),
    default=3600,
    show_default=True,
    help="Give up after this many seconds (hashing a large database takes as long as reading it).",
)
def verify_cmd(stream: str, as_json: bool, timeout: float) -> None:
    """Compute the checksum at both ends at the same position and print both (exit 1 on mismatch).

    Progress (what it waits for, pages hashed) is printed to stderr every few
    seconds while it runs.
    """
    started = time.monotonic()
    while True:
        # Each call waits at most 5 s, well inside the control socket's own timeout.
        result = _call("replication.verify", stream=stream, wait_s=min(5.0, timeout))
        if not (isinstance(result, dict) and result.get("pending")):
            break
        progress = result.get("progress") or {}
        done, total = (list(progress.get("hashed_pages") or []) + [0, 0])[:2]
        pages = f" ({done}/{total} pages, {100 * done / total:.0f}%)" if total else ""
        click.echo(f"{stream}: verify {progress.get('phase', 'running')}{pages}", err=True)
        if time.monotonic() - started > timeout:
            echo_error(f"verify of {stream} did not finish within {timeout:g} s", 1)  # JSON under --json
            sys.exit(1)
    if as_json:
        echo_json(result)
    elif "source_checksum" in result:
        click.echo(f"position {result['position']}")
        click.echo(f"  source  {result['source_checksum']}")
        click.echo(f"  replica {result['replica_checksum']}")
        click.echo("  match" if result["ok"] else "  MISMATCH")
    else:
        click.echo(result.get("error", "verify failed"))
    if not result.get("ok"):
        sys.exit(1)


@replication.command("restore")
@click.argument("stream")
@click.option(
    "--at",
    "at",
    required=True,
    help="ISO 8601 (UTC unless it has a zone, or with --local), a Unix time, or an age (2h):"
    " the newest snapshot at or before it.",
)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--snapshots",
    type=click.Path(file_okay=False, path_type=Path),
    help="Snapshot directory [default: from the daemon, or <replica>.hotsite/snapshots].",
)
def restore_cmd(stream: str, at: str, output: Path, snapshots: Path | None) -> None:
    """Point-in-time restore: copy the newest kept snapshot taken at or before --at to --output."""
    from appliance.replication.snapshots import SnapshotStore

    try:
        when = timefmt.parse_when(at, time.time(), allow_epoch=True)
    except ValueError as exc:
        click.echo(f"hotsite: error: --at {at!r}: {exc}", err=True)
        sys.exit(2)
    if snapshots is None:
        result = _call("replication.snapshots", stream=stream)
        snapshots = Path(result["directory"])
    try:
        snap = SnapshotStore(snapshots).restore(when, output)
    except HotsiteError as exc:
        fail(exc)
        return
    click.echo(
        f"restored {output} from snapshot of {timefmt.stamp(snap.taken_at)} (position {snap.position})"
    )


@replication.command("promote")
@click.argument("stream")
@click.option("--reason", default="operator", show_default=True)
@click.option(
    "--force-damaged",
    is_flag=True,
    help="Promote even a replica that failed its check at rest (it is then not a committed state).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@yes_option
def promote_cmd(stream: str, reason: str, force_damaged: bool, as_json: bool, yes: bool) -> None:
    """Stop applying, record the final position and the data-loss window; the replica becomes writable.

    Refused (exit 1) for a stream never seeded, and for a replica whose file
    differs from the state recorded when it was last verified, unless
    --force-damaged.
    """
    confirm(
        f"Promote {stream}? Replication stops and the backup's copy becomes writable;"
        " what the primary wrote since the last applied change is lost.",
        yes,
    )
    params: dict[str, Any] = {"stream": stream, "reason": reason}
    if force_damaged:
        params["force_damaged"] = True
    result = _call("replication.promote", **params)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    window = result.get("data_loss_window_s")
    click.echo(f"{stream}: promoted; writable copy {result['path']}")
    click.echo(
        f"  final position {result.get('position')}, data-loss window "
        f"{'unknown' if window is None else f'{window:.3f}s'}"
    )
    if result.get("damaged"):
        click.echo(
            f"  DAMAGED COPY handed out: {result['path']} is not a state the primary committed."
            f" {result['damaged']}. Its checksum is {result.get('checksum')}; the last verified state"
            f" (position {result.get('position')}) had {result.get('recorded_checksum') or 'no record'}."
        )


@replication.command("demote")
@click.argument("stream")
@click.option("--discard-local-writes", is_flag=True, help="Drop writes made at the backup since promotion.")
@yes_option
def demote_cmd(stream: str, discard_local_writes: bool, yes: bool) -> None:
    """Resume replication into a promoted replica (refused if the backup wrote to it, unless told).

    The replica must still have exactly the checksum recorded at promotion.
    With --discard-local-writes the backup's copy is first saved as a named
    restore point in the snapshot directory, then resynced from the source.
    """
    if discard_local_writes:
        confirm(f"Demote {stream} and DISCARD every write made at the backup since its promotion?", yes)
    result = _call("replication.demote", stream=stream, discard_local_writes=discard_local_writes)
    saved = (result or {}).get("saved_local_copy") if isinstance(result, dict) else None
    if saved:
        click.echo(f"{stream}: the backup's copy was saved to {saved}")
    click.echo(f"{stream}: replication resumed")


@click.group()
def _standalone() -> None:
    """For running these commands without the hotsite group (tests, debugging)."""


_standalone.add_command(source)
_standalone.add_command(replication)

if __name__ == "__main__":
    _standalone()


def _link_word(stream: dict[str, Any]) -> str:
    """The stream's link as status prints it: up, quiet (connected, the source silent), DOWN."""
    link = stream.get("link") or ("up" if stream.get("connected") else "down")
    return "DOWN" if link == "down" else link
