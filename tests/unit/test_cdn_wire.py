"""The CDN carrier's shapes (transport/cdn/wire.py): what is claimed, what is the cover's,
and the bounds of packet-up's reordering."""

from __future__ import annotations

import pytest

from veil.errors import TransportError
from veil.transport.cdn import wire

SECRET = b"/AAAAAAAAAAAAAAAAAAAAAA/"
SESSION = b"BBBBBBBBBBBBBBBBBBBBBB"
WS = {b"upgrade": b"websocket", b"connection": b"keep-alive, Upgrade",
      b"sec-websocket-version": b"13", b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ=="}


def judge(method: bytes, path: bytes, headers: dict[bytes, bytes]) -> wire.CarrierRequest | None:
    return wire.judge(method, path, headers, frozenset({SECRET}))


def test_the_three_shapes() -> None:
    assert judge(b"GET", SECRET, WS) == wire.WebSocketOpen(WS[b"sec-websocket-key"])
    assert judge(b"GET", SECRET + SESSION, {}) == wire.DownlinkOpen(SESSION)
    assert judge(b"POST", SECRET + SESSION + b"/7", {b"content-length": b"5"}) == \
        wire.UplinkPacket(SESSION, 7, 5, close=False)


@pytest.mark.parametrize("method,path,headers", [
    (b"GET", b"/AAAAAAAAAAAAAAAAAAAAAB/", WS),  # another token
    (b"GET", SECRET, {}),  # the path without an upgrade
    (b"POST", SECRET, WS),
    (b"GET", SECRET, {**WS, b"sec-websocket-version": b"8"}),
    (b"GET", SECRET, {**WS, b"sec-websocket-key": b"short"}),
    (b"GET", SECRET, {**WS, b"content-length": b"1"}),
    (b"GET", SECRET + SESSION + b"x", {}),  # not a session id
    (b"GET", SECRET + SESSION, {b"content-length": b"3"}),
    (b"POST", SECRET + SESSION + b"/1", {}),  # no length
    (b"POST", SECRET + SESSION + b"/1", {b"transfer-encoding": b"chunked"}),
    (b"POST", SECRET + SESSION + b"/1", {b"content-length": b"0"}),
    (b"POST", SECRET + SESSION + b"/1",
     {b"content-length": str(wire.MAX_POST_BYTES + 1).encode()}),
    (b"POST", SECRET + SESSION + b"/" + b"9" * (wire.MAX_SEQ_DIGITS + 1),
     {b"content-length": b"1"}),
])
def test_anything_else_is_the_covers(method: bytes, path: bytes,
                                     headers: dict[bytes, bytes]) -> None:
    assert judge(method, path, headers) is None


def test_reorder_delivers_in_order_and_bounds_what_it_holds() -> None:
    reorder = wire.Reorder()
    assert reorder.push(1, b"b") == []
    assert reorder.push(2, b"c") == []
    assert reorder.push(0, b"a") == [b"a", b"b", b"c"]
    with pytest.raises(TransportError, match="twice"):
        reorder.push(2, b"c")
    with pytest.raises(TransportError, match="ahead"):
        reorder.push(3 + wire.MAX_HELD_POSTS, b"x")
    assert reorder.held == 0


def test_secret_paths_must_be_unguessable_and_normal() -> None:
    assert wire.check_secret_path(wire.new_secret_path()).startswith(b"/")
    for bad in ("/short/", "no-slashes-at-all-here-xx", "/aaaaaaaaaaaaaaaaaa/../x/",
                "/aaaaaaaaaaaaaaaaaa//bbb/"):
        with pytest.raises(TransportError):
            wire.check_secret_path(bad)


def test_the_downlink_preamble_is_dropped_however_it_is_split() -> None:
    """Every downlink opens with random padding of random length (so a proxy that holds a
    response's head until its body starts, as nginx does on h2, passes the 200 at once);
    the client drops it, in whatever pieces it arrives."""
    sizes = set()
    for _ in range(50):
        body = wire.downlink_preamble()
        size, rest = body.split(b"\r\n", 1)
        preamble = rest[:int(size, 16)]
        sizes.add(len(preamble))
        stream = preamble + b"the session's bytes"
        for step in (1, 2, 3, 7, len(stream)):
            reader = wire.PreambleReader()
            out = b"".join(reader.feed(stream[i:i + step]) for i in range(0, len(stream), step))
            assert out == b"the session's bytes"
    assert len(sizes) > 10  # the first record's size varies


def test_a_downlink_without_the_preamble_is_not_a_veil_server() -> None:
    with pytest.raises(TransportError, match="preamble"):
        wire.PreambleReader().feed(b"\xff\xffsomething else")


def _chunked(pieces: list[bytes], extension: bytes = b"", trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces if p)
    return body + b"0\r\n" + trailer + b"\r\n"


def _h11_body(wire_bytes: bytes) -> bytes:
    """The same body as h11 reads it (the reference)."""
    import h11

    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire_bytes)
    out = b""
    while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        if isinstance(event, h11.Data):
            out += event.data
        if isinstance(event, h11.EndOfMessage):
            return out
    raise AssertionError("h11 did not see the end")


@pytest.mark.parametrize("seed", range(20))
def test_a_chunked_body_reads_as_h11_reads_it_however_it_is_split(seed: int) -> None:
    import random

    draw = random.Random(seed)
    pieces = [draw.randbytes(draw.choice((1, 2, 15, 4096, 8192, 70000))) for _ in range(12)]
    extension = draw.choice((b"", b";name=value", b";x"))  # h11 refuses BWS before ";"
    trailer = draw.choice((b"", b"X-Trailer: 1\r\n"))
    body = _chunked(pieces, extension, trailer)
    reader = wire.ChunkedReader()
    got = bytearray()
    pos = 0
    while pos < len(body):
        step = draw.choice((1, 2, 3, 7, 100, 4096, 20000))
        got += reader.feed(body[pos:pos + step])
        assert not reader.done or pos + step >= len(body)
        pos += step
    assert reader.done
    assert bytes(got) == b"".join(pieces) == _h11_body(body)


@pytest.mark.parametrize("broken", [
    b"g\r\nx\r\n",  # not hex
    b"\r\n",  # no size
    b"3\r\nabcX\r\n",  # data not followed by CRLF
    b"1" * 16 + b"\r\n",  # a size no body has
    b"-1\r\n",
    b"5" + b";" + b"x" * 2000 + b"\r\n",  # a line past MAX_CHUNK_LINE
    b"0\r\n" + b"X: y\r\n" * 2000,  # a trailer section past its bound
    b"0\r\n\r\nHTTP/1.1 200 OK\r\n",  # bytes after the last chunk
])
def test_a_broken_chunked_body_is_refused_and_stays_refused(broken: bytes) -> None:
    reader = wire.ChunkedReader()
    with pytest.raises(TransportError):
        for i in range(0, len(broken), 64):  # also when it comes in pieces
            reader.feed(broken[i:i + 64])
    assert reader.failed
    with pytest.raises(TransportError):
        reader.feed(b"1\r\nx\r\n")


def test_a_long_line_is_refused_before_it_is_buffered() -> None:
    reader = wire.ChunkedReader()
    with pytest.raises(TransportError):
        for _ in range(100):
            reader.feed(b"a" * 100)  # a size line that never ends
