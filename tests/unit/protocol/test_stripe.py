"""Striping (veil.protocol.stripe): reassembly in order, duplicates and the reorder bound as
protocol errors, and the home stream's flow control counting every striped byte."""

from __future__ import annotations

import pytest

from veil.errors import RemoteProtocolError
from veil.protocol.address import Address
from veil.protocol.events import (
    ChunkReceived,
    DataReceived,
    Event,
    JoinAnswered,
    JoinRequested,
    SessionClosed,
    StreamEnded,
    StreamOpened,
)
from veil.protocol.frames import (
    CloseCode,
    FrameType,
    StreamKind,
    frame,
)
from veil.protocol.session import INITIAL_STREAM_WINDOW, Session, SessionConfig
from veil.protocol.shaping import NO_SHAPING
from veil.protocol.stripe import (
    MAX_REORDER_PIECES,
    STRIPED_STREAM_WINDOW,
    Reassembly,
    pack_chunk_prefix,
)

POOL = bytes(range(16))
TOKEN = b"group-01"
CONFIG = SessionConfig(shaping=NO_SHAPING, keepalive_interval=None)


# ------------------------------------------------------------------ Reassembly
def test_pieces_out_of_order_are_delivered_in_order() -> None:
    r = Reassembly(100)
    assert r.add(110, b"c" * 5) == []
    assert r.add(105, b"b" * 5) == []
    assert r.held_bytes == 10
    assert r.add(100, b"a" * 5) == [b"aaaaa", b"bbbbb", b"ccccc"]
    assert r.next == 115 and r.held_bytes == 0


@pytest.mark.parametrize(("offset", "data"), [
    (95, b"x" * 5),    # before the next byte awaited: delivered already
    (98, b"x" * 5),    # straddles it
    (110, b"x" * 5),   # exactly a piece held
    (108, b"x" * 5),   # overlaps a piece held from the left
    (112, b"x"),       # inside a piece held
    (100, b"x" * 12),  # in order, but runs into a piece held
])
def test_a_byte_received_twice_is_a_protocol_error(offset: int, data: bytes) -> None:
    r = Reassembly(0)
    r.add(0, b"a" * 100)
    r.add(110, b"c" * 5)
    with pytest.raises(RemoteProtocolError, match="duplicate"):
        r.add(offset, data)


def test_the_reorder_bound_is_enforced() -> None:
    r = Reassembly(0, limit=1000)
    r.add(990, b"x" * 10)  # ends exactly at the bound: fine
    with pytest.raises(RemoteProtocolError, match="reorder bound") as caught:
        r.add(995, b"y" * 10)
    assert caught.value.code == "flow_control"


def test_the_pieces_held_are_bounded() -> None:
    r = Reassembly(0)
    for i in range(MAX_REORDER_PIECES):
        r.add(2 * i + 1, b"x")  # every other byte: a hole before each
    with pytest.raises(RemoteProtocolError, match="too many"):
        r.add(2 * MAX_REORDER_PIECES + 1, b"x")


def test_the_end_waits_for_every_byte_before_it() -> None:
    r = Reassembly(0)
    assert r.add(10, b"", fin=True) == []
    assert not r.finished
    assert r.add(5, b"b" * 5) == []
    assert r.add(0, b"a" * 5) == [b"aaaaa", b"bbbbb"]
    assert r.finished
    with pytest.raises(RemoteProtocolError, match="after the end"):
        r.add(10, b"z")


def test_an_end_before_bytes_held_is_a_protocol_error() -> None:
    r = Reassembly(0)
    r.add(20, b"x" * 5)
    with pytest.raises(RemoteProtocolError, match="after the end"):
        r.add(10, b"", fin=True)


# ------------------------------------------------------------------ sessions of a pool
def _joined() -> tuple[list[Session], list[Session]]:
    """Two sessions (members 0 and 1) of one client pool, each end's, joined and answered."""
    clients = [Session(client=True, now=0.0, config=CONFIG) for _ in range(2)]
    servers = [Session(client=False, now=0.0, config=CONFIG) for _ in range(2)]
    for member, (client, server) in enumerate(zip(clients, servers, strict=True)):
        client.send_join(POOL, member)
        assert server.receive_data(client.data_to_send(), 0.0) == [JoinRequested(POOL, member)]
        server.answer_join(TOKEN)
        assert client.receive_data(server.data_to_send(), 0.0) == [JoinAnswered(TOKEN)]
    return clients, servers


def _open(clients: list[Session], servers: list[Session]) -> int:
    stream_id = clients[0].open_stream(StreamKind.TCP, Address("example.com", 443))
    (opened,) = servers[0].receive_data(clients[0].data_to_send(), 0.0)
    assert isinstance(opened, StreamOpened)
    return stream_id


def _data(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


def test_a_stream_striped_over_two_sessions_arrives_in_order_with_its_end() -> None:
    clients, servers = _joined()
    sid = _open(clients, servers)
    home, carrier = servers
    # The server sends the stream's first bytes as DATA on its home, then stripes: a piece
    # carried by the other session, one on the home as a CHUNK, then the end.
    home.send_data(sid, b"A" * 10)
    offset, _ = home.stripe_take(sid, 20)
    assert offset == 10
    carrier.send_chunk(0, sid, offset, b"B" * 20)
    home.send_data(sid, b"C" * 5)
    home.send_eof(sid)
    # The carrier's chunk arrives first: held; nothing is delivered before the DATA.
    (chunk,) = clients[1].receive_data(carrier.data_to_send(), 0.0)
    assert chunk == ChunkReceived(0, sid, 10, False, b"B" * 20)
    held = clients[0].receive_chunk(chunk.stream_id, chunk.offset, chunk.data, chunk.fin, 0.0)
    assert _data(held) == b""
    events = clients[0].receive_data(home.data_to_send(), 0.0)
    assert _data(events) == b"A" * 10 + b"B" * 20 + b"C" * 5
    assert events[-1] == StreamEnded(sid)


def test_reordered_bytes_count_against_the_stream_window() -> None:
    clients, servers = _joined()
    sid = _open(clients, servers)
    home = clients[0]
    # A striped stream's window is STRIPED_STREAM_WINDOW: a first chunk (ahead of a hole)
    # grants the rest; held bytes are not given back until delivered and consumed.
    home.receive_chunk(sid, 1, b"x" * 1000, False, 0.0)
    grant = home.data_to_send()
    assert grant == frame(FrameType.WINDOW, sid,
                          (STRIPED_STREAM_WINDOW - INITIAL_STREAM_WINDOW).to_bytes(4, "big"))
    room = STRIPED_STREAM_WINDOW - 1000 - 1
    assert home.receive_chunk(sid, 1001, b"y" * room, False, 0.0) == []
    # One byte more than the window, though inside the reorder bound from the hole: refused.
    (closed,) = home.receive_chunk(sid, 0, b"zz", False, 0.0)
    assert isinstance(closed, SessionClosed) and closed.code is CloseCode.FLOW_CONTROL_ERROR


def test_a_chunk_past_the_reorder_bound_closes_the_session() -> None:
    clients, servers = _joined()
    sid = _open(clients, servers)
    payload = pack_chunk_prefix(0, STRIPED_STREAM_WINDOW, False) + b"x"
    events = clients[1].receive_data(frame(FrameType.CHUNK, sid, payload), 0.0)
    (chunk,) = events
    assert isinstance(chunk, ChunkReceived)
    (closed,) = clients[0].receive_chunk(sid, chunk.offset, chunk.data, chunk.fin, 0.0)
    assert isinstance(closed, SessionClosed) and closed.code is CloseCode.FLOW_CONTROL_ERROR


def test_a_duplicate_chunk_closes_the_session() -> None:
    clients, servers = _joined()
    sid = _open(clients, servers)
    home = clients[0]
    home.receive_chunk(sid, 0, b"x" * 10, False, 0.0)
    (closed,) = home.receive_chunk(sid, 5, b"x" * 10, False, 0.0)
    assert isinstance(closed, SessionClosed) and closed.code is CloseCode.PROTOCOL_ERROR


def test_chunks_and_joins_outside_a_pool_are_protocol_errors() -> None:
    lone = Session(client=False, now=0.0, config=CONFIG)
    events = lone.receive_data(frame(FrameType.CHUNK, 1, pack_chunk_prefix(0, 0, False) + b"x"),
                               0.0)
    assert isinstance(events[-1], SessionClosed)
    assert events[-1].code is CloseCode.PROTOCOL_ERROR
    # A second JOIN on one session, and an answer the client never asked for.
    _clients, servers = _joined()
    events = servers[0].receive_data(frame(FrameType.JOIN, 0, POOL + b"\x05"), 0.0)
    assert isinstance(events[-1], SessionClosed)
    client = Session(client=True, now=0.0, config=CONFIG)
    events = client.receive_data(frame(FrameType.JOIN, 0, b"\x00" + TOKEN), 0.0)
    assert isinstance(events[-1], SessionClosed)


def test_a_stream_that_never_stripes_sends_plain_frames() -> None:
    clients, servers = _joined()
    sid = _open(clients, servers)
    servers[0].send_data(sid, b"hello")
    servers[0].send_eof(sid)
    wire = servers[0].data_to_send()
    assert wire == (frame(FrameType.DATA, sid, b"hello") + frame(FrameType.FIN, sid))
