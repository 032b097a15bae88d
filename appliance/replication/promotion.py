"""Promotion at failover, as pure decisions: the data-loss window and the failback guard.

The failover engine calls :func:`promote` (via the service) when the backup
takes over: apply stops, the final position is recorded, and the window of
source commits the replica may lack is reported. It is measured from the
last moment the replica *knew* it held the newest committed state (a batch
that emptied the source's queue, or a heartbeat at our position), in the
source's clock (offset estimated at connect), to the promotion: an honest
upper bound, never a guess from the last apply.
"""

from __future__ import annotations


def data_loss_window(current_at: float | None, local_now: float, clock_offset_s: float) -> float | None:
    """Seconds of source commits the replica may lack, or None if it never knew it was current."""
    if current_at is None:
        return None
    return max(0.0, local_now + clock_offset_s - current_at)


def over_budget(lag_s: float | None, budget_s: float) -> bool:
    """A stream with unknown lag (never in sync) is over any budget: it is not ready for failover."""
    return lag_s is None or lag_s > budget_s
