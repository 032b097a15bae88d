"""The appliance's side: `HttpWitnessVoter` asks a witness agent, `voter_from_config` picks it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from appliance.clock import Clock, SystemClock
from appliance.errors import ConfigError
from appliance.timeouts import cancelled_meanwhile
from failover.thirdvote import NullVoter, Vote, Voter
from failover.witness.settings import read_token
from failover.witness.vote import (
    DEFAULT_MAX_AGE_S,
    MAX_ANSWER_BYTES,
    clean,
    interpret,
)

if TYPE_CHECKING:
    from failover.settings import FailoverConfig as Config

log = logging.getLogger("hotsite.failover.witness")


# ---------------------------------------------------------------------------
# The appliance's side


class HttpWitnessVoter(Voter):
    """Asks a ``hotsite witness`` agent over HTTP(S) what it sees of the primary.

    Contract (:class:`~failover.thirdvote.Voter`): :meth:`vote` returns within
    ``timeout_s`` (plus scheduling noise) and never raises, except
    ``CancelledError`` when its caller is cancelled. An unreachable, slow,
    refusing, confused or stale witness gives ``Vote(None, detail)``. Stale
    means the witness's own ``age_s`` (its monotonic clock, plus our round
    trip) exceeds ``max_age_s``; wall clocks are compared only if an answer
    lacks ``age_s``. Set ``max_age_s`` above the witness's interval + timeout.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_age_s: float,
        clock: Clock,
        token: str | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"{url!r}: expected an http:// or https:// URL")
        if timeout_s <= 0 or max_age_s <= 0:
            raise ValueError("timeout_s and max_age_s must be > 0")
        self.url = url
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._source = f"witness:{urlsplit(url).netloc.rsplit('@', 1)[-1]}"
        headers = {"Accept": "application/json", "User-Agent": "hotsite"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            verify=verify, follow_redirects=False, headers=headers, timeout=timeout_s, trust_env=False
        )

    async def vote(self) -> Vote:
        started = self._clock.monotonic()
        nonce = secrets.token_urlsafe(16)
        try:
            async with asyncio.timeout(self.timeout_s):
                status, body = await self._fetch(nonce)
        except TimeoutError:
            cancelled_meanwhile()  # a stop that lands with an error must still stop the witness poll
            return self._unknown(f"witness did not answer within {self.timeout_s:g}s")
        except httpx.TimeoutException:
            cancelled_meanwhile()
            return self._unknown(f"witness did not answer within {self.timeout_s:g}s")
        except httpx.ConnectError as exc:
            cancelled_meanwhile()
            return self._unknown(f"witness unreachable: {exc or type(exc).__name__}")
        except TooLarge:
            cancelled_meanwhile()
            return self._unknown(f"witness answer larger than {MAX_ANSWER_BYTES} bytes")
        except Exception as exc:  # the contract: never raise; say what happened instead
            cancelled_meanwhile()
            return self._unknown(f"witness request failed: {type(exc).__name__}: {exc}")
        now = self._clock.monotonic()
        try:
            return interpret(
                status,
                body,
                max_age_s=self.max_age_s,
                rtt_s=now - started,
                received_mono=now,
                received_wall=self._clock.time(),
                source=self._source,
                nonce=nonce,
            )
        except Exception as exc:  # interpret is total by design; this is the contract's backstop
            return self._unknown(f"witness answer could not be judged: {type(exc).__name__}")

    async def _fetch(self, nonce: str) -> tuple[int, bytes]:
        async with self._client.stream("GET", self.url, params={"nonce": nonce}) as response:
            chunks, size = [], 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise TooLarge
                chunks.append(chunk)
            return response.status_code, b"".join(chunks)

    def _unknown(self, detail: str) -> Vote:
        return Vote(None, clean(detail), self._clock.monotonic(), self._source)

    async def close(self) -> None:
        await self._client.aclose()


class TooLarge(Exception):
    pass


def voter_from_config(config: Config, *, clock: Clock | None = None) -> Voter:
    """The configured voter: :class:`HttpWitnessVoter`, or :class:`NullVoter` without a witness.

    Reads ``failover.witness`` and ``failover.witness_timeout_s``, and, when the
    schema has them, ``witness_token_file``, ``witness_ca_file`` and
    ``witness_max_age_s`` (default 10 s). Raises :class:`ConfigError` if the
    token or CA file cannot be read: better refused at start than a witness
    that silently never agrees.
    """
    section = config.failover
    clock = clock or SystemClock()
    if section.witness is None:
        return NullVoter(clock)
    token_file: Path | None = getattr(section, "witness_token_file", None)
    ca_file: Path | None = getattr(section, "witness_ca_file", None)
    max_age_s = float(getattr(section, "witness_max_age_s", DEFAULT_MAX_AGE_S))
    verify: bool | ssl.SSLContext = True
    if ca_file is not None:
        try:
            verify = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"failover.witness_ca_file: cannot load {ca_file}: {exc}") from None
    return HttpWitnessVoter(
        section.witness,
        timeout_s=section.witness_timeout_s,
        max_age_s=max_age_s,
        clock=clock,
        token=read_token(token_file) if token_file is not None else None,
        verify=verify,
    )
