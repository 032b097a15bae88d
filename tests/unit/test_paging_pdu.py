"""SMS PDUs: golden vectors, and every encoding checked against the independent decoder smspdudecoder."""

from __future__ import annotations

import contextlib
import datetime as dt
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smspdudecoder.easy import read_incoming_sms, read_outgoing_sms
from smspdudecoder.fields import SMSDeliver, SMSSubmit

from appliance.paging import pdu
from appliance.paging.pdu import PduError
from tests.support.modem import gsm_text, read_submit

GSM_CHARS = pdu.GSM7_BASIC.replace("\x1b", "") + "".join(pdu.GSM7_EXT)


def test_reference_example_ucs2() -> None:
    (part,) = pdu.encode_submit("+8613800138000", "你好")
    assert part.hex == "0011000D91683108108300F00008AA044F60597D"  # REFERENCE.md
    assert part.tpdu_length == 19  # AT+CMGS=19: SMSC field excluded


def test_golden_gsm7_with_extension_table() -> None:
    (part,) = pdu.encode_submit("+8613800138000", "Cost: 5€ [x]", reference=7)
    decoded = SMSSubmit.decode(io.StringIO(part.hex))
    assert decoded["dcs"]["encoding"] == "gsm"
    assert gsm_text(part.hex, decoded) == "Cost: 5€ [x]"
    assert decoded["recipient"]["number"] == "8613800138000"
    # 15 septets leave 7 spare bits: a <CR> there (TS 23.038 6.1.2.3.1), as smspdudecoder's own
    # encoder writes it: GSM.encode("Cost: 5€ [x]", with_padding=True) ends in F81A.
    assert part.hex == "0011000D91683108108300F00000AA0FC3F79CAE03D53665D08687DFF81A"


def test_golden_deliver_with_smsc_field() -> None:
    # A real-world shaped SMS-DELIVER: SMSC +8613800100500, from +8613900139000, "ACK 42".
    hexpdu = pdu.encode_deliver("+8613900139000", "ACK 42")
    assert hexpdu.startswith("0891683108100005F0")
    ours = pdu.decode_deliver(hexpdu)
    theirs = SMSDeliver.decode(io.StringIO(hexpdu))
    assert theirs["smsc"]["number"] == "8613800100500" and ours.smsc == "+8613800100500"
    assert (ours.sender, ours.text) == ("+8613900139000", "ACK 42")
    assert read_incoming_sms(hexpdu)["content"] == "ACK 42"
    assert ours.timestamp == dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    assert theirs["scts"] == ours.timestamp


def test_decode_independent_vector() -> None:
    # From the smspdudecoder documentation (an SMS-DELIVER built by someone else).
    vector = "07919730071111F1000B919746121611F10000811170021222230DC8329BFD6681EE6F399B1C02"
    ours = pdu.decode_deliver(vector)
    theirs = read_incoming_sms(vector)
    assert ours.text == theirs["content"] == "Hello, world!"
    assert ours.sender == theirs["sender"] and ours.smsc == "+79037011111"


@settings(max_examples=120, deadline=None)
@given(st.text(alphabet=GSM_CHARS, min_size=1, max_size=400), st.integers(0, 255))
def test_gsm7_submit_round_trips_through_the_independent_decoder(text: str, ref: int) -> None:
    parts = pdu.encode_submit("+8613800138000", text, reference=ref)
    joined = ""
    for i, part in enumerate(parts, start=1):
        assert len(bytes.fromhex(part.hex)) - 1 == part.tpdu_length
        decoded = SMSSubmit.decode(io.StringIO(part.hex))
        joined += gsm_text(part.hex, decoded)
        if len(parts) > 1:
            (element,) = decoded["user_data"]["header"]["elements"]
            assert element["data"] == {"reference": ref, "parts_count": len(parts), "part_number": i}
        septets = pdu.gsm7_septets(gsm_text(part.hex, decoded))
        assert septets is not None and len(septets) <= (153 if len(parts) > 1 else 160)
    assert joined == text
    assert read_outgoing_sms(parts[0].hex)["recipient"] == "+8613800138000"


@settings(max_examples=120, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=300))
def test_ucs2_never_splits_a_surrogate_pair(text: str) -> None:
    if pdu.gsm7_septets(text) is not None:
        text = "中" + text
    parts = pdu.encode_submit("+8613800138000", text, reference=1)
    joined = ""
    for part in parts:
        decoded = SMSSubmit.decode(io.StringIO(part.hex))  # raises on half a surrogate pair
        assert decoded["dcs"]["encoding"] == "ucs2"
        units = len(decoded["user_data"]["data"].encode("utf-16-be")) // 2
        assert units <= (67 if len(parts) > 1 else 70)
        joined += decoded["user_data"]["data"]
    assert joined == text


def test_split_sizes() -> None:
    assert pdu.count_parts("a" * 160) == 1 and pdu.count_parts("a" * 161) == 2
    assert pdu.count_parts("€" * 80) == 1 and pdu.count_parts("€" * 81) == 2  # two septets each
    assert pdu.count_parts("中" * 70) == 1 and pdu.count_parts("中" * 71) == 2
    emoji = "😀" * 34  # 68 UTF-16 units: fits one part of 70
    assert pdu.count_parts(emoji) == 1
    parts = pdu.split_ucs2("中" + "😀" * 34)  # 69 units -> 1 part
    assert len(parts) == 1
    parts = pdu.split_ucs2("中中" + "😀" * 34)  # 70 units -> 1 part
    assert len(parts) == 1
    parts = pdu.split_ucs2("中中中" + "😀" * 34)  # 71 units: 3 + 32 pairs fill 67 exactly
    assert [len(p) // 2 for p in parts] == [67, 4]
    parts = pdu.split_ucs2("中中" + "😀" * 34 + "中")  # 67 units would end inside a pair -> 66 + 5
    assert [len(p) // 2 for p in parts] == [66, 5]
    assert "".join(p.decode("utf-16-be") for p in parts) == "中中" + "😀" * 34 + "中"
    gsm = pdu.split_gsm7(pdu.gsm7_septets("a" * 152 + "€" + "b" * 10) or [])
    assert [len(p) for p in gsm] == [152, 12]  # the escape pair is not split across parts


@pytest.mark.parametrize("encoding", ["gsm7", "ucs2"])
def test_deliver_concatenated_parts(encoding: str) -> None:
    text = "ACK 7 现在处理" if encoding == "ucs2" else "STATUS please"
    hexpdu = pdu.encode_deliver("+8613900139000", text, concat=(42, 2, 1))
    ours = pdu.decode_deliver(hexpdu)
    theirs = read_incoming_sms(hexpdu)
    assert ours.text == theirs["content"] == text
    assert ours.concat == (42, 2, 1) and theirs["partial"]["part_number"] == 1
    assert ours.encoding == encoding


def test_alphanumeric_sender_and_status_report() -> None:
    # A network text from an alphanumeric sender "BANK" (TOA 0xD0).
    body = bytes([0x04, 0x07, 0xD0]) + pdu.pack7(pdu.gsm7_septets("BANK") or []) + bytes([0, 0])
    body += bytes.fromhex("62203290030023") + bytes([2]) + pdu.pack7(pdu.gsm7_septets("hi") or [])
    ours = pdu.decode_deliver("00" + body.hex())
    assert ours.sender == "BANK" and ours.text == "hi"
    report = pdu.decode_status_report(pdu.encode_status_report(17, "+8613800138000", 0))
    assert (report.reference, report.recipient, report.delivered, report.final) == (
        17,
        "+8613800138000",
        True,
        True,
    )
    assert not pdu.decode_status_report(pdu.encode_status_report(3, "+8613800138000", 0x30)).final


@pytest.mark.parametrize("bad", ["", "zz", "07919730071111", "0004", "00440D91", "0011000D91683108"])
def test_malformed_pdus_raise_pdu_error(bad: str) -> None:
    with pytest.raises(PduError):
        pdu.decode_deliver(bad)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60))
def test_garbage_never_raises_anything_but_pdu_error(data: bytes) -> None:
    for decode in (pdu.decode_deliver, pdu.decode_status_report):
        with contextlib.suppress(PduError):
            decode(data.hex())


# The text of the demo's first page: 143 septets (each bracket is an escape pair), so 7 bits of
# its last octet are spare. It once showed in the demo's SMS log as "... or 2002@".
SPARE_SEVEN = (
    "[lab-backup-appliance] #1 CRITICAL: site:primary:sbc is down: 3 consecutive failures, "
    "last timeout: no reply within 0.4s. Reply ACK 1 or 2002"
)


def test_seven_spare_bits_carry_a_carriage_return_not_an_at_sign() -> None:
    septets = pdu.gsm7_septets(SPARE_SEVEN)
    assert septets is not None and len(septets) % 8 == 7
    (part,) = pdu.encode_submit("+8613800138000", SPARE_SEVEN)
    data = bytes.fromhex(part.hex)
    ud = data[-((7 * len(septets) + 7) // 8) :]
    assert data[-len(ud) - 1] == len(septets), "the UDL counts the text's septets only"
    assert pdu.unpack7(ud, len(septets) + 1)[-1] == pdu.CR  # TS 23.038 6.1.2.3.1
    assert pdu.gsm7_text(pdu.unpack7(ud, len(septets))) == SPARE_SEVEN


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=GSM_CHARS, min_size=1, max_size=400), st.integers(0, 255))
def test_the_modem_emulator_logs_exactly_what_was_sent(text: str, ref: int) -> None:
    """What the lab's SMS log and the tests read from the emulator is the text, nothing trailing."""
    parts = pdu.encode_submit("+8613800138000", text, reference=ref)
    assert "".join(read_submit(p.hex)[1] for p in parts) == text
    assert {read_submit(p.hex)[0] for p in parts} == {"+8613800138000"}


def test_the_demo_page_reads_back_without_a_trailing_at_sign() -> None:
    (part,) = pdu.encode_submit("+8613800138000", SPARE_SEVEN)
    assert read_submit(part.hex) == ("+8613800138000", SPARE_SEVEN)
