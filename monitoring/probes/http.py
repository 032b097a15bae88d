"""HTTP(S) probe: a status code in the accepted range and, optionally, a body match.

Used for the primary site's own health endpoint and for the witness. A
health page that answers 200 but says ``"status": "degraded"`` is the grey
failure the appliance exists to see, hence the optional body match.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable

import httpx

from monitoring.probes.base import ProbeResult

MAX_BODY_BYTES = 64 * 1024


class HttpProbe:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        verify: bool | ssl.SSLContext = True,
        user_agent: str = "hotsite",
    ) -> None:
        self._clock = clock
        self._client = httpx.AsyncClient(
            verify=verify,
            follow_redirects=False,
            headers={"User-Agent": user_agent},
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def probe(
        self,
        target: str,
        url: str,
        *,
        timeout: float = 1.0,
        expect_status: range = range(200, 300),
        body_pattern: re.Pattern[str] | None = None,
    ) -> ProbeResult:
        started = self._clock()
        try:
            response = await self._client.get(url, timeout=timeout)
        except httpx.TimeoutException:
            return self._fail(target, "timeout", f"no answer in {timeout:g}s")
        except httpx.ConnectError as exc:
            reason = "refused" if _caused_by(exc, ConnectionRefusedError) else "unreachable"
            return self._fail(target, reason, str(exc) or type(exc).__name__)
        except httpx.HTTPError as exc:
            return self._fail(target, "error", type(exc).__name__)
        rtt = self._clock() - started
        code = response.status_code
        if code not in expect_status:
            return ProbeResult(target, False, self._clock(), rtt, code, "bad_code", f"HTTP {code}")
        if body_pattern is not None and not body_pattern.search(response.text[:MAX_BODY_BYTES]):
            return ProbeResult(
                target,
                False,
                self._clock(),
                rtt,
                code,
                "bad_body",
                f"body does not match {body_pattern.pattern!r}",
            )
        return ProbeResult(target, True, self._clock(), rtt, code, "ok", f"HTTP {code}")

    def _fail(self, target: str, reason: str, detail: str) -> ProbeResult:
        return ProbeResult(target, False, self._clock(), None, None, reason, detail)

    async def close(self) -> None:
        await self._client.aclose()


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is anywhere in the exception's cause chain (httpx wraps the OS error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
