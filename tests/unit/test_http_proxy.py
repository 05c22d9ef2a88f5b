"""The sans-IO HTTP proxy request parser: exact request heads in, exact rewrites out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.client.http_proxy import (
    MAX_HEAD_BYTES,
    MAX_TRAILING_DATA,
    ForwardRequest,
    HttpProxyParser,
    ProxyRequest,
    TunnelRequest,
    error_response,
)
from veil.errors import LocalProtocolError, RemoteProtocolError
from veil.protocol.address import Address


def parse(data: bytes) -> tuple[ProxyRequest, bytes]:
    parser = HttpProxyParser()
    request = parser.receive_data(data)
    assert request is not None
    return request, parser.trailing_data


def refused(data: bytes) -> str:
    parser = HttpProxyParser()
    with pytest.raises(RemoteProtocolError) as info:
        parser.receive_data(data)
    return info.value.code


# -- CONNECT --------------------------------------------------------------------------------------


def test_connect() -> None:
    request, rest = parse(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert request == TunnelRequest(Address("example.com", 443))
    assert rest == b""


def test_connect_ipv6_and_pipelined_client_hello() -> None:
    request, rest = parse(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01")
    assert request == TunnelRequest(Address("2001:db8::1", 8443))
    assert rest == b"\x16\x03\x01"


@pytest.mark.parametrize(
    "target",
    [
        b"example.com",
        b"example.com:0",
        b"example.com:65536",
        b"user@example.com:443",
        b"[::1]",
        b"[nope]:443",
        b"[::1:443",
        b"exa%6dple.com:443",
        b"example.com:4a3",
        b"example.com:+443",
        b"a" * 300 + b":443",
    ],
)
def test_connect_bad_targets(target: bytes) -> None:
    assert refused(b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n") == "bad_request"


# -- absolute-URI requests ------------------------------------------------------------------------


def test_get_is_rewritten_to_origin_form() -> None:
    request, rest = parse(
        b"GET http://example.com:8080/a/b?c=d HTTP/1.1\r\n"
        b"Host: wrong.example\r\n"
        b"User-Agent: t\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"Connection: keep-alive, X-Drop\r\n"
        b"X-Drop: 1\r\n"
        b"Keep-Alive: 300\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: websocket\r\n"
        b"Accept: */*\r\n"
        b"\r\n"
    )
    assert request == ForwardRequest(
        Address("example.com", 8080),
        b"GET /a/b?c=d HTTP/1.1\r\n"
        b"Host: example.com:8080\r\n"
        b"User-Agent: t\r\n"
        b"Accept: */*\r\n"
        b"Connection: close\r\n"
        b"\r\n",
    )
    assert rest == b""


@pytest.mark.parametrize(
    ("uri", "path", "host"),
    [
        (b"http://example.com", b"/", b"example.com"),
        (b"http://example.com?q=1", b"/?q=1", b"example.com"),
        (b"HTTP://Example.COM/", b"/", b"Example.COM"),
        (b"http://[::1]:8080/x", b"/x", b"[::1]:8080"),
        (b"http://10.0.0.1/x/", b"/x/", b"10.0.0.1"),
    ],
)
def test_uri_forms(uri: bytes, path: bytes, host: bytes) -> None:
    request, _ = parse(b"GET " + uri + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert isinstance(request, ForwardRequest)
    assert (
        request.head
        == b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    )


def test_default_port_and_ipv6_destination() -> None:
    request, _ = parse(b"GET http://[::1]/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert request.dest == Address("::1", 80)


def test_post_body_is_relayed_raw() -> None:
    request, rest = parse(
        b"POST http://example.com/form HTTP/1.1\r\nHost: example.com\r\n"
        b"Content-Length: 11\r\nConnection: Content-Length\r\n\r\nhello world"
    )
    assert isinstance(request, ForwardRequest)
    # Framing headers are kept even when Connection names them: the body goes through as is.
    assert request.head == (
        b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert rest == b"hello world"


def test_chunked_body_keeps_transfer_encoding() -> None:
    request, rest = parse(
        b"PUT http://example.com/ HTTP/1.1\r\nHost: example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert isinstance(request, ForwardRequest)
    assert b"Transfer-Encoding: chunked\r\n" in request.head
    assert rest == b"5\r\nhello\r\n0\r\n\r\n"


def test_http10_without_host_gets_one() -> None:
    request, _ = parse(b"GET http://example.com/ HTTP/1.0\r\n\r\n")
    assert isinstance(request, ForwardRequest)
    assert request.head == b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"


def test_bare_lf_line_endings() -> None:
    request, rest = parse(b"GET http://example.com/ HTTP/1.1\nHost: example.com\n\nbody")
    assert request.dest == Address("example.com", 80)
    assert rest == b"body"


def test_header_values_are_kept_byte_for_byte() -> None:
    request, _ = parse(b"GET http://e.com/ HTTP/1.1\r\nHost: e.com\r\nX-Raw: caf\xc3\xa9\r\n\r\n")
    assert isinstance(request, ForwardRequest)
    assert b"X-Raw: caf\xc3\xa9\r\n" in request.head


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
        (b"GET https://example.com/ HTTP/1.1\r\nHost: x\r\n\r\n", "not_implemented"),
        (b"GET ftp://example.com/ HTTP/1.1\r\nHost: x\r\n\r\n", "not_implemented"),
        (b"GET http://u:p@example.com/ HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
        (b"GET http://example.com/#frag HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
        (b"GET http:///path HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
        (b"GET 1http://e.com/ HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
        (b"GET http://e.com/ HTTP/1.1\r\n\r\n", "bad_request"),  # HTTP/1.1 needs Host
        (b"GET http://e.com/ HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "bad_request"),
        (
            b"GET http://e.com/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            "bad_request",
        ),
        (
            b"GET http://e.com/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "not_implemented",
        ),
        (b"GET http://e.com/\xff HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "bad_request"),
        (b"\r\n\r\n", "bad_request"),
    ],
)
def test_refusals(data: bytes, code: str) -> None:
    assert refused(data) == code


def test_head_size_limit() -> None:
    start = b"GET http://e.com/ HTTP/1.1\r\nHost: e.com\r\nX-Pad: "
    end = b"\r\n\r\n"
    fits = start + b"a" * (MAX_HEAD_BYTES - len(start) - len(end)) + end
    assert len(fits) == MAX_HEAD_BYTES
    request, _ = parse(fits)
    assert request.dest == Address("e.com", 80)
    assert refused(start + b"a" * (MAX_HEAD_BYTES - len(start) - len(end) + 1) + end) == (
        "head_too_large"
    )
    # Without a blank line, refused as soon as the buffer passes the limit.
    parser = HttpProxyParser()
    assert parser.receive_data(start + b"a" * (MAX_HEAD_BYTES - len(start))) is None
    with pytest.raises(RemoteProtocolError):
        parser.receive_data(b"a")


def test_trailing_data_is_bounded() -> None:
    parser = HttpProxyParser()
    parser.receive_data(b"CONNECT e.com:443 HTTP/1.1\r\nHost: e.com\r\n\r\n")
    parser.receive_data(bytes(MAX_TRAILING_DATA))
    with pytest.raises(RemoteProtocolError) as info:
        parser.receive_data(b"x")
    assert info.value.code == "overflow"


def test_no_reuse_after_failure() -> None:
    parser = HttpProxyParser()
    with pytest.raises(RemoteProtocolError):
        parser.receive_data(b"BAD\r\n\r\n")
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"GET http://e.com/ HTTP/1.1\r\nHost: e.com\r\n\r\n")


@pytest.mark.parametrize(
    ("code", "status_line"),
    [
        ("bad_request", b"HTTP/1.1 400 Bad Request"),
        ("overflow", b"HTTP/1.1 400 Bad Request"),
        ("not_implemented", b"HTTP/1.1 501 Not Implemented"),
        ("head_too_large", b"HTTP/1.1 431 Request Header Fields Too Large"),
        ("bad_gateway", b"HTTP/1.1 502 Bad Gateway"),
    ],
)
def test_error_responses(code: str, status_line: bytes) -> None:
    assert (
        error_response(code) == status_line + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )


# -- property tests -------------------------------------------------------------------------------

hosts = st.one_of(
    st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12),
        min_size=1,
        max_size=4,
    ).map(".".join),
    st.ip_addresses(v=4).map(str),
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.text(alphabet=LETTERS + "0123456789-", min_size=1, max_size=16)
values = st.text(alphabet="".join(map(chr, range(0x20, 0x7F))), max_size=30).map(str.strip)
paths = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._~-?=&", max_size=30)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    host = draw(hosts)
    port = draw(st.integers(1, 0xFFFF))
    extra = draw(st.lists(st.tuples(tokens, values), max_size=6))
    headers = b"".join(
        f"{n}: {v}\r\n".encode()
        for n, v in extra
        if n.lower() not in ("host", "content-length", "transfer-encoding")
    )
    if draw(st.booleans()):
        line = f"CONNECT {host}:{port} HTTP/1.1\r\n"
    else:
        method = draw(st.sampled_from(["GET", "POST", "HEAD"]))
        line = f"{method} http://{host}:{port}/{draw(paths)} HTTP/1.1\r\n"
    return (
        line.encode()
        + f"Host: {host}\r\n".encode()
        + headers
        + b"\r\n"
        + draw(st.binary(max_size=40))
    )


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(requests(), st.lists(st.integers(0, 10_000), max_size=20))
def test_fragmentation_does_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = HttpProxyParser()
    expected = whole.receive_data(data)
    assert expected is not None
    pieces = HttpProxyParser()
    got = [r for piece in split(data, cuts) if (r := pieces.receive_data(piece)) is not None]
    assert got == [expected]
    assert pieces.trailing_data == whole.trailing_data


def _feed_expecting_clean_errors(chunks: list[bytes]) -> None:
    parser = HttpProxyParser()
    for chunk in chunks:
        try:
            parser.receive_data(chunk)
        except RemoteProtocolError as exc:
            assert (
                error_response(exc.code).startswith(b"HTTP/1.1 4") or exc.code == "not_implemented"
            )
            return


@given(st.lists(st.binary(max_size=200), max_size=6))
def test_garbage_gives_clean_errors(chunks: list[bytes]) -> None:
    _feed_expecting_clean_errors([*chunks, b"\r\n\r\n"])


@given(requests(), st.integers(0, 10_000), st.integers(0, 255), st.lists(st.integers(0, 10_000)))
def test_corrupted_requests_give_clean_errors(
    data: bytes, where: int, value: int, cuts: list[int]
) -> None:
    corrupted = bytearray(data)
    corrupted[where % len(data)] = value
    _feed_expecting_clean_errors(split(bytes(corrupted), cuts))


# ---------------------------------------------------------------- Proxy-Authorization
def _authed(header: bytes | None) -> bytes:
    head = b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n"
    if header is not None:
        head += b"Proxy-Authorization: " + header + b"\r\n"
    return head + b"\r\n"


def test_credentials_are_required_when_set() -> None:
    import base64

    from veil.config import Credentials

    creds = Credentials(b"alice", b"s3cret")
    good = b"Basic " + base64.b64encode(b"alice:s3cret")
    parser = HttpProxyParser(creds)
    assert parser.receive_data(_authed(good)) == TunnelRequest(Address("example.org", 443))
    assert HttpProxyParser(creds).receive_data(_authed(b"basic " + good[6:])) is not None
    for bad in (None, b"Basic " + base64.b64encode(b"alice:wrong"),
                b"Bearer " + base64.b64encode(b"alice:s3cret"), b"Basic !!!"):
        with pytest.raises(RemoteProtocolError) as err:
            HttpProxyParser(creds).receive_data(_authed(bad))
        assert err.value.code == "proxy_auth_required"
        response = error_response(err.value.code)
        assert response.startswith(b"HTTP/1.1 407 ")
        assert b'Proxy-Authenticate: Basic realm="veil"' in response
    # Without credentials configured, no header is needed (a loopback proxy).
    assert HttpProxyParser().receive_data(_authed(None)) is not None
