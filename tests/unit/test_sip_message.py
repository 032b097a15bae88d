"""SIP message building and parsing: round trips, compact forms, garbage, matching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitoring.sip import (
    USER_AGENT,
    OptionsRequest,
    SipMessage,
    SipParseError,
    build_options,
    build_response,
    parse_message,
    parse_response,
)

BRANCH = "z9hG4bKabc123"
CALL_ID = "c0ffee@127.0.0.1"


def request(**kwargs: object) -> OptionsRequest:
    args: dict[str, object] = {
        "local_host": "127.0.0.1",
        "local_port": 40000,
        "branch": BRANCH,
        "call_id": CALL_ID,
        "from_tag": "ftag",
        "cseq": 7,
    }
    args.update(kwargs)
    return build_options("10.0.0.1", 5060, **args)  # type: ignore[arg-type]


def reply(code: int = 200, reason: str = "OK", **kwargs: object) -> bytes:
    return build_response(parse_message(request(**kwargs).data), code, reason, to_tag="t1")


VALID = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bKabc123;rport=40000;received=127.0.0.1\r\n"
    b"From: <sip:hotsite@127.0.0.1:40000>;tag=ftag\r\n"
    b"To: <sip:10.0.0.1:5060>;tag=t1\r\n"
    b"Call-ID: c0ffee@127.0.0.1\r\n"
    b"CSeq: 7 OPTIONS\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


# -- building -----------------------------------------------------------------


def test_request_has_every_rfc3261_header() -> None:
    msg = parse_message(request().data)
    assert (msg.method, msg.uri) == ("OPTIONS", "sip:10.0.0.1:5060")
    assert msg.header("via") == f"SIP/2.0/UDP 127.0.0.1:40000;branch={BRANCH};rport"
    assert msg.header("max-forwards") == "70"
    assert msg.header("from") == "<sip:hotsite@127.0.0.1:40000>;tag=ftag"
    assert msg.header("to") == "<sip:10.0.0.1:5060>"
    assert msg.call_id == CALL_ID
    assert msg.cseq == (7, "OPTIONS")
    assert msg.header("contact") == "<sip:hotsite@127.0.0.1:40000>"
    assert msg.header("accept") == "application/sdp"
    assert msg.header("user-agent") == USER_AGENT and USER_AGENT.startswith("hotsite/")
    assert msg.header("content-length") == "0"
    assert msg.body == b""
    assert request().data.endswith(b"\r\n\r\n") and b"\n" not in request().data.replace(b"\r\n", b"")


def test_random_ids_are_fresh_and_rfc3261_branches() -> None:
    a = build_options("10.0.0.1", 5060, local_host="127.0.0.1", local_port=1)
    b = build_options("10.0.0.1", 5060, local_host="127.0.0.1", local_port=1)
    assert a.branch.startswith("z9hG4bK") and len(a.branch) > 7 + 16
    assert a.branch != b.branch and a.call_id != b.call_id and a.from_tag != b.from_tag
    assert a.call_id.endswith("@127.0.0.1")


def test_ipv6_hosts_are_bracketed() -> None:
    req = build_options("::1", 5060, local_host="::1", local_port=5, branch=BRANCH)
    msg = parse_message(req.data)
    assert msg.uri == "sip:[::1]:5060"
    assert msg.vias[0].sent_by == "[::1]:5"


@pytest.mark.parametrize("cseq", [0, -1, 2**31])
def test_out_of_range_cseq_is_refused(cseq: int) -> None:
    with pytest.raises(ValueError):
        request(cseq=cseq)


# -- parsing ------------------------------------------------------------------


def test_round_trip_reply_matches_its_request() -> None:
    resp = parse_response(reply())
    assert resp.code == 200 and resp.reason == "OK" and resp.status == "200 OK"
    assert resp.top_branch == BRANCH
    assert resp.header("to") == "<sip:10.0.0.1:5060>;tag=t1"
    assert request().matches(resp)


def test_compact_and_case_insensitive_headers() -> None:
    data = (
        b"SIP/2.0 200 OK\r\n"
        b"v: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bKabc123\r\n"
        b"f: <sip:a@b>;tag=ftag\r\n"
        b"t: <sip:c@d>\r\n"
        b"i: c0ffee@127.0.0.1\r\n"
        b"cseq: 7 OPTIONS\r\n"
        b"l: 4\r\n"
        b"\r\n"
        b"body-and-extra"
    )
    msg = parse_response(data)
    assert msg.header("Via") == msg.header("V") == msg.header("v")
    assert msg.header("CALL-ID") == "c0ffee@127.0.0.1"
    assert msg.header("Content-Length") == "4"
    assert msg.body == b"body"  # RFC 3261 18.3: bytes beyond Content-Length are dropped
    assert request().matches(msg)


def test_multiple_vias_in_one_header_and_in_several() -> None:
    data = VALID.replace(
        b"Via: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bKabc123;rport=40000;received=127.0.0.1\r\n",
        b"Via: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bKabc123 , SIP/2.0/TCP p1:5060;branch=z9hG4bK2\r\n"
        b'v: SIP / 2.0 / tls p2;branch=z9hG4bK3;maddr="x,y"\r\n',
    )
    msg = parse_response(data)
    assert [v.branch for v in msg.vias] == ["z9hG4bKabc123", "z9hG4bK2", "z9hG4bK3"]
    assert [v.transport for v in msg.vias] == ["UDP", "TCP", "TLS"]
    assert msg.top_branch == BRANCH


def test_via_params_are_parsed() -> None:
    via = parse_response(VALID).vias[0]
    assert via.sent_by == "127.0.0.1:40000"
    assert dict(via.params) == {"branch": BRANCH, "rport": "40000", "received": "127.0.0.1"}


def test_folded_headers_leading_crlf_and_bare_lf_are_tolerated() -> None:
    data = b"\r\n\r\n" + VALID.replace(b"CSeq: 7 OPTIONS\r\n", b"CSeq: 7\r\n OPTIONS\r\n")
    assert parse_response(data).cseq == (7, "OPTIONS")
    assert parse_response(VALID.replace(b"\r\n", b"\n")).code == 200


def test_reason_phrase_may_be_empty_or_utf8() -> None:
    assert parse_response(VALID.replace(b"200 OK", b"200")).reason == ""
    msg = parse_response(VALID.replace(b"200 OK", "503 Überlastet\x07".encode()))
    assert msg.code == 503 and msg.status == "503 ?berlastet?"  # printable for logs


def test_a_request_is_not_a_response() -> None:
    with pytest.raises(SipParseError, match="request"):
        parse_response(request().data)


MALFORMED = {
    "empty": b"",
    "only crlf": b"\r\n\r\n",
    "no end of headers": VALID[:-2],
    "http": VALID.replace(b"SIP/2.0 200 OK", b"HTTP/1.1 200 OK"),
    "sip 3.0": VALID.replace(b"SIP/2.0 200", b"SIP/3.0 200"),
    "code too short": VALID.replace(b"200 OK", b"20 OK"),
    "code 700": VALID.replace(b"200 OK", b"700 OK"),
    "code not digits": VALID.replace(b"200 OK", b"2x0 OK"),
    "unicode digits": VALID.replace(b"200 OK", "2\u0662\u0660 OK".encode()),
    "not utf-8": VALID.replace(b"OK", b"\xff\xfe"),
    "header without colon": VALID.replace(b"Call-ID:", b"Call-ID"),
    "header name with space": VALID.replace(b"Call-ID:", b"Call ID:"),
    "continuation first": VALID.replace(b"SIP/2.0 200 OK\r\n", b"SIP/2.0 200 OK\r\n folded\r\n"),
    "missing via": VALID.replace(b"Via:", b"X-Via:"),
    "missing call-id": VALID.replace(b"Call-ID:", b"X-Call-ID:"),
    "missing cseq": VALID.replace(b"CSeq:", b"X-CSeq:"),
    "missing from": VALID.replace(b"From:", b"X-From:"),
    "missing to": VALID.replace(b"To:", b"X-To:"),
    "two call-ids": VALID.replace(b"CSeq:", b"i: other\r\nCSeq:"),
    "empty call-id": VALID.replace(b"Call-ID: c0ffee@127.0.0.1", b"Call-ID: "),
    "call-id with space": VALID.replace(b"c0ffee@127.0.0.1", b"c0 ffee"),
    "cseq without method": VALID.replace(b"7 OPTIONS", b"7"),
    "cseq not a number": VALID.replace(b"7 OPTIONS", b"seven OPTIONS"),
    "cseq too big": VALID.replace(b"7 OPTIONS", b"2147483648 OPTIONS"),
    "cseq huge": VALID.replace(b"7 OPTIONS", b"9" * 5000 + b" OPTIONS"),
    "via not sip": VALID.replace(b"SIP/2.0/UDP", b"HTTP/1.1/UDP"),
    "via without host": VALID.replace(b"SIP/2.0/UDP 127.0.0.1:40000", b"SIP/2.0/UDP"),
    "via bad param": VALID.replace(b";rport=40000", b";=40000"),
    "second via bad": VALID.replace(b"received=127.0.0.1", b"received=127.0.0.1, junk"),
    "content-length negative": VALID.replace(b"Content-Length: 0", b"Content-Length: -1"),
    "content-length text": VALID.replace(b"Content-Length: 0", b"Content-Length: zero"),
    "truncated body": VALID.replace(b"Content-Length: 0", b"Content-Length: 10"),
    "nul bytes": b"\x00" * 64,
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_sip_parse_error(data: bytes) -> None:
    with pytest.raises(SipParseError):
        parse_response(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_parse_or_raise_sip_parse_error(data: bytes) -> None:
    try:
        msg = parse_response(data)
    except SipParseError:
        return
    assert isinstance(msg, SipMessage) and msg.code is not None


_FRAGMENTS = st.sampled_from(
    [b"\r\n", b"\n", b" ", b"\t", b":", b";", b",", b"=", b'"', b"/", b"@", b"\xff", b"\x00"]
    + [b"SIP/2.0", b"Via", b"v", b"i", b"l", b"CSeq", b"branch", b"OPTIONS", b"0", b"2", b"9" * 12]
)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutated_valid_replies_parse_or_raise_sip_parse_error(data: st.DataObject) -> None:
    """Garbage near the valid shape reaches the deep parser paths that random bytes miss."""
    msg = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(msg)))
        if data.draw(st.booleans()):
            msg[pos:pos] = data.draw(_FRAGMENTS)
        else:
            del msg[pos : pos + data.draw(st.integers(1, 8))]
    try:
        parsed = parse_response(bytes(msg))
    except SipParseError:
        return
    assert parsed.code is not None and parsed.vias and parsed.cseq[0] >= 0


# -- matching -----------------------------------------------------------------

MISMATCHES = {
    "wrong branch": (b"branch=z9hG4bKabc123", b"branch=z9hG4bKabc124"),
    "branch case": (b"branch=z9hG4bKabc123", b"branch=z9hG4bKABC123"),
    "no branch": (b";branch=z9hG4bKabc123", b""),
    "wrong call-id": (b"Call-ID: c0ffee@", b"Call-ID: c0ffef@"),
    "wrong cseq number": (b"CSeq: 7 OPTIONS", b"CSeq: 8 OPTIONS"),
    "wrong cseq method": (b"CSeq: 7 OPTIONS", b"CSeq: 7 INVITE"),
    "cseq method case": (b"CSeq: 7 OPTIONS", b"CSeq: 7 options"),
}


def test_the_exact_reply_matches() -> None:
    assert request().matches(parse_response(VALID))


@pytest.mark.parametrize("old,new", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_a_reply_that_differs_in_one_id_does_not_match(old: bytes, new: bytes) -> None:
    assert old in VALID
    assert not request().matches(parse_response(VALID.replace(old, new)))


def test_a_request_echoing_every_id_does_not_match() -> None:
    assert not request().matches(parse_message(request().data))
