"""The one interface every paging channel implements, and the fallback rule.

A channel delivers one text to one contact. The outbox (``outbox.py``)
decides when to call it and what to do with the answer; the channel only says
what happened, in one of three words, because that is what makes "exactly
once" possible:

- ``sent``: the far end took it (``+CMGS: <mr>``, SMTP 250, HTTP 2xx).
- ``failed``: it certainly did not go out; safe to try again or fall back.
  ``retryable`` says whether trying again later could help (a 400 never will).
- ``uncertain``: it may have gone out (the modem got the whole PDU and then
  said something odd or nothing at all: gammu's bug #416). Resent at once on
  the next channel, and on the same channel only marked "(repeat)" (PAGING.md).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.paging.oncall import Contact

Result = Literal["sent", "failed", "uncertain"]
# A send's progress, reported by the channel as it goes: (channel, phase, part, parts).
# Phases: "handed" (given to a channel that reports nothing finer), and for SMS per part
# "command" (AT+CMGS written), "prompt" ('>' seen), "pdu" (about to write the PDU),
# "answered" (+CMGS: the part went out), "error" (+CMS/+CME: it certainly did not).
Progress = Callable[[str, str, int, int], None]


@dataclass(frozen=True, slots=True)
class Message:
    """One page: ``text`` for SMS, ``subject`` + ``text`` for e-mail, the rest for webhooks."""

    contact: Contact
    text: str
    subject: str = ""
    incident: int | None = None
    kind: str = "trigger"  # trigger | resolve | reply | test
    dedup_key: str = ""
    severity: str = "error"
    details: dict[str, Any] = field(default_factory=dict)
    progress: Progress | None = field(default=None, compare=False, repr=False)

    def report(self, channel: str, phase: str, part: int = 0, parts: int = 1) -> None:
        """Tell the outbox how far this send got (persisted before the step it names)."""
        if self.progress is not None:
            self.progress(channel, phase, part, parts)


@dataclass(frozen=True, slots=True)
class Delivery:
    result: Result
    detail: str = ""
    retryable: bool = True
    reference: str | None = None  # e.g. the SMS message references, for delivery reports

    @property
    def sent(self) -> bool:
        return self.result == "sent"


class Channel(abc.ABC):
    """A way to reach a contact.

    Contract:

    - :meth:`send` returns a :class:`Delivery` within ``send_timeout_s`` plus a
      few seconds; it never raises for a delivery problem (a network error, a
      modem error, a bad reply): those are ``failed`` or ``uncertain``. It is
      safe to call concurrently; channels serialise internally if they must.
    - :meth:`can_reach` is pure: does this channel have an address for the contact?
    - :meth:`start` / :meth:`stop` bracket the channel's life; ``stop`` is
      idempotent and cancels background work (modem polling).
    - :meth:`health` returns a small JSON-able dict for ``hotsite status``.
    """

    name: str = "null"
    kind: str = "null"
    send_timeout_s: float = 10.0
    # True when send() reports its own phases through Message.report (the SMS channel);
    # otherwise the caller records "handed" before calling send().
    reports_phases: bool = False
    # True when the channel sends one message at a time (a modem on one serial port): the
    # outbox then claims one row for it at a time, so rows never pile up claimed behind it.
    exclusive: bool = False

    @abc.abstractmethod
    def can_reach(self, contact: Contact) -> bool: ...

    @abc.abstractmethod
    async def send(self, message: Message) -> Delivery: ...

    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def stop(self) -> None:  # noqa: B027 - optional hook
        pass

    def health(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}


class NullChannel(Channel):
    """Reaches everyone and records what it was given: for tests, benchmarks and dry runs."""

    kind = "null"

    def __init__(self, name: str = "null", result: Result = "sent", retryable: bool = True) -> None:
        self.name = name
        self.result: Result = result
        self.retryable = retryable
        self.sent: list[Message] = []

    def can_reach(self, contact: Contact) -> bool:
        return True

    async def send(self, message: Message) -> Delivery:
        self.sent.append(message)
        return Delivery(self.result, f"null channel {self.name}", retryable=self.retryable)


async def send_with_fallback(channels: list[Channel], message: Message) -> tuple[Delivery, str, list[str]]:
    """Try each channel that can reach the contact, in order, until one does not fail.

    Returns the last delivery, the channel that produced it, and a line per
    channel tried (for the outbox's record and ``hotsite page test``).
    """
    tried: list[str] = []
    last = Delivery("failed", "no configured channel can reach this contact", retryable=False)
    used, retryable, uncertain = "", False, None
    for channel in channels:
        if not channel.can_reach(message.contact):
            continue
        if not channel.reports_phases:
            message.report(channel.name, "handed")
        delivery = await channel.send(message)
        tried.append(f"{channel.name}: {delivery.result} {delivery.detail}".strip())
        if delivery.sent:
            return delivery, channel.name, tried
        if delivery.result == "uncertain":
            # It may have gone out: go on to the next channel (a second medium is no
            # duplicate), but never report this page as certainly failed.
            uncertain = uncertain or (delivery, channel.name)
        retryable = retryable or delivery.retryable
        last, used = delivery, channel.name
    if uncertain is not None:
        return uncertain[0], uncertain[1], tried
    if tried:
        last = Delivery("failed", last.detail, retryable=retryable, reference=last.reference)
    return last, used, tried
