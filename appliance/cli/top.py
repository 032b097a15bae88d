"""``hotsite top``: the technician's live view at the rack, fit for an 80x24 serial console.

One screen: both sites, every trunk with an RTT sparkline, the failover engine's state and
what it waits for, replication lag against its budget, open incidents and who is on call.
Keys: ``a`` acknowledges the oldest open incident, ``d`` then ``y`` starts a drill, ``q``
quits. When stdout is not a terminal it prints one plain-text snapshot and exits (or one
per interval with ``--watch``), so ``hotsite top | mail`` and serial-console logs work.

Everything shown comes from the daemon's API (``status``, ``incidents``, ``oncall``,
``replication.status``); the RTT history for the sparklines is kept here, one point per
refresh, because the daemon keeps only the last probe per target. The rendering is a pure
function of a snapshot, the history and the width, tested without a terminal.

Register with ``cli.add_command(top)`` (``appliance.cli.main``).
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import click
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from appliance import api, timefmt
from appliance.cli.options import echo_json
from appliance.errors import HotsiteError

Fetch = Callable[..., Any]  # fetch(method, **params) -> result; raises HotsiteError
SPARK = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-~=*#@"
HISTORY = 24  # sparkline points kept per trunk (one per refresh)
STYLE = {
    "up": "bold green",
    "down": "bold red",
    "degraded": "bold yellow",
    "unknown": "yellow",
    "open": "bold red",
    "acked": "yellow",
    "critical": "bold red",
    "error": "red",
    "warning": "yellow",
}
CALM_STATES = ("primary_active",)


# -- data --------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What one refresh read from the daemon; a part that failed is None with its error kept."""

    at: float
    status: dict[str, Any] | None = None
    incidents: dict[str, Any] | None = None
    oncall: dict[str, Any] | None = None
    replication: list[dict[str, Any]] | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "status": self.status,
            "incidents": self.incidents,
            "oncall": self.oncall,
            "replication": self.replication,
            "errors": self.errors,
        }


def gather(fetch: Fetch, now: float) -> Snapshot:
    """Read every part; one failing part (paging not configured, replication starting) is shown
    as such instead of blanking the screen. Only the status is required."""
    snap = Snapshot(at=now)
    for attr, method, params in (
        ("status", "status", {"events": 0}),
        ("incidents", "incidents", {"limit": 0}),
        ("oncall", "oncall", {}),
        ("replication", "replication.status", {}),
    ):
        try:
            result = fetch(method, **params)
        except HotsiteError as exc:
            snap.errors[attr] = exc.message
            continue
        if attr == "replication":  # {"streams": [...], "source_agent": ..., "at": ...}
            result = result.get("streams", []) if isinstance(result, dict) else None
        setattr(snap, attr, result)
    return snap


class RttHistory:
    """Per-trunk RTT points (ms, or None for a refresh without an answer), newest last."""

    def __init__(self, size: int = HISTORY) -> None:
        self.size = size
        self.points: dict[str, deque[float | None]] = {}

    def add(self, snap: Snapshot) -> None:
        for trunk in (snap.status or {}).get("trunks", []):
            rtt = trunk.get("rtt_ms") if trunk.get("state") == "up" else None
            self.points.setdefault(trunk["name"], deque(maxlen=self.size)).append(rtt)

    def of(self, name: str) -> list[float | None]:
        return list(self.points.get(name, ()))


def sparkline(values: Sequence[float | None], width: int, *, ascii_only: bool = False) -> str:
    """The last ``width`` values as block characters scaled to their own min..max; a gap for None."""
    chars = SPARK_ASCII if ascii_only else SPARK
    values = list(values)[-width:]
    known = [v for v in values if v is not None]
    if not known:
        return " " * len(values)
    low, high = min(known), max(known)
    span = high - low
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif span <= 0:
            out.append(chars[len(chars) // 2 - 1])
        else:
            out.append(chars[min(len(chars) - 1, int((v - low) / span * len(chars)))])
    return "".join(out)


# -- rendering (pure) -----------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _styled(value: str) -> Text:
    return Text(
        value.upper() if value in ("up", "down", "degraded", "unknown") else value, style=STYLE.get(value, "")
    )


def _table(*columns: str, widths: dict[str, int] | None = None) -> Table:
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold", pad_edge=False)
    for c in columns:
        width = (widths or {}).get(c)
        table.add_column(c, no_wrap=True, overflow="ellipsis", max_width=width, min_width=None)
    return table


def view(
    snap: Snapshot, history: RttHistory, *, width: int = 80, message: str = "", keys: bool = True
) -> Group:
    """The whole screen as rich renderables: header, sites, trunks, replication, incidents, on call."""
    parts: list[RenderableType] = []
    status = snap.status or {}
    appliance = status.get("appliance", {})
    failover = status.get("failover", {})
    clock = timefmt.clock(snap.at)  # labelled: UTC unless --local
    state = failover.get("state", "?")
    parts.append(
        Text.assemble(
            ("hotsite top ", "bold"),
            f"{appliance.get('name', '?')} {clock}  ",
            ("failover ", "bold"),
            (state, "bold green" if state in CALM_STATES else "bold red"),
            f" {_age(failover.get('since_s'))}, routing {failover.get('routing', '?')},"
            f" epoch {failover.get('epoch', '?')}",
            overflow="ellipsis",
            no_wrap=True,
        )
    )
    waiting = failover.get("waiting_for") or ""
    detail = f"waiting for: {waiting}" if waiting else f"last: {failover.get('last_decision') or '-'}"
    witness = failover.get("witness") or {}
    alive = witness.get("primary_alive")
    vote = "sees primary" if alive else "primary lost" if alive is False else "no vote"
    parts.append(
        Text(
            f"{detail}; witness: {vote}",
            overflow="ellipsis",
            no_wrap=True,
        )
    )
    if snap.errors.get("status"):
        parts.append(Text(f"daemon: {snap.errors['status']}", style="bold red"))

    sites = _table("site", "role", "verdict", "since", "calls", "why", widths={"why": max(10, width - 48)})
    for s in status.get("sites", []):
        sites.add_row(
            s["name"],
            s.get("role", ""),
            _styled(s.get("verdict", "unknown")),
            _age(s.get("verdict_since_s")),
            "-" if s.get("calls_in_progress") is None else str(s["calls_in_progress"]),
            "; ".join(s.get("why") or []) or "",
        )
    parts.append(sites)

    ascii_only = not _unicode_ok()
    spark_width = max(8, min(HISTORY, width - 56))
    trunks = _table("trunk", "state", "RTT ms", "history", "code", "calls", "why", widths={"why": 14})
    for t in status.get("trunks", []):
        rtt = t.get("rtt_ms")
        trunks.add_row(
            t["name"],
            _styled(t.get("state", "unknown")),
            "-" if rtt is None else f"{rtt:.1f}",
            Text(sparkline(history.of(t["name"]), spark_width, ascii_only=ascii_only), style="cyan"),
            "-" if t.get("last_code") is None else str(t["last_code"]),
            "-" if t.get("calls_in_progress") is None else str(t["calls_in_progress"]),
            (t.get("last_result") or t.get("reason") or "") if t.get("state") != "up" else "",
        )
    parts.append(trunks)

    if snap.replication:
        repl = _table("stream", "lag s", "budget s", "link", "mode", "txns", "error", widths={"error": 24})
        for r in snap.replication:
            lag = r.get("lag_s")
            promoted = bool(r.get("promoted"))
            repl.add_row(
                r["name"],
                Text(
                    "-" if promoted else "?" if lag is None else f"{lag:.1f}",
                    style="bold red" if r.get("over_budget") and not promoted else "green",
                ),
                f"{r.get('rpo_budget_s', 0):g}",
                Text("PROMOTED", style="bold yellow") if promoted else _link(r),
                str(r.get("mode") or "-"),
                str(r.get("transactions", "-")),
                r.get("last_error") or "",
            )
        parts.append(repl)
        line, style = loss_window(snap.replication)
        parts.append(Text(line, style=style, no_wrap=True, overflow="ellipsis"))
    elif "replication" in snap.errors:
        parts.append(Text(f"replication: {snap.errors['replication']}", style="yellow", no_wrap=True))
    else:
        parts.append(Text("replication: no streams configured", style="dim"))

    active = (snap.incidents or {}).get("active", [])
    if active:
        inc = _table("#", "code", "sev", "status", "age", "summary", widths={"summary": max(20, width - 40)})
        for i in active[:4]:
            inc.add_row(
                str(i["id"]),
                i.get("short_code", ""),
                _styled(i.get("severity", "")),
                _styled(i.get("status", "")),
                _age(snap.at - i["opened_at"]) if i.get("opened_at") else "-",
                i.get("summary", ""),
            )
        parts.append(inc)
        if len(active) > 4:
            parts.append(Text(f"… and {len(active) - 4} more (hotsite incidents)", style="dim"))
    elif "incidents" in snap.errors:
        parts.append(Text(f"incidents: {snap.errors['incidents']}", style="yellow", no_wrap=True))
    else:
        parts.append(Text("no open incidents", style="green"))

    parts.append(Text(_oncall_line(snap), no_wrap=True, overflow="ellipsis"))
    if keys:
        parts.append(
            Text.assemble(
                ("a", "bold reverse"),
                " ack oldest open  ",
                ("d", "bold reverse"),
                " drill  ",
                ("q", "bold reverse"),
                " quit",
            )
        )
    if message:
        parts.append(Text(message, style="bold yellow", no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


def _link(stream: dict[str, Any]) -> Text:
    """UP, DOWN, or ``QUIET 6s``: connected, but nothing heard from the source for that long."""
    link = stream.get("link") or ("up" if stream.get("connected") else "down")
    if link == "quiet":
        return Text(f"QUIET {stream.get('silent_s') or 0:.0f}s", style="bold yellow")
    return _styled(link)


def loss_window(streams: list[dict[str, Any]]) -> tuple[str, str]:
    """One line on the data-loss window: what a promotion would lose now, or what it did lose.

    A stream's lag *is* that window: the time since the replica last knew it held the primary's
    newest commit (``appliance/replication/promotion.py``), so it grows while the link is down.
    Once the database was promoted (failover), the window recorded at that moment is shown.
    """
    said = []
    for r in streams:
        promotion = r.get("promoted")
        if promotion:
            at = timefmt.clock(promotion["at"]) if promotion.get("at") else "?"
            lost = _seconds(promotion.get("data_loss_window_s"))
            said.append(f"{r['name']} {lost} at promotion {at}")
        else:
            said.append(f"{r['name']} {_seconds(r.get('lag_s'))}")
    if any(r.get("promoted") for r in streams):
        return "data-loss window: " + ", ".join(said), "bold yellow"
    late = any(r.get("over_budget") for r in streams)
    return "data-loss window (a takeover now would lose): " + ", ".join(said), "bold red" if late else "dim"


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}s"


def _oncall_line(snap: Snapshot) -> str:
    if snap.oncall is None:
        return f"on call: {snap.errors.get('oncall', 'unknown')}"
    rotations = snap.oncall.get("rotations", [])
    if not rotations:
        return "on call: no rotations configured"
    return "on call: " + "; ".join(f"{r['rotation']}: {r.get('on_call') or 'nobody'}" for r in rotations)


def _unicode_ok() -> bool:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower()
    return "utf" in encoding


def plain(snap: Snapshot, history: RttHistory, width: int = 80) -> str:
    """The screen as plain text (no colour, no cursor movement), for pipes and logs."""
    console = Console(
        width=width,
        no_color=True,
        highlight=False,
        force_terminal=False,
        color_system=None,
        file=io.StringIO(),
        record=True,
        legacy_windows=False,
    )
    console.print(view(snap, history, width=width, keys=False))
    # Tables pad every cell to the column width; into a pipe or a log that is only noise.
    return "".join(line.rstrip() + "\n" for line in console.export_text(styles=False).splitlines())


# -- keys and actions -----------------------------------------------------------------------


def oldest_open(snap: Snapshot) -> dict[str, Any] | None:
    active = [i for i in (snap.incidents or {}).get("active", []) if i.get("status") == "open"]
    return min(active, key=lambda i: i["id"]) if active else None


class Keys:
    """Single keypresses from a terminal, without echo or Enter (cbreak), restored on exit.

    ``read(timeout)`` returns one character or None; it never blocks longer than ``timeout``.
    On a non-terminal stdin it returns None after the timeout.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.fd = stream.fileno() if stream.isatty() else None
        self._saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        if self.fd is not None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self, timeout: float) -> str | None:
        if self.fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(self.fd, 1)
        return data.decode(errors="replace") if data else None


class Screen:
    """The live loop's state: the last snapshot, the history, a pending confirmation, a message."""

    def __init__(self, fetch: Fetch, clock: Callable[[], float] = time.time) -> None:
        self.fetch = fetch
        self.clock = clock
        self.history = RttHistory()
        self.snap = Snapshot(at=clock())
        self.message = ""
        self.confirm: str | None = None

    def refresh(self) -> None:
        self.snap = gather(self.fetch, self.clock())
        self.history.add(self.snap)

    def key(self, key: str) -> bool:
        """Handle one key; False means quit."""
        if self.confirm == "drill":
            self.confirm = None
            if key in ("y", "Y"):
                self.message = self._act("drill", "drill")
            else:
                self.message = "drill not started"
            return True
        if key in ("q", "Q", "\x03", "\x04"):
            return False
        if key == "a":
            incident = oldest_open(self.snap)
            if incident is None:
                self.message = "no open incident to acknowledge"
            else:
                result = self._act("ack", "ack", id=str(incident["id"]))
                self.message = result if result.startswith("error") else f"acknowledged #{incident['id']}"
            self.refresh()
        elif key == "d":
            self.confirm = "drill"
            self.message = "start a drill (checks the backup path)? y to confirm"
        return True

    def _act(self, what: str, method: str, **params: Any) -> str:
        try:
            result = self.fetch(method, **params)
        except HotsiteError as exc:
            return f"error: {what}: {exc.message}"
        if isinstance(result, dict) and "decision" in result:
            return f"{what}: {result['decision']}"
        return f"{what}: done"


def _fetcher(timeout: float = api.CLIENT_TIMEOUT_S) -> Fetch:
    ctx = click.get_current_context().find_root().obj

    def fetch(method: str, **params: Any) -> Any:
        return api.call(ctx.runtime_dir, method, params, timeout=timeout)

    return fetch


@contextlib.contextmanager
def _live(console: Console) -> Iterator[Any]:
    from rich.live import Live

    with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
        yield live


def run_live(screen: Screen, console: Console, interval: float, keys: Keys) -> None:
    with keys, _live(console) as live:
        next_refresh = 0.0
        while True:
            now = time.monotonic()
            if now >= next_refresh:
                screen.refresh()
                next_refresh = now + interval
            live.update(
                view(screen.snap, screen.history, width=console.width, message=screen.message), refresh=True
            )
            key = keys.read(min(0.25, max(0.0, next_refresh - time.monotonic())))
            if key is not None and not screen.key(key):
                return


@click.command("top")
@click.option(
    "--interval",
    "-i",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.2, 60),
    help="Seconds between refreshes.",
)
@click.option(
    "--watch", is_flag=True, help="Not on a terminal: print a snapshot every interval until stopped."
)
@click.option(
    "--width",
    default=80,
    show_default=True,
    type=click.IntRange(60, 400),
    help="Columns of the plain-text snapshot.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON for scripts.")
def top(interval: float, watch: bool, width: int, as_json: bool) -> None:
    """A live view of both sites, trunks, failover, replication, incidents and on-call.

    Keys on a terminal: a acknowledges the oldest open incident, d then y starts a drill
    (checks the backup path; routing does not move), q quits. Not on a terminal: one
    plain-text snapshot (80 columns), or one per --interval with --watch.

    \b
    Examples:
      hotsite top                      full screen, refreshed every second
      hotsite top | cat                one plain snapshot
      hotsite top --watch -i 10 >> /var/log/hotsite-top.log
      hotsite top --json | jq .status.failover
    """
    fetch = _fetcher()
    if as_json:
        snap = gather(fetch, time.time())
        if snap.status is None:
            _die(snap)
        echo_json(snap.to_json())
        return
    console = Console(highlight=False)
    if console.is_terminal and sys.stdin.isatty():
        with contextlib.suppress(KeyboardInterrupt):
            run_live(Screen(fetch), console, interval, Keys(sys.stdin))
        return
    history = RttHistory()
    while True:
        snap = gather(fetch, time.time())
        history.add(snap)
        if snap.status is None and not watch:
            _die(snap)
        click.echo(plain(snap, history, width), nl=False)
        if not watch:
            return
        click.echo("")
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


def _die(snap: Snapshot) -> None:
    click.echo(f"hotsite: error: {snap.errors.get('status', 'no answer')}", err=True)
    sys.exit(1)
