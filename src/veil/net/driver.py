"""The session driver: where the sans-IO session meets an asyncio transport.

:class:`SessionDriver` owns one TLS transport and one :class:`~veil.protocol.session.Session`.
It feeds received bytes to the session, dispatches the events to per-stream handlers, writes
what the session wants sent, and arms exactly one timer for keepalives and the idle close
(both the session's: see veil.protocol.session). Stream handlers
(:class:`TcpRelay`, UDP flows) are the other end of each stream: a local socket on the client,
an outbound socket on the server. The same classes serve both sides.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from veil.errors import LocalProtocolError
from veil.net.loop_timer import LoopTimer
from veil.net.stripe import kernel_unsent, socket_of
from veil.protocol.address import Address
from veil.protocol.events import (
    ChunkReceived,
    DatagramReceived,
    DataReceived,
    Event,
    JoinAnswered,
    JoinRequested,
    PacketReceived,
    ReportReceived,
    SessionClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from veil.protocol.frames import (
    HEADER_SIZE,
    MAX_CHUNK_DATA,
    MAX_DATA_PAYLOAD,
    CloseCode,
    ResetCode,
)
from veil.protocol.idleclose import MAX_CLOSE_BYTES, CloseShape, idle_close_shape
from veil.protocol.session import IDLE_CLOSE_REASON, Session, StreamState
from veil.protocol.stripe import STRIPE_AFTER_BYTES
from veil.transport.carrier import CarrierTransport

if TYPE_CHECKING:
    from veil.net.stripe import StripeGroup

log = logging.getLogger("veil.net")

#: How far a session's unsent output may exceed its transport's high-water mark before the
#: driver stops reading the peer (until the transport drains below its low-water mark). At the
#: high-water mark every local source pauses, so the output overshoots it by at most a read
#: already under way (one 256 KiB DATA frame) and the few frames a received batch answers
#: with; what goes further is the peer making the session answer faster than it reads the
#: answers (RESETs for OPENs it may not make, WINDOWs), which must cost the server the
#: peer's socket buffer, not memory. It is below the TLS carrier's own mark
#: (veil.transport.carrier.UNSENT_READ_SLACK) so the session's bound acts first; legitimate
#: traffic never reaches either, which is what keeps two ends that both send in bulk from
#: each waiting for the other to read.
SESSION_UNSENT_SLACK = 512 * 1024
#: Frames of one session parsed per event-loop turn; the rest of what was read waits in the
#: session (Session.input_held, at most one read) while the driver stops reading the peer,
#: and is parsed on the next turns, after every other connection has had its turn. The TLS
#: carrier reads one buffer (256 KiB) per turn, but 256 KiB of 12-17-byte frames is 15,000
#: frames, ~60 ms of parsing at ~4 us a frame: a flood of them made every other user wait
#: that long per turn, a round trip several turns (p99 0.3-0.9 s). 1,024 frames is ~4 ms;
#: a session that moves data never reaches it (bulk DATA is one frame per 256 KiB, and 1,024
#: frames per 256 KiB is an average of 256 bytes a frame).
FRAMES_PER_TURN = 1024
#: After the peer's CLOSE frame, how long to wait for the rest of its close (close_notify,
#: FIN) before closing anyway: its last records are a round trip away at most, and a peer
#: that says CLOSE and then keeps the connection open is owed no more.
PEER_CLOSE_GRACE_S = 5.0
#: A destination's close is held (server side, ``TcpRelay(hold_idle_close=True)``) only after
#: this much silence on its stream, either way: a site's idle close comes seconds to minutes
#: after its last answer (Apache 5 s, nginx 75 s); a close sooner than a second follows what
#: the user just did, and crosses as the answer it is.
HOLD_AFTER_SILENCE_S = 1.0
#: How long bytes shaped like an idle close wait for the FIN that makes them one; a site
#: writes its GOAWAY, close_notify and FIN together (nginx: within a millisecond). Past it
#: they go out: at worst, 2-byte output after a silence is that much late.
CLOSE_FIN_WAIT_S = 0.25


class StreamHandler(Protocol):
    """The local end of one stream, as the driver sees it."""

    def on_data(self, data: bytes) -> None: ...
    def on_eof(self) -> None: ...
    def on_reset(self, code: ResetCode) -> None: ...
    def on_writable(self) -> None: ...
    def on_datagram(self, address: Address, payload: bytes) -> None: ...
    def pause_source(self) -> None: ...
    def resume_source(self) -> None: ...


class PacketHandler(StreamHandler, Protocol):
    """The local end of an IP stream: also takes IP packets (a TUN device)."""

    def on_packet(self, packet: bytes) -> None: ...


class DatagramStreamHandler:
    """The flow-control half of a :class:`StreamHandler` for streams of datagrams or packets.

    Such a stream has no byte credit to wait for and no source worth pausing: when the
    session is congested its datagrams are dropped instead, as UDP and IP routers do (and a
    TUN device is shared by every client, so pausing it for one would stall them all).
    """

    def on_writable(self) -> None:
        pass

    def pause_source(self) -> None:
        pass

    def resume_source(self) -> None:
        pass


class SessionDriver(asyncio.Protocol):
    """Runs a session over a (TLS) transport.

    It takes received data as a transient view (``accepts_views``): the session copies what
    it keeps, so the TLS carrier can decrypt into one reusable buffer.

    ``on_stream_opened`` is called for streams the peer opens (server side) and must register
    a handler with :meth:`attach` or reset the stream. ``on_closed`` is called once, when the
    session and its transport are gone. ``on_report`` gets each block report the peer sent
    (server side; without it reports are ignored, like padding).
    """

    accepts_views = True

    def __init__(self, session: Session, *,
                 on_stream_opened: Callable[[StreamOpened], None] | None = None,
                 on_closed: Callable[[SessionDriver], None] | None = None,
                 on_bytes: Callable[[int, int], None] | None = None,
                 on_report: Callable[[bytes], None] | None = None) -> None:
        self.session = session
        self._on_report = on_report
        self.handlers: dict[int, StreamHandler] = {}
        self._on_stream_opened = on_stream_opened
        self._on_closed = on_closed
        self._on_bytes = on_bytes  # (received, sent) byte counts, for accounting
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._timer = LoopTimer(self._loop, self._on_timer)
        self._writing_paused = False
        self._reading_paused = False  # by us, for unsent output (SESSION_UNSENT_SLACK)
        self._parsing_held = False  # by us, for input left unparsed (FRAMES_PER_TURN)
        self._closed_by_peer = ""  # the reason in the peer's CLOSE, if it sent one
        self._done = False
        # The peer ended the session (its CLOSE frame, or its close_notify / FIN): we answer
        # as nginx and Chromium answer a peer's close, with our FIN alone, no close_notify.
        self._peer_closed = False
        self._peer_eof = False
        #: The peer closed the session as idle (CLOSE NORMAL, IDLE_CLOSE_REASON): a server
        #: does that only when every stream's destination had closed while idle (its closes
        #: held, TcpRelay.hold_idle_close), so streams still open here are over too.
        self.closed_as_idle_by_peer = False
        self._quiet_close: asyncio.TimerHandle | None = None
        self.closed = self._loop.create_future()
        self._read_buffer: memoryview | None = None
        # Streams whose destination closed while idle, their close held until the peer next
        # speaks (TcpRelay.hold_idle_close); woken by the peer's next bytes.
        self._dormant: dict[int, TcpRelay] = {}
        #: The pool group this session is in (veil.net.stripe), None outside one.
        self.group: StripeGroup | None = None
        #: Server: called with the client's JOIN (veil.protocol.stripe); client: with the
        #: server's answer. None: ignored (the session stays out of any group).
        self.on_join: Callable[[JoinRequested], None] | None = None
        self.on_join_answered: Callable[[JoinAnswered], None] | None = None
        #: This session's streams whose reads go out striped (veil.net.stripe): while any
        #: is, the session carries other members' pieces only with room to spare.
        self.striping: set[int] = set()
        self._socket: object = None  # the transport's socket, asked once (queued)

    @property
    def read_buffer(self) -> memoryview:
        """One buffer that every stream of this session reads its local socket into.

        Sharing is safe because a read is framed and handed to TLS (which encrypts it at once)
        before the event loop can run another read; it bounds read memory per session to one
        frame instead of one per stream.
        """
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(HEADER_SIZE + MAX_DATA_PAYLOAD))
        return self._read_buffer

    # ------------------------------------------------------------------ transport side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.flush()

    def data_received(self, data: bytes | memoryview) -> None:
        if self._on_bytes is not None:
            self._on_bytes(len(data), 0)
        self._dispatch(self.session.receive_data(data, self._loop.time(), FRAMES_PER_TURN))
        if self._dormant:
            # The peer spoke: the closes held since are answers now, not moments of our own.
            dormant, self._dormant = self._dormant, {}
            for relay in dormant.values():
                relay.wake()
        self._hold_unparsed()
        self.flush()

    def _hold_unparsed(self) -> None:
        """Stop reading the peer while the session holds input past its frame budget, and
        parse it on the next turn (FRAMES_PER_TURN)."""
        if self._parsing_held or not self.session.input_held or self.session.closed:
            return
        self._parsing_held = True
        transport = self._transport
        if transport is not None and not self._reading_paused:
            transport.pause_reading()
        self._loop.call_soon(self._parse_held)

    def _parse_held(self) -> None:
        if self._done:
            return
        self._dispatch(self.session.receive_data(b"", self._loop.time(), FRAMES_PER_TURN))
        if self.session.input_held and not self.session.closed:
            self._loop.call_soon(self._parse_held)  # still held: one more turn
        else:
            self._parsing_held = False
            transport = self._transport
            if not self._reading_paused and transport is not None:
                transport.resume_reading()
        self.flush()

    def eof_received(self) -> bool:
        self._peer_closed = self._peer_eof = True
        if self._done:
            self._close_transport()  # the rest of the peer's close, awaited since its CLOSE
        self._finish("peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._quiet_close is not None:
            self._quiet_close.cancel()
        self._finish(f"connection lost: {exc}" if exc else "connection closed")

    def pause_writing(self) -> None:
        # The TLS connection is congested: stop reading every local source until it drains,
        # so bytes queue in the sources' kernel buffers rather than in our memory; and hold
        # the answers to the peer's PINGs (coalesced into one) until then.
        self._writing_paused = True
        self.session.set_congested(True)
        for handler in self.handlers.values():
            handler.pause_source()

    def resume_writing(self) -> None:
        # Below the transport's low-water mark: read the peer again, send the PONG held.
        self._writing_paused = False
        self.session.set_congested(False)
        transport = self._transport
        if self._reading_paused and transport is not None:
            self._reading_paused = False
            if not self._parsing_held:
                transport.resume_reading()
        for handler in list(self.handlers.values()):
            handler.resume_source()
        if self.group is not None:
            self.group.drained()
        self.flush()

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    # ------------------------------------------------------------------ striping
    def queued(self) -> int:
        """Bytes written but not yet sent: the transport's buffer and the socket's unsent
        bytes (what a new piece waits behind on this connection; veil.net.stripe)."""
        transport = self._transport
        if transport is None:
            return 1 << 62
        if self._socket is None:
            self._socket = socket_of(transport) or False
        sock = self._socket
        return transport.get_write_buffer_size() + (
            kernel_unsent(sock) if sock is not False else 0)  # type: ignore[arg-type]

    def receive_chunk(self, event: ChunkReceived, now: float) -> None:
        """A piece of one of this session's streams, carried by another of the pool."""
        if self._done:
            return
        self._dispatch(self.session.receive_chunk(event.stream_id, event.offset, event.data,
                                                  event.fin, now))
        self.flush()

    def reset_striped(self) -> None:
        """A session of the group went, maybe with pieces of these streams: reset them."""
        if self._done:
            return
        for stream_id in self.session.striped_streams():
            handler = self.handlers.pop(stream_id, None)
            self.session.reset(stream_id, ResetCode.CANCELLED)
            if handler is not None:
                handler.on_reset(ResetCode.CANCELLED)
        self.flush()

    @property
    def transport(self) -> asyncio.Transport | None:
        """The (TLS) transport the session runs over, None once it is gone."""
        return self._transport

    # ------------------------------------------------------------------ stream side
    def attach(self, stream_id: int, handler: StreamHandler) -> None:
        self.handlers[stream_id] = handler
        if self._writing_paused:
            handler.pause_source()

    def detach(self, stream_id: int) -> None:
        self.handlers.pop(stream_id, None)
        self._dormant.pop(stream_id, None)
        self.striping.discard(stream_id)

    def hold_close(self, relay: TcpRelay, last_active: float) -> None:
        """``relay``'s destination closed it after a silence: hold that close (its bytes and
        FIN stay with the relay) until the peer next speaks; the session counts the stream
        as idle since ``last_active``."""
        self._dormant[relay.stream_id] = relay
        self.session.set_dormant(relay.stream_id, last_active)
        self.flush()  # re-arm the timer: the idle close may be due now

    def cancel(self, stream_id: int, code: ResetCode = ResetCode.CANCELLED) -> None:
        """Stop handling ``stream_id`` and reset it with ``code``, written out at once."""
        self.detach(stream_id)
        self.session.reset(stream_id, code)
        self.flush()

    def flush(self) -> None:
        """Write what the session queued (with a keepalive PING after a silence) and re-arm
        the session's timer."""
        data = self.session.data_to_send(self._loop.time())
        transport = self._transport
        if data and transport is not None:
            if self._on_bytes is not None:
                self._on_bytes(0, len(data))
            transport.write(data)
            if (self._writing_paused and not self._reading_paused
                    and transport.get_write_buffer_size()
                    > transport.get_write_buffer_limits()[1] + SESSION_UNSENT_SLACK):
                # Backpressure rather than buffering: the peer's next bytes wait in its socket
                # until it has read what we owe it (resume_writing).
                self._reading_paused = True
                if not self._parsing_held:
                    transport.pause_reading()
        self._timer.set(self.session.get_timer())
        if self.session.closed and not self._done:
            self._finish(self._closed_by_peer or "session closed")

    def _on_timer(self, now: float) -> None:
        self._dispatch(self.session.handle_timer(now))
        self.flush()

    def _dispatch(self, events: list[Event]) -> None:
        # Dispatch on the event type and nothing else: this is the hot path, and DATA first.
        handlers = self.handlers
        for event in events:
            if isinstance(event, DataReceived):
                handler = handlers.get(event.stream_id)
                if handler is not None:
                    handler.on_data(event.data)
                else:
                    self.session.consume(event.stream_id, len(event.data))
            elif isinstance(event, StreamWritable):
                if (handler := handlers.get(event.stream_id)) is not None:
                    handler.on_writable()
            elif isinstance(event, StreamEnded):
                if (handler := handlers.get(event.stream_id)) is not None:
                    handler.on_eof()
            elif isinstance(event, PacketReceived):
                # Only IP streams produce packets, and their handlers are PacketHandlers.
                if (handler := handlers.get(event.stream_id)) is not None:
                    cast(PacketHandler, handler).on_packet(event.packet)
            elif isinstance(event, DatagramReceived):
                if (handler := handlers.get(event.stream_id)) is not None:
                    handler.on_datagram(event.address, event.payload)
            elif isinstance(event, StreamReset):
                if (handler := handlers.pop(event.stream_id, None)) is not None:
                    handler.on_reset(event.code)
            elif isinstance(event, ChunkReceived):
                if self.group is not None:
                    self.group.route(event, self._loop.time())
            elif isinstance(event, JoinRequested):
                if self.on_join is not None:
                    self.on_join(event)
            elif isinstance(event, JoinAnswered):
                if self.on_join_answered is not None:
                    self.on_join_answered(event)
            elif isinstance(event, StreamOpened):
                if self._on_stream_opened is None:
                    self.session.reset(event.stream_id, ResetCode.REFUSED_DESTINATION)
                else:
                    self._on_stream_opened(event)
            elif isinstance(event, ReportReceived):
                if self._on_report is not None:
                    self._on_report(event.payload)
            elif isinstance(event, SessionClosed):
                self._peer_closed = self._peer_closed or event.remote
                if (event.remote and event.code is CloseCode.NORMAL
                        and event.reason == IDLE_CLOSE_REASON
                        and self.session.peer_holds_idle_closes):
                    self.closed_as_idle_by_peer = True
                log.debug("session closed (%s, remote=%s): %s", event.code.name, event.remote,
                          event.reason)
                if event.remote and event.code is not CloseCode.NORMAL:
                    # Why the peer ended it goes to whoever awaits `closed` (the client logs
                    # it), e.g. "closed by the peer: PROTOCOL_ERROR: PING flood".
                    self._closed_by_peer = (f"closed by the peer: {event.code.name}"
                                            + (f": {event.reason}" if event.reason else ""))

    # ------------------------------------------------------------------ shutdown
    def close(self, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the session politely: a CLOSE frame, then the transport."""
        if self._done:
            return
        self.session.close(code, reason)
        self.flush()

    def _finish(self, why: str) -> None:
        if self._done:
            return
        self._done = True
        self._timer.cancel()
        if self.group is not None:
            self.group.remove(self)
        handlers, self.handlers = self.handlers, {}
        crossed_since = self._idle_close_crossed_since()
        for handler in handlers.values():
            if (crossed_since is not None and isinstance(handler, TcpRelay)
                    and handler.last_sent < crossed_since):
                # Its destination had closed it while idle (the server held that close):
                # the application learns when it next uses the connection, as the server
                # held it (closing now would be news no site's close brings: Chromium
                # answered a bare FIN here with a new connection, with no user demand).
                handler.orphan()
            else:
                # Open or written to while the server's idle close was on its way (or not
                # such a close): what it sent is lost. A reset at once, so the application
                # fails fast (a browser retries a request on a reused connection).
                handler.on_reset(ResetCode.CANCELLED)
        if self._peer_closed and not self._peer_eof:
            # Its close_notify and FIN follow its CLOSE: closing now could meet them with a
            # reset (bytes arriving at a closed socket). Close when they come.
            if self._transport is not None:
                self._quiet_close = self._loop.call_later(PEER_CLOSE_GRACE_S,
                                                          self._close_transport)
        else:
            self._close_transport()
        if not self.closed.done():
            self.closed.set_result(why)
        if self._on_closed is not None:
            self._on_closed(self)


    def _idle_close_crossed_since(self) -> float | None:
        """After the peer's idle close (closed_as_idle_by_peer): streams that sent anything
        since the moment returned crossed that close and were lost; the others' destinations
        had closed while idle (their closes held). None: not such a close, every stream lost.

        A server closes as idle only when nothing came from us for its idle close (75 s), so
        each of our writes either reached it that long before its CLOSE or crossed it, one
        round trip before the CLOSE arrived at most. The reuse limit (70 s), under the
        server's idle close by design, falls between the two."""
        limit = self.session.config.reuse_limit
        if not self.closed_as_idle_by_peer or limit is None:
            return None
        return self._loop.time() - limit

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._peer_closed:
            # Everything the peer sent has been read: the socket closes with a FIN, and no
            # close_notify of ours follows the peer's (nginx's and Chromium's answer); on
            # veil's TLS, after what we still hold (an abort would drop it).
            if isinstance(transport, CarrierTransport):
                transport.close_quietly()
            else:
                transport.abort()
        else:
            transport.close()


def reset_reason(code: ResetCode) -> str:
    """A reset code as words: ``REFUSED_DESTINATION`` -> "refused destination"."""
    return code.name.lower().replace("_", " ")


def log_reset(stream_id: int, code: ResetCode) -> None:
    log.debug("stream %d reset by the peer: %s", stream_id, reset_reason(code))


class TcpRelay(asyncio.BufferedProtocol):
    """Relays one local TCP connection to one session stream, both ways, with backpressure.

    Local reads become DATA frames; when the stream's window is exhausted the local socket
    stops being read. Received DATA is written to the local socket and acknowledged to the
    peer only once the local socket has taken it (not while its write buffer is over the
    high-water mark), so a slow local reader stops only its own stream.
    """

    def __init__(self, driver: SessionDriver, stream_id: int,
                 transport: asyncio.Transport | None = None, *,
                 hold_idle_close: bool = False) -> None:
        self.driver = driver
        self.session = driver.session
        self.stream_id = stream_id
        self.transport = transport
        # Server side: a destination's own idle close (veil.protocol.idleclose) is held until
        # the client next speaks, so the tunnel shows no moment the server opens.
        self._hold_idle_close = hold_idle_close
        self._loop = driver._loop
        self._last_active = self._loop.time()
        #: When this stream last sent to the peer (its OPEN, on the client, or data).
        self.last_sent = self._last_active
        self._held: bytearray | None = None  # a close's bytes, while they wait for the FIN
        self._held_timer: asyncio.TimerHandle | None = None
        self._dormant = False  # the whole close (and its FIN) is held
        self._orphaned = False  # the session ended as idle with this stream open (orphan)
        self._local_paused = False  # local transport's write buffer is full
        self._unacked = 0  # bytes written locally while paused, acknowledged on resume
        self._blocked = False  # the stream has no send window
        self._reading = True
        self._closed = False
        # Data (and EOF) that arrive before an outbound connection is made wait here; the
        # stream window bounds it because nothing is acknowledged until it is written.
        self._early: list[bytes] = []
        self._early_eof = False
        self._eof_sent = False
        self._answered = False  # the peer has sent data on this stream
        # Its reads go out striped (veil.net.stripe): the home's congestion alone does not
        # stop it, only every member's at once (StripeGroup.waiting).
        self._striping = False
        #: Set by an inbound that can still tell its application why the stream failed (the
        #: HTTP proxy's 502) while no byte has come back: the bytes to write before closing
        #: when the peer resets the stream first, by reset code; None (or it gives None): a cut.
        self.answer_early_reset: Callable[[ResetCode], bytes | None] | None = None
        #: Told why the peer reset this stream (not when it was cancelled): a DEBUG line by
        #: default; the client says it where its user reads (``ClientTunnel``).
        self.report_reset: Callable[[int, ResetCode], None] = log_reset

    # --- local transport callbacks
    def get_buffer(self, sizehint: int) -> memoryview:
        # The socket reads straight into the payload part of a DATA frame (see send_frame),
        # and never more than the stream may send: nothing has to be held back and copied.
        if self._orphaned:
            return self.driver.read_buffer[HEADER_SIZE : HEADER_SIZE + 1]
        credit = self.session.send_credit(self.stream_id)
        return self.driver.read_buffer[HEADER_SIZE : HEADER_SIZE + max(1, credit)]

    def buffer_updated(self, nbytes: int) -> None:
        if self._orphaned:
            if self.transport is not None:
                self.transport.abort()
            return
        if self._hold_idle_close and self._holding(nbytes):
            return
        self.last_sent = self._loop.time()
        group = self.driver.group
        try:
            if (group is not None and len(group.members) > 1
                    and self.session.stream_sent(self.stream_id) >= STRIPE_AFTER_BYTES):
                writable = self._send_striped(group, nbytes)
            else:
                writable = self.session.send_frame(
                    self.stream_id, self.driver.read_buffer[: HEADER_SIZE + nbytes])
                if self._striping:  # the pool shrank to its home: the home's pauses rule
                    self._striping = False
                    self.driver.striping.discard(self.stream_id)
                    if self.driver.writing_paused:
                        self._pause_reading()
        except LocalProtocolError:
            self._abort()
            return
        self._after_send(writable)

    def _send_striped(self, group: StripeGroup, nbytes: int) -> bool:
        """Send a read of a bulk stream in pieces, each on the session of the pool that has
        least queued (veil.protocol.stripe); what send_frame returns."""
        home = self.driver
        member = home.session.member
        assert member is not None  # in a group
        view = home.read_buffer[HEADER_SIZE : HEADER_SIZE + nbytes]
        writable = True
        if not self._striping:
            self._striping = True
            home.striping.add(self.stream_id)
        starts = range(0, nbytes, MAX_CHUNK_DATA)
        carriers = group.carriers(home, [min(MAX_CHUNK_DATA, nbytes - at) for at in starts])
        for start, carrier in zip(starts, carriers, strict=True):
            piece = view[start : start + MAX_CHUNK_DATA]
            if carrier is home:
                writable = self.session.send_data(self.stream_id, bytes(piece))
                continue
            offset, writable = self.session.stripe_take(self.stream_id, len(piece))
            carrier.session.send_chunk(member, self.stream_id, offset, bytes(piece))
            carried = carrier.session.member
            assert carried is not None
            group.carried[carried] = group.carried.get(carried, 0) + len(piece)
        for carrier in set(carriers):
            if carrier is not home:
                carrier.flush()  # the home's: by the caller (_after_send)
        if carriers[-1] is home and home.writing_paused:
            # The home is over its high-water mark and no other member could take the piece:
            # read no more until the home drains (its resume_source) or another member does
            # (StripeGroup.drained).
            group.waiting.add(self)
            self._pause_reading()
        return writable

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.driver.writing_paused:
            self.pause_source()
        early, self._early = self._early, []
        for data in early:
            self.on_data(data)
        if self._early_eof:
            self.on_eof()
        self.driver.flush()

    def data_received(self, data: bytes) -> None:
        """Bytes read before the relay took over (early data)."""
        self.last_sent = self._loop.time()
        try:
            writable = self.session.send_data(self.stream_id, data)
        except LocalProtocolError:
            self._abort()
            return
        self._after_send(writable)

    def _after_send(self, writable: bool) -> None:
        if not writable:
            self._blocked = True
            self._pause_reading()
        self.driver.flush()  # at once: the shared read buffer is reused by the next read

    def eof_received(self) -> bool:
        if self._orphaned:
            return False  # the application closed it: close ours
        if self._eof_sent:
            return True  # reported again (uvloop does after pause/resume): already passed on
        held = self._held
        if held is not None:
            if idle_close_shape(held) is CloseShape.YES:
                self._go_dormant()
                return True
            self._release_held()
        return self._send_eof()

    def _send_eof(self) -> bool:
        self._eof_sent = True
        try:
            self.session.send_eof(self.stream_id)
        except LocalProtocolError:
            return False
        self.driver.flush()
        if self.session.stream_state(self.stream_id) is StreamState.CLOSED:
            self._finish_closed()
        return True  # keep the write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.driver.detach(self.stream_id)
        if exc is not None or self.session.stream_state(self.stream_id) is not StreamState.CLOSED:
            self.session.reset(self.stream_id, ResetCode.CANCELLED)
            self.driver.flush()

    def pause_writing(self) -> None:
        self._local_paused = True

    def resume_writing(self) -> None:
        self._local_paused = False
        if self._unacked:
            self.session.consume(self.stream_id, self._unacked)
            self._unacked = 0
            self.driver.flush()

    # --- holding a destination's idle close (server side)
    def _holding(self, nbytes: int) -> bool:
        """Whether this read (in the shared read buffer) is held as (part of) an idle close;
        a read that turns out not to be one goes out now, after what was held."""
        now = self._loop.time()
        data = self.driver.read_buffer[HEADER_SIZE : HEADER_SIZE + nbytes]
        held = self._held
        if held is not None:
            held += data
            if idle_close_shape(held) is CloseShape.NO:
                self._last_active = now
                self._release_held()
            return True
        # A close is no activity: the stream stays idle since its last real byte.
        quiet = now - self._last_active >= HOLD_AFTER_SILENCE_S
        if not quiet or nbytes > MAX_CLOSE_BYTES or idle_close_shape(data) is CloseShape.NO:
            self._last_active = now
            return False
        self._held = bytearray(data)
        self._held_timer = self._loop.call_later(CLOSE_FIN_WAIT_S, self._release_held)
        return True

    def _release_held(self) -> None:
        """Send what was held: it was not a close after all (or a dormant close wakes)."""
        self._last_active = self._loop.time()
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self._held = self._held, None
        if not held or self._closed:
            return
        try:
            writable = self.session.send_data(self.stream_id, bytes(held))
        except LocalProtocolError:
            self._abort()
            return
        self._after_send(writable)

    def _go_dormant(self) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        self._dormant = True
        self.driver.hold_close(self, self._last_active)

    def wake(self) -> None:
        """The client spoke: deliver the held close, its bytes and then its FIN."""
        if not self._dormant or self._closed:
            return
        self._dormant = False
        self.session.wake(self.stream_id)
        self._release_held()
        if not self._closed:
            self._send_eof()

    # --- session side (StreamHandler)
    def on_data(self, data: bytes) -> None:
        self._answered = True
        if self._hold_idle_close:
            self._last_active = self._loop.time()
        transport = self.transport
        if transport is None:
            self._early.append(data)
            return
        if self._closed:
            self.session.consume(self.stream_id, len(data))
            return
        transport.write(data)
        if self._local_paused:
            self._unacked += len(data)
        else:
            self.session.consume(self.stream_id, len(data))

    def on_eof(self) -> None:
        transport = self.transport
        if transport is None:
            self._early_eof = True
            return
        if self._closed:
            return
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                # The application reset its socket and the loop has not seen it yet
                # (shutdown: ENOTCONN). Its stream ends here; the session's others go on.
                self._abort()
                return
        if self.session.stream_state(self.stream_id) is StreamState.CLOSED:
            self._finish_closed()

    def on_reset(self, code: ResetCode) -> None:
        if code is not ResetCode.CANCELLED:
            # Why an application's connection was cut (a destination refused, unresolvable,
            # unreachable...): the one place a user can learn it. Never the destination.
            self.report_reset(self.stream_id, code)
        transport, answer = self.transport, None
        if self.answer_early_reset is not None and not self._answered and not self._closed:
            answer = self.answer_early_reset(code)
        if transport is None or answer is None:
            self._abort(notify=False)
            return
        self.transport = None  # not aborted: the answer goes out, then the connection closes
        self._abort(notify=False)
        transport.write(answer)
        transport.close()

    def on_writable(self) -> None:
        self._blocked = False
        if not self.driver.writing_paused or self._striping:
            self._resume_reading()

    def on_datagram(self, address: Address, payload: bytes) -> None:
        pass  # TCP streams carry no datagrams; the session rejects them before they get here

    def pause_source(self) -> None:
        if self._striping:
            return  # other connections of the pool may carry it: the next read decides
        self._pause_reading()

    def resume_source(self) -> None:
        if not self._blocked:
            self._resume_reading()

    # --- internals
    def _pause_reading(self) -> None:
        if self._reading and self.transport is not None and not self._closed:
            self._reading = False
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self.transport is not None and not self._closed:
            self._reading = True
            self.transport.resume_reading()

    def orphan(self) -> None:
        """The session is gone, and with it this stream, whose destination had closed it
        while idle: leave the local connection open and end it when the application next
        writes (a reset: its request never left, so a browser retries it on a new
        connection, as after any keep-alive race) or closes it."""
        if self._closed:
            return
        self._closed = self._orphaned = True
        self.driver.detach(self.stream_id)
        if self.transport is not None and not self._reading:
            self._reading = True
            self.transport.resume_reading()

    def _finish_closed(self) -> None:
        """Both directions finished cleanly: close the local socket politely."""
        self._closed = True
        self.driver.detach(self.stream_id)
        if self.transport is not None:
            self.transport.close()

    def _abort(self, notify: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        self._held = None
        if notify:
            self.driver.cancel(self.stream_id)
        else:
            self.driver.detach(self.stream_id)
        if self.transport is not None:
            self.transport.abort()
