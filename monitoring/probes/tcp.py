"""TCP connect probe: is anything accepting connections on host:port?

The cheapest evidence that a service (an ACD, a CTI server, an SBC's TLS
port) is alive at the transport level. A refused connection fails at once
with reason ``refused``; silence fails at the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from monitoring.probes.base import ProbeResult


class TcpConnectProbe:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock

    async def probe(self, target: str, host: str, port: int, *, timeout: float = 1.0) -> ProbeResult:
        started = self._clock()
        try:
            async with asyncio.timeout(timeout):
                _reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            return ProbeResult(
                target, False, self._clock(), None, None, "timeout", f"no answer in {timeout:g}s"
            )
        except ConnectionRefusedError:
            return ProbeResult(target, False, self._clock(), None, None, "refused", "connection refused")
        except OSError as exc:
            return ProbeResult(
                target, False, self._clock(), None, None, "unreachable", exc.strerror or str(exc)
            )
        rtt = self._clock() - started
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return ProbeResult(target, True, self._clock(), rtt, None, "ok", "connected")
