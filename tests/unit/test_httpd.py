"""appliance.httpd's request-head parser: total over any bytes, strict about what it accepts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import httpd

# ---------------------------------------------------------------------------
# The request parser the witness, the receiver and the metrics server share


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /vote HTTP/1.1\r\nHost: x\r\n\r\n", ("GET", "/vote", {"host": "x"})),
        (
            b"GET /vote?x=1 HTTP/1.0\r\nAuthorization:  Bearer t \r\n\r\n",
            ("GET", "/vote", {"authorization": "Bearer t"}),
        ),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", ("HEAD", "/metrics", {})),
    ],
)
def test_parse_head(head: bytes, expected: tuple[str, str, dict[str, str]]) -> None:
    request = httpd.parse_head(head)
    assert (request.method, request.path, request.headers) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"GET /vote\r\n\r\n",
        b"GET /vote HTTP/2.0\r\n\r\n",
        b"GET vote HTTP/1.1\r\n\r\n",
        b"G(T /vote HTTP/1.1\r\n\r\n",
        b"GET /vo\x00te HTTP/1.1\r\n\r\n",
        b"GET /vote HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET /vote HTTP/1.1\r\n: empty name\r\n\r\n",
        b"GET /vote HTTP/1.1\r\n",
        b"\r\n\r\n",
    ],
)
def test_parse_head_refuses_garbage(head: bytes) -> None:
    with pytest.raises(httpd.BadRequest):
        httpd.parse_head(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_head_is_total(data: bytes) -> None:
    try:
        request = httpd.parse_head(data + b"\r\n\r\n")
    except httpd.BadRequest:
        return
    assert request.path.startswith("/")
