"""`hotsite status` as text: etcd leadership and the other appliances' views are shown."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from appliance.cli.render import status_view


def status(coordination: dict[str, Any], lost: list[str]) -> dict[str, Any]:
    return {
        "appliance": {"version": "0.1.0", "name": "dr-east", "uptime_s": 30},
        "failover": {"state": "backup_active", "policy": "auto", "lost_sites": lost},
        "sites": [],
        "trunks": [],
        "coordination": coordination,
    }


def text(doc: dict[str, Any]) -> str:
    console = Console(width=120, record=True, color_system=None)
    console.print(status_view(doc))
    return console.export_text()


def test_a_lone_appliance_shows_no_coordination_line() -> None:
    assert "coordination" not in text(status({"backend": "witness"}, []))


def test_the_leader_its_token_the_lost_sites_and_the_peers_are_shown() -> None:
    out = text(
        status(
            {
                "backend": "etcd", "role": "leader", "token": 41, "domain": "callcentre",
                "peers": [{"appliance": "dr-west", "site": "west", "verdicts": {"primary": "down", "west": "up"},
                           "age_s": 0.4, "fresh": True}],
            },
            ["west"],
        )
    )  # fmt: skip
    assert "coordination: leader (token 41)  domain callcentre  lost backup sites: west" in out
    assert "dr-west" in out and "primary down, west up" in out and "0.4s" in out


def test_an_appliance_cut_from_etcd_says_it_is_not_acting() -> None:
    out = text(
        status({"backend": "etcd", "role": "unknown", "detail": "etcd unreachable", "domain": "d"}, [])
    )
    assert "coordination: NOT ACTING: etcd unreachable" in out
