"""Per-trunk call KPIs from real traffic, counted by Kamailio itself (monitoring/KPIS.md).

The carrier-edge Kamailio counts, per carrier trunk (the INVITE's source
address), in statistics of its ``statistics`` module: attempts, answered
calls, final failures by class (3xx-6xx) and by the usual codes, and the
post-dial delay (sum of milliseconds and number of calls that rang). hotsite
reads the totals with one ``stats.get_statistics`` call per poll — never one
call per call — and derives, over a sliding window:

* ASR, answer-seizure ratio: answered / attempts;
* NER, network effectiveness ratio (ITU-T E.425, GSMA IR.42): attempts that
  ended in an answer *or a user's decision* (busy, no answer, declined,
  cancelled by the caller: :data:`USER_CODES`) / attempts;
* the average PDD and the most frequent failure code.

The pure parts (stat names, parsing, windows, the health judgement) take
numbers and a clock reading and return numbers, so they are tested with a
simulated clock; the poller at the bottom is the only I/O.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Final failure codes counted one by one (others only in their class).
CODES: tuple[int, ...] = (
    403, 404, 408, 480, 484, 486, 487, 488, 500, 502, 503, 504, 600, 603, 604,
)  # fmt: skip
# Outcomes that are the called party's (or the caller's) doing, not the network's: NER counts them.
# 480 no answer / unavailable, 486 and 600 busy, 487 the caller gave up, 603 declined.
USER_CODES: frozenset[int] = frozenset({480, 486, 487, 600, 603})
CLASSES: tuple[str, ...] = ("3xx", "4xx", "5xx", "6xx")
COUNTERS: tuple[str, ...] = ("attempts", "answered", "pdd_ms", "pdd_calls")
GROUP = "script"  # where the statistics module puts the variables a config declares

_UNSAFE = re.compile(r"[^A-Za-z0-9]")


def stat_prefix(ip: str) -> str:
    """``kpi_10_77_0_11``: the prefix of one trunk's statistics (names allow no dots or colons)."""
    return "kpi_" + _UNSAFE.sub("_", ip)


def stat_names(ip: str) -> list[str]:
    """Every statistic the generated config declares (and updates) for the trunk at *ip*."""
    p = stat_prefix(ip)
    return (
        [f"{p}_{c}" for c in COUNTERS]
        + [f"{p}_fail_{k}" for k in CLASSES]
        + [f"{p}_code_{code}" for code in CODES]
    )


# ---------------------------------------------------------------------------
# Counters (cumulative, as Kamailio holds them) and their differences


@dataclass(frozen=True, slots=True)
class Counters:
    attempts: int = 0
    answered: int = 0
    pdd_ms: int = 0
    pdd_calls: int = 0
    classes: Mapping[str, int] = field(default_factory=dict)  # "4xx" -> final failures
    codes: Mapping[int, int] = field(default_factory=dict)  # 503 -> final failures

    def minus(self, older: Counters) -> Counters:
        """What happened between *older* and this reading."""
        return Counters(
            attempts=self.attempts - older.attempts,
            answered=self.answered - older.answered,
            pdd_ms=self.pdd_ms - older.pdd_ms,
            pdd_calls=self.pdd_calls - older.pdd_calls,
            classes={k: v - older.classes.get(k, 0) for k, v in self.classes.items()},
            codes={k: v - older.codes.get(k, 0) for k, v in self.codes.items()},
        )

    def reset_since(self, older: Counters) -> bool:
        """A counter went backwards: Kamailio restarted and counts from zero again."""
        pairs = [(self.attempts, older.attempts), (self.answered, older.answered)]
        pairs += [(self.pdd_calls, older.pdd_calls), (self.pdd_ms, older.pdd_ms)]
        pairs += [(v, older.classes.get(k, 0)) for k, v in self.classes.items()]
        return any(new < old for new, old in pairs)

    @property
    def failed(self) -> int:
        return sum(self.classes.values())

    @property
    def user_failures(self) -> int:
        return sum(n for code, n in self.codes.items() if code in USER_CODES)

    @property
    def asr(self) -> float | None:
        return None if self.attempts <= 0 else self.answered / self.attempts

    @property
    def ner(self) -> float | None:
        if self.attempts <= 0:
            return None
        return min(1.0, (self.answered + self.user_failures) / self.attempts)

    @property
    def pdd_avg_ms(self) -> float | None:
        return None if self.pdd_calls <= 0 else self.pdd_ms / self.pdd_calls

    @property
    def network_failures(self) -> int:
        return max(0, self.failed - self.user_failures)

    def top_failure(self) -> tuple[str, int] | None:
        """The most frequent final failure: a code when it is counted alone, else its class."""
        counted = {str(code): n for code, n in self.codes.items() if n > 0}
        for klass, n in self.classes.items():
            alone = sum(m for code, m in self.codes.items() if str(code)[0] == klass[0])
            if n - alone > 0:
                counted[f"other {klass}"] = n - alone
        if not counted:
            return None
        return max(sorted(counted.items()), key=lambda item: item[1])


class KpiParseError(ValueError):
    """Kamailio's answer to stats.get_statistics was not what this module expects."""


_STAT_LINE = re.compile(r"^(?:(?P<group>[^:=\s]+):)?(?P<name>[^=\s]+)\s*=\s*(?P<value>-?\d+)\s*$")


def parse_statistics(result: Any) -> dict[str, int]:
    """``["script:kpi_10_77_0_11_attempts = 12", ...]`` (stats.get_statistics) -> {name: value}."""
    if not isinstance(result, list):
        raise KpiParseError(f"expected a list of 'group:name = value' strings, got {result!r:.120}")
    values: dict[str, int] = {}
    for item in result:
        match = _STAT_LINE.match(item) if isinstance(item, str) else None
        if match is None:
            raise KpiParseError(f"expected 'group:name = value', got {item!r:.120}")
        values[match["name"]] = int(match["value"])
    return values


def counters_for(ip: str, values: Mapping[str, int]) -> Counters | None:
    """One trunk's counters from the parsed statistics; None when Kamailio does not count it."""
    p = stat_prefix(ip)
    if f"{p}_attempts" not in values:
        return None
    return Counters(
        attempts=values.get(f"{p}_attempts", 0),
        answered=values.get(f"{p}_answered", 0),
        pdd_ms=values.get(f"{p}_pdd_ms", 0),
        pdd_calls=values.get(f"{p}_pdd_calls", 0),
        classes={k: values.get(f"{p}_fail_{k}", 0) for k in CLASSES},
        codes={code: values.get(f"{p}_code_{code}", 0) for code in CODES},
    )


# ---------------------------------------------------------------------------
# The sliding window: readings kept for window_s, the difference is the window's traffic


@dataclass(slots=True)
class Window:
    """Cumulative readings of one trunk, oldest first, covering at least ``window_s``."""

    window_s: float
    readings: deque[tuple[float, Counters]] = field(default_factory=deque)

    def add(self, now: float, counters: Counters) -> None:
        if self.readings and counters.reset_since(self.readings[-1][1]):
            self.readings.clear()  # Kamailio restarted: what came before is another count
        self.readings.append((now, counters))
        # Keep the newest reading at or before now - window_s as the window's base.
        while len(self.readings) >= 2 and self.readings[1][0] <= now - self.window_s:
            self.readings.popleft()

    def traffic(self) -> Counters:
        """What happened in the window (less when fewer readings are known)."""
        if not self.readings:
            return Counters()
        return self.readings[-1][1].minus(self.readings[0][1])

    @property
    def span_s(self) -> float:
        return 0.0 if not self.readings else self.readings[-1][0] - self.readings[0][0]


# ---------------------------------------------------------------------------
# The health judgement: calls failing, from real traffic

CallsState = Literal["unknown", "ok", "failing"]


@dataclass(frozen=True, slots=True)
class AsrPolicy:
    min_asr_pct: float = 20.0  # below this ASR over the window: calls failing
    recover_asr_pct: float = 30.0  # failing until the ASR is back at or above this
    min_attempts: int = 20  # fewer attempts in the window: no judgement at all

    def __post_init__(self) -> None:
        if not 0 <= self.min_asr_pct <= self.recover_asr_pct <= 100:
            raise ValueError(
                f"expected 0 <= min_asr_pct ({self.min_asr_pct}) <= recover_asr_pct"
                f" ({self.recover_asr_pct}) <= 100"
            )
        if self.min_attempts < 1:
            raise ValueError(f"min_attempts must be >= 1, got {self.min_attempts}")


@dataclass(frozen=True, slots=True)
class CallsHealth:
    """What the real traffic of one trunk says, and why."""

    state: CallsState = "unknown"
    since: float | None = None
    why: str = "not enough calls yet"


def judge_calls(
    previous: CallsHealth, traffic: Counters, window_s: float, policy: AsrPolicy, now: float
) -> CallsHealth:
    """Judge one trunk's calls over the window: failing only on enough attempts with a low ASR.

    Below ``min_attempts`` nothing is judged (``unknown``): three failed calls at
    night are no evidence. Failing needs ASR < ``min_asr_pct``; once failing, the
    trunk recovers at ASR >= ``recover_asr_pct`` (hysteresis: no flapping at the line).
    """
    if traffic.attempts < policy.min_attempts or traffic.asr is None:
        state: CallsState = "unknown"
        why = f"{max(traffic.attempts, 0)} attempt(s) in {window_s:g} s, fewer than {policy.min_attempts}"
    else:
        asr_pct = 100.0 * traffic.asr
        line = policy.recover_asr_pct if previous.state == "failing" else policy.min_asr_pct
        state = "failing" if asr_pct < line else "ok"
        why = evidence(traffic, window_s)
    since = previous.since if state == previous.state and previous.since is not None else now
    return CallsHealth(state=state, since=since, why=why)


def evidence(traffic: Counters, window_s: float) -> str:
    """``ASR 5% over 40 attempts in 300 s, top failure 503 (30)``."""
    asr = traffic.asr or 0.0
    text = f"ASR {100 * asr:.0f}% over {traffic.attempts} attempts in {window_s:g} s"
    top = traffic.top_failure()
    return text + (f", top failure {top[0]} ({top[1]})" if top else "")


def trunk_state(options_state: str, options_why: str, calls: CallsHealth) -> tuple[str, str]:
    """A trunk answering OPTIONS whose real calls fail is ``degraded: calls failing``."""
    if options_state == "up" and calls.state == "failing":
        return "degraded", f"calls failing: {calls.why}"
    return options_state, options_why


def view(traffic: Counters, window_s: float, span_s: float) -> dict[str, Any]:
    """The KPIs of one window, for the API, the CLI and the metrics."""
    asr, ner, pdd = traffic.asr, traffic.ner, traffic.pdd_avg_ms
    top = traffic.top_failure()
    return {
        "window_s": window_s,
        "span_s": round(span_s, 1),
        "attempts": traffic.attempts,
        "answered": traffic.answered,
        "failed": traffic.failed,
        "asr_pct": None if asr is None else round(100 * asr, 1),
        "ner_pct": None if ner is None else round(100 * ner, 1),
        "failures": {k: v for k, v in traffic.classes.items() if v},
        "codes": {str(k): v for k, v in traffic.codes.items() if v},
        "network_failures": traffic.network_failures,
        "user_failures": traffic.user_failures,
        "pdd_avg_ms": None if pdd is None else round(pdd, 1),
        "top_failure": None if top is None else {"code": top[0], "count": top[1]},
    }
