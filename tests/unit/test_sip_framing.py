"""Cutting a SIP byte stream (TCP, TLS) into messages by Content-Length (RFC 3261 18.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitoring.sip import SipFramingError, StreamFramer, build_options, build_response, parse_message


def reply(body: bytes = b"") -> bytes:
    request = parse_message(build_options("10.0.0.1", 5060, local_host="127.0.0.1", local_port=1).data)
    data = build_response(request, 200, "OK", to_tag="t")
    if body:
        data = data.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body)) + body
    return data


def test_one_message_in_one_read() -> None:
    message = reply()
    assert StreamFramer().feed(message) == [message]


def test_a_message_in_pieces_waits_for_the_last_byte_of_its_body() -> None:
    message = reply(b"v=0\r\n")
    framer = StreamFramer()
    assert framer.feed(message[:10]) == []
    assert framer.feed(message[10:-1]) == []
    assert framer.buffered == len(message) - 1
    assert framer.feed(message[-1:]) == [message]
    assert framer.buffered == 0


def test_several_messages_and_keepalives_in_one_read() -> None:
    a, b = reply(), reply(b"xyz")
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n" + a + b"\r\n" + b + a[:5]) == [a, b]
    assert framer.pings == 1  # the double CRLF before a is a ping to answer; the lone CRLF is not
    assert framer.feed(a[5:]) == [a]


def test_compact_content_length_frames_too() -> None:
    message = reply(b"abc").replace(b"Content-Length: 3", b"l: 3")
    assert StreamFramer().feed(message) == [message]


def test_a_lone_crlf_waits_to_see_whether_it_is_a_ping() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == [] and framer.pings == 0
    assert framer.feed(b"\r\n") == [] and framer.pings == 1 and framer.buffered == 0


@pytest.mark.parametrize(
    "data,why",
    [
        (b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n", "without Content-Length"),
        (b"SIP/2.0 200 OK\r\nContent-Length: 99999\r\n\r\n", "cap 1024"),
        (b"X" * 1100, "no end of headers within 1024 bytes"),
        (b"SIP/2.0 200 OK\r\nContent-Length: -1\r\n\r\n", "without Content-Length"),
    ],
)
def test_unframeable_streams_raise_and_forget_the_buffer(data: bytes, why: str) -> None:
    framer = StreamFramer(max_message=1024)
    with pytest.raises(SipFramingError, match=why):
        framer.feed(data)
    assert framer.buffered == 0
    message = reply()
    assert framer.feed(message) == [message]  # usable again on a fresh stream


def test_a_framed_but_malformed_message_is_still_returned_for_the_parser_to_reject() -> None:
    junk = b"\x00\xffnot sip\r\nContent-Length: 2\r\n\r\nab"
    message = reply()
    assert StreamFramer().feed(junk + message) == [junk, message]


def test_the_cap_must_leave_room_for_a_message() -> None:
    with pytest.raises(ValueError):
        StreamFramer(max_message=10)


@given(
    bodies=st.lists(st.binary(max_size=40), min_size=1, max_size=5),
    pings=st.lists(st.booleans(), min_size=5, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_any_split_of_the_stream_yields_the_same_messages(
    bodies: list[bytes], pings: list[bool], cuts: list[int]
) -> None:
    messages = [reply(body) for body in bodies]
    stream = b"".join((b"\r\n\r\n" if ping else b"") + m for m, ping in zip(messages, pings, strict=False))
    framer = StreamFramer()
    got: list[bytes] = []
    start = 0
    for cut in sorted({min(c, len(stream)) for c in cuts} | {len(stream)}):
        got += framer.feed(stream[start:cut])
        start = cut
    assert got == messages
    assert framer.pings == sum(pings[: len(messages)]) and framer.buffered == 0
