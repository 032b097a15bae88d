"""``hotsite lab``: the one-machine lab of network namespaces, and the demo on top of it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from appliance import api
from appliance.errors import HotsiteError

DEFAULT_WORKDIR = Path("/run/hotsite-lab")


def _lab(workdir: Path) -> Any:
    from provisioning.lab import Lab

    return Lab(workdir)


def _lab_errors() -> tuple[type[BaseException], ...]:
    from provisioning.lab import LabError

    return (LabError,)


def _die(message: str, code: int = 1) -> None:
    click.echo(f"hotsite: error: {message}", err=True)
    sys.exit(code)


workdir_option = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="Where the lab keeps its generated files, logs and state.",
)


@click.group()
def lab() -> None:
    """The one-machine lab: primary, backup, carrier edge and witness as namespaces.

    \b
    Examples:
      hotsite lab up && hotsite lab status
      hotsite lab impair trunk-a --cut     # pull trunk-a's cable
      hotsite lab impair trunk-a --reject-invites 503   # OPTIONS fine, calls fail
      hotsite lab heal trunk-a
      hotsite lab down                     # removes everything, even after a crash
    """


@lab.command()
@workdir_option
@click.option(
    "--mode",
    type=click.Choice(["auto", "netns", "loopback"]),
    default="auto",
    show_default=True,
    help="netns needs root; loopback runs every host on its own 127.77.0.x address.",
)
@click.option("--metrics-listen", default="127.0.0.1:9477", show_default=True)
@click.option(
    "--with-replication",
    is_flag=True,
    help="The primary also runs `hotsite source` (a CRM database with a writer, dialplans);"
    " the daemon's config replicates them (the demo turns this on).",
)
def up(workdir: Path, mode: str, metrics_listen: str, with_replication: bool) -> None:
    """Bring the lab up and write the daemon's config for it."""
    info = _up(workdir, mode, metrics_listen, replication=with_replication)
    click.echo(f"lab up ({info['mode']} mode); daemon config: {workdir / 'hotsite.toml'}")
    for skipped in info.get("skipped", []):
        click.echo(f"skipped: {skipped}")


def _up(workdir: Path, mode: str, metrics_listen: str, *, replication: bool = False) -> dict[str, Any]:
    from rich.console import Console

    from provisioning.lab import config as lab_config

    the_lab = _lab(workdir)
    # A spinner on a terminal (bringing the lab up takes seconds); nothing in a log.
    try:
        what = "namespaces, Kamailio, SIPp, witness" + (", source agent" if replication else "")
        with Console(stderr=True).status(f"bringing the lab up: {what}..."):
            info = the_lab.up(mode=mode, replication=replication)
        with Console(stderr=True).status("waiting for every host to answer..."):
            the_lab.wait_ready()
    except _lab_errors() as exc:
        with contextlib.suppress(Exception):
            the_lab.down()
        _die(str(exc))
    (workdir / "hotsite.toml").write_text(lab_config.render(info, metrics_listen=metrics_listen))
    return dict(info)


@lab.command()
@workdir_option
def down(workdir: Path) -> None:
    """Remove every namespace, process and file the lab made."""
    for line in _down(workdir):
        click.echo(line)
    click.echo("lab down")


# What `lab up` and the demo add to the lab's workdir beside the lab's own files.
DAEMON_FILES = (
    "hotsite.toml", "hotsite-daemon.log", "state", "run", "dispatcher.list.token",
    "modem.log", "modem.device", "modem.sock", "sms.log",  # the demo's modem (lab/modem_link.py)
    "replica",  # the replicas of `lab up --with-replication` (lab/config.py REPLICA_DIR)
)  # fmt: skip


def _down(workdir: Path) -> list[str]:
    try:
        removed = list(_lab(workdir).down())
    except _lab_errors() as exc:
        _die(str(exc))
    for name in DAEMON_FILES:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(f"removed {path}")
    with contextlib.suppress(OSError):
        workdir.rmdir()  # only if empty: never remove what we did not make
    return removed


@lab.command("status")
@workdir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts and tests.")
def lab_status(workdir: Path, as_json: bool) -> None:
    """Every lab host with its namespace, addresses, ports and processes."""
    info = _lab(workdir).status()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        sys.exit(0 if info else 1)
    if not info:
        _die("the lab is not up ('hotsite lab up' starts it)")
    click.echo(f"mode {info['mode']}, workdir {info['workdir']}, Kamailio RPC {info['kamailio']['rpc_url']}")
    for host in info["hosts"]:
        procs = ", ".join(
            f"{p['name']}[{p['pid']}]{'' if p['alive'] else ' DEAD'}" for p in host["processes"]
        )
        ports = ", ".join(f"{k} {v}" for k, v in host["ports"].items())
        click.echo(
            f"  {host['name']:<9} {host['namespace'] or '-':<16} {host['address']:<12} {ports:<20} {procs}"
        )
    for skipped in info.get("skipped", []):
        click.echo(f"skipped: {skipped}")


@lab.command("sms")
@workdir_option
@click.option("--from", "sender", required=True, metavar="NUMBER", help="The phone the text comes from.")
@click.argument("text")
def sms(workdir: Path, sender: str, text: str) -> None:
    """Reply to a page by SMS: TEXT reaches the demo's modem as if NUMBER's phone sent it.

    \b
    Example (the on-call engineer acknowledges incident 7's page):
      hotsite lab sms --from +8613800138000 "ACK 7"
    """
    from provisioning.lab import modem_link

    try:
        modem_link.send_sms(workdir, sender, text)
    except modem_link.ModemLinkError as exc:
        _die(str(exc))
    click.echo(f"texted {text!r} from {sender} to the demo's modem")


@lab.command()
@workdir_option
@click.argument("host")
@click.option("--loss", "loss_pct", type=click.FloatRange(0, 100), help="Packet loss in percent.")
@click.option("--delay", "delay_ms", type=click.FloatRange(0, 60000), help="Added delay in ms.")
@click.option("--cut", is_flag=True, help="Cut the host's link entirely.")
@click.option(
    "--reject-invites",
    "reject_invites",
    type=click.IntRange(400, 699),
    help="Reject every INVITE with this code (e.g. 503); OPTIONS still answered.",
)
@click.option("--no-media", is_flag=True, help="Answer calls but send no RTP back.")
@click.option(
    "--one-way",
    "one_way",
    is_flag=True,
    help="Answer calls, play a prompt to the caller, never echo the caller's RTP (one-way audio).",
)
def impair(
    workdir: Path,
    host: str,
    loss_pct: float | None,
    delay_ms: float | None,
    cut: bool,
    reject_invites: int | None,
    no_media: bool,
    one_way: bool,
) -> None:
    """Degrade HOST: its link (loss, delay, cut) or its calls (rejected, no media, one-way audio)."""
    calls = reject_invites is not None or no_media or one_way
    if loss_pct is None and delay_ms is None and not cut and not calls:
        raise click.UsageError("give --loss, --delay, --cut, --reject-invites, --no-media or --one-way")
    try:
        click.echo(
            _lab(workdir).impair(
                host,
                loss_pct=loss_pct,
                delay_ms=delay_ms,
                cut=cut,
                reject_invites=reject_invites,
                no_media=no_media,
                one_way=one_way,
            )
        )
    except _lab_errors() as exc:
        _die(str(exc))


@lab.command()
@workdir_option
@click.argument("host")
@click.option("--reason", default="ACD down: no agents can take calls", show_default=True)
def degrade(workdir: Path, host: str, reason: str) -> None:
    """A grey failure: HOST's health endpoint says it cannot serve; its SBC still answers."""
    try:
        click.echo(_lab(workdir).degrade(host, reason))
    except _lab_errors() as exc:
        _die(str(exc))


@lab.command()
@workdir_option
@click.argument("host")
@click.option("--from", "peer", default="appliance", show_default=True, help="The one peer cut off.")
def partition(workdir: Path, host: str, peer: str) -> None:
    """Cut only the path between HOST and one peer; everyone else still reaches HOST."""
    try:
        click.echo(_lab(workdir).partition(host, peer))
    except _lab_errors() as exc:
        _die(str(exc))


@lab.command()
@workdir_option
@click.argument("host")
def heal(workdir: Path, host: str) -> None:
    """Remove every impairment from HOST: link, loss, partition, grey failure."""
    try:
        click.echo(_lab(workdir).heal(host))
    except _lab_errors() as exc:
        _die(str(exc))


@lab.command()
@workdir_option
@click.option("--mode", type=click.Choice(["auto", "netns", "loopback"]), default="auto", show_default=True)
@click.option("--metrics-listen", default="127.0.0.1:9477", show_default=True)
def demo(workdir: Path, mode: str, metrics_listen: str) -> None:
    """Lab up, a GSM modem for paging, the daemon, and `hotsite top` live until Ctrl-C; then all down.

    The primary runs `hotsite source` and a writer changing its CRM database; the daemon
    replicates it and the dialplans (`lab up --with-replication`).
    """
    from provisioning.lab import config as lab_config

    info = _up(workdir, mode, metrics_listen, replication=True)
    runtime_dir = workdir / "run"
    log_path = workdir / "hotsite-daemon.log"
    modem = _start_modem(workdir)
    if modem is not None:
        config = workdir / "hotsite.toml"
        config.write_text(config.read_text() + lab_config.paging(_wait_for_modem(workdir, modem)))
    daemon = _start_daemon(workdir / "hotsite.toml", log_path)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    hint = demo_hint(workdir, runtime_dir, paging=modem is not None)
    try:
        if sys.stdout.isatty():
            _demo_live(runtime_dir, workdir, hint, stop, daemon, log_path)
        else:  # a log or a pipe: one plain line whenever something changed
            click.echo(
                f"Lab up ({info['mode']}). Daemon log: {log_path}. Metrics: http://{metrics_listen}/metrics"
            )
            click.echo(hint)
            last = ""
            while not stop["now"]:
                _check_alive(daemon, log_path)
                line = _plain_line(runtime_dir)
                if line != last:
                    click.echo(f"{time.strftime('%H:%M:%S')} {line}")
                    last = line
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except HotsiteError as exc:
        click.echo(f"hotsite: error: {exc.message}", err=True)
    finally:
        click.echo("stopping the daemon and tearing the lab down...")
        _stop_daemon(daemon)
        if modem is not None:
            _stop_daemon(modem)
        for line in _down(workdir):
            click.echo(line)
        click.echo("lab down")


def demo_hint(workdir: Path, runtime_dir: Path, *, paging: bool) -> str:
    """The five things to try, each with what the viewer should see after it.

    The demo's lab replicates the primary's CRM database (``lab up --with-replication``): at the
    cut the backup promotes its copy and ``top`` shows the data-loss window that promotion had.
    """
    from provisioning.lab import config as lab_config

    lab_args = "" if workdir == DEFAULT_WORKDIR else f" --workdir {workdir}"
    lines = [
        "Try in another terminal (Ctrl-C here tears everything down):",
        f"1 cut      hotsite lab impair{lab_args} primary --cut   -> primary DOWN, calls move to the backup"
        + (", the on-call phone gets an SMS page" if paging else "")
        + ", the crm copy is promoted (data-loss window below)",
    ]
    if paging:
        lines.append(
            f'2 ack      hotsite lab sms{lab_args} --from {lab_config.ON_CALL} "ACK <code>"'
            "   -> the incident is acked (code: incidents below), no escalation"
        )
    lines += [
        f"3 heal     hotsite lab heal{lab_args} primary; hotsite failback --yes --runtime-dir {runtime_dir}"
        "   -> routing back to the primary" + (", a resolve SMS" if paging else ""),
        f"4 degrade  hotsite lab degrade{lab_args} primary"
        "   -> grey failure: hotlines move though the SBC answers",
        f"5 split    hotsite lab partition{lab_args} primary"
        "   -> primary_degraded, no failover: the witness still sees the primary",
    ]
    return "\n".join(lines)


def _demo_live(
    runtime_dir: Path,
    workdir: Path,
    hint: str,
    stop: dict[str, bool],
    daemon: subprocess.Popen[bytes],
    log_path: Path,
) -> None:
    """`hotsite top`'s screen, with the hint above and the modem's SMS log below."""
    from rich.console import Console
    from rich.live import Live

    from appliance.cli import top as top_mod

    def fetch(method: str, **params: Any) -> Any:
        return api.call(runtime_dir, method, params, timeout=2.0)

    console = Console(highlight=False)
    history = top_mod.RttHistory()
    with Live(console=console, screen=True, auto_refresh=False) as live:
        while not stop["now"]:
            _check_alive(daemon, log_path)
            snap = top_mod.gather(fetch, time.time())
            history.add(snap)
            live.update(_demo_view(snap, history, workdir, hint, console.width), refresh=True)
            time.sleep(1.0)


def _demo_view(snap: Any, history: Any, workdir: Path, hint: str, width: int) -> Any:
    from rich.console import Group
    from rich.text import Text

    from appliance.cli import top as top_mod
    from provisioning.lab import modem_link

    tail = modem_link.log_tail(workdir, 6)
    sms = [line if len(line) <= width else line[: width - 1] + "…" for line in tail]  # one screen line each
    return Group(
        Text(hint, style="dim"),
        top_mod.view(snap, history, width=width, keys=False),
        Text("SMS (the demo's GSM modem):", style="bold"),
        Text("\n".join(sms) if sms else "  no text yet", style="cyan"),
    )


def _start_modem(workdir: Path) -> subprocess.Popen[bytes] | None:
    """The GSM modem emulator in its own process, from the source tree (``make demo``); None without it."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "tests" / "support" / "modem_server.py").is_file():
        click.echo("no modem emulator here (tests/support): the demo runs without paging", err=True)
        return None
    log_file = (workdir / "modem.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.modem_server", str(workdir)],
        cwd=root,
        stdout=log_file,
        stderr=log_file,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


def _wait_for_modem(workdir: Path, modem: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    from provisioning.lab import modem_link

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if modem.poll() is not None:
            raise click.ClickException(f"the modem emulator exited; see {workdir / 'modem.log'}")
        with contextlib.suppress(OSError):
            return (workdir / modem_link.DEVICE).read_text()
        time.sleep(0.1)
    raise click.ClickException(f"the modem emulator did not start within {timeout:.0f} s")


def _check_alive(daemon: subprocess.Popen[bytes], log_path: Path) -> None:
    if daemon.poll() is not None:
        raise HotsiteError(f"the daemon exited with status {daemon.returncode}; see {log_path}")


def _plain_line(runtime_dir: Path) -> str:
    try:
        status = api.call(runtime_dir, "status", {"events": 0}, timeout=2.0)
    except HotsiteError as exc:
        return f"waiting for the daemon: {exc.message}"
    sites = " ".join(f"{s['name']}={s['verdict']}" for s in status["sites"])
    trunks = " ".join(f"{t['name']}={t['state']}" for t in status["trunks"])
    line = f"sites: {sites}  trunks: {trunks}"
    try:
        streams = api.call(runtime_dir, "replication.status", {}, timeout=2.0).get("streams", [])
    except HotsiteError:
        return line
    links = " ".join(
        f"{r['name']}={'promoted' if r.get('promoted') else 'up' if r.get('connected') else 'down'}"
        for r in streams
    )
    return f"{line}  replication: {links}" if links else line


def _start_daemon(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log_file = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "--config", str(config_path), "run"],
        stdout=log_file,
        stderr=log_file,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches us, not the daemon: we stop it in order
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _stop_daemon(daemon: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if daemon.poll() is not None:
        return
    daemon.terminate()
    try:
        daemon.wait(timeout)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
