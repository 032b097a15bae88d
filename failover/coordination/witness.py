"""``backend = "witness"``: one appliance acts alone; its witness (if any) is the third vote."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from failover.actuators.base import Actuator
from failover.coordination.base import Coordination, Job, Recorder, Takeover
from failover.thirdvote import Voter

if TYPE_CHECKING:
    from failover.settings import FailoverConfig as Config


class WitnessOnly(Coordination):
    """Nothing to elect: this appliance may always act, with the engine's epoch as its fencing token.

    The actuators are used as they are (their own token checks refuse an older
    epoch); the voter is the configured witness, or a NullVoter that makes
    ``auto`` degrade to ``confirm``.
    """

    name = "witness"
    epoch_is_token = True

    @classmethod
    def from_config(
        cls, config: Config, *, registry: object = None, record: Recorder | None = None
    ) -> WitnessOnly:
        return cls()

    def voter(self, witness: Voter, site_verdicts: Callable[[], dict[str, str]]) -> Voter:
        return witness

    def guard(self, actuators: Sequence[Actuator], *, on_takeover: Takeover) -> list[Actuator]:
        return list(actuators)

    def jobs(self) -> dict[str, Job]:
        return {}

    def view(self) -> dict[str, Any]:
        return {"backend": self.name}
