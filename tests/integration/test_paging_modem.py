"""The SMS channel against the pseudo-terminal modem emulator: real serial I/O, real faults."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest

from appliance.paging import pdu
from appliance.paging.channel import Message
from appliance.paging.modem import GsmChannel, Inbound, ModemHealth
from appliance.paging.oncall import Contact
from tests.support.modem import ModemEmulator

ZHANG = Contact("Zhang Wei", phone="+8613800138000")
LI = "+8613900139000"


@pytest.fixture
def emulator() -> Iterator[ModemEmulator]:
    emu = ModemEmulator().start()
    yield emu
    emu.stop()


class Harness:
    def __init__(self, emu: ModemEmulator, **options: object) -> None:
        self.inbound: list[Inbound] = []
        self.reports: list[tuple[int, pdu.StatusReport]] = []
        self.health: list[ModemHealth | None] = []
        self.events: list[str] = []

        async def on_text(message: Inbound) -> None:
            self.inbound.append(message)

        async def on_report(ref: int, report: pdu.StatusReport) -> None:
            self.reports.append((ref, report))

        settings: dict[str, object] = dict(
            send_timeout_s=1.0,
            prompt_timeout_s=0.5,
            command_timeout_s=0.5,
            retries=2,
            backoff_s=0.05,
            poll_s=30.0,
            health_s=30.0,
        )
        settings.update(options)
        self.channel = GsmChannel(
            "sms",
            emu.path,
            on_text=on_text,
            on_report=on_report,
            on_health=self.health.append,
            on_event=self.events.append,
            **settings,  # type: ignore[arg-type]
        )


async def until(predicate, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def run(emulator: ModemEmulator, body: Callable[[Harness], Awaitable[None]], **options: object) -> Harness:
    """Start a channel on the emulator, run ``body``, stop the channel (no async plugin needed)."""

    async def main() -> Harness:
        h = Harness(emulator, **options)
        await h.channel.start()
        try:
            await asyncio.wait_for(body(h), 20)
        finally:
            await h.channel.stop()
        return h

    return asyncio.run(main())


def test_init_health_and_a_long_chinese_page(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        assert harness.channel.up
        assert emulator.commands[:6] == [
            "AT",
            "ATE0",
            "AT+CMEE=1",
            "AT+CPIN?",
            "AT+CMGF=0",
            "AT+CNMI=2,1,0,1,0",
        ]
        await until(lambda: harness.health)
        health = harness.health[-1]
        assert health is not None and health.registered and health.signal_dbm == -73.0
        text = "主站点故障，呼叫已切换到备用中心。请尽快回复确认。" * 4  # 100 characters: two UCS2 parts
        delivery = await harness.channel.send(Message(ZHANG, text))
        assert delivery.result == "sent", delivery
        assert len(emulator.submitted) == 2
        decoded = emulator.submitted_texts()
        assert "".join(t for _, t in decoded) == text and {r for r, _ in decoded} == {"+8613800138000"}
        await until(lambda: len(harness.reports) == 2)
        assert sorted(str(ref) for ref, _ in harness.reports) == sorted(delivery.reference.split(","))  # type: ignore[union-attr]
        assert all(r.delivered for _, r in harness.reports)

    run(emulator, body)


def test_slow_prompt_is_waited_for(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        emulator.prompt_delay = 0.3
        emulator.reply_delay = 0.4
        assert (await harness.channel.send(Message(ZHANG, "slow"))).sent
        assert len(emulator.submitted) == 1

    run(emulator, body)


def test_missing_prompt_aborts_with_esc_and_resets(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        emulator.prompt_delay = 5.0  # never within prompt_timeout_s
        delivery = await harness.channel.send(Message(ZHANG, "no prompt"))
        assert delivery.result == "failed" and "prompt" in delivery.detail and delivery.retryable
        assert emulator.submitted == []
        emulator.prompt_delay = 0.0
        assert (await harness.channel.send(Message(ZHANG, "after reset"))).sent
        assert "reset" in harness.events

    run(emulator, body)


def test_cms_errors_retry_transient_and_stop_on_permanent(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        emulator.cms_errors = [42, 332]  # congestion, network timeout: then it works
        delivery = await harness.channel.send(Message(ZHANG, "retry me"))
        assert delivery.sent and len(emulator.submitted) == 1
        emulator.cms_errors = [1]  # unassigned number: retrying cannot help
        delivery = await harness.channel.send(Message(ZHANG, "bad number"))
        assert delivery.result == "failed" and not delivery.retryable
        assert "+CMS ERROR 1 (unassigned number)" in delivery.detail
        assert emulator.cms_errors == [] and len(emulator.submitted) == 1

    run(emulator, body)


def test_no_network_fails_retryably(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        emulator.creg = 0
        delivery = await harness.channel.send(Message(ZHANG, "no network"))
        assert delivery.result == "failed" and delivery.retryable and "331" in delivery.detail
        assert "no network service" in delivery.detail
        health = await harness.channel.modem.health()
        assert not health.registered

    run(emulator, body)


def test_sim_not_ready_and_pin(emulator: ModemEmulator) -> None:
    emulator.sim = "SIM PIN"

    async def without_pin(h: Harness) -> None:
        assert not h.channel.up and "SIM not ready: SIM PIN" in h.channel.last_error
        delivery = await h.channel.send(Message(ZHANG, "x"))
        assert delivery.result == "failed" and "SIM not ready" in delivery.detail
        assert emulator.submitted == []

    run(emulator, without_pin)
    emulator.pin = "1234"

    async def with_pin(h: Harness) -> None:
        assert h.channel.up and 'AT+CPIN="1234"' in emulator.commands
        assert (await h.channel.send(Message(ZHANG, "x"))).sent

    run(emulator, with_pin, pin="1234")


def test_hang_is_reset_and_the_page_still_goes(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        emulator.hang_on = "AT+CMGS"
        delivery = await harness.channel.send(Message(ZHANG, "through a hang"))
        assert delivery.sent, delivery
        assert emulator.resets == 1 and len(emulator.submitted) == 1
        assert emulator.commands.count("ATE0") == 2  # re-initialised after the reset

    run(emulator, body)


def test_odd_reply_after_pdu_is_uncertain_and_never_resent(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        emulator.silent_after_pdu = True
        delivery = await harness.channel.send(Message(ZHANG, "maybe sent"))
        assert delivery.result == "uncertain"
        await asyncio.sleep(0.3)
        assert len(emulator.submitted) == 1  # no duplicate (gammu #416)
        assert (await harness.channel.send(Message(ZHANG, "next one"))).sent

    run(emulator, body)


def test_inbound_cmti_mid_command_gsm7_and_ucs2(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        emulator.inject_sms(LI, "ACK 42", mid_command=True)
        await harness.channel.send(Message(ZHANG, "a page while a text arrives"))
        emulator.inject_sms(LI, "收到，正在处理", ucs2=True)
        await until(lambda: len(harness.inbound) == 2)
        assert [(m.sender, m.text) for m in harness.inbound] == [(LI, "ACK 42"), (LI, "收到，正在处理")]
        await until(lambda: emulator.storage == {})  # deleted after processing

    run(emulator, body)


def test_poll_finds_texts_whose_cmti_was_dropped(emulator: ModemEmulator) -> None:
    async def body(harness: Harness) -> None:
        emulator.inject_sms(LI, "STATUS ", notify=False, concat=(9, 2, 1))
        emulator.inject_sms(LI, "please", notify=False, concat=(9, 2, 2))
        emulator.store_pdu("00GARBAGE", notify=False)
        assert await harness.channel.poll() == 3
        assert [(m.sender, m.text) for m in harness.inbound] == [(LI, "STATUS please")]
        assert emulator.storage == {} and "bad_pdu" in harness.events
        assert "AT+CMGL=4" in emulator.commands

    run(emulator, body)
