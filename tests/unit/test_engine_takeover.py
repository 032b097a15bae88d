"""The engine's ``TookOver`` event: a new leader's engine follows the routing it read back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from failover.engine import ENGINE_STATES, EngineState, Page, Policy, RunbookDone, TookOver, step

AUTO = Policy(mode="auto", has_witness=True, hold_down_s=10)


def test_a_new_leader_follows_the_failover_it_found_and_moves_the_epoch_on() -> None:
    before = EngineState(state="primary_active", routing="normal", epoch=4)
    out = step(before, TookOver("failover", 137, "failover-without:west", ("west",)), AUTO, 100.0)
    assert (out.state.state, out.state.routing, out.state.lost, out.state.epoch) == (
        "backup_active",
        "failover",
        ("west",),
        5,
    )
    assert "took over the lease (token 137): the real routing is failover-without:west" in out.decision
    assert out.actions == () and out.changed


def test_a_mixed_world_is_held_for_an_operator_and_paged() -> None:
    out = step(EngineState(), TookOver("unknown", 9, "mixed"), AUTO, 5.0)
    assert (out.state.state, out.state.routing) == ("held", "unknown")
    assert out.state.waiting_for == "an operator: routing state unknown"
    assert [a.severity for a in out.actions if isinstance(a, Page)] == ["critical"]


@given(st.sampled_from(ENGINE_STATES), st.sampled_from(["normal", "failover", "unknown"]), st.integers(0, 50))
def test_whatever_it_was_doing_a_result_decided_before_the_takeover_is_ignored(
    name: str, routing: str, epoch: int
) -> None:
    before = EngineState(state=name, routing="failover", epoch=epoch)  # type: ignore[arg-type]
    took = step(before, TookOver(routing, 7, routing), AUTO, 10.0)  # type: ignore[arg-type]
    assert took.state.epoch == epoch + 1
    expected = {"normal": "primary_active", "failover": "backup_active"}.get(routing, "held")
    assert took.state.state == expected and took.state.routing == routing
    late = step(took.state, RunbookDone("failover", epoch, False, "unknown", "stale"), AUTO, 11.0)
    assert late.state.state == expected and "ignored a stale" in late.decision
