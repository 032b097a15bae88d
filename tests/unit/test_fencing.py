"""The fencing rule and the lease timing, as properties over random histories.

A small model of etcd's lease semantics drives the real pure core
(:mod:`failover.lease`): requests are *sent* at one time and *processed* by
the server some delay later (the server restarts the TTL at processing),
answers arrive later still, leases expire and their keys vanish, and
appliances act whenever :func:`failover.lease.may_act` says so, through the
real fencing rule (:func:`failover.lease.admit`). Properties:

* whenever an appliance acts, the server agrees that it holds the key then;
* tokens obeyed at the edge never go down, and each belongs to one appliance;
* the acting windows of two tokens never overlap.

The model's etcd is honest (see the integration tests for the real one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from failover import lease as core

TTL = 6.0
MARGIN = core.default_margin(TTL)


@dataclass
class Server:
    revision: int = 0
    leases: dict[int, float] = field(default_factory=dict)  # lease id -> expiry
    key: tuple[int, int, str] | None = None  # (create revision, lease, appliance)
    next_lease: int = 100

    def expire(self, now: float) -> None:
        for lid, expiry in list(self.leases.items()):
            if expiry <= now:
                del self.leases[lid]
                if self.key and self.key[1] == lid:
                    self.key = None
                    self.revision += 1

    def grant(self, now: float) -> int:
        self.expire(now)
        self.next_lease += 1
        self.leases[self.next_lease] = now + TTL
        self.revision += 1
        return self.next_lease

    def keepalive(self, lid: int, now: float) -> float:
        self.expire(now)
        if lid not in self.leases:
            return 0.0
        self.leases[lid] = now + TTL
        return TTL

    def create(self, lid: int, who: str, now: float) -> tuple[bool, tuple[int, int, str] | None]:
        self.expire(now)
        if lid not in self.leases:
            return False, self.key
        if self.key is None:
            self.revision += 1
            self.key = (self.revision, lid, who)
            return True, self.key
        return False, self.key


@dataclass
class Edge:
    """The actuator's side: the fencing rule, and a log of what it obeyed."""

    highest: int = 0
    obeyed: list[tuple[str, int, float]] = field(default_factory=list)

    def apply(self, who: str, token: int, now: float) -> bool:
        if not core.admit(self.highest, token):
            return False
        self.highest = token
        self.obeyed.append((who, token, now))
        return True


step = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["cycle", "act", "cycle", "act", "wait", "fail"]),
    st.one_of(st.floats(0.0, 1.0), st.floats(TTL - 1.0, TTL + 1.0)),  # time before this step
    st.floats(0.0, 1.5),  # request delay: sent -> processed
    st.floats(0.0, 1.5),  # answer delay: processed -> received
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(step, min_size=1, max_size=80))
def test_no_two_leaders_act_with_overlapping_tokens(
    history: list[tuple[str, str, float, float, float]],
) -> None:
    server, edge, now = Server(), Edge(), 0.0
    states = {n: core.LeaseState(domain="d", me=n) for n in "ab"}
    for who, kind, wait, d_req, d_ans in history:
        now += wait
        s = states[who]
        if kind == "fail":  # a request that got no clear answer
            states[who] = core.unreachable(s, "timeout", now)
        elif kind == "cycle":
            sent, processed = now, now + d_req
            if s.lease_id is None:
                lid = server.grant(processed)
                s = core.granted(s, lid, TTL, sent_at=sent, margin_s=MARGIN)
            else:
                ttl = server.keepalive(s.lease_id, processed)
                s = core.renewed(s, ttl, sent_at=sent, margin_s=MARGIN, now=processed + d_ans)
            if s.lease_id is not None:
                created, kv = server.create(s.lease_id, who, processed)
                if created or kv and kv[1] == s.lease_id:
                    assert kv is not None
                    s = core.acquired(s, kv[0], now=processed + d_ans)
                else:
                    s = core.held_by(s, kv[2] if kv else None, kv[0] if kv else None, now=processed + d_ans)
            now = processed + d_ans  # the appliance is busy until the answer comes
            states[who] = s
        elif kind == "act" and core.may_act(s, now):
            assert s.token is not None
            server.expire(now)
            holder = server.key
            assert holder is not None and holder[2] == who and holder[0] == s.token, (
                f"{who} acts with token {s.token} at {now:.2f} but the server's key is {holder}"
            )
            edge.apply(who, s.token, now)
    owners: dict[int, str] = {}
    last_time = -1.0
    for who, token, at in edge.obeyed:
        assert owners.setdefault(token, who) == who
        assert at >= last_time
        last_time = at
    tokens = [t for _w, t, _a in edge.obeyed]
    assert tokens == sorted(tokens)


def test_a_deadline_counted_from_the_answer_would_be_caught() -> None:
    """The property above can fail: counting from the answer's arrival outlives the server's lease."""
    sent, answered = 0.0, 1.5
    server_expiry = sent + TTL  # the server renewed at (or just after) the send
    assert core.lease_deadline(sent, TTL, MARGIN) < server_expiry
    assert core.lease_deadline(answered, TTL, MARGIN) > server_expiry


def test_fencing_rule_refuses_only_older_tokens() -> None:
    assert core.admit(0, 1) and core.admit(5, 5) and core.admit(5, 6)
    assert not core.admit(6, 5)


@given(st.lists(st.integers(0, 50), max_size=60))
def test_an_edge_obeys_a_non_decreasing_sequence(tokens: list[int]) -> None:
    edge = Edge()
    for t in tokens:
        edge.apply("x", t, 0.0)
    obeyed = [t for _w, t, _a in edge.obeyed]
    assert obeyed == sorted(obeyed)
    # Every refused token was older than one obeyed before it.
    highest = 0
    for t in tokens:
        assert (t in obeyed) or t < highest
        highest = max(highest, t)


def test_unknown_leadership_never_acts_and_says_so() -> None:
    s = core.acquired(
        core.granted(core.LeaseState("d", "a"), 1, TTL, sent_at=0.0, margin_s=MARGIN), 7, now=0.1
    )
    assert core.may_act(s, 1.0)
    lost = core.unreachable(s, "timeout", 1.0)
    assert lost.role == "unknown" and not core.may_act(lost, 1.0)
    assert "keeping the current routing" in lost.detail
    assert not core.may_act(s, TTL)  # an old view expires on its own


NEED = 2.0  # what one apply may take


lease_event = st.tuples(
    st.sampled_from(["renew_ok", "renew_fail", "apply", "apply", "wait"]),
    st.floats(0.0, TTL),  # time before the event
    st.floats(0.0, 1.0),  # renewal round trip (sent -> answer)
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(lease_event, min_size=1, max_size=60))
def test_no_apply_after_a_failed_renewal_before_a_fresh_one_and_none_that_would_outlive_the_lease(
    history: list[tuple[str, float, float]],
) -> None:
    """The rule a leader's every apply passes (``may_apply``), on a simulated clock.

    A model of what the leader knows: ``failed`` is set by a renewal that got no
    clear answer and cleared only by a later successful one (with the key read
    back as ours). Whenever ``may_apply`` admits an apply, the last renewal
    succeeded and the apply's whole budget fits before that renewal's lease
    could expire on the server (send time + TTL).
    """
    granted = core.granted(core.LeaseState(domain="d", me="a"), 1, TTL, sent_at=0.0, margin_s=MARGIN)
    state = core.acquired(granted, 7, now=0.0)
    now, last_ok_sent, failed = 0.0, 0.0, False
    for kind, wait, rtt in history:
        now += wait
        if kind == "renew_fail":
            state = core.unreachable(state, "no quorum", now + rtt)
            now, failed = now + rtt, True
        elif kind == "renew_ok" and now < state.valid_until + TTL:  # the server still knows the lease
            sent = now
            state = core.renewed(state, TTL, sent_at=sent, margin_s=MARGIN, now=sent + rtt)
            state = core.acquired(state, 7, now=sent + rtt)
            now, last_ok_sent, failed = sent + rtt, sent, False
        elif kind == "apply" and core.may_apply(state, now, NEED):
            assert not failed, f"apply at {now:.2f} after a failed renewal"
            assert now + NEED < last_ok_sent + TTL, f"apply at {now:.2f} could outlive the lease"
            assert now - last_ok_sent < TTL - MARGIN - NEED  # the bound on the renewal's age


def test_the_apply_bound_refuses_a_timeout_the_lease_can_never_fit() -> None:
    assert core.apply_bound_problem(10, 5) is None
    assert core.apply_bound_problem(10, 9.4) is None
    problem = core.apply_bound_problem(10, 10)
    assert problem and "trusted for at most 9.5s" in problem
