"""Coordination through etcd: one leader per routing domain, fencing tokens from etcd revisions.

Past one appliance, "which appliance may move routing" must live in a proven
consensus store, not in code of our own. The pieces, one module each, each
usable alone:

* :mod:`~failover.etcd.gateway`: :class:`Gateway`, one JSON call to etcd's v3
  gateway with endpoint failover, TLS, authentication; raises
  :class:`EtcdUnavailable` (nothing clear came back) or :class:`EtcdError`.
* :mod:`~failover.etcd.election`: :class:`EtcdLease`, the election loop for one
  domain (:meth:`~EtcdLease.leadership` never raises and answers from memory),
  and :class:`EtcdVoter`, the :class:`~failover.thirdvote.Voter` face: only the
  leader passes on its inner voter's word; everyone else votes "unknown".
* :mod:`~failover.etcd.fence`: :class:`Fence` and :class:`FencedActuator`: every
  ``apply`` first checks the lease, swaps the engine's epoch for the etcd token,
  and is cut off when the lease view would expire; a new leader fences every
  actuator and re-reads the real routing before its first action.
* :mod:`~failover.etcd.peers`: the other appliances' site verdicts, the witness
  of a multi-site domain.
* :mod:`~failover.etcd.checks` (``hotsite config check``) and
  :mod:`~failover.etcd.metrics` (``hotsite_coordination_*``).

The daemon's wiring object is the coordination backend
:class:`failover.coordination.etcd.Etcd`.
"""

from __future__ import annotations

from failover.coordination.base import NotLeader, Takeover
from failover.etcd.checks import (
    ETCD_EXPIRY_SWEEP_S,
    MIN_MEMBERS_FOR_AUTO,
    problems,
    takeover_bound_s,
    warnings,
)
from failover.etcd.election import EtcdLease, EtcdVoter
from failover.etcd.fence import Fence, FencedActuator
from failover.etcd.gateway import (
    MAX_ANSWER_BYTES,
    OPS,
    EtcdError,
    EtcdUnavailable,
    Gateway,
    boottime,
    read_credentials,
    tls_context,
)
from failover.etcd.metrics import CoordinationMetrics

__all__ = [
    "ETCD_EXPIRY_SWEEP_S",
    "MAX_ANSWER_BYTES",
    "MIN_MEMBERS_FOR_AUTO",
    "OPS",
    "CoordinationMetrics",
    "EtcdError",
    "EtcdLease",
    "EtcdUnavailable",
    "EtcdVoter",
    "Fence",
    "FencedActuator",
    "Gateway",
    "NotLeader",
    "Takeover",
    "boottime",
    "problems",
    "read_credentials",
    "takeover_bound_s",
    "tls_context",
    "warnings",
]
