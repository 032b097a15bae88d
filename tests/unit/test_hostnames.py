"""One host check: a host the config's addresses accept is the one probe targets accept, and back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import fields
from appliance.hostnames import check_host, is_host
from monitoring.targets import parse_url

hosts = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,20}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.text(alphabet="ab-._ 1é", min_size=1, max_size=12),
)


@given(hosts)
def test_the_config_and_the_probe_targets_accept_the_same_hosts(host: str) -> None:
    in_config = True
    try:
        fields.check_host(host)
    except ValueError:
        in_config = False
    in_targets = True
    try:
        parse_url(f"tcp://{host}:5060")
    except ValueError as exc:
        in_targets = "neither an IP address nor a host name" not in str(exc) and "no host" not in str(exc)
    assert in_config == is_host(host)
    if ":" not in host and "/" not in host and "@" not in host and host.strip() == host:
        assert in_targets == in_config, host


@pytest.mark.parametrize("host", ["sbc-1.example.net", "10.0.0.1", "::1", "a" * 63])
def test_hosts(host: str) -> None:
    assert check_host(host) == host


@pytest.mark.parametrize("host", ["", "-a", "a_b", "a" * 254, "exa mple"])
def test_not_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="neither an IP address nor a host name"):
        check_host(host)
