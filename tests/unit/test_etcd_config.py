"""``[coordination]``: the keys, their mistakes, and the three-member rule for automatic failover."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from failover import etcd
from failover.coordination.etcd import Etcd
from failover.thirdvote import NullVoter
from tests.support import configs

BASE = configs.TWO_SITES

THREE = 'endpoints = ["http://10.0.0.1:2379", "http://10.0.1.1:2379", "http://10.0.2.1:2379"]\n'


def schema_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert info.value.exit_code == 2
    return info.value.problems


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ('backend = "zookeeper"\n', "coordination.backend: 'zookeeper': expected 'witness' or 'etcd'"),
        ('backend = "etcd"\n', "backend 'etcd' needs endpoints"),
        ('backend = "etcd"\nendpoints = ["etcd1:2379"]\n', "expected an http:// or https:// URL"),
        (THREE + "ttl_s = 1\n", "coordination.ttl_s: 1: expected greater than or equal to 2"),
        (THREE + "ttl_s = 2\nrequest_timeout_s = 1.0\n", "must be at most a third of ttl_s"),
        (THREE + 'cert_file = "/etc/hotsite/etcd.crt"\n', "give both cert_file and key_file"),
        (
            THREE + 'domain = "Call Centre"\n',
            "coordination.domain: 'Call Centre': expected a lower-case name",
        ),
        (THREE + 'password = "x"\n', "coordination.password: unknown key (known keys here: backend, ca_file"),
    ],
)
def test_each_mistake_is_named(section: str, expected: str) -> None:
    found = schema_problems(BASE + "[coordination]\n" + section)
    assert any(expected in p for p in found), found


def test_defaults_keep_the_witness() -> None:
    cfg = config.parse(BASE)
    assert cfg.coordination.backend == "witness"
    assert etcd.problems(cfg) == []


@pytest.mark.parametrize(
    ("endpoints", "policy", "rejected"),
    [
        (1, "auto", True),
        (2, "auto", True),
        (3, "auto", False),
        (5, "auto", False),
        (1, "confirm", False),
        (2, "manual", False),
    ],
)
def test_automatic_failover_needs_three_members(endpoints: int, policy: str, rejected: bool) -> None:
    urls = ", ".join(f'"http://10.0.{i}.1:2379"' for i in range(endpoints))
    text = (
        BASE
        + f'[failover]\npolicy = "{policy}"\nwitness = "http://w:1/vote"\n'
        + f'[coordination]\nbackend = "etcd"\nendpoints = [{urls}]\n'
    )
    # The loader runs the cross check itself, so `hotsite config check` names it.
    if not rejected:
        assert etcd.problems(config.parse(text)) == []
        return
    with pytest.raises(config.ConfigError) as info:
        config.parse(text)
    found = [p for p in info.value.problems if "etcd member(s)" in p]
    assert f"{endpoints} etcd member(s)" in found[0] and "at least 3" in found[0]


def test_tls_files_with_plain_http_endpoints_are_flagged() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(BASE + '[coordination]\nbackend = "etcd"\nca_file = "/etc/ca.pem"\n' + THREE)
    assert any("plain http://" in p for p in info.value.problems)


@pytest.mark.parametrize(
    ("content", "ok"),
    [("root:s3cret\n", True), ("root\n", False), (":x", False), ("a:b\nc:d", False), ("", False)],
)
def test_credentials_file(tmp_path: Path, content: str, ok: bool) -> None:
    path = tmp_path / "etcd.credentials"
    path.write_text(content)
    if ok:
        assert etcd.read_credentials(path) == ("root", "s3cret")
    else:
        with pytest.raises(ConfigError, match="user:password"):
            etcd.read_credentials(path)
    with pytest.raises(ConfigError, match="does not exist"):
        etcd.read_credentials(tmp_path / "missing")


def test_unreachable_etcd_is_unknown_never_leader() -> None:
    """Nothing listens on the endpoint: the vote says why, leadership is "unknown", nothing raises."""
    cfg = config.parse(
        BASE
        + '[coordination]\nbackend = "etcd"\nendpoints = ["http://127.0.0.1:9"]\nrequest_timeout_s = 0.2\n'
    )
    coordination = Etcd(cfg.coordination, appliance="a")

    async def scenario() -> None:
        await coordination.lease.cycle()
        vote = await coordination.voter(NullVoter(), dict).vote()
        assert vote.primary_alive is None and "etcd unreachable" in vote.detail
        state = coordination.lease.leadership()
        assert state.role == "unknown" and not coordination.lease.may_act()
        view = coordination.view()
        assert view["role"] == "unknown" and view["may_act"] is False
        assert "keeping the current routing" in view["detail"]
        await coordination.gateway.close()

    asyncio.run(scenario())


def test_a_new_leader_adopts_the_real_routing(tmp_path: Path) -> None:
    from appliance.clock import SimulatedClock
    from appliance.store import Store
    from failover.service import FailoverService

    cfg = config.parse(BASE)
    store = Store.open(tmp_path / "state")
    service = FailoverService(cfg, store, SimulatedClock(), [], NullVoter())
    assert service.state.routing == "normal"

    async def scenario() -> None:
        engine = asyncio.create_task(service.run())
        epoch = await service.took_over("failover", 42)
        assert (service.state.state, service.state.routing) == ("backup_active", "failover")
        assert epoch == service.state.epoch
        await service.took_over("mixed", 43)
        assert (service.state.state, service.state.routing) == ("held", "unknown")
        engine.cancel()
        await asyncio.gather(engine, return_exceptions=True)

    asyncio.run(scenario())
    decisions = [e for e in store.events(kind="failover.decision") if "took over" in e.message]
    assert len(decisions) == 2  # the engine decided, and the audit log says so


def test_an_actuator_whose_apply_could_never_fit_in_the_lease_is_refused() -> None:
    hook = '\n[actuators.carrier]\ntype = "hook"\ncommand = ["/usr/local/bin/redirect"]\n'
    etcd_section = '\n[coordination]\nbackend = "etcd"\n' + THREE
    found = schema_problems(BASE + hook + etcd_section)  # the hook's default timeout (10 s) = the TTL
    assert any(
        p.startswith(
            "actuators.carrier.timeout_s: an apply may take 10s but a renewed lease is trusted for at most 9.5s"
        )
        and "raise coordination.ttl_s" in p
        for p in found
    ), found
    config.parse(BASE + hook + "timeout_s = 5\n" + etcd_section)  # fits: accepted
    config.parse(BASE + hook + "\n[failover]\nstep_timeout_s = 5\n" + etcd_section)  # the step bounds it


def test_config_check_states_the_takeover_bound_with_the_raft_leader_lost() -> None:
    cfg = config.parse(BASE + '[coordination]\nbackend = "etcd"\n' + THREE + "etcd_election_ms = 2000\n")
    found = [w for w in cfg.warnings() if w.startswith("coordination: a takeover")]
    # ttl 10 + 3 x 2 s election + etcd's 0.5 s expiry sweep + retry 0.5 + request 1.0
    assert found and "up to 18.0s, not ttl_s (10s)" in found[0], cfg.warnings()
    assert not [w for w in config.parse(BASE).warnings() if w.startswith("coordination")]
