"""What `hotsite config check` says about an etcd `[coordination]`: refusals and the takeover bound."""

from __future__ import annotations

from typing import TYPE_CHECKING

from failover import lease as core

MIN_MEMBERS_FOR_AUTO = 3
ETCD_EXPIRY_SWEEP_S = 0.5  # etcd's lessor revokes expired leases on this period

if TYPE_CHECKING:
    from failover.settings import CoordinationSection
    from failover.settings import FailoverConfig as Config


def problems(config: Config) -> list[str]:
    """Cross checks of ``[coordination]`` the schema cannot make alone (``hotsite config check``)."""
    section = getattr(config, "coordination", None)
    if section is None or section.backend != "etcd":
        return []
    found = []
    if config.failover.policy == "auto" and len(section.endpoints) < MIN_MEMBERS_FOR_AUTO:
        found.append(
            f"coordination.endpoints: {len(section.endpoints)} etcd member(s) but failover.policy is 'auto':"
            f" automatic failover needs a cluster of at least {MIN_MEMBERS_FOR_AUTO} members"
            " (a majority that survives the loss of one site); list every member, or use policy 'confirm'"
        )
    for name, actuator in config.actuators.items():
        need = min(float(getattr(actuator, "timeout_s", 5.0)), config.failover.step_timeout_s)
        problem = core.apply_bound_problem(section.ttl_s, need)
        if problem:
            found.append(
                f"actuators.{name}.timeout_s: {problem} with coordination.ttl_s {section.ttl_s};"
                f" lower timeout_s (or failover.step_timeout_s) or raise coordination.ttl_s"
            )
    tls_files = section.ca_file or section.cert_file
    plain = [url for url in section.endpoints if url.lower().startswith("http://")]
    if tls_files and plain:
        found.append(f"coordination.endpoints: TLS files are given but {plain[0]!r} is plain http://")
    return found


def takeover_bound_s(section: CoordinationSection) -> float:
    """The longest a standby waits for the lease when the lost site held the lease *and* etcd's raft leader.

    The majority first notices the raft leader is gone and elects a new one
    (one to two election timeouts, randomised, plus a vote round); the new raft
    leader then extends every lease by one election timeout (etcd's lessor
    ``Promote``), so the old leader's lease outlives the cut by up to
    TTL + 3 election timeouts; etcd removes expired leases every 0.5 s, and the
    standby takes the key at its next retry (one request).
    """
    election = section.etcd_election_ms / 1000
    return section.ttl_s + 3 * election + ETCD_EXPIRY_SWEEP_S + section.retry_s + section.request_timeout_s


def warnings(config: Config) -> list[str]:
    """What ``hotsite config check`` says about ``[coordination]`` without refusing it."""
    section = getattr(config, "coordination", None)
    if section is None or section.backend != "etcd":
        return []
    bound = takeover_bound_s(section)
    return [
        f"coordination: a takeover can take up to {bound:.1f}s, not ttl_s ({section.ttl_s}s), when the lost"
        " site held both the lease and etcd's raft leader: etcd elects a new raft leader (up to"
        f" 2 x etcd_election_ms {section.etcd_election_ms}) and then extends every lease by one"
        " election timeout (failover/MULTISITE.md, Timings)"
    ]
