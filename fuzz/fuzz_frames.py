"""Session frames: ``Session.receive_data`` on either side, fed any bytes in any cutting.

Input: ``flags | cutting | bytes``. flags bit 0: the client side (else the server side);
bit 1: the client has a stream blocked on flow control (so WINDOW frames flush it); bit 2:
the keepalive timer fires between reads. The client side has a TCP, a UDP and an IP stream
open (ids 1, 3, 5) so that the peer's frames for them reach the stream code.

Invariants: ``receive_data`` returns events (a raised ``ProtocolError`` is tolerated only if
the session is closed afterwards); SessionClosed is the last event ever and leaves the session
closed, silent and without a timer; the server never reports a stream the client could not
have opened; DATA is never empty; the parser's buffer stays within the largest frame.
"""

from __future__ import annotations

import sys

import harness

from veil.errors import ProtocolError
from veil.protocol.address import Address
from veil.protocol.events import (
    DatagramReceived,
    DataReceived,
    PacketReceived,
    SessionClosed,
    StreamOpened,
)
from veil.protocol.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    CloseCode,
    FrameType,
    ResetCode,
    StreamKind,
    frame,
    pack_u32,
)
from veil.protocol.session import INITIAL_STREAM_WINDOW, Session, SessionConfig

MODULES = ("veil.protocol.session", "veil.protocol.address", "veil.protocol.frames")

DEST = Address("example.com", 443)
# Frames other than DATA are buffered whole: the parser never holds more than the largest.
_MAX_BUFFERED = HEADER_SIZE + max(v for k, v in MAX_PAYLOAD.items() if k != FrameType.DATA)
_BLOCKING_WRITE = bytes(INITIAL_STREAM_WINDOW + 1)


def _session(flags: int) -> Session:
    session = Session(client=bool(flags & 1), now=0.0, config=SessionConfig(max_streams=4))
    if session.client:
        for kind in (StreamKind.TCP, StreamKind.UDP, StreamKind.IP):
            session.open_stream(kind, DEST)
        if flags & 2:
            session.send_data(1, _BLOCKING_WRITE)
        session.data_to_send()
    return session


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, selector = data[0], data[1]
    session = _session(flags)
    now = 0.0
    for piece in harness.pieces(data[2:], selector):
        now += 1.0
        was_closed = session.closed
        try:
            events = session.receive_data(piece, now)
        except ProtocolError:
            assert session.closed, "a protocol error left the session open"
            return
        if was_closed:
            assert not events, "events after the session closed"
        for i, event in enumerate(events):
            if isinstance(event, SessionClosed):
                assert i == len(events) - 1, "events after SessionClosed"
                assert session.closed
            elif isinstance(event, DataReceived):
                assert event.data, "empty DataReceived"
                session.consume(event.stream_id, len(event.data))
            elif isinstance(event, StreamOpened):
                assert not session.client, "the server opened a stream"
                assert event.stream_id % 2 == 1
            elif isinstance(event, DatagramReceived | PacketReceived):
                assert event.stream_id in (3, 5) or not session.client
        assert len(session._partial) <= _MAX_BUFFERED, "parser buffer beyond the largest frame"
        if session.closed:
            assert session.get_timer() is None
        elif flags & 4:
            session.handle_timer(now + 30.0)
        session.data_to_send()


# ------------------------------------------------------------------ seeds
def _client_flight() -> bytes:
    """What a client sends: OPENs of every kind, data, a datagram, padding, FIN, PING."""
    client = Session(client=True, now=0.0)
    tcp = client.open_stream(StreamKind.TCP, DEST)
    udp = client.open_stream(StreamKind.UDP, Address("192.0.2.1", 53))
    ip = client.open_stream(StreamKind.IP, Address("2001:db8::1", 0))
    client.send_data(tcp, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    client.send_datagram(udp, Address("192.0.2.1", 53), b"\x12\x34query")
    client.send_packet(ip, b"\x00" * 10 + b"\x45" + bytes(19))
    client.send_padding(40)
    client.send_eof(tcp)
    client.handle_timer(100.0)  # a PING
    client.reset(udp, ResetCode.CANCELLED)
    return bytes(client.data_to_send())


def _server_flight() -> bytes:
    """What a server sends back on the client's streams 1 (TCP), 3 (UDP) and 5 (IP)."""
    client = Session(client=True, now=0.0)
    server = Session(client=False, now=0.0)
    for kind in (StreamKind.TCP, StreamKind.UDP, StreamKind.IP):
        client.open_stream(kind, DEST)
    server.receive_data(client.data_to_send(), 0.0)
    server.data_to_send()
    server.send_data(1, b"HTTP/1.1 200 OK\r\n\r\nhello")
    server.send_datagram(3, Address("192.0.2.1", 53), b"answer")
    server.send_packet(5, b"\x00" * 10 + b"\x60" + bytes(39))
    server.consume(1, INITIAL_STREAM_WINDOW)  # a WINDOW frame
    server.send_eof(1)
    server.reset(3, ResetCode.CONNECT_FAILED)
    server.close(CloseCode.SHUTDOWN, "bye")
    return bytes(server.data_to_send())


def seeds() -> dict[str, bytes]:
    client, server = _client_flight(), _server_flight()
    return {
        "server-side-client-flight": b"\x00\x00" + client,
        "server-side-client-flight-cut": b"\x00\x23" + client,
        "server-side-client-flight-bytewise": b"\x04\x10" + client,
        "client-side-server-flight": b"\x01\x00" + server,
        "client-side-server-flight-cut": b"\x01\x47" + server,
        "client-side-blocked-window": b"\x03\x00" + frame(FrameType.WINDOW, 0, pack_u32(1 << 20))
        + frame(FrameType.WINDOW, 1, pack_u32(1 << 20)),
        "window-overflow": b"\x01\x00" + frame(FrameType.WINDOW, 0, pack_u32(0x7FFFFFFF)),
        "ping-pong": b"\x05\x00" + frame(FrameType.PING, 0, bytes(8))
        + frame(FrameType.PONG, 0, (1).to_bytes(8, "big")),
        "unknown-type": b"\x00\x00" + bytes((0xFF, 0, 0, 0, 0, 0, 0, 0)),
        "huge-length": b"\x00\x00" + bytes((FrameType.DATA, 0xFF, 0xFF, 0xFF, 0, 0, 0, 1)),
        "max-datagram-header": b"\x01\x00"
        + bytes((FrameType.DATAGRAM,)) + (MAX_PAYLOAD[FrameType.DATAGRAM]).to_bytes(3, "big")
        + (3).to_bytes(4, "big") + b"\x01\x7f\x00\x00\x01\x00\x35",
        "open-idna-domain": b"\x00\x00"
        + frame(FrameType.OPEN, 1, b"\x01\x03\x0dxn--bcher-kva\x01\xbb"),
        "open-bad-idna": b"\x00\x00" + frame(FrameType.OPEN, 1, b"\x01\x03\x04xn--\x01\xbb"),
        "data-on-unopened": b"\x00\x00" + frame(FrameType.DATA, 7, b"x"),
        "fin-twice": b"\x01\x00" + frame(FrameType.FIN, 1) + frame(FrameType.FIN, 1),
        "close-bad-utf8": b"\x00\x00" + frame(FrameType.CLOSE, 0, b"\x63\xff\xfe"),
    }


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
