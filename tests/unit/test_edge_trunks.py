"""The carrier edge's trunks, as an inventory gives them, to the IP addresses Kamailio counts."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitoring import kpis
from provisioning.lab import kamailio


def test_every_form_an_inventory_may_hold_gives_the_ip() -> None:
    assert kamailio.trunk_ips(["192.0.2.21", "192.0.2.22:5060", {"address": "[2001:db8::1]:5061"}]) == [
        "192.0.2.21",
        "192.0.2.22",
        "2001:db8::1",
    ]
    table = {
        "carrier-a": {"address": "192.0.2.21:5060", "carrier": "A"},
        "carrier-b": {"address": "192.0.2.23"},
    }
    assert kamailio.trunk_ips(table) == ["192.0.2.21", "192.0.2.23"]
    assert kamailio.trunk_ips(None) == [] and kamailio.trunk_ips([]) == []
    assert kamailio.trunk_ips(["192.0.2.21:5060", "192.0.2.21:5070"]) == [
        "192.0.2.21"
    ]  # one address, one trunk


@pytest.mark.parametrize(
    ("trunks", "message"),
    [
        (["192.0.2.21", "carrier-b.example"], "kamailio_edge_trunks[1]: expected an IP address"),
        ({"carrier-a": {"addr": "192.0.2.21"}}, "kamailio_edge_trunks.carrier-a: expected an IP address"),
        (["192.0.2.21:99999"], "kamailio_edge_trunks[0]: expected an IP address"),
        ("192.0.2.21", "kamailio_edge_trunks: expected a list of trunk addresses or a mapping"),
        ([5060], "kamailio_edge_trunks[0]"),
    ],
)
def test_anything_else_is_refused_naming_the_key(trunks: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kamailio.trunk_ips(trunks, key="kamailio_edge_trunks")


@given(st.lists(st.ip_addresses(v=4), max_size=5), st.integers(1, 65535))
def test_the_rendered_config_declares_exactly_the_stats_the_reader_reads(
    ips: list[ipaddress.IPv4Address], port: int
) -> None:
    cfg = kamailio.render_cfg(
        address="127.0.0.1",
        module_dir="/usr/lib/kamailio/modules",
        dispatcher_list=kamailio.Path("/tmp/d.list"),
        rpc_socket=kamailio.Path("/tmp/rpc.sock"),
        trunks=kamailio.trunk_ips([f"{ip}:{port}" for ip in ips]),
    )
    for ip in ips:
        for name in kpis.stat_names(str(ip)):
            assert f'modparam("statistics", "variable", "{name}")' in cfg
