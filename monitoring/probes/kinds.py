"""The one table of probe kinds: a kind's name, how its URL reads, how it is probed, how it is judged.

Everything that used to list kinds reads this table: the prober's dispatch
(:class:`monitoring.prober.Prober`), target URLs (:func:`monitoring.targets.parse_url`,
and through it the config's site checks and ``hotsite probe``), which kinds
count as independent evidence about a site (the config's warning, the
witness's targets), the monitor's thresholds and code metric, and the help
texts. A new kind is one module (its probe, keeping :class:`~monitoring.probes.base.Probe`,
and a URL parser returning an :class:`~monitoring.probes.base.Address`) and
one line in :data:`KINDS`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from appliance.fields import is_host
from monitoring.probes.base import Address, Probe, ProbeContext, ProbeResult, ProbeTarget
from monitoring.probes.http import HttpProbe
from monitoring.probes.icmp import IcmpProbe
from monitoring.probes.sip import SipOptionsProbe
from monitoring.probes.tcp import TcpConnectProbe
from monitoring.probes.testcall import TestCall

SIP_TRANSPORTS = ("udp", "tcp", "tls")
_SIP_DEFAULT_PORT = {"udp": 5060, "tcp": 5060, "tls": 5061}


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of probe and everything the rest of hotsite needs to know about it."""

    name: str  # the metric label and Target.kind: "sip", "http", ...
    make: Callable[[ProbeContext], Probe]  # the prober calls it once, on the first target of this kind
    schemes: tuple[str, ...] = ()  # URL prefixes, lower case ("tcp://"); none: not written as a URL
    parse: Callable[[str], Address] | None = None  # raises ValueError naming what is wrong
    form: str = ""  # the URL form for help texts: "tcp://HOST:PORT"
    expected: str = ""  # the same, as an error message says what it expected
    label: str = ""  # the scheme as a sentence names it: "tcp://"
    evidence: bool = False  # an independent view of a site: a site check, a witness target
    polled: bool = True  # False: reported by events (netlink), never scheduled
    thresholds: Literal["probes", "definitive", "calls"] = "probes"  # which rise/fall judge it
    reports_code: bool = False  # a final status code worth a metric (SIP, HTTP)
    matches_body: bool = False  # ``expect_body`` applies


# ---------------------------------------------------------------------------
# URL parsing, kind by kind


def _check_host(host: str, url: str) -> str:
    if not host:
        raise ValueError(f"{url!r}: no host")
    if not is_host(host):
        raise ValueError(f"{url!r}: {host!r} is neither an IP address nor a host name")
    return host


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{url!r}: port must be 1-65535, got {text!r}")
    return int(text)


def _parse_sip(url: str) -> Address:
    body, *params = url[4:].split(";")
    transport = "udp"
    for param in params:
        key, _, value = param.partition("=")
        if key.lower() != "transport":
            continue
        if value.lower() not in SIP_TRANSPORTS:
            raise ValueError(f"{url!r}: transport must be udp, tcp or tls, got {value!r}")
        transport = value.lower()
    if "@" in body:
        body = body.rsplit("@", 1)[1]
    if body.startswith("["):
        host, _, rest = body[1:].partition("]")
        port_text = rest.lstrip(":")
    else:
        host, _, port_text = body.partition(":")
    port = _port(port_text, url) if port_text else _SIP_DEFAULT_PORT[transport]
    return Address(_check_host(host, url), port, transport)


def _parse_http(url: str) -> Address:
    parts = urlsplit(url)
    _check_host(parts.hostname or "", url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{url!r}: port must be 1-65535")
    return Address(parts.hostname or "", port or 0, url=url)


def _parse_tcp(url: str) -> Address:
    host, sep, port_text = url[6:].rstrip("/").rpartition(":")
    if not sep:
        raise ValueError(f"{url!r}: expected tcp://HOST:PORT")
    return Address(_check_host(host.strip("[]"), url), _port(port_text, url))


def _parse_icmp(url: str) -> Address:
    return Address(_check_host(url[7:].rstrip("/"), url))


# ---------------------------------------------------------------------------
# Each kind's probe as the prober holds it


class _SipKind:
    """SIP OPTIONS; which final codes count as alive is the target's business (default any 2xx)."""

    def __init__(self, ctx: ProbeContext) -> None:
        # The probe reports every final reply (408 never: the probe enforces that).
        self._probe = SipOptionsProbe(
            accept=lambda code: True, clock=ctx.clock, on_unmatched=ctx.on_unmatched, ssl_context=ctx.tls
        )

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if target.transport and target.transport != "udp":
            result = await self._probe.probe(
                target.name, target.host, target.port, timeout=timeout, transport=target.transport
            )
        else:
            result = await self._probe.probe(target.name, target.host, target.port, timeout=timeout)
        if result.code is None or result.code < 200:
            return result
        codes = target.accept_codes
        alive = result.code in codes if codes else 200 <= result.code < 300
        if alive == result.ok:
            return result
        if alive:
            return dataclasses.replace(result, ok=True, reason="ok")
        return dataclasses.replace(result, ok=False, reason="bad_code")

    async def close(self) -> None:
        await self._probe.close()


class _HttpKind:
    def __init__(self, ctx: ProbeContext) -> None:
        self._probe = HttpProbe(clock=ctx.clock, verify=ctx.tls)
        self._patterns: dict[str, re.Pattern[str]] = {}

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        pattern = None
        if target.expect_body is not None:
            pattern = self._patterns.setdefault(target.expect_body, re.compile(target.expect_body))
        return await self._probe.probe(target.name, target.url, timeout=timeout, body_pattern=pattern)

    async def close(self) -> None:
        await self._probe.close()


class _TcpKind:
    def __init__(self, ctx: ProbeContext) -> None:
        self._probe = TcpConnectProbe(clock=ctx.clock)

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        return await self._probe.probe(target.name, target.host, target.port, timeout=timeout)

    async def close(self) -> None:
        pass


class _IcmpKind:
    def __init__(self, ctx: ProbeContext) -> None:
        self._probe = IcmpProbe(clock=ctx.clock)

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        return await self._probe.probe(target.name, target.host, timeout=timeout)

    async def close(self) -> None:
        pass


class _HostKind:
    """The appliance's own disk, memory and temperature (the daemon's HostProbe samples them)."""

    def __init__(self, ctx: ProbeContext) -> None:
        self._host = ctx.host

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if self._host is None:
            raise ValueError("host targets need a HostProbe")
        result: ProbeResult = self._host.probe(target.name, target.host)
        return result

    async def close(self) -> None:
        pass


class _TestcallKind:
    def __init__(self, ctx: ProbeContext) -> None:
        self._ctx = ctx

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if target.call is None:
            raise ValueError(f"testcall target {target.name} has no call to place")
        if self._ctx.calls is None:
            raise ValueError("testcall targets need the prober's call slots")
        async with self._ctx.calls:  # waiting for a slot counts against the target's timeout
            result = await TestCall(target.call, clock=self._ctx.clock).run()
        self._ctx.last_calls[target.name] = result
        return result.to_probe()

    async def close(self) -> None:
        pass


class _LinkKind:
    """Carrier state comes from netlink events (monitoring.probes.link.LinkMonitor), never a probe."""

    def __init__(self, ctx: ProbeContext) -> None:
        pass

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        raise ValueError(f"unknown target kind 'link' for {target.name}: links are watched, not probed")

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# The table: one line per kind. Order is the order of help texts and error messages.

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("sip", _SipKind, ("sip:",), _parse_sip, "sip:HOST[:PORT][;transport=udp|tcp|tls]",
             "sip:HOST:PORT;transport=udp|tcp|tls", "sip:", evidence=True, reports_code=True),
        Kind("http", _HttpKind, ("http://", "https://"), _parse_http, "http(s)://HOST[:PORT]/PATH",
             "http(s)://…", "http(s)://", evidence=True, reports_code=True, matches_body=True),
        Kind("tcp", _TcpKind, ("tcp://",), _parse_tcp, "tcp://HOST:PORT", "tcp://HOST:PORT", "tcp://",
             evidence=True),
        Kind("icmp", _IcmpKind, ("icmp://",), _parse_icmp, "icmp://HOST", "icmp://HOST", "icmp://",
             evidence=True),
        Kind("host", _HostKind),
        Kind("link", _LinkKind, polled=False, thresholds="definitive"),
        Kind("testcall", _TestcallKind, thresholds="calls", reports_code=True),
    )
}  # fmt: skip


def get(name: str) -> Kind:
    """The kind called ``name``; ValueError for a name no line of :data:`KINDS` has."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown target kind {name!r}") from None


def for_url(url: str) -> Kind | None:
    """The kind whose scheme ``url`` starts with (case-insensitive), if any."""
    lowered = url.lower()
    return next((k for k in KINDS.values() if k.parse and lowered.startswith(k.schemes)), None)


def _either(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def expected_urls(evidence_only: bool = False) -> str:
    """``sip:HOST:PORT;…, http(s)://…, tcp://HOST:PORT or icmp://HOST``: what an error says it expected."""
    return _either([k.expected for k in KINDS.values() if k.parse and (k.evidence or not evidence_only)])


def url_labels(evidence_only: bool = False) -> str:
    """``sip:, http(s)://, tcp:// or icmp://``: the schemes, as a sentence names them."""
    return _either([k.label for k in KINDS.values() if k.parse and (k.evidence or not evidence_only)])


def url_forms() -> list[str]:
    """One line per URL form, for help texts."""
    return [k.form for k in KINDS.values() if k.parse]


def evidence_kinds() -> list[str]:
    """The kinds that are independent evidence about a site, in table order."""
    return [k.name for k in KINDS.values() if k.evidence]
