"""The HTTP proxy inbound's sans-IO ``HttpProxyParser`` (CONNECT and absolute-URI requests).

Input: ``cutting | bytes``.

Invariants: ``receive_data`` raises only ``RemoteProtocolError``, whose code maps to an HTTP
error response; a request is returned once; its destination has a port in 1..65535 and
encodes; a forwarded head is exactly one well-formed HTTP/1.1 request head (h11 reads it back,
nothing follows its blank line: no smuggling), names the URI's authority as its only Host,
carries ``Connection: close`` and no hop-by-hop or Proxy-* header; bytes after the client's
head are kept as early data, unchanged.
"""

from __future__ import annotations

import sys

import h11
import harness

from veil.client.http_proxy import (
    MAX_HEAD_BYTES,
    ForwardRequest,
    HttpProxyParser,
    TunnelRequest,
    error_response,
)
from veil.errors import RemoteProtocolError
from veil.protocol.address import Address

MODULES = ("veil.client.http_proxy",)

_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
               b"upgrade"}


def _check_forward(request: ForwardRequest) -> None:
    head = request.head
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1, "head framing"
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=2 * MAX_HEAD_BYTES)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request), f"forwarded head does not parse: {event!r}"
    after = conn.next_event()
    if isinstance(after, h11.EndOfMessage):
        after = conn.next_event()
    assert after in (h11.NEED_DATA, h11.PAUSED), f"bytes after the head: {after!r}"
    assert event.target.startswith(b"/"), "target is not origin-form"
    names = [name.lower() for name, _ in event.headers.raw_items()]
    assert names.count(b"host") == 1, "Host header count"
    assert names[-1] == b"connection"
    for name in names[:-1]:
        assert name not in _HOP_BY_HOP and not name.startswith(b"proxy-"), f"forwarded {name!r}"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    parser = HttpProxyParser()
    request = None
    fed = 0
    for piece in harness.pieces(body, selector):
        try:
            got = parser.receive_data(piece)
        except RemoteProtocolError as exc:
            assert error_response(exc.code).startswith(b"HTTP/1.1 4") or \
                error_response(exc.code).startswith(b"HTTP/1.1 5")
            return
        fed += len(piece)
        if got is None:
            continue
        assert request is None, "two requests from one connection"
        request = got
        assert 0 < got.dest.port <= 0xFFFF
        Address.decode(got.dest.encode())  # the tunnel's OPEN carries it, the server reads it
        if isinstance(got, ForwardRequest):
            _check_forward(got)
        else:
            assert isinstance(got, TunnelRequest)
        assert body[:fed].endswith(parser.trailing_data)
    if request is not None:
        assert body.endswith(parser.trailing_data)


# ------------------------------------------------------------------ seeds
def seeds() -> dict[str, bytes]:
    get = (b"GET http://example.com/a?b=c HTTP/1.1\r\nHost: example.com\r\n"
           b"Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
           b"User-Agent: curl/8\r\nAccept: */*\r\n\r\n")
    return {
        "connect": b"\x00CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
                   b"\x16\x03\x01\x00\x01x",
        "connect-ipv6": b"\x00CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n",
        "connect-cut": b"\x23CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "connect-no-port": b"\x00CONNECT example.com HTTP/1.1\r\n\r\n",
        "connect-port-zero": b"\x00CONNECT example.com:0 HTTP/1.1\r\n\r\n",
        "get": b"\x00" + get,
        "get-bytewise": b"\x10" + get,
        "get-lf-only": b"\x00GET http://example.com HTTP/1.0\nHost: x\n\n",
        "post-body": b"\x00POST http://example.com:8080/form HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 5\r\n\r\nhello",
        "post-chunked": b"\x00POST http://example.com/ HTTP/1.1\r\nHost: x\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "smuggle-both": b"\x00POST http://example.com/ HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "https-uri": b"\x00GET https://example.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "origin-form": b"\x00GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "userinfo": b"\x00GET http://user@example.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "fragment": b"\x00GET http://example.com/#frag HTTP/1.1\r\nHost: x\r\n\r\n",
        "long-label": b"\x00CONNECT " + b"a" * 300 + b":443 HTTP/1.1\r\n\r\n",
        "dots-host": b"\x00CONNECT ..:443 HTTP/1.1\r\n\r\n",
        "bogus-punycode": b"\x00CONNECT xn--zz.com:443 HTTP/1.1\r\nHost: xn--zz.com:443\r\n\r\n",
        "non-ascii-target": b"\x00GET http://ex\xc3\xa4mple.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "http2-preface": b"\x00PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "garbage": b"\x00\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    }


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
