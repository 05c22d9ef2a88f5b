"""The session protocol, driven on both ends over an in-memory link."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import RemoteProtocolError
from veil.protocol.address import Address
from veil.protocol.events import (
    DatagramReceived,
    DataReceived,
    PongReceived,
    SessionClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from veil.protocol.frames import (
    FEATURE_HOLDS_IDLE_CLOSES,
    FEATURE_RESOLVE,
    FEATURES_TAG,
    CloseCode,
    FrameType,
    ResetCode,
    StreamKind,
    frame,
    pack_u32,
)
from veil.protocol.resolve import (
    MAX_ANSWER_BYTES,
    MAX_RESOLVED_ADDRESSES,
    decode_answer,
    encode_answer,
)
from veil.protocol.session import (
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    UNPRODUCTIVE_FRAME_BURST,
    UNPRODUCTIVE_FRAMES_PER_S,
    Session,
    SessionConfig,
    StreamState,
)
from veil.protocol.shaping import NO_SHAPING, ShapingPolicy

DEST = Address("example.com", 443)


def pair() -> tuple[Session, Session]:
    return Session(client=True, now=0.0), Session(client=False, now=0.0)


def transfer(src: Session, dst: Session, now: float = 0.0) -> list:
    return dst.receive_data(src.data_to_send(), now)


def data_of(events: list, stream_id: int) -> bytes:
    return b"".join(e.data for e in events
                    if isinstance(e, DataReceived) and e.stream_id == stream_id)


def test_open_with_early_data_arrives_in_one_flight() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    assert client.send_data(sid, b"GET / HTTP/1.1\r\n\r\n")
    events = transfer(client, server)
    assert events[0] == StreamOpened(sid, StreamKind.TCP, DEST)
    assert data_of(events, sid) == b"GET / HTTP/1.1\r\n\r\n"


def test_exact_wire_bytes_of_open_and_data() -> None:
    client = Session(client=True, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    sid = client.open_stream(StreamKind.TCP, Address("1.2.3.4", 80))
    client.send_data(sid, b"hi")
    assert client.data_to_send() == (
        bytes([FrameType.OPEN, 0, 0, 8, 0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 0, 80])
        + bytes([FrameType.DATA, 0, 0, 2, 0, 0, 0, 1]) + b"hi"
    )


def test_half_close_keeps_the_other_direction() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    client.send_eof(sid)
    events = transfer(client, server)
    assert StreamEnded(sid) in events
    assert client.stream_state(sid) is StreamState.LOCAL_CLOSED
    server.send_data(sid, b"reply")
    server.send_eof(sid)
    events = transfer(server, client)
    assert data_of(events, sid) == b"reply"
    assert StreamEnded(sid) in events
    assert client.stream_state(sid) is StreamState.CLOSED
    assert server.stream_state(sid) is StreamState.CLOSED


def test_reset_carries_its_reason() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    transfer(client, server)
    server.reset(sid, ResetCode.REFUSED_DESTINATION)
    assert transfer(server, client) == [StreamReset(sid, ResetCode.REFUSED_DESTINATION, True)]


def test_flow_control_blocks_then_resumes_without_loss() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    payload = os.urandom(INITIAL_STREAM_WINDOW + 5000)
    assert client.send_data(sid, payload) is False  # blocked: the rest is pending
    events = transfer(client, server)
    got = data_of(events, sid)
    assert len(got) == INITIAL_STREAM_WINDOW
    server.consume(sid, len(got))
    events = transfer(server, client)
    assert StreamWritable(sid) in events
    got += data_of(transfer(client, server), sid)
    assert got == payload


def test_slow_stream_does_not_stall_another() -> None:
    client, server = pair()
    slow = client.open_stream(StreamKind.TCP, DEST)
    fast = client.open_stream(StreamKind.TCP, DEST)
    client.send_data(slow, bytes(INITIAL_STREAM_WINDOW * 2))  # never consumed by the server
    transfer(client, server)
    total = 0
    for _ in range(20):
        assert client.send_data(fast, bytes(256 * 1024))
        events = transfer(client, server)
        n = len(data_of(events, fast))
        total += n
        server.consume(fast, n)
        client.receive_data(server.data_to_send(), 0)
    assert total == 20 * 256 * 1024


def test_session_window_bounds_total_unconsumed_bytes() -> None:
    client, server = pair()
    received = 0
    for _ in range(40):
        sid = client.open_stream(StreamKind.TCP, DEST)
        client.send_data(sid, bytes(INITIAL_STREAM_WINDOW))
        received += len(data_of(transfer(client, server), sid))
    assert received == INITIAL_SESSION_WINDOW


def test_peer_exceeding_window_is_a_protocol_error() -> None:
    _, server = pair()
    opening = frame(FrameType.OPEN, 1, bytes([StreamKind.TCP]) + DEST.encode())
    too_much = frame(FrameType.DATA, 1, bytes(64 * 1024)) * (INITIAL_STREAM_WINDOW // 65536 + 1)
    events = server.receive_data(opening + too_much, 0)
    assert isinstance(events[-1], SessionClosed)
    assert events[-1].code is CloseCode.FLOW_CONTROL_ERROR
    assert server.closed


@pytest.mark.parametrize("bad", [
    bytes([0xEE, 0, 0, 0, 0, 0, 0, 0]),  # unknown type
    frame(FrameType.DATA, 3, b"x"),  # stream never opened
    frame(FrameType.PING, 1, bytes(8)),  # session frame on a stream
    bytes([FrameType.WINDOW, 0, 0, 3, 0, 0, 0, 0, 0, 0, 1]),  # wrong length
    frame(FrameType.WINDOW, 0, pack_u32(0)),  # zero increment
    frame(FrameType.OPEN, 2, bytes([1]) + DEST.encode()),  # even id from the client
    frame(FrameType.OPEN, 1, bytes([1, 9])),  # bad address type
    bytes([FrameType.DATA, 0x10, 0, 0, 0, 0, 0, 1]),  # oversized DATA
])
def test_malformed_input_closes_the_session_cleanly(bad: bytes) -> None:
    _, server = pair()
    events = server.receive_data(bad, 0)
    assert isinstance(events[-1], SessionClosed) and not events[-1].remote
    assert server.data_to_send()[0] == FrameType.CLOSE
    assert server.receive_data(b"more", 0) == []


def test_too_many_streams_are_reset_not_fatal() -> None:
    client = Session(client=True, now=0)
    server = Session(client=False, now=0, config=SessionConfig(max_streams=2))
    ids = [client.open_stream(StreamKind.TCP, DEST) for _ in range(3)]
    events = transfer(client, server)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == ids[:2]
    assert transfer(server, client) == [StreamReset(ids[2], ResetCode.TOO_MANY_STREAMS, True)]


def test_datagrams_carry_addresses_both_ways() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.UDP, Address("0.0.0.0", 0))
    client.send_datagram(sid, Address("9.9.9.9", 53), b"query")
    events = transfer(client, server)
    assert events[-1] == DatagramReceived(sid, Address("9.9.9.9", 53), b"query")
    server.send_datagram(sid, Address("9.9.9.9", 53), b"answer")
    assert transfer(server, client) == [DatagramReceived(sid, Address("9.9.9.9", 53), b"answer")]


def frames_of(wire: bytes | memoryview) -> list[FrameType]:
    """The frame types in a write, in order."""
    found, data, pos = [], bytes(wire), 0
    while pos < len(data):
        word = int.from_bytes(data[pos : pos + 4], "big")
        found.append(FrameType(word >> 24))
        pos += 8 + (word & 0xFFFFFF)
    return found


def test_an_idle_session_never_pings_however_long_a_stream_stays_open() -> None:
    # Chromium's idle HTTP/2 connection sends nothing; neither does veil's, stream or not.
    client, server = pair()
    client.open_stream(StreamKind.TCP, DEST)
    transfer(client, server)
    assert client.get_timer() is None
    for now in (5.0, 60.0, 3600.0):
        assert client.handle_timer(now) == []
        assert client.data_to_send(now) == b""
    assert server.get_timer() is None  # its idle close waits for the stream to go


def test_a_write_after_a_silence_carries_a_ping_and_finds_a_dead_peer() -> None:
    plain = SessionConfig(shaping=NO_SHAPING)  # no padding frames in the writes compared
    client, server = Session(client=True, now=0.0, config=plain), Session(client=False, now=0.0)
    sid = client.open_stream(StreamKind.TCP, DEST)
    server.receive_data(client.data_to_send(0.0), 0.0)
    # Within the interval of the last bytes received: the write goes alone.
    server.send_data(sid, b"hello")
    client.receive_data(server.data_to_send(1.0), 1.0)
    client.send_data(sid, b"soon")
    assert frames_of(client.data_to_send(1.0 + 9.9)) == [FrameType.DATA]
    # After the interval: the PING goes first, with the user's write (Chromium's preface
    # ping), and an answer clears it.
    client.send_data(sid, b"after a silence")
    wire = client.data_to_send(11.0)
    assert frames_of(wire) == [FrameType.PING, FrameType.DATA]
    server.receive_data(wire, 11.0)
    assert client.receive_data(server.data_to_send(11.25), 11.25) == [PongReceived(0.25)]
    assert client.get_timer() is None
    # Silent again past the interval, and this time nobody answers: declared dead 10 s later.
    client.send_data(sid, b"into the void")
    assert frames_of(client.data_to_send(30.0)) == [FrameType.PING, FrameType.DATA]
    assert client.get_timer() == 30.0 + 10.0
    client.send_data(sid, b"more")  # one PING outstanding at most
    assert frames_of(client.data_to_send(35.0)) == [FrameType.DATA]
    assert client.handle_timer(39.9) == []
    events = client.handle_timer(40.0)
    assert events == [SessionClosed(CloseCode.KEEPALIVE_TIMEOUT, "keepalive timeout", False)]


def test_the_server_never_pings() -> None:
    from veil.server.service import SERVER_SESSION_CONFIG

    client = Session(client=True, now=0.0)
    server = Session(client=False, now=0.0, config=SERVER_SESSION_CONFIG)
    sid = client.open_stream(StreamKind.TCP, DEST)
    transfer(client, server)
    server.send_data(sid, b"an answer an hour later")
    assert FrameType.PING not in frames_of(server.data_to_send(3600.0))


def test_close_is_reported_to_the_peer() -> None:
    client, server = pair()
    client.close(CloseCode.SHUTDOWN, "bye")
    assert transfer(client, server) == [SessionClosed(CloseCode.SHUTDOWN, "bye", True)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=70_000), min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=40))
def test_any_fragmentation_delivers_the_same_bytes(chunks: list[bytes], cuts: list[int]) -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    client.send_padding(100)
    for chunk in chunks:
        client.send_data(sid, chunk)
    client.send_eof(sid)
    wire = client.data_to_send()
    events = []
    pos, i = 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        events += server.receive_data(wire[pos : pos + step], 0)
        pos += step
        i += 1
    assert data_of(events, sid) == b"".join(chunks)
    assert events[0] == StreamOpened(sid, StreamKind.TCP, DEST)
    assert events[-1] == StreamEnded(sid)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(garbage: bytes) -> None:
    _, server = pair()
    for event in server.receive_data(garbage, 0):
        assert not isinstance(event, DataReceived) or event.data


def test_used_up_credit_blocks_until_window_then_says_writable() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    assert client.send_credit(sid) == INITIAL_STREAM_WINDOW
    assert client.send_data(sid, bytes(INITIAL_STREAM_WINDOW)) is False  # sent, credit now 0
    assert client.send_credit(sid) == 0
    got = data_of(transfer(client, server), sid)
    assert len(got) == INITIAL_STREAM_WINDOW  # nothing was held back
    server.consume(sid, len(got))
    assert StreamWritable(sid) in transfer(server, client)
    assert client.send_credit(sid) == INITIAL_STREAM_WINDOW


def test_send_frame_writes_the_header_in_place() -> None:
    client = Session(client=True, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    server = Session(client=False, now=0.0)
    sid = client.open_stream(StreamKind.TCP, DEST)
    client.data_to_send()
    buffer = memoryview(bytearray(8 + 5))
    buffer[8:] = b"hello"
    assert client.send_frame(sid, buffer)
    out = client.data_to_send()
    assert isinstance(out, memoryview) and out.obj is buffer.obj  # no copy was made
    assert bytes(out) == frame(FrameType.DATA, sid, b"hello")
    server.receive_data(frame(FrameType.OPEN, sid, bytes([1]) + DEST.encode()), 0)
    assert data_of(server.receive_data(bytes(out), 0), sid) == b"hello"


def test_shaping_pads_the_first_writes_of_a_session_and_of_each_stream() -> None:
    policy = ShapingPolicy(session_writes=2, stream_writes=1, min_size=900, max_size=1000)
    client = Session(client=True, now=0.0, config=SessionConfig(shaping=policy))
    server = Session(client=False, now=0.0)
    sizes = []
    for _ in range(4):  # two session writes, then one per new stream, then none
        sid = client.open_stream(StreamKind.TCP, DEST)
        client.send_data(sid, b"x" * 64)
        wire = client.data_to_send()
        sizes.append(len(wire))
        assert data_of(server.receive_data(bytes(wire), 0), sid) == b"x" * 64
        client.send_data(sid, b"y" * 64)  # the stream's second write: not padded
        sizes.append(len(client.data_to_send()))
    assert all(900 <= n <= 1000 for n in sizes[:3]), sizes  # session writes 1-2, stream 1
    assert 900 <= sizes[4] <= 1000 and 900 <= sizes[6] <= 1000  # each new stream's first
    assert sizes[5] == sizes[7] == 8 + 64  # later writes of a stream are left alone


def test_shaping_leaves_large_writes_alone() -> None:
    client = Session(client=True, now=0.0)
    sid = client.open_stream(StreamKind.TCP, DEST)
    client.data_to_send()
    client.send_data(sid, bytes(5000))
    assert len(client.data_to_send()) == 8 + 5000


# As many PINGs at once as a peer may send (more is a flood, see the tests below).
PING_FLOOD = UNPRODUCTIVE_FRAME_BURST


def test_a_ping_flood_owes_one_pong_with_the_latest_payload() -> None:
    """However many PINGs arrive, the session owes one PONG (16 bytes): the latest PING's."""
    server = Session(client=False, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    pings = b"".join(frame(FrameType.PING, 0, n.to_bytes(8, "big")) for n in range(PING_FLOOD))
    assert server.receive_data(pings, 1.0) == []
    assert server.data_to_send() == frame(FrameType.PONG, 0, (PING_FLOOD - 1).to_bytes(8, "big"))
    assert server.data_to_send() == b""


def test_pongs_wait_while_the_wire_is_congested() -> None:
    """While the caller's wire is congested no PONG leaves; PINGs that arrive meanwhile are
    answered once, when it drains. Other frames are not held."""
    server = Session(client=False, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    server.set_congested(True)
    for n in range(3):
        server.receive_data(frame(FrameType.PING, 0, n.to_bytes(8, "big")), 1.0)
        assert server.data_to_send() == b""
    server.send_padding(1)
    assert server.data_to_send() == frame(FrameType.PADDING, 0, b"\0")
    server.set_congested(False)
    assert server.data_to_send() == frame(FrameType.PONG, 0, (2).to_bytes(8, "big"))
    assert server.data_to_send() == b""


def test_a_pong_owed_when_the_session_closes_is_not_sent_after_close() -> None:
    server = Session(client=False, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    server.receive_data(frame(FrameType.PING, 0, bytes(8)), 1.0)
    server.close(CloseCode.NORMAL, "")
    assert server.data_to_send() == frame(FrameType.CLOSE, 0, bytes((CloseCode.NORMAL,)))


def test_a_ping_flood_past_the_allowance_closes_the_session() -> None:
    """PINGs past UNPRODUCTIVE_FRAME_BURST at once close the session with PROTOCOL_ERROR and
    a reason the peer can log, as HTTP/2 servers answer a PING flood."""
    server = Session(client=False, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    ping = frame(FrameType.PING, 0, bytes(8))
    assert server.receive_data(ping * UNPRODUCTIVE_FRAME_BURST, 0.0) == []
    events = server.receive_data(ping, 0.0)
    assert events == [SessionClosed(CloseCode.PROTOCOL_ERROR, "PING flood", False)]
    assert server.flood == "PING flood"
    assert server.data_to_send() == frame(FrameType.CLOSE, 0,
                                          bytes((CloseCode.PROTOCOL_ERROR,)) + b"PING flood")


def test_pings_at_a_steady_rate_under_the_allowance_are_answered() -> None:
    """The allowance comes back with time: a peer pinging for a minute at the rate it earns
    (UNPRODUCTIVE_FRAMES_PER_S) is never cut."""
    server = Session(client=False, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    step = 1 / UNPRODUCTIVE_FRAMES_PER_S
    for n in range(int(60 * UNPRODUCTIVE_FRAMES_PER_S)):
        assert server.receive_data(frame(FrameType.PING, 0, n.to_bytes(8, "big")),
                                   n * step) == []
    assert not server.closed


def test_an_empty_data_flood_closes_the_session() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    transfer(client, server)
    empty = frame(FrameType.DATA, sid)
    events = server.receive_data(empty * (UNPRODUCTIVE_FRAME_BURST + 1), 0.0)
    assert events[-1] == SessionClosed(CloseCode.PROTOCOL_ERROR, "empty DATA flood", False)


def test_a_frame_budget_holds_the_rest_for_the_next_call() -> None:
    """With max_frames, one call parses at most that many frames; the rest is held (copied:
    the caller may reuse its buffer) and parsed by the next calls, in order."""
    client = Session(client=True, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    server = Session(client=False, now=0.0)
    sid = client.open_stream(StreamKind.TCP, DEST)
    for n in range(10):
        client.send_data(sid, bytes([n]))
    wire = bytearray(client.data_to_send())
    events = server.receive_data(memoryview(wire), 0.0, max_frames=4)
    assert [type(e) for e in events] == [StreamOpened, DataReceived, DataReceived,
                                         DataReceived]
    assert server.input_held == 7 * (8 + 1)  # seven one-byte DATA frames
    wire[:] = bytes(len(wire))  # the caller reuses its buffer
    received = [e.data for e in events if isinstance(e, DataReceived)]
    while server.input_held:
        more = server.receive_data(b"", 0.0, max_frames=4)
        assert len(more) <= 4
        received += [e.data for e in more if isinstance(e, DataReceived)]
    assert received == [bytes([n]) for n in range(10)]
    assert server.receive_data(b"", 0.0, max_frames=4) == []


def test_a_frame_budget_counts_a_large_data_frame_once() -> None:
    """A DATA frame begun in one call is finished by the next without counting again: bulk
    data never meets the budget."""
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    client.send_data(sid, bytes(100_000))
    wire = client.data_to_send()
    first = server.receive_data(wire[:50_000], 0.0, max_frames=2)
    rest = server.receive_data(wire[50_000:], 0.0, max_frames=1)
    assert server.input_held == 0
    assert sum(len(e.data) for e in first + rest if isinstance(e, DataReceived)) == 100_000


def test_an_idle_close_is_one_goaway_sized_frame_even_early_in_a_session() -> None:
    """nginx ends an idle connection with an HTTP/2 GOAWAY (17 bytes: a 34-byte TLS record)
    and close_notify. A session's idle close is one 17-byte CLOSE frame, not padded although
    the session's first writes would be (tests/lab/test_lifecycle.py measures both)."""
    server = Session(client=False, now=0.0, config=SessionConfig(idle_close=(3.0, 3.0)))
    assert server.get_timer() == 3.0
    (closed,) = server.handle_timer(3.0)
    assert isinstance(closed, SessionClosed) and closed.code is CloseCode.NORMAL
    assert server.data_to_send() == frame(FrameType.CLOSE, 0, bytes((CloseCode.NORMAL,))
                                          + b"inactive")
    assert len(frame(FrameType.CLOSE, 0, bytes(9))) == 17


def test_a_session_idle_near_the_servers_close_takes_no_new_stream() -> None:
    """The server closes an idle session at nginx's keepalive_timeout; the client opens no
    stream on one idle past its reuse limit (an OPEN could cross the server's CLOSE)."""
    client = Session(client=True, now=0.0, config=SessionConfig(reuse_limit=70.0))
    assert client.reusable(69.9) and not client.reusable(70.0)
    stream = client.open_stream(StreamKind.TCP, DEST)
    assert client.get_timer() is None  # a stream open: no idle close, and no ping while idle
    assert client.reusable(500.0)  # a stream is open: not idle
    # Where the server may hold its destinations' idle closes, a stream quiet as long as the
    # reuse limit counts as idle: the server may end the session as idle (set_dormant).
    client.peer_features |= FEATURE_HOLDS_IDLE_CLOSES  # the server said so
    client.data_to_send(400.0)  # the stream's OPEN goes out at 400
    assert client.reusable(469.9)
    assert not client.reusable(470.0)
    client.reset(stream)
    client.handle_timer(100.0)  # the last stream went: idle from now
    assert client.reusable(169.9) and not client.reusable(170.0)
    assert Session(client=True, now=0.0, config=SessionConfig(reuse_limit=None)).reusable(1e9)
    client.close()
    assert not client.reusable(100.0)


def test_an_idle_ping_keeps_a_cdn_carried_session_with_streams_open_alive() -> None:
    """SessionConfig.idle_ping (the server's, on CDN ways): a PING after a jittered silence
    while streams are open, none with no stream open; the answer clears it."""
    client = Session(client=True, now=0.0)
    server = Session(client=False, now=0.0, config=SessionConfig(keepalive_interval=None,
                                                                 idle_ping=40.0,
                                                                 idle_close=None))
    assert server.get_timer() is None  # no stream open: nothing to keep
    sid = client.open_stream(StreamKind.TCP, DEST)
    transfer(client, server)
    due = server.get_timer()
    assert due is not None and 30.0 <= due <= 50.0  # 40 s x 0.75-1.25
    assert server.handle_timer(due - 0.01) == [] and server.data_to_send() == b""
    server.handle_timer(due)
    wire = server.data_to_send()
    assert frames_of(wire)[0] == FrameType.PING  # (then the first writes' padding)
    client.receive_data(wire, due)
    assert server.receive_data(client.data_to_send(), due + 0.1) == [PongReceived(
        pytest.approx(0.1))]
    later = server.get_timer()
    assert later is not None and due + 0.1 + 30.0 <= later <= due + 0.1 + 50.0
    client.reset(sid)
    transfer(client, server, due + 1)
    server.handle_timer(due + 1)
    assert server.get_timer() is None  # the stream went: no more pings


def test_a_new_stream_that_hears_nothing_probes_the_path() -> None:
    """A blackholed path under a live session: the user's new stream gets no answer, so a PING
    goes 2 s after its OPEN, and the session is declared dead 5 s later without an answer."""
    plain = SessionConfig(shaping=NO_SHAPING)
    client = Session(client=True, now=0.0, config=plain)
    server = Session(client=False, now=0.0)
    client.open_stream(StreamKind.TCP, DEST)
    server.receive_data(client.data_to_send(1.0), 1.0)
    assert client.get_timer() == 1.0 + 2.0
    # An answer within the 2 s cancels the probe.
    server.send_data(1, b"hello")
    client.receive_data(server.data_to_send(2.5), 2.5)
    assert client.get_timer() is None
    # The next stream hears nothing: PING at +2 s, dead at +2+5 s.
    client.open_stream(StreamKind.TCP, DEST)
    assert frames_of(client.data_to_send(4.0)) == [FrameType.OPEN]
    assert client.get_timer() == 6.0
    assert client.handle_timer(6.0) == []
    assert frames_of(client.data_to_send(6.0)) == [FrameType.PING]
    assert client.get_timer() == 11.0
    events = client.handle_timer(11.0)
    assert events == [SessionClosed(CloseCode.KEEPALIVE_TIMEOUT, "keepalive timeout", False)]


def test_a_tuns_packets_after_a_silence_probe_the_path_as_a_new_stream_does() -> None:
    """--tun's IP stream stays open for the session's life, so no OPEN ever probes a
    blackholed path: the client's packets do (a PING when nothing came back within 2 s, dead
    5 s after that); packets the server answers, and the server's own packets, probe
    nothing."""
    plain = SessionConfig(shaping=NO_SHAPING)
    client = Session(client=True, now=0.0, config=plain)
    server = Session(client=False, now=0.0, config=SessionConfig(keepalive_interval=None,
                                                                 shaping=NO_SHAPING))
    sid = client.open_stream(StreamKind.IP, DEST)
    server.receive_data(client.data_to_send(0.0), 0.0)
    server.send_packet(sid, b"p" * 40)
    client.receive_data(server.data_to_send(0.5), 0.5)
    assert client.get_timer() is None and server.get_timer() is None
    # A packet the server answers within the 2 s: no probe.
    client.send_packet(sid, b"q" * 40)
    client.data_to_send(1.0)
    assert client.get_timer() == 3.0
    server.receive_data(client.data_to_send(1.0), 1.0)
    server.send_packet(sid, b"a" * 40)
    client.receive_data(server.data_to_send(1.1), 1.1)
    assert client.get_timer() is None
    # The server goes quiet (a blackhole); the user's next connection:
    client.send_packet(sid, b"syn" * 20)
    assert frames_of(client.data_to_send(3.0)) == [FrameType.DATAGRAM]
    assert client.get_timer() == 5.0
    assert client.handle_timer(5.0) == []
    assert frames_of(client.data_to_send(5.0)) == [FrameType.PING]
    events = client.handle_timer(10.0)
    assert events == [SessionClosed(CloseCode.KEEPALIVE_TIMEOUT, "keepalive timeout", False)]
    # The server's packets after its own silence never make it ping.
    server.send_packet(sid, b"late" * 10)
    server.data_to_send(100.0)
    assert server.get_timer() is None


def test_a_slow_target_is_asked_once_and_the_session_lives_on() -> None:
    """A long poll: the server answers the probe, and nothing more is sent while it waits."""
    client = Session(client=True, now=0.0, config=SessionConfig(shaping=NO_SHAPING))
    server = Session(client=False, now=0.0)
    client.open_stream(StreamKind.TCP, DEST)
    server.receive_data(client.data_to_send(0.0), 0.0)
    client.handle_timer(2.0)
    server.receive_data(client.data_to_send(2.0), 2.0)
    assert client.receive_data(server.data_to_send(), 2.1) == [PongReceived(pytest.approx(0.1))]
    assert client.get_timer() is None
    for now in (30.0, 300.0):
        assert client.handle_timer(now) == [] and client.data_to_send(now) == b""


# -- features and RESOLVE streams ---------------------------------------------------------------

def test_the_server_announces_its_features_in_a_padding_an_old_client_ignores() -> None:
    client, server = pair()
    assert client.peer_features == 0
    server.announce_features(FEATURE_RESOLVE, 100)
    wire = bytes(server.data_to_send())
    # A PADDING of the asked length, on stream 0: to a client before features, padding.
    assert wire[:8] == frame(FrameType.PADDING, 0, bytes(100))[:8]
    assert wire[8:8 + len(FEATURES_TAG) + 1] == FEATURES_TAG + bytes((FEATURE_RESOLVE,))
    assert client.receive_data(wire, 0) == []
    assert client.peer_features == FEATURE_RESOLVE
    # Plain padding (an older server's) names no feature.
    old_client, old_server = pair()
    old_server.send_padding(100)
    assert transfer(old_server, old_client) == []
    assert old_client.peer_features == 0


def test_an_open_of_an_unknown_kind_is_reset_and_the_session_lives() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.TCP, DEST)
    wire = bytearray(client.data_to_send())
    opening = frame(FrameType.OPEN, sid, bytes((StreamKind.TCP,)) + DEST.encode())
    at = wire.index(opening)
    wire[at + 8] = 99  # a kind of a newer client's
    assert server.receive_data(bytes(wire), 0) == []
    assert not server.closed
    assert transfer(server, client) == [StreamReset(sid, ResetCode.REFUSED_DESTINATION, True)]
    # The session goes on: the next stream opens as usual.
    other = client.open_stream(StreamKind.TCP, DEST)
    assert transfer(client, server) == [StreamOpened(other, StreamKind.TCP, DEST)]


def test_a_resolve_stream_asks_with_open_and_fin_and_gets_data_then_fin() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.RESOLVE, Address("example.com", 0))
    client.send_eof(sid)
    events = transfer(client, server)
    assert events == [StreamOpened(sid, StreamKind.RESOLVE, Address("example.com", 0)),
                      StreamEnded(sid)]
    answer = encode_answer([ipaddress.ip_address("192.0.2.7"),
                            ipaddress.ip_address("2001:db8::7")])
    server.send_data(sid, answer)
    server.send_eof(sid)
    events = transfer(server, client)
    assert events == [DataReceived(sid, answer), StreamEnded(sid)]
    assert client.stream_count == 0 and server.stream_count == 0  # closed both ways
    assert decode_answer(answer) == (ipaddress.ip_address("192.0.2.7"),
                                     ipaddress.ip_address("2001:db8::7"))


def test_a_resolve_answer_is_bounded_and_checked() -> None:
    many = [ipaddress.ip_address(f"192.0.2.{i}") for i in range(1, 30)]
    answer = encode_answer(many + many)
    assert answer[0] == MAX_RESOLVED_ADDRESSES
    assert len(answer) <= MAX_ANSWER_BYTES
    assert decode_answer(answer) == tuple(many[:MAX_RESOLVED_ADDRESSES])
    for bad in (b"", b"\x00", b"\x01", b"\x01\x05" + bytes(4), b"\x01\x04" + bytes(3),
                b"\x01\x04" + bytes(5), bytes((MAX_RESOLVED_ADDRESSES + 1,)) + b"\x04" * 200):
        with pytest.raises(RemoteProtocolError):
            decode_answer(bad)
