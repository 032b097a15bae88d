"""The DR drill: is the backup ready to take the calls, without moving any production call?

Checks, each timed and explained:

* the backup site is judged up and its SBC answers;
* the replicas are within their data-loss budget;
* the witness answers (when there is one);
* every actuator can read the real routing back (the runbook could act);
* a real SIP request to the drill's test number goes through the carrier
  edge's Kamailio along the *backup* path and is answered by the backup SBC.
  Only the test number is re-routed, for the seconds the check lasts;
* with ``[testcalls] hotlines``: the failover's verification calls
  (:mod:`failover.verification`), one per hotline, each to the test number routed
  for that call where the plan would send the hotline, answered there with audio.

The report ends with the expected RTO: detection (fall x interval +
timeout), the hold-down, and the runbook's own time estimated from the
actuators' measured read-back latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance.fields import host_port
from appliance.kamailio import KamailioRpc, KamailioRpcError
from failover import plans, verification
from failover.actuators.base import Actuator, ActuatorError
from failover.settings import FailoverConfig as Config
from failover.thirdvote import Voter
from monitoring.probes.testcall import CallResult, CallSpec, place_call
from monitoring.sip import SipParseError, build_options, parse_response
from monitoring.targets import call_spec

Check = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    duration_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "duration_s": round(self.duration_s, 4),
        }


def expected_rto(config: Config, runbook_estimate_s: float) -> dict[str, float]:
    """Pure: the seconds from the primary's death to every hotline routed by plan."""
    p = config.probes
    detection = p.fall * p.interval_s + p.timeout_s
    parts = {
        "detection_s": round(detection, 3),
        "hold_down_s": config.failover.hold_down_s,
        "runbook_s": round(runbook_estimate_s, 3),
    }
    parts["total_s"] = round(sum(parts.values()), 3)
    return parts


class Drill:
    def __init__(
        self,
        config: Config,
        *,
        site_verdict: Callable[[str], str],
        replication_lagging: Callable[[], list[str]],
        actuators: list[Actuator],
        voter: Voter,
        kamailio: Callable[[], KamailioRpc | None],
        clock: Callable[[], float] = time.monotonic,
        place: Callable[[CallSpec], Awaitable[CallResult]] = place_call,
    ) -> None:
        self.config = config
        self._place = place
        self._verdict = site_verdict
        self._lagging = replication_lagging
        self._actuators = actuators
        self._voter = voter
        self._kamailio = kamailio  # a getter: a reload replaces the daemon's client
        self._clock = clock
        self._read_latency_s = 0.0

    async def __call__(self) -> tuple[bool, str, dict[str, Any]]:
        started = time.time()
        checks: list[tuple[str, Check]] = [
            ("backup site up", self._backup_up),
            ("replicas within budget", self._replicas),
            ("witness answers", self._witness),
            ("actuators read routing back", self._actuators_readable),
            ("test call through the backup path", self._test_call),
        ]
        results = [await self._run(name, check) for name, check in checks]
        if verification.enabled(self.config):
            calls = verification.expectations(self.config, "failover")
            budget = len(calls) * self.config.testcalls.call_budget_s + 5
            results.append(await self._run("hotline calls through the backup path", self._calls, budget))
        passed = sum(r.ok for r in results)
        rto = expected_rto(self.config, runbook_estimate_s=2 * self._read_latency_s)
        ok = passed == len(results)
        failed = [r.name for r in results if not r.ok]
        detail = f"{passed}/{len(results)} checks passed, expected RTO {rto['total_s']:g}s" + (
            f"; failed: {', '.join(failed)}" if failed else ""
        )
        report = {
            "started_at": started,
            "finished_at": time.time(),
            "ok": ok,
            "checks": [r.to_json() for r in results],
            "expected_rto": rto,
            "production_routing_touched": False,
        }
        return ok, detail, report

    async def _run(self, name: str, check: Check, timeout_s: float = 15.0) -> CheckResult:
        started = self._clock()
        try:
            async with asyncio.timeout(timeout_s):
                ok, detail = await check()
        except TimeoutError:
            ok, detail = False, f"no answer within {timeout_s:g} s"
        return CheckResult(name, ok, detail, self._clock() - started)

    async def _backup_up(self) -> tuple[bool, str]:
        site = plans.backup_site(self.config)
        verdict = self._verdict(site)
        return verdict == "up", f"{site} is {verdict}"

    async def _replicas(self) -> tuple[bool, str]:
        lagging = self._lagging()
        if lagging:
            return False, "over budget: " + ", ".join(lagging)
        streams = len(self.config.replication.streams)
        return True, f"{streams} stream(s) within budget" if streams else "no replication configured"

    async def _witness(self) -> tuple[bool, str]:
        if self.config.failover.witness is None:
            return True, "no witness configured (automatic failover acts as confirm)"
        vote = await self._voter.vote()
        if vote.primary_alive is None:
            return False, f"no usable vote: {vote.detail}"
        return True, f"witness answers; sees the primary: {vote.primary_alive}"

    async def _actuators_readable(self) -> tuple[bool, str]:
        normal = plans.normal_routing(self.config)
        problems, started = [], self._clock()
        for actuator in self._actuators:
            try:
                differences = await actuator.verify(normal)
            except ActuatorError as exc:
                problems.append(f"{actuator.name}: {exc.message}")
                continue
            if differences:
                problems.append(f"{actuator.name} differs from normal routing: {'; '.join(differences)}")
        self._read_latency_s = self._clock() - started
        names = ", ".join(a.name for a in self._actuators) or "none"
        return not problems, "; ".join(
            problems
        ) or f"read back in {self._read_latency_s * 1000:.0f} ms ({names})"

    async def _test_call(self) -> tuple[bool, str]:
        number = self.config.failover.test_number
        if number is None:
            return False, "failover.test_number is not set: no end-to-end check of the backup path"
        rpc = self._kamailio()
        if rpc is None or self.config.kamailio.sip is None:
            return False, "kamailio.rpc_url and kamailio.sip are needed for the test call"
        backup = self.config.sites[plans.backup_site(self.config)]
        try:
            async with _routed(rpc, number, backup.kamailio_set):
                code, contact = await _options_via(self.config.kamailio.sip, number)
        except KamailioRpcError as exc:
            return False, exc.message
        backup_host = host_port(backup.sbc)[0]
        if code is None:
            return False, f"no answer to the test number {number} through the backup path"
        if not 200 <= code < 300:
            return False, f"test number {number} answered {code}"
        if backup_host not in contact:
            return False, f"answered by {contact or 'an unknown contact'}, not the backup SBC {backup_host}"
        return True, f"test number {number} answered {code} by the backup SBC ({contact})"

    async def _calls(self) -> tuple[bool, str]:
        """The failover's verification calls, through the backup path, without moving a hotline.

        Each hotline's call goes to the drill's test number, routed for the seconds of that call
        to the set the failover plan would give the hotline; it must be answered there with audio.
        """
        number, rpc, edge = self.config.failover.test_number, self._kamailio(), self.config.kamailio.sip
        if number is None or rpc is None or edge is None:
            return False, "failover.test_number, kamailio.rpc_url and kamailio.sip are needed for drill calls"
        sets = plans.destinations(self.config)
        results = []
        for expected in verification.expectations(self.config, "failover"):
            stand_in = dataclasses.replace(expected, number=number)
            spec = call_spec(self.config, f"drill:{expected.hotline}", number, edge)
            try:
                async with _routed(rpc, number, sets[expected.destination].kamailio_set):
                    call = await self._place(spec)
            except KamailioRpcError as exc:
                return False, exc.message
            ok, detail = verification.judge(stand_in, call)
            results.append((ok, f"{expected.hotline}: {detail}"))
        results.sort(key=lambda r: r[0])  # failures first
        return all(ok for ok, _ in results), "; ".join(d for _, d in results) or "no hotlines to call"


@contextlib.asynccontextmanager
async def _routed(rpc: KamailioRpc, number: str, kamailio_set: int) -> AsyncIterator[None]:
    """The drill's test number routed to ``kamailio_set`` in Kamailio's hotlines table for the
    duration of one check, and removed again however the check ends."""
    await rpc.call("htable.seti", "hotlines", number, kamailio_set)
    try:
        yield
    finally:
        await rpc.call("htable.delete", "hotlines", number)


async def _options_via(proxy: str, number: str, timeout: float = 3.0) -> tuple[int | None, str]:
    """One OPTIONS to ``number`` through the proxy; the final code and the answerer's Contact."""
    host, port = host_port(proxy)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((host, port))
        local_host, local_port = sock.getsockname()[:2]
        request = build_options(host, port, local_host=local_host, local_port=local_port, user=number)
        await loop.sock_sendall(sock, request.data)
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    data = await loop.sock_recv(sock, 65535)
            except TimeoutError:
                break
            try:
                reply = parse_response(data)
            except SipParseError:
                continue
            if request.matches(reply) and reply.code is not None and reply.code >= 200:
                return reply.code, reply.header("contact") or ""
    except OSError:
        return None, ""
    finally:
        sock.close()
    return None, ""
