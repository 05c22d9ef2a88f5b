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
