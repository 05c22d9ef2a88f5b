"""The built-in cover site's sans-IO HTTP parser (``cover/http1.py`` ``CoverConnection``):
whatever a prober sends, the answer must be nginx's.

Input: ``flags | cutting | bytes``. flags bit 0: plain bytes on the TLS port
(``PLAIN_ON_TLS_PORT``); bit 1: the bytes came out of TLS; bit 2: the peer half-closes after
the last read; bit 3: every pending timer fires between reads (keep-alive, header and
lingering timeouts).

Invariants: no call raises; every write starts a response nginx would send (an HTTP/1.1
status line with ``Server: nginx/1.22.1``, or for HTTP/0.9 a page of the site or an error
page); nothing is written once the connection is closed, and a closed connection has no
timer; a close action is always one of ``CloseAction``.
"""

from __future__ import annotations

import sys

import harness

from veil.cover.http1 import CloseAction, CoverConnection, CoverMode
from veil.cover.site import CoverSite

MODULES = ("veil.cover.http1", "veil.cover.uri", "veil.cover.site", "veil.cover.nginx")

SITE = CoverSite.builtin()
_SERVER = b"\r\nServer: nginx/1.22.1\r\n"


def _bare_starts() -> tuple[bytes, ...]:
    """HTTP/0.9 answers are bare bodies: a file of the site or an error page."""
    starts = {b"<html>"}
    for name in SITE.names:
        f = SITE._files[("/" + name).encode()]
        starts.add(f.body[:16])
    return tuple(starts)


BARE_STARTS = _bare_starts()


def _check_output(out: bytes) -> None:
    if not out:
        return
    if out.startswith(b"HTTP/1.1 "):
        if out.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
            out = out[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
            if not out:
                return
        head = out.split(b"\r\n\r\n", 1)[0]
        assert _SERVER in head + b"\r\n", f"a response without nginx's Server: {head[:200]!r}"
        return
    assert out.startswith(BARE_STARTS), f"not a response nginx would send: {out[:80]!r}"


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, selector = data[0], data[1]
    mode = CoverMode.PLAIN_ON_TLS_PORT if flags & 1 else CoverMode.HTTP
    now = 1000.0
    conn = CoverConnection(SITE, now=now, mode=mode, tls=bool(flags & 2))
    for piece in harness.pieces(data[2:], selector):
        was_closed = conn.closed
        now += 0.25
        conn.receive_data(piece, now)
        out = conn.data_to_send()
        assert not (was_closed and out), "wrote after closing"
        _check_output(out)
        assert isinstance(conn.close_action, CloseAction)
        if conn.closed:
            assert conn.get_timer() is None
        elif flags & 8 and (timer := conn.get_timer()) is not None:
            now = max(now, timer)
            conn.handle_timer(now)
            out = conn.data_to_send()
            assert not out, f"a timeout wrote {out[:80]!r}"  # nginx closes without a word
    if flags & 4:
        was_closed = conn.closed
        conn.receive_eof(now)
        out = conn.data_to_send()
        assert not (was_closed and out)
        _check_output(out)
        assert conn.closed


# ------------------------------------------------------------------ seeds
def seeds() -> dict[str, bytes]:
    get = b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Mozilla/5.0 Chrome/120\r\n\r\n"
    return {
        "get": b"\x00\x00" + get,
        "get-cut": b"\x02\x13" + get,
        "get-eof": b"\x04\x00" + get[:-2],
        "pipelined": b"\x00\x00" + get + b"HEAD /about.html HTTP/1.1\r\nHost: a\r\n\r\n" + get,
        "keepalive-timeout": b"\x08\x00" + get + b"GET /style.css HTTP/1.1\r\nHost: a\r\n\r\n",
        "http10": b"\x00\x00GET /robots.txt HTTP/1.0\r\n\r\n",
        "http09": b"\x00\x00GET /robots.txt\r\n",
        "http09-missing": b"\x00\x00GET /nope\r\n",
        "absolute-uri": b"\x00\x00GET http://[::1]:80/./a/../index.html?x=%41 HTTP/1.1\r\n\r\n",
        "complex-uri": b"\x00\x00GET /%2e%2E/a//b/./../c%00 HTTP/1.1\r\nHost: x\r\n\r\n",
        "conditional": b"\x00\x00GET /index.html HTTP/1.1\r\nHost: a\r\n"
        b"If-Modified-Since: Wed, 15 Mar 2023 13:20:00 GMT\r\nIf-None-Match: W/\"x\", *\r\n\r\n",
        "if-unmodified-since": b"\x00\x00GET / HTTP/1.1\r\nHost: a\r\n"
        b"If-Unmodified-Since: Sunday, 06-Nov-94 08:49:37 GMT\r\n\r\n",
        "ranges": b"\x00\x00GET /style.css HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1,5-,-3\r\n"
        b"If-Range: \"x\"\r\n\r\n",
        "post-body": b"\x00\x00POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\nhello",
        "chunked": b"\x08\x00POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\nTrailer: 1\r\n\r\n",
        "body-too-large": b"\x00\x00PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 9999999\r\n\r\n",
        "plain-on-tls-port": b"\x01\x00" + get,
        "plain-garbage": b"\x01\x00\x01\x02\x03\r\n\r\n",
        "tls-record": b"\x02\x00\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        "bad-method": b"\x00\x00get / HTTP/1.1\r\n\r\n",
        "bad-version": b"\x00\x00GET / HTTP/2.0\r\n\r\n",
        "bad-header": b"\x00\x00GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        "duplicate-host": b"\x00\x00GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "leading-crlf": b"\x00\x00\r\n\r\n\r\n" + get,
        "long-line": b"\x00\x00GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        "msie": b"\x00\x00GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla/4.0 (MSIE 6.0)\r\n\r\n",
        "connection-close": b"\x06\x00GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "options-star": b"\x00\x00OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        "lf-only": b"\x00\x00GET / HTTP/1.1\nHost: a\n\n",
        "nul-byte": b"\x00\x00GET /\x00 HTTP/1.1\r\n\r\n",
    }


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
