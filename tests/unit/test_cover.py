"""Exact bytes and decisions of the nginx-like cover site, without a network."""

from __future__ import annotations

import asyncio
import re
from typing import cast

import pytest

from veil.cover.adapters import CoverProtocol
from veil.cover.http1 import CloseAction, CoverConnection, CoverMode
from veil.cover.nginx import parse_http_time
from veil.cover.site import DEFAULT_MTIME, CoverSite, SiteFile
from veil.cover.uri import parse_complex_uri, validate_host

DATE = re.compile(rb"Date: [^\r]*\r\n")

PAGE_400 = (
    b"<html>\r\n<head><title>400 Bad Request</title></head>\r\n<body>\r\n"
    b"<center><h1>400 Bad Request</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
RESP_400 = (
    b"HTTP/1.1 400 Bad Request\r\nServer: nginx/1.22.1\r\nDate: -\r\n"
    b"Content-Type: text/html\r\nContent-Length: 157\r\nConnection: close\r\n\r\n" + PAGE_400
)
ROBOTS = b"User-agent: *\nDisallow:\n"


@pytest.fixture
def site() -> CoverSite:
    return CoverSite({
        "index.html": SiteFile(b"<html>hi</html>\n", b"text/html", DEFAULT_MTIME),
        "robots.txt": SiteFile(ROBOTS, b"text/plain", DEFAULT_MTIME),
    })


def conn(site: CoverSite, **kw: object) -> CoverConnection:
    return CoverConnection(site, now=100.0, **kw)  # type: ignore[arg-type]


def feed(c: CoverConnection, data: bytes, now: float = 100.0) -> bytes:
    """What the adapter does: take the answers, go on with held pipelined requests."""
    c.receive_data(data, now)
    out = c.data_to_send()
    while c.held:
        c.resume(now)
        out += c.data_to_send()
    return DATE.sub(b"Date: -\r\n", out)


def test_pipelined_requests_are_answered_one_at_a_time(site: CoverSite) -> None:
    """nginx parses a pipelined request only once the answer before it is written: the
    connection holds the rest until its output is taken, and while the transport says its
    buffer is full (output_blocked) it starts none."""
    c = conn(site)
    c.receive_data(b"GET /robots.txt HTTP/1.1\r\nHost: a\r\n\r\n" * 999, 100.0)
    assert c.held
    assert c.data_to_send().count(b"HTTP/1.1 200 OK") == 1
    c.output_blocked = True
    c.resume(100.0)
    assert c.held and c.data_to_send() == b""
    c.output_blocked = False
    c.resume(100.0)
    assert c.data_to_send().count(b"HTTP/1.1 200 OK") == 1
    answers = 2
    while c.held:
        c.resume(100.0)
        answers += c.data_to_send().count(b"HTTP/1.1 200 OK")
    assert answers == 999


def test_builtin_site_is_small_and_plausible() -> None:
    s = CoverSite.builtin()
    assert "index.html" in s.names
    assert any(name.endswith(".css") for name in s.names)
    total = sum(len(f.body) for f in s._files.values())
    assert total < 20 * 1024


def test_get_root_exact_bytes(site: CoverSite) -> None:
    c = conn(site)
    out = feed(c, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert out == (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: -\r\nContent-Type: text/html\r\n"
        b"Content-Length: 16\r\nLast-Modified: Wed, 15 Mar 2023 13:20:00 GMT\r\n"
        b'Connection: keep-alive\r\nETag: "6411c600-10"\r\nAccept-Ranges: bytes\r\n\r\n'
        b"<html>hi</html>\n"
    )
    assert c.close_action is CloseAction.NONE
    assert c.get_timer() == 100.0 + 75.0  # keepalive_timeout


def test_byte_by_byte_equals_one_chunk(site: CoverSite) -> None:
    req = b"GET /robots.txt HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\n\r\n"
    c = conn(site)
    out = b"".join(feed(c, bytes([b])) for b in req)
    assert out == feed(conn(site), req)


def test_404_http10_closes(site: CoverSite) -> None:
    c = conn(site)
    out = feed(c, b"GET /nope HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404 Not Found\r\nServer: nginx/1.22.1\r\nDate: -\r\n"
                          b"Content-Type: text/html\r\nContent-Length: 153\r\n"
                          b"Connection: close\r\n\r\n<html>\r\n<head><title>404 Not Found")
    assert c.close_action is CloseAction.CLOSE


def test_invalid_first_byte_rejected_at_once_with_lingering_close(site: CoverSite) -> None:
    c = conn(site)
    assert feed(c, b"\x16") == RESP_400
    assert c.close_action is CloseAction.LINGER
    assert c.get_timer() == 100.0 + 5.0  # lingering_timeout


@pytest.mark.parametrize("prefix", [b"G", b"GET", b"GET ", b"GET /a", b"GET / HTTP/1.", b"\r\n",
                                    b"GET / HTTP/1.1\r\nHost: a\r\n", b"X-Y_Z"])
def test_valid_prefixes_wait_for_more(site: CoverSite, prefix: bytes) -> None:
    c = conn(site, started_at=90.0)
    assert feed(c, prefix) == b""
    assert c.close_action is CloseAction.NONE
    assert c.get_timer() == 90.0 + 60.0  # client_header_timeout counts from the accept
    c.handle_timer(150.0)
    assert c.data_to_send() == b""
    assert c.close_action is CloseAction.QUIET  # timed out mid-request: no close_notify


def test_silence_closes_after_header_timeout(site: CoverSite) -> None:
    c = conn(site)
    c.handle_timer(159.9)
    assert c.close_action is CloseAction.NONE
    c.handle_timer(160.0)
    assert c.close_action is CloseAction.CLOSE


@pytest.mark.parametrize("good, bad", [
    (b"GET /", b"\x01"), (b"GET ", b"*"), (b"GET / H", b"X"), (b"GET / HTTP/", b"0"),
    (b"get", b""), (b"GET / HTTP/1.1\r\n", b" "), (b"GET / HTTP/1.1\r\nA", b"\x7f"),
])
def test_rejected_on_the_first_invalid_byte(site: CoverSite, good: bytes, bad: bytes) -> None:
    c = conn(site)
    out = feed(c, good)
    if not bad:  # a lower-case first byte is invalid by itself
        assert out == RESP_400
        return
    assert out == b""
    assert feed(c, bad) == RESP_400


def test_version_2_gets_505(site: CoverSite) -> None:
    out = feed(conn(site), b"GET / HTTP/2")
    assert out.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


def test_request_line_limit_is_8k(site: CoverSite) -> None:
    line = b"GET /" + b"a" * (8192 - 5 - 11) + b" HTTP/1.0\r\n"
    assert len(line) == 8192
    assert feed(conn(site), line + b"\r\n").startswith(b"HTTP/1.1 404 ")
    c = conn(site)
    out = feed(c, b"GET /" + b"a" * (8192 - 5))
    assert out.startswith(b"HTTP/1.1 414 Request-URI Too Large\r\n")


def test_crlf_before_request_is_unlimited(site: CoverSite) -> None:
    out = feed(conn(site), b"\r\n" * 30000 + b"GET /robots.txt HTTP/1.0\r\n\r\n")
    assert out.endswith(ROBOTS)


def test_long_header_gets_494_page(site: CoverSite) -> None:
    c = conn(site)
    out = feed(c, b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"b" * 9000)
    assert b"<title>400 Request Header Or Cookie Too Large</title>" in out
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert c.close_action is CloseAction.LINGER


def test_keepalive_pipelined_pair_then_http09(site: CoverSite) -> None:
    c = conn(site)
    out = feed(c, b"GET /robots.txt HTTP/1.1\r\nHost: a\r\n\r\n" * 2)
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert feed(c, b"GET /robots.txt\r\n") == ROBOTS
    assert c.close_action is CloseAction.CLOSE


def test_http09_error_has_no_header(site: CoverSite) -> None:
    assert feed(conn(site), b"HEAD /\r\n") == PAGE_400


def test_conditional_and_range(site: CoverSite) -> None:
    out = feed(conn(site), b"GET /robots.txt HTTP/1.1\r\nHost: a\r\n"
                           b'If-None-Match: "6411c600-18"\r\n\r\n')
    assert out == (b"HTTP/1.1 304 Not Modified\r\nServer: nginx/1.22.1\r\nDate: -\r\n"
                   b"Last-Modified: Wed, 15 Mar 2023 13:20:00 GMT\r\nConnection: keep-alive\r\n"
                   b'ETag: "6411c600-18"\r\n\r\n')
    out = feed(conn(site), b"GET /robots.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=0-3\r\n\r\n")
    assert out.endswith(b'ETag: "6411c600-18"\r\nContent-Range: bytes 0-3/24\r\n\r\nUser')
    out = feed(conn(site), b"GET /robots.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=50-\r\n\r\n")
    assert b"HTTP/1.1 416 Requested Range Not Satisfiable" in out
    assert b"Connection: keep-alive\r\nContent-Range: bytes */24\r\n\r\n" in out


def test_post_is_405_and_chrome_gets_padding(site: CoverSite) -> None:
    out = feed(conn(site), b"POST / HTTP/1.1\r\nHost: a\r\nUser-Agent: x Chrome/120 y\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 Not Allowed\r\n")
    assert out.count(b"<!-- a padding to disable MSIE and Chrome friendly error page -->") == 6


def test_missing_host_and_duplicate_host(site: CoverSite) -> None:
    assert feed(conn(site), b"GET / HTTP/1.1\r\n\r\n") == RESP_400
    c = conn(site)
    assert feed(c, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n") == RESP_400  # no blank line


def test_plain_http_on_tls_port(site: CoverSite) -> None:
    c = conn(site, mode=CoverMode.PLAIN_ON_TLS_PORT)
    out = feed(c, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert out == (
        b"HTTP/1.1 400 Bad Request\r\nServer: nginx/1.22.1\r\nDate: -\r\n"
        b"Content-Type: text/html\r\nContent-Length: 255\r\nConnection: close\r\n\r\n"
        b"<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port</title>"
        b"</head>\r\n<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
        b"<center>The plain HTTP request was sent to HTTPS port</center>\r\n"
        b"<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n"
    )
    assert feed(conn(site, mode=CoverMode.PLAIN_ON_TLS_PORT), b"x") == RESP_400


def test_body_is_discarded_before_next_request(site: CoverSite) -> None:
    c = conn(site)
    out = feed(c, b"GET /robots.txt HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n12")
    assert out.endswith(ROBOTS)
    assert feed(c, b"345GET /robots.txt HTTP/1.1\r\nHost: a\r\n\r\n").endswith(ROBOTS)


def test_eof_mid_request_closes_silently(site: CoverSite) -> None:
    c = conn(site)
    feed(c, b"GET / HTTP/1.1\r\n")
    c.receive_eof(101.0)
    assert c.data_to_send() == b""
    assert c.close_action is CloseAction.CLOSE


@pytest.mark.parametrize("raw, expected", [
    (b"/a/./b", b"/a/b"), (b"/a//b", b"/a/b"), (b"/a/../b", b"/b"), (b"/..", None),
    (b"/%61", b"/a"), (b"/%2e%2e/x", None), (b"/a%2fb", b"/a/b"), (b"/%00", None),
    (b"/%zz", None), (b"/a?x", b"/a"), (b"/a#x", b"/a"), (b"/%3F", b"/?"), (b"/%25", b"/%"),
    (b"/a/.", b"/a/"), (b"/x/%2e%2e%2fabout.html", b"/about.html"),
])
def test_parse_complex_uri(raw: bytes, expected: bytes | None) -> None:
    assert parse_complex_uri(raw) == expected


@pytest.mark.parametrize("host, expected", [
    (b"Example.COM", b"example.com"), (b"a.b.", b"a.b"), (b"a..b", None), (b"a/b", None),
    (b"", None), (b"[::1]:80", b"[::1]"), (b"x:80", b"x"), (b"a b", None),
])
def test_validate_host(host: bytes, expected: bytes | None) -> None:
    assert validate_host(host) == expected


@pytest.mark.parametrize("value", [
    b"Wed, 15 Mar 2023 13:20:00 GMT", b"Wednesday, 15-Mar-23 13:20:00 GMT",
    b"Wed Mar 15 13:20:00 2023", b"Wed, 15 Mar 2023 13:20:00 GMT; length=3",
])
def test_parse_http_time(value: bytes) -> None:
    assert parse_http_time(value) == DEFAULT_MTIME


def test_parse_http_time_rejects() -> None:
    assert parse_http_time(b"yesterday") is None
    assert parse_http_time(b"Wed, 30 Feb 2023 13:20:00 GMT") is None


def test_take_over_an_open_transport(site: CoverSite) -> None:
    """A gate reads the first bytes, then hands the transport and those bytes over."""

    class Gate(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            CoverProtocol.take_over(self.transport, data, site)

    async def main() -> bytes:
        server = await asyncio.get_running_loop().create_server(Gate, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /robots.txt HTTP/1.0\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the scenario: the request's end comes in a later read
        writer.write(b"\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return data

    out = asyncio.run(main())
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.endswith(b"Connection: close\r\n" + b'ETag: "6411c600-18"\r\n'
                        b"Accept-Ranges: bytes\r\n\r\n" + ROBOTS)
