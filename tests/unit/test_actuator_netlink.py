"""The gratuitous ARP frame, byte by byte (RFC 826 layout, RFC 5227 announcement)."""

from __future__ import annotations

import ipaddress

import pytest

from failover.actuators.netlink import garp_frame


def test_garp_is_a_broadcast_arp_request_announcing_our_own_address() -> None:
    mac = bytes.fromhex("02005e001001")
    frame = garp_frame(mac, ipaddress.IPv4Address("192.0.2.10"))
    assert len(frame) == 42
    assert frame[0:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    assert frame[14:22] == bytes.fromhex("0001 0800 06 04 0001")  # Ethernet, IPv4, request
    assert frame[22:28] == mac and frame[28:32] == bytes([192, 0, 2, 10])
    assert frame[32:38] == b"\x00" * 6 and frame[38:42] == bytes([192, 0, 2, 10])


def test_a_bad_mac_is_refused() -> None:
    with pytest.raises(ValueError, match="6-byte"):
        garp_frame(b"\x00" * 4, ipaddress.IPv4Address("192.0.2.10"))
