"""Human renderings of API results: tables with colour on a terminal, plain text elsewhere.

Off a terminal :mod:`appliance.cli.table` prints the same renderables as plain
columns; times and ages come from :mod:`appliance.timefmt` (UTC unless ``--local``).
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from appliance import timefmt
from appliance.cli import table as table_out

STATE_STYLE = {"up": "bold green", "down": "bold red", "degraded": "bold yellow", "unknown": "yellow"}


def _state(state: str) -> Text:
    return Text(state.upper(), style=STATE_STYLE.get(state, ""))


def _since(seconds: float | None) -> str:
    """How long a state has held: an age (``12 s``, ``4 min``), never a clock reading."""
    return timefmt.age(seconds)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def status_view(status: dict[str, Any]) -> Group:
    appliance = status["appliance"]
    failover = status["failover"]
    header = Text.assemble(
        ("hotsite ", "bold"),
        f"{appliance['version']} on {appliance['name']}  up {_since(appliance['uptime_s'])}  ",
        ("failover: ", "bold"),
        f"{failover['state']} (policy {failover['policy']})",
    )
    sites = Table(title="Sites", title_justify="left", expand=False)
    for column in ("site", "role", "verdict", "since", "SBC", "SBC RTT ms", "why"):
        sites.add_column(column, overflow="fold")
    for site in status["sites"]:
        sites.add_row(
            site["name"],
            site["role"],
            _state(site["verdict"]),
            _since(site["verdict_since_s"]),
            f"{site['sbc']} {site['state']}",
            _ms(site["rtt_ms"]),
            "; ".join(site["why"]),
        )
    trunks = Table(title="Trunks", title_justify="left", expand=False)
    for column in ("trunk", "address", "state", "since", "RTT ms", "code", "reason"):
        trunks.add_column(column)
    for trunk in status["trunks"]:
        trunks.add_row(
            trunk["name"],
            trunk["address"],
            _state(trunk["state"]),
            _since(trunk["since_s"]),
            _ms(trunk["rtt_ms"]),
            str(trunk["last_code"] or "-"),
            trunk["reason"],
        )
    parts: list[Any] = [header]
    coordination = coordination_line(status.get("coordination") or {}, failover)
    if coordination is not None:
        parts.append(coordination)
    parts += [sites, trunks]
    peers = (status.get("coordination") or {}).get("peers")
    if peers:
        parts.append(peers_table(peers))
    if status.get("events"):
        parts.append(events_table(status["events"], title="Recent events"))
    return Group(*parts)


def coordination_line(coordination: dict[str, Any], failover: dict[str, Any]) -> Text | None:
    """Who may act (etcd leadership) and which backup sites the plan avoids; None for a lone appliance."""
    if coordination.get("backend") != "etcd":
        return None
    role = coordination.get("role", "unknown")
    if role == "leader":
        who = Text(f"leader (token {coordination.get('token')})", style="green")
    elif role == "follower":
        who = Text(f"standby; leader is {coordination.get('holder') or 'nobody yet'}")
    else:
        who = Text(f"NOT ACTING: {coordination.get('detail', 'etcd unreachable')}", style="bold red")
    line = Text.assemble(("coordination: ", "bold"), who, f"  domain {coordination.get('domain', '?')}")
    if failover.get("lost_sites"):
        line.append(f"  lost backup sites: {', '.join(failover['lost_sites'])}", style="yellow")
    return line


def peers_table(peers: list[dict[str, Any]]) -> Table:
    """The other appliances' views of the sites, as this appliance last read them from etcd."""
    table = Table(title="Appliances (etcd views)", title_justify="left", expand=False)
    for column in ("appliance", "at site", "sees", "age"):
        table.add_column(column, overflow="fold")
    for peer in peers:
        sees = ", ".join(f"{site} {verdict}" for site, verdict in sorted(peer["verdicts"].items()))
        age = f"{peer['age_s']:.1f}s" + ("" if peer["fresh"] else " (stale)")
        table.add_row(peer["appliance"], peer["site"], sees, age)
    return table


def events_table(events: list[dict[str, Any]], title: str = "Events") -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("id", "time", "kind", "actor", "message"):
        table.add_column(column, overflow="fold")
    for event in events:
        table.add_row(
            str(event["id"]),
            timefmt.stamp(event["at"]),
            event["kind"],
            event["actor"],
            event["message"],
        )
    return table


def print_status(status: dict[str, Any]) -> None:
    table_out.emit(status_view(status))


def print_events(events: list[dict[str, Any]]) -> None:
    table_out.emit(events_table(events))


def targets_table(targets: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("target", "kind", "address", "state", "since", "RTT ms", "code", "why"):
        table.add_column(column, overflow="fold")
    for t in targets:
        state = _state(t["state"])
        if t.get("pending"):
            state.append(" (damped)", style="dim")
        table.add_row(
            t["target"],
            t["kind"],
            t["address"],
            state,
            _since(t["since_s"]),
            _ms(t["rtt_ms"]),
            str(t["last_code"] or "-"),
            t["reason"],
        )
    return table


def print_targets(targets: list[dict[str, Any]], title: str) -> None:
    table_out.emit(targets_table(targets, title))


def print_trunks(trunks: list[dict[str, Any]]) -> None:
    """The trunks' probe table and, when Kamailio counts their calls, their call KPIs."""
    with_kpis = [t for t in trunks if t.get("kpis")]
    # A degraded trunk answers its probes: its why (the failing calls) says more than its probe's reason.
    shown = [t | {"reason": t["why"]} if t.get("state") == "degraded" and t.get("why") else t for t in trunks]
    tables: list[Table] = [targets_table(shown, "Trunks")]
    if with_kpis:
        tables.append(kpis_table(with_kpis))
    table_out.emit(*tables)


def kpis_table(trunks: list[dict[str, Any]]) -> Table:
    """Real traffic per trunk over the KPI window (monitoring/KPIS.md), counted by Kamailio."""
    window = next((t["kpis"].get("window_s") for t in trunks if t["kpis"].get("window_s")), None)
    title = "Calls" + (f" (Kamailio, last {window:g} s)" if window else " (Kamailio)")
    table = Table(title=title, title_justify="left", expand=False)
    columns = ("trunk", "in use", "attempts", "answered", "ASR", "NER", "PDD ms", "failed", "top", "calls")
    for column in columns:
        table.add_column(column, overflow="fold")
    for t in trunks:
        k = t["kpis"]
        used = "-" if t.get("calls_in_progress") is None else str(t["calls_in_progress"])
        if k.get("channels"):
            used += f"/{k['channels']}"
        failures = k.get("failures") or {}
        top = k.get("top_failure")
        table.add_row(
            t["name"],
            used,
            _count(k.get("attempts")),
            _count(k.get("answered")),
            _pct(k.get("asr_pct")),
            _pct(k.get("ner_pct")),
            _ms(k.get("pdd_avg_ms")),
            " ".join(f"{n} {c}" for c, n in sorted(failures.items())) or "-",
            "-" if top is None else f"{top['code']}:{top['count']}",
            Text("no read") if k.get("error") else _calls(k.get("calls") or "unknown"),
        )
    return table


_CALLS_STATE = {"ok": "up", "failing": "down", "unknown": "unknown"}


def _calls(state: str) -> Text:
    """ok / failing / unknown, coloured like up / down / unknown."""
    return Text(state, style=STATE_STYLE.get(_CALLS_STATE.get(state, "unknown"), ""))


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:g}%"
