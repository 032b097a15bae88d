"""E-mail pages over SMTP (STARTTLS, AUTH), through the stdlib client in a worker thread.

Why smtplib in a thread rather than an async client: one page at a time is the
load, and smtplib is the best-trodden SMTP client there is. The password comes
from ``password_file`` and is never sent before STARTTLS succeeded.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from appliance.paging.channel import Channel, Delivery, Message
from appliance.paging.oncall import Contact


class SmtpChannel(Channel):
    kind = "smtp"

    def __init__(
        self,
        name: str,
        host: str,
        port: int = 587,
        *,
        from_addr: str,
        starttls: bool = True,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        self.name = name
        self.host, self.port = host, port
        self.from_addr = from_addr
        self.starttls = starttls
        self.username, self.password = username, password
        self.ca_file = ca_file
        self.send_timeout_s = timeout_s

    def can_reach(self, contact: Contact) -> bool:
        return contact.email is not None

    async def send(self, message: Message) -> Delivery:
        if message.contact.email is None:
            return Delivery("failed", f"{message.contact.name} has no e-mail address", retryable=False)
        try:
            async with asyncio.timeout(self.send_timeout_s + 5):
                return await asyncio.to_thread(self._send, message)
        except TimeoutError:
            return Delivery(
                "failed", f"SMTP {self.host}:{self.port} did not finish within {self.send_timeout_s:g} s"
            )

    def _login(self, client: smtplib.SMTP) -> None:
        """One attempt with one mechanism: smtplib's login() tries every mechanism in turn after a
        refusal, and some servers answer the second attempt with silence until the timeout."""
        advertised = (client.esmtp_features.get("auth") or "").upper().split()
        mechanism = next((m for m in ("PLAIN", "LOGIN") if m in advertised), None)
        if mechanism is None:
            client.login(self.username or "", self.password or "")  # let smtplib pick (CRAM-MD5…)
            return
        client.user, client.password = self.username or "", self.password or ""
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        client.auth(mechanism, authobject, initial_response_ok=True)

    def _send(self, message: Message) -> Delivery:
        mail = EmailMessage()
        mail["From"] = self.from_addr
        mail["To"] = message.contact.email
        mail["Subject"] = message.subject or message.text.split("\n", 1)[0][:120]
        mail["Date"] = formatdate(localtime=False)
        mail["Message-ID"] = make_msgid(domain=self.from_addr.split("@", 1)[1])
        if message.dedup_key:
            mail["X-Hotsite-Page"] = message.dedup_key
        mail.set_content(message.text + "\n")
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.send_timeout_s) as client:
                client.ehlo()
                if self.starttls:
                    if not client.has_extn("starttls"):
                        return Delivery("failed", f"{self.host} does not offer STARTTLS", retryable=False)
                    context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
                    client.starttls(context=context)
                    client.ehlo()
                if self.username:
                    self._login(client)
                refused = client.send_message(mail)
        except smtplib.SMTPAuthenticationError as exc:
            return Delivery("failed", f"SMTP login refused: {exc.smtp_code}", retryable=False)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = {code for code, _ in exc.recipients.values()}
            return Delivery(
                "failed", f"recipient refused: {sorted(codes)}", retryable=all(c < 500 for c in codes)
            )
        except smtplib.SMTPResponseException as exc:
            return Delivery(
                "failed", f"SMTP {exc.smtp_code} {exc.smtp_error[:80]!r}", retryable=exc.smtp_code < 500
            )
        except ssl.SSLError as exc:
            return Delivery("failed", f"TLS with {self.host} failed: {exc.reason}", retryable=False)
        except (smtplib.SMTPException, OSError) as exc:
            return Delivery("failed", f"SMTP {self.host}:{self.port}: {exc}")
        if refused:
            return Delivery("failed", f"recipient refused: {refused}")
        return Delivery("sent", f"250 from {self.host}", reference=str(mail["Message-ID"]))
