"""Replication as a runbook step: promote the customer database at failover, guard the failback.

At failover the backup's replicas stop applying and become writable, and
the data-loss window (how many seconds of commits the replica may lack) is
recorded for the incident report. At failback a replica that the backup
has written to is never silently overwritten: the step refuses and says
what must be done, so the failback stops and rolls back, calls stay at the
backup, and an operator decides.

Tokens: the replicas this step promotes are this appliance's own, so no
other appliance ever writes them; the newest token (applied or fenced) is
kept in memory and an older one is refused (:class:`StaleToken`), so a
runbook decided before this appliance's last takeover cannot promote or
demote after it.
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.logs import kv
from appliance.replication.service import ReplicationService
from failover.actuators.base import Actuator, ActuatorError, StaleToken
from failover.routing import Routing

log = logging.getLogger(f"hotsite.{__name__}")


class ReplicationActuator(Actuator):
    name = "replication"
    timeout_s = 30.0
    local_only = True  # this appliance's own replicas: a promotion need not fit in the lease

    def __init__(self, service: ReplicationService) -> None:
        self._service = service
        self.last_promotion: dict[str, dict[str, Any]] = {}
        self.highest_token = 0

    async def fence(self, token: int) -> None:
        self._admit(token, "fence")

    def _admit(self, token: int, what: str) -> None:
        if token < self.highest_token:
            raise StaleToken(f"{self.name}: {what}: token {token} is older than {self.highest_token}")
        self.highest_token = token

    async def apply(self, routing: Routing, token: int) -> None:
        self._admit(token, "apply")
        if routing.kind == "failover":
            await self._promote()
        else:
            await self._resume()

    async def _promote(self) -> None:
        waiting = [s for s in self._service.sqlite_streams() if not self._service.is_promoted(s)]
        for stream in waiting:
            result = await self._service.promote(stream, reason="failover")
            self.last_promotion.update(result)
            for name, detail in result.items():
                log.warning(
                    "replica promoted",
                    extra=kv(stream=name, data_loss_window_s=detail.get("data_loss_window_s")),
                )

    async def _resume(self) -> None:
        for stream in self._service.sqlite_streams():
            if not self._service.is_promoted(stream):
                continue
            local = self._service.local_changes(stream)
            if local:
                raise ActuatorError(
                    f"stream {stream}: the backup wrote to its copy ({local}); bring those writes to the"
                    f" primary first, then run 'hotsite replication demote {stream} --discard-local-writes'"
                )
            await self._service.demote(stream)

    async def verify(self, routing: Routing) -> list[str]:
        want = routing.kind == "failover"
        return [
            f"stream {stream} is {'not ' if want else ''}promoted"
            for stream in self._service.sqlite_streams()
            if self._service.is_promoted(stream) != want
        ]
