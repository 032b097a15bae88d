"""A takeover is an engine event: it moves the epoch above everything seen, before the fence lets anything act.

Pure part: the engine on a simulated clock, any history with takeovers at any
point (hypothesis). Fence part: the real :class:`failover.etcd.Fence` over a
lease set from the pure lease core on a simulated clock, its ``on_takeover``
answered by the pure engine, and applies decided at every epoch of that
history thrown at it, concurrently.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover import lease as core
from failover.actuators.base import NullActuator
from failover.coordination.base import NotLeader
from failover.engine import (
    Command,
    EngineState,
    Event,
    Outcome,
    Policy,
    PrimaryVerdict,
    Resumed,
    RunbookDone,
    RunRunbook,
    Tick,
    TookOver,
    WitnessVote,
    step,
    took_over,
)
from failover.etcd import EtcdLease, Fence, Gateway
from failover.routing import Routing

AUTO = Policy(mode="auto", has_witness=True, hold_down_s=5, min_dwell_s=10, max_auto_per_hour=5)
NORMAL = Routing("normal", "primary", 1, {"95588": 1}, active_sets=frozenset({1}))
FAILOVER = Routing("failover", "backup", 2, {"95588": 2}, frozenset({1}))
GATEWAY = Gateway(["http://127.0.0.1:9"])  # never called: the lease's state is set from the pure core
OBSERVED = ["normal", "failover", "failover-without:west", "mixed", "unreadable"]

world = st.one_of(
    st.builds(PrimaryVerdict, st.sampled_from(["down", "down", "up", "degraded", "unknown"])),
    st.builds(WitnessVote, st.sampled_from([True, False, None])),
    st.builds(Tick),
    st.builds(
        Command,
        st.sampled_from(["failover", "failback", "approve", "cancel", "maintenance_on", "maintenance_off"]),
        st.just("operator"),
        st.just(""),
        st.booleans(),
    ),
    st.builds(Resumed, st.integers(0, 40)),
    st.builds(
        lambda observed, token: took_over(observed, token), st.sampled_from(OBSERVED), st.integers(1, 10**6)
    ),
)


class Engine:
    """The pure engine with a simulated clock, and every epoch it has handed out or been told of."""

    def __init__(self) -> None:
        self.state = EngineState()
        self.now = 0.0
        self.seen: set[int] = {0}
        self.decided: list[int] = []  # epochs of the runbooks it started

    def at(self, gap: float, event: Event) -> Outcome:
        self.now += gap
        out = step(self.state, event, AUTO, self.now)
        self.state = out.state
        self.seen.add(out.state.epoch)
        for action in out.actions:
            if isinstance(action, RunRunbook):
                self.seen.add(action.epoch)
                self.decided.append(action.epoch)
        return out

    def finish_runbook(self, ok: bool) -> None:
        """What the edges report when a runbook the engine started ends."""
        if self.state.state in ("failing_over", "failing_back"):
            kind: Literal["failover", "failback"] = (
                "failover" if self.state.state == "failing_over" else "failback"
            )
            self.at(
                1.0, RunbookDone(kind, self.state.epoch, ok, "failover" if kind == "failover" else "normal")
            )


@settings(max_examples=200, deadline=None)
@given(
    script=st.lists(st.tuples(st.floats(0, 20), world, st.booleans()), max_size=60),
)
def test_the_epoch_after_a_takeover_is_above_every_epoch_seen_and_old_results_are_stale(
    script: list[tuple[float, Event, bool]],
) -> None:
    engine = Engine()
    for gap, event, ok in script:
        before = max(engine.seen)
        out = engine.at(gap, event)
        if isinstance(event, TookOver):
            assert out.state.epoch > before  # above every epoch handed out or obeyed before
            assert not any(isinstance(a, RunRunbook) for a in out.actions)  # it decides, it does not act
            follows = {"normal": "primary_active", "failover": "backup_active"}
            assert out.state.state == follows.get(event.routing, "held")
            for old in sorted(set(engine.decided)):  # a result decided before the takeover is ignored
                late = step(out.state, RunbookDone("failover", old, True, "failover"), AUTO, engine.now)
                assert "ignored a stale" in late.decision and late.state.state == out.state.state
        engine.finish_runbook(ok)
    assert engine.decided == sorted(engine.decided)


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        ("normal", TookOver("normal", 7, "normal", ())),
        ("failover", TookOver("failover", 7, "failover", ())),
        (
            "failover-without:west,east",
            TookOver("failover", 7, "failover-without:west,east", ("east", "west")),
        ),
        ("mixed", TookOver("unknown", 7, "mixed", ())),
        ("unreadable", TookOver("unknown", 7, "unreadable", ())),
    ],
)
def test_what_a_takeover_read_back_becomes_one_engine_event(observed: str, expected: TookOver) -> None:
    assert took_over(observed, 7) == expected


class Edge(NullActuator):
    def __init__(self, name: str, journal: list[tuple[str, str, int]]) -> None:
        super().__init__()
        self.name, self.journal = name, journal

    async def fence(self, token: int) -> None:
        self.journal.append((self.name, "fence", token))
        await asyncio.sleep(0)  # let anything racing the takeover run now
        await super().fence(token)

    async def verify(self, routing: Routing) -> list[str]:
        self.journal.append((self.name, "verify", 0))
        return [] if routing.name == "normal" else ["not failover"]

    async def apply(self, routing: Routing, token: int) -> None:
        self.journal.append((self.name, "apply", token))
        await super().apply(routing, token)


@settings(max_examples=100, deadline=None)
@given(
    history=st.lists(st.tuples(st.floats(0, 20), world, st.booleans()), max_size=40),
    after=st.lists(st.sampled_from(["failover", "failback", "approve"]), max_size=4),
    order=st.randoms(use_true_random=False),
    token=st.integers(1, 10**6),
)
def test_no_action_reaches_an_actuator_before_every_actuator_is_fenced_nor_one_decided_before_the_takeover(
    history: list[tuple[float, Event, bool]], after: list[str], order: object, token: int
) -> None:
    engine = Engine()
    for gap, event, ok in history:  # what this appliance decided while it stood by
        engine.at(gap, event)
        engine.finish_runbook(ok)
    before_takeover = set(engine.decided) | {engine.state.epoch}
    now = [engine.now]
    lease = EtcdLease(GATEWAY, domain="d", appliance="a", ttl_s=10, clock=lambda: now[0])
    lease.state = core.acquired(
        core.granted(lease.state, 7, 10, sent_at=now[0], margin_s=lease.margin_s), token, now=now[0]
    )
    journal: list[tuple[str, str, int]] = []
    edges = [Edge("kamailio", journal), Edge("carrier", journal)]
    fence = Fence(
        lease,
        lambda: {"normal": NORMAL, "failover": FAILOVER},
        on_takeover=lambda observed, tok: engine.at(0.0, took_over(observed, tok)).state.epoch,
    )
    wrapped = fence.wrap(edges)

    async def attempt(epoch: int) -> bool:
        try:
            await wrapped[epoch % 2].apply(NORMAL, epoch)
        except NotLeader:
            return False
        return True

    async def scenario() -> dict[int, bool]:
        epochs = sorted(before_takeover)
        order.shuffle(epochs)  # type: ignore[attr-defined]
        first = dict(zip(epochs, await asyncio.gather(*(attempt(e) for e in epochs)), strict=True))
        for command in after:  # decided after the takeover: carried out
            out = engine.at(1.0, Command(command, "operator", "", True))  # type: ignore[arg-type]
            for action in out.actions:
                if isinstance(action, RunRunbook):
                    first[action.epoch] = await attempt(action.epoch)
            engine.finish_runbook(True)
        return first

    admitted = asyncio.run(scenario())
    fences = [i for i, (_, kind, _) in enumerate(journal) if kind == "fence"]
    applies = [i for i, (_, kind, _) in enumerate(journal) if kind == "apply"]
    assert len(fences) == 2 and fences == [0, 1]  # every actuator fenced once, first of all
    assert all(tok == token for _, kind, tok in journal if kind in ("fence", "apply"))  # the lease's token
    assert not applies or applies[0] > fences[-1]
    for epoch, ok in admitted.items():
        assert ok == (epoch >= fence.min_epoch), (epoch, fence.min_epoch)
    assert fence.min_epoch > max(before_takeover)  # nothing decided while standing by is carried out
    assert engine.state.epoch >= fence.min_epoch
