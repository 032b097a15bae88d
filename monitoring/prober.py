"""One entry point for probing any target, whatever its kind.

The daemon's scheduler and the ``hotsite probe`` command both call
:meth:`Prober.probe`; each kind's probe keeps its own long-lived state
(sockets, HTTP connection pool), created on first use.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from appliance.errors import ConfigError
from monitoring.probes import kinds
from monitoring.probes.base import Probe, ProbeContext, ProbeResult
from monitoring.probes.host import HostProbe
from monitoring.probes.testcall import CallResult
from monitoring.targets import Target


class Prober:
    """Dispatches each target to its kind's probe (:data:`monitoring.probes.kinds.KINDS`)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_unmatched: Callable[[str], None] | None = None,
        host: HostProbe | None = None,
        tls_ca_file: Path | None = None,
        max_calls: int = 2,
    ) -> None:
        try:
            tls = ssl.create_default_context(cafile=str(tls_ca_file) if tls_ca_file else None)
        except (OSError, ssl.SSLError) as exc:  # a missing CA file is the user's mistake, not a crash
            raise ConfigError(
                f"probes.tls_ca_file: cannot load {tls_ca_file}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        # Test calls occupy real channels: at most this many at once, whatever the scheduler allows.
        self._context = ProbeContext(clock, tls, on_unmatched, host, asyncio.Semaphore(max_calls))
        self._probes: dict[str, Probe] = {}

    @property
    def last_calls(self) -> dict[str, CallResult]:
        """The latest test call per target, for views."""
        return self._context.last_calls

    async def probe(self, target: Target, timeout: float) -> ProbeResult:
        probe = self._probes.get(target.kind)
        if probe is None:
            probe = self._probes[target.kind] = kinds.get(target.kind).make(self._context)
        return await probe.probe(target, timeout)

    async def close(self) -> None:
        for probe in self._probes.values():
            await probe.close()
