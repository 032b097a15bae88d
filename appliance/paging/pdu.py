"""SMS PDUs (3GPP TS 23.040 / 23.038): SMS-SUBMIT encoding, SMS-DELIVER and status report decoding.

Why PDU mode rather than text mode: text mode cannot carry Chinese reliably
(the modem's character set is a guess) nor concatenated messages. Here:

- GSM 7-bit default alphabet with the extension table (``{ } [ ] ~ \\ | ^ €``
  take two septets, escape 0x1B first) when the text fits it, else UCS2;
- long texts are split into parts of 153 septets / 67 UCS2 units with a
  concatenation header (``05 00 03 ref total seq``), never inside an escape
  pair or a UTF-16 surrogate pair;
- received PDUs begin with the SMSC field (its first octet counts the octets
  after it, type of address included).

Every function raises :class:`PduError` on malformed input; never anything else.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from appliance.errors import HotsiteError

GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXT = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}
_BASIC_INDEX = {ch: i for i, ch in enumerate(GSM7_BASIC) if ch != "\x1b"}
_EXT_DECODE = {v: k for k, v in GSM7_EXT.items()}
ESCAPE = 0x1B
CR = 0x0D  # the padding septet of 3GPP TS 23.038 6.1.2.3.1

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67
MAX_PARTS = 255


class PduError(HotsiteError):
    """A PDU that cannot be built or parsed."""


@dataclass(frozen=True, slots=True)
class SubmitPdu:
    """One part to send: ``AT+CMGS=<tpdu_length>`` then ``hex`` (which includes the SMSC field)."""

    hex: str
    tpdu_length: int
    part: int = 1
    parts: int = 1


@dataclass(frozen=True, slots=True)
class Deliver:
    smsc: str | None
    sender: str
    text: str
    timestamp: dt.datetime | None
    encoding: str
    concat: tuple[int, int, int] | None = None  # (reference, total, sequence)


@dataclass(frozen=True, slots=True)
class StatusReport:
    reference: int  # the TP-MR that +CMGS returned
    recipient: str
    status: int

    @property
    def delivered(self) -> bool:
        return self.status < 0x20

    @property
    def final(self) -> bool:
        """0x2x is "still trying"; 0x00-0x1F delivered, 0x40+ permanently failed."""
        return not 0x20 <= self.status < 0x40


# ---------------------------------------------------------------------------
# Alphabets


def gsm7_septets(text: str) -> list[int] | None:
    """The septets of ``text`` in the default alphabet, or None if it needs UCS2."""
    out: list[int] = []
    for ch in text:
        if ch in _BASIC_INDEX:
            out.append(_BASIC_INDEX[ch])
        elif ch in GSM7_EXT:
            out += [ESCAPE, GSM7_EXT[ch]]
        else:
            return None
    return out


def gsm7_text(septets: list[int]) -> str:
    out, escaped = [], False
    for s in septets:
        if escaped:
            out.append(_EXT_DECODE.get(s, " "))
            escaped = False
        elif s == ESCAPE:
            escaped = True
        else:
            out.append(GSM7_BASIC[s])
    return "".join(out)


def pack7(septets: list[int], fill_bits: int = 0) -> bytes:
    """Pack septets after ``fill_bits`` zero bits (the fill after a user data header).

    When the text leaves 7 spare bits in its last octet, they carry a <CR> rather than zeros
    (3GPP TS 23.038 6.1.2.3.1): a receiver that counts septets from the octets instead of the
    UDL would otherwise show a trailing '@'. The UDL still counts only the text's septets.
    """
    if (fill_bits + 7 * len(septets)) % 8 == 1:
        septets = [*septets, CR]
    acc = 0
    for i, s in enumerate(septets):
        acc |= (s & 0x7F) << (fill_bits + 7 * i)
    nbits = fill_bits + 7 * len(septets)
    return acc.to_bytes((nbits + 7) // 8, "little")


def unpack7(data: bytes, count: int, skip_bits: int = 0) -> list[int]:
    acc = int.from_bytes(data, "little")
    if skip_bits + 7 * count > 8 * len(data):
        raise PduError(f"user data too short for {count} septets")
    return [(acc >> (skip_bits + 7 * i)) & 0x7F for i in range(count)]


# ---------------------------------------------------------------------------
# Splitting


def split_gsm7(septets: list[int]) -> list[list[int]]:
    if len(septets) <= GSM7_SINGLE:
        return [septets]
    parts: list[list[int]] = []
    current: list[int] = []
    i = 0
    while i < len(septets):
        unit = septets[i : i + 2] if septets[i] == ESCAPE else septets[i : i + 1]
        if len(current) + len(unit) > GSM7_PART:
            parts.append(current)
            current = []
        current += unit
        i += len(unit)
    parts.append(current)
    return parts


def split_ucs2(text: str) -> list[bytes]:
    """UTF-16BE parts of at most 67 units (70 when one part), never splitting a surrogate pair."""
    data = text.encode("utf-16-be")
    if len(data) <= 2 * UCS2_SINGLE:
        return [data]
    parts, current = [], b""
    for ch in text:
        unit = ch.encode("utf-16-be")  # 2 bytes, or 4 for a surrogate pair
        if len(current) + len(unit) > 2 * UCS2_PART:
            parts.append(current)
            current = b""
        current += unit
    parts.append(current)
    return parts


def count_parts(text: str) -> int:
    septets = gsm7_septets(text)
    return len(split_gsm7(septets)) if septets is not None else len(split_ucs2(text))


# ---------------------------------------------------------------------------
# Addresses and timestamps


def encode_address(number: str) -> bytes:
    """Destination address: length in digits, type (0x91 international, 0x81 national), BCD digits."""
    digits = number.lstrip("+")
    if not digits.isdigit() or not 1 <= len(digits) <= 20:
        raise PduError(f"not a phone number: {number!r}")
    toa = 0x91 if number.startswith("+") else 0x81
    return bytes([len(digits), toa]) + _bcd(digits)


def encode_smsc(number: str | None) -> bytes:
    """The SMSC field: ``00`` means "use the SIM's SMSC"."""
    if not number:
        return b"\x00"
    digits = number.lstrip("+")
    body = bytes([0x91 if number.startswith("+") else 0x81]) + _bcd(digits)
    return bytes([len(body)]) + body


def _bcd(digits: str) -> bytes:
    if len(digits) % 2:
        digits += "F"
    return bytes.fromhex("".join(digits[i + 1] + digits[i] for i in range(0, len(digits), 2)))


def _unbcd(data: bytes) -> str:
    text = "".join(f"{b:02X}"[::-1] for b in data)
    return text.rstrip("F")


def _decode_address(data: bytes, pos: int) -> tuple[str, int]:
    ndigits, toa = data[pos], data[pos + 1]
    nbytes = (ndigits + 1) // 2
    raw = data[pos + 2 : pos + 2 + nbytes]
    if len(raw) < nbytes:
        raise PduError("address runs past the end of the PDU")
    if toa & 0x70 == 0x50:  # alphanumeric sender, e.g. "BANK"
        number = gsm7_text(unpack7(raw, ndigits * 4 // 7))
    else:
        number = _unbcd(raw)
        if toa & 0x70 == 0x10:
            number = "+" + number
    return number, pos + 2 + nbytes


def _decode_scts(data: bytes) -> dt.datetime | None:
    try:
        d = [int(f"{b:02X}"[::-1][:2]) if i != 6 else b for i, b in enumerate(data)]
        tz_byte = data[6]
        quarters = int(f"{tz_byte & 0xF7:02X}"[::-1])
        offset = dt.timedelta(minutes=15 * quarters) * (-1 if tz_byte & 0x08 else 1)
        return dt.datetime(2000 + d[0], d[1], d[2], d[3], d[4], d[5], tzinfo=dt.timezone(offset))
    except ValueError:
        return None  # a garbled timestamp should not cost us the message


# ---------------------------------------------------------------------------
# SMS-SUBMIT


def encode_submit(
    number: str,
    text: str,
    *,
    reference: int = 0,
    status_report: bool = False,
    smsc: str | None = None,
    validity: int = 0xAA,  # relative, 4 days
) -> list[SubmitPdu]:
    """One :class:`SubmitPdu` per part; ``reference`` (0-255) ties concatenated parts together."""
    if not text:
        raise PduError("empty message")
    septets = gsm7_septets(text)
    chunks: list[tuple[int, bytes, int]] = []  # (dcs, user data, UDL)
    if septets is not None:
        gparts = split_gsm7(septets)
        for index, part in enumerate(gparts, start=1):
            if len(gparts) == 1:
                chunks.append((0x00, pack7(part), len(part)))
            else:
                udh = _udh(reference, len(gparts), index)
                fill = (7 - len(udh) * 8 % 7) % 7
                header_septets = (len(udh) * 8 + fill) // 7
                chunks.append((0x00, udh + pack7(part, fill), header_septets + len(part)))
    else:
        uparts = split_ucs2(text)
        for index, data in enumerate(uparts, start=1):
            udh = _udh(reference, len(uparts), index) if len(uparts) > 1 else b""
            chunks.append((0x08, udh + data, len(udh) + len(data)))
    if len(chunks) > MAX_PARTS:
        raise PduError(f"message too long: {len(chunks)} parts (at most {MAX_PARTS})")
    out = []
    for index, (dcs, ud, udl) in enumerate(chunks, start=1):
        first = 0x01 | 0x10 | (0x20 if status_report else 0) | (0x40 if len(chunks) > 1 else 0)
        tpdu = bytes([first, 0x00]) + encode_address(number) + bytes([0x00, dcs, validity, udl]) + ud
        out.append(SubmitPdu((encode_smsc(smsc) + tpdu).hex().upper(), len(tpdu), index, len(chunks)))
    return out


def _udh(reference: int, total: int, sequence: int) -> bytes:
    return bytes([0x05, 0x00, 0x03, reference & 0xFF, total, sequence])


# ---------------------------------------------------------------------------
# Received PDUs


def _skip_smsc(data: bytes) -> tuple[str | None, int]:
    if not data:
        raise PduError("empty PDU")
    length = data[0]
    if length == 0:
        return None, 1
    if 1 + length > len(data):
        raise PduError("SMSC field runs past the end of the PDU")
    number = _unbcd(data[2 : 1 + length])
    if data[1] & 0x70 == 0x10:
        number = "+" + number
    return number, 1 + length


def _bytes(pdu_hex: str) -> bytes:
    try:
        return bytes.fromhex(pdu_hex.strip())
    except ValueError:
        raise PduError(f"not hexadecimal: {pdu_hex[:40]!r}") from None


def decode_deliver(pdu_hex: str) -> Deliver:
    """Decode an SMS-DELIVER as ``AT+CMGR``/``AT+CMGL`` return it (SMSC field first)."""
    data = _bytes(pdu_hex)
    try:
        smsc, pos = _skip_smsc(data)
        first = data[pos]
        if first & 0x03 != 0x00:
            raise PduError(f"not an SMS-DELIVER (first octet {first:#04x})")
        sender, pos = _decode_address(data, pos + 1)
        _pid, dcs = data[pos], data[pos + 1]
        timestamp = _decode_scts(data[pos + 2 : pos + 9])
        udl = data[pos + 9]
        ud = data[pos + 10 :]
    except IndexError:
        raise PduError("PDU truncated") from None
    concat: tuple[int, int, int] | None = None
    udh_len = 0
    if first & 0x40:
        if not ud:
            raise PduError("user data header announced but missing")
        udh_len = ud[0] + 1
        concat = _parse_udh(ud[1:udh_len])
    encoding = _encoding(dcs)
    if encoding == "gsm7":
        header_septets = (udh_len * 8 + 6) // 7
        septets = unpack7(ud, udl)[header_septets:]
        text = gsm7_text(septets)
    elif encoding == "ucs2":
        body = ud[udh_len:udl]
        if len(body) % 2:
            body = body[:-1]
        text = body.decode("utf-16-be", errors="replace")
    else:
        text = ud[udh_len:udl].decode("latin-1")
    return Deliver(smsc, sender, text, timestamp, encoding, concat)


def decode_status_report(pdu_hex: str) -> StatusReport:
    """Decode an SMS-STATUS-REPORT (as ``+CDS`` delivers it, SMSC field first)."""
    data = _bytes(pdu_hex)
    try:
        _smsc, pos = _skip_smsc(data)
        first = data[pos]
        if first & 0x03 != 0x02:
            raise PduError(f"not a status report (first octet {first:#04x})")
        reference = data[pos + 1]
        recipient, pos = _decode_address(data, pos + 2)
        status = data[pos + 14]
    except IndexError:
        raise PduError("status report truncated") from None
    return StatusReport(reference, recipient, status)


def _encoding(dcs: int) -> str:
    group = dcs & 0xF0
    if group in (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70) or group == 0xF0:
        alphabet = (dcs >> 2) & 0x03 if group != 0xF0 else (1 if dcs & 0x04 else 0)
        return {0: "gsm7", 1: "8bit", 2: "ucs2"}.get(alphabet, "gsm7")
    if group in (0xC0, 0xD0):
        return "gsm7"
    if group == 0xE0:
        return "ucs2"
    return "8bit"


def _parse_udh(udh: bytes) -> tuple[int, int, int] | None:
    i = 0
    while i + 1 < len(udh):
        iei, length = udh[i], udh[i + 1]
        value = udh[i + 2 : i + 2 + length]
        if iei == 0x00 and length == 3:
            return value[0], value[1], value[2]
        if iei == 0x08 and length == 4:
            return value[0] << 8 | value[1], value[2], value[3]
        i += 2 + length
    return None


# ---------------------------------------------------------------------------
# Building received PDUs (the modem emulator uses this; tests check it against an independent decoder)


def encode_deliver(
    sender: str,
    text: str,
    *,
    smsc: str | None = "+8613800100500",
    timestamp: dt.datetime | None = None,
    ucs2: bool | None = None,
    concat: tuple[int, int, int] | None = None,
) -> str:
    """One SMS-DELIVER PDU as a modem would return it (single part unless ``concat`` is given)."""
    ts = timestamp or dt.datetime(2026, 3, 2, 9, 30, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    septets = None if ucs2 else gsm7_septets(text)
    if ucs2 is False and septets is None:
        raise PduError("text does not fit the GSM 7-bit alphabet")
    udh = _udh(*concat) if concat else b""
    if septets is not None:
        fill = (7 - len(udh) * 8 % 7) % 7 if udh else 0
        header_septets = (len(udh) * 8 + fill) // 7 if udh else 0
        ud, udl, dcs = udh + pack7(septets, fill), header_septets + len(septets), 0x00
    else:
        body = text.encode("utf-16-be")
        ud, udl, dcs = udh + body, len(udh) + len(body), 0x08
    first = 0x04 | (0x40 if udh else 0)
    tpdu = bytes([first]) + encode_address(sender) + bytes([0x00, dcs]) + _scts(ts) + bytes([udl]) + ud
    return (encode_smsc(smsc) + tpdu).hex().upper()


def encode_status_report(reference: int, recipient: str, status: int = 0) -> str:
    ts = _scts(dt.datetime(2026, 3, 2, 9, 30, 5, tzinfo=dt.UTC))
    tpdu = bytes([0x06, reference]) + encode_address(recipient) + ts + ts + bytes([status])
    return (encode_smsc(None) + tpdu).hex().upper()


def _scts(ts: dt.datetime) -> bytes:
    offset = ts.utcoffset() or dt.timedelta(0)
    quarters = int(abs(offset.total_seconds()) // 900)
    parts = [ts.year % 100, ts.month, ts.day, ts.hour, ts.minute, ts.second]
    out = bytes(int(f"{p:02d}"[::-1], 16) for p in parts)
    tz = int(f"{quarters:02d}"[::-1], 16) | (0x08 if offset < dt.timedelta(0) else 0)
    return out + bytes([tz])
