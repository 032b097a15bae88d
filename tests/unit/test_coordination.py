"""The ``Coordination`` interface: one table of backends, and what each backend gives the daemon."""

from __future__ import annotations

import asyncio
import typing

import pytest
from prometheus_client import CollectorRegistry

from appliance import config
from appliance.config import CoordinationSection
from appliance.errors import ConfigError
from failover import lease as core
from failover.actuators.base import NullActuator
from failover.coordination.backends import BACKENDS, from_config
from failover.coordination.base import Coordination, NotLeader
from failover.coordination.etcd import Etcd
from failover.coordination.witness import WitnessOnly
from failover.etcd import FencedActuator
from failover.etcd.peers import PeerVoter
from failover.routing import Routing
from failover.thirdvote import NullVoter, Vote, Voter
from tests.support import configs

BASE = configs.TWO_SITES
ETCD = '[coordination]\nbackend = "etcd"\nendpoints = ["http://127.0.0.1:9"]\nrequest_timeout_s = 0.2\n'
WITNESS = '[failover]\nwitness = "http://10.0.0.9:8080"\n'
NORMAL = Routing("normal", "primary", 1, {"95588": 1}, active_sets=frozenset({1}))


class Witness(Voter):
    async def vote(self) -> Vote:
        return Vote(True, "the witness sees the primary", 1.0, "witness")


def test_every_backend_the_schema_accepts_is_in_the_one_table() -> None:
    field = CoordinationSection.model_fields["backend"].annotation
    assert set(typing.get_args(field)) == set(BACKENDS)


def test_an_unknown_backend_is_named_with_the_known_ones() -> None:
    cfg = config.parse(BASE)
    odd = cfg.model_copy(
        update={"coordination": cfg.coordination.model_copy(update={"backend": "zookeeper"})}
    )
    with pytest.raises(ConfigError) as info:
        from_config(odd)
    assert info.value.message == (
        "coordination.backend: 'zookeeper' is not a known backend; expected one of 'witness', 'etcd'"
    )


def test_witness_only_acts_alone_through_the_actuators_as_they_are() -> None:
    coordination = from_config(config.parse(BASE))
    assert isinstance(coordination, WitnessOnly) and coordination.epoch_is_token
    witness = Witness()
    assert coordination.voter(witness, dict) is witness
    actuators = [NullActuator()]
    assert coordination.guard(actuators, on_takeover=lambda observed, token: None) == actuators
    assert coordination.jobs() == {}
    assert coordination.view() == {"backend": "witness"}


def test_etcd_without_a_witness_takes_the_other_sites_views_and_fences_every_actuator() -> None:
    cfg = config.parse(BASE + ETCD)
    coordination = from_config(cfg, registry=CollectorRegistry())
    assert isinstance(coordination, Etcd) and not coordination.epoch_is_token
    voter = coordination.voter(NullVoter(), lambda: {"primary": "down"})
    assert isinstance(voter.inner, PeerVoter)
    guarded = coordination.guard([NullActuator()], on_takeover=lambda observed, token: None)
    assert [type(a) for a in guarded] == [FencedActuator]
    assert list(coordination.jobs()) == ["peer views", "coordination"]
    view = coordination.view()
    assert view["backend"] == "etcd" and view["role"] == "unknown" and view["fenced_token"] is None

    async def scenario() -> None:
        with pytest.raises(NotLeader, match="not acting"):  # nobody granted this appliance a lease
            await guarded[0].apply(NORMAL, 1)
        await coordination.gateway.close()

    asyncio.run(scenario())


def test_etcd_with_a_witness_passes_on_the_witness_and_tells_role_changes() -> None:
    cfg = config.parse(BASE + WITNESS + ETCD)
    coordination = from_config(cfg, registry=CollectorRegistry())
    assert isinstance(coordination, Etcd)
    witness = Witness()
    assert coordination.voter(witness, dict).inner is witness
    assert list(coordination.jobs()) == ["coordination"]
    roles: list[tuple[str, str]] = []
    coordination.on_change(lambda role, detail: roles.append((role, detail)))

    lease = coordination.lease
    now = lease.now()
    lease.state = core.acquired(core.granted(lease.state, 7, 10, sent_at=now, margin_s=0.5), 42, now=now)

    async def scenario() -> None:
        await lease.cycle()  # the leader cannot renew (nothing listens): "unknown", the listener hears it
        await coordination.gateway.close()

    asyncio.run(scenario())
    assert [role for role, _ in roles] == ["unknown"] and "etcd unreachable" in roles[0][1]


def test_the_interface_is_all_the_daemon_sees() -> None:
    for make in BACKENDS.values():
        cls = getattr(make, "__self__", None)
        assert isinstance(cls, type) and issubclass(cls, Coordination) and not cls.__abstractmethods__


def test_the_daemon_wires_the_interface_without_naming_a_backend() -> None:
    """app.py builds whatever the table gives: no branch on the backend, no None for "no etcd"."""
    from pathlib import Path

    app = (Path(__file__).resolve().parents[2] / "appliance" / "app.py").read_text()
    assert ".backend ==" not in app and "coordination = None" not in app and "EtcdCoordination" not in app
    assert "coordination_from_config(" in app


def test_the_status_shows_only_this_leaderships_takeover() -> None:
    """A leader again with a new token shows no routing read back until its own takeover is done.

    A routing read in an earlier leadership, shown as this one's, said "taken over" before the
    fence (test_multisite_fence released a stalled write on it and saw it applied, 1 run of 3).
    """
    coordination = Etcd(config.parse(BASE + ETCD).coordination, appliance="a")
    fence = coordination.guard([NullActuator()], on_takeover=lambda observed, token: None)[0].gate  # type: ignore[attr-defined]
    lease = coordination.lease
    now = lease.now()
    fence.observed, fence.verified_token = "normal", 264  # what its takeover with token 264 read
    lease.state = core.acquired(core.granted(lease.state, 7, 10, sent_at=now, margin_s=0.5), 1415, now=now)
    assert coordination.view()["observed_routing"] is None
    fence.observed, fence.verified_token = "failover", 1415
    assert coordination.view()["observed_routing"] == "failover"
    asyncio.run(coordination.gateway.close())
