"""The session protocol: many streams and UDP flows multiplexed over one byte stream.

Sans-IO: feed received bytes to :meth:`Session.receive_data` and get events back; call the
``send_*``/``open_stream``/``reset`` methods to act, then send what :meth:`Session.data_to_send`
returns. Time is an argument: :meth:`Session.get_timer` says when to call
:meth:`Session.handle_timer` next. There is no socket, clock or logging in here.

Flow control is credit based, per stream and per session, like HTTP/2: a sender may have at
most ``window`` unacknowledged bytes in flight; the receiver grants more with WINDOW frames
once the application has *consumed* data (delivered it onward), see :meth:`Session.consume`.
A slow reader therefore stops only its own stream, and a session's buffered bytes are bounded
by its session window.

Frame layout and limits are in :mod:`veil.protocol.frames`; docs/protocol.md is the spec.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from veil.errors import LocalProtocolError, RemoteProtocolError
from veil.protocol.address import ATYP_DOMAIN, Address, NeedMoreData
from veil.protocol.events import (
    ChunkReceived,
    DatagramReceived,
    DataReceived,
    Event,
    JoinAnswered,
    JoinRequested,
    PacketReceived,
    PongReceived,
    ReportReceived,
    SessionClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from veil.protocol.frames import (
    CHUNK_PREFIX_SIZE,
    EXACT_LENGTH,
    FEATURE_HOLDS_IDLE_CLOSES,
    FEATURES_TAG,
    GROUP_TOKEN_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_CHUNK_DATA,
    MAX_DATA_PAYLOAD,
    MAX_PAYLOAD,
    POOL_ID_SIZE,
    REPORT_TAG,
    SESSION_FRAMES,
    CloseCode,
    FrameType,
    ResetCode,
    StreamKind,
    frame,
    pack_header,
    pack_u32,
    unpack_header,
    unpack_u32,
)
from veil.protocol.shaping import DEFAULT_SHAPING, ShapingPolicy
from veil.protocol.stripe import (
    STRIPED_STREAM_WINDOW,
    Reassembly,
    pack_chunk_prefix,
    unpack_chunk_prefix,
)

# Windows. A stream moves at most one window per round trip: 4 MiB is ~170 Mbit/s at 200 ms
# (a censored country to a server abroad) and smooths scheduling stalls on a busy LAN host.
# The session window lets 7 streams stall at once before the 8th notices, and bounds what a
# receiver buffers for one session (32 MiB) whatever its peer does.
INITIAL_STREAM_WINDOW = 4 * 1024 * 1024
INITIAL_SESSION_WINDOW = 32 * 1024 * 1024
# Grant credit back once a quarter of a window is consumed: few WINDOW frames, no stalls.
_GRANT_FRACTION = 4
# A window above 2**31 - 1 can only come from a broken or hostile peer.
MAX_WINDOW = 2**31 - 1
# Keepalive as Chromium does it on HTTP/2 (SpdySession's "preface ping"): never while idle.
# A session whose peer has been silent for DEFAULT_KEEPALIVE_INTERVAL sends a PING with its
# next write (a new stream, data, a window grant: the user's demand), and declares the peer
# dead when nothing arrives within DEFAULT_KEEPALIVE_TIMEOUT of it. An idle session sends
# nothing at all, as a browser's idle connection to nginx sends nothing; a dead path is found
# the moment the user needs it (Chromium's connection_at_risk_of_loss_time and hung interval,
# 10 s each), and by TCP keepalive below TLS (net.client_session) for a session that stays
# idle. The server sets no interval: nginx never pings.
DEFAULT_KEEPALIVE_INTERVAL = 10.0
DEFAULT_KEEPALIVE_TIMEOUT = 10.0
# One departure from Chromium, for the day a path is blackholed under a live session: a new
# stream that has heard nothing back DEFAULT_OPEN_PROBE after its OPEN, on a session that has
# received nothing since, gets a PING, and the session is declared dead if nothing answers it
# within DEFAULT_OPEN_PROBE_TIMEOUT. Chromium would wait for TCP; veil's client has another
# way in to move to (protocol.failover), so it asks once, within the user's own request (never
# while idle), and finds a dead path ~7 s after the user's click instead of never. 2 s lets a
# loaded server and a slow target answer first; 5 s for the PONG is many round trips even on
# a lossy long link (a lost PING is retransmitted within ~1 s at 150 ms RTT).
# A TUN's IP stream is open for the session's whole life, so the same probe applies to its
# packets: when the client's packets are answered by nothing (no frame at all) within
# DEFAULT_OPEN_PROBE, a PING goes. Inner TCP answers every segment it gets, so on a working
# path this is a connection attempt to a host that does not answer: one PING per attempt.
DEFAULT_OPEN_PROBE = 2.0
DEFAULT_OPEN_PROBE_TIMEOUT = 5.0
#: The spread of each idle ping's wait (SessionConfig.idle_ping), as factors of it: no period.
IDLE_PING_JITTER = (0.75, 1.25)
#: nginx's keepalive_timeout (75 s, its default, which nginx 1.22 applies to HTTP/2 as well:
#: http2_idle_timeout is obsolete since 1.19.7). A connection to "nginx" with no request in
#: flight never outlives it: nginx closes it then.
NGINX_KEEPALIVE_TIMEOUT = 75.0
#: The server closes a session with no stream open after nginx's keepalive_timeout, as nginx
#: closes a browser's idle connection; the client leaves that close to it, as Chromium leaves it
#: to nginx. Its own idle close is a backstop for a server that never closes (drawn per session
#: from this range, seconds, so the moment is not one constant of veil's).
DEFAULT_IDLE_CLOSE = (85.0, 95.0)
#: A session idle this long takes no new stream (seconds): the server's close is due within
#: 5 s, and an OPEN sent now could cross it on the way. The user's next stream opens a new
#: session, and the client closes the old one itself: a click in those 5 s is the only time
#: the client, not the server, ends an idle session. 5 s covers a round trip and a late timer.
DEFAULT_REUSE_LIMIT = NGINX_KEEPALIVE_TIMEOUT - 5.0
#: The reason an idle close gives: 8 bytes, so its CLOSE frame (8-byte header, the code, the
#: reason) is 17 bytes, nginx's GOAWAY's size (9-byte header, 8 bytes), and its TLS record is
#: the record nginx ends an idle connection with (34 bytes with TLS 1.3 and AES-GCM).
IDLE_CLOSE_REASON = "inactive"
# The draws above: not secrets, but not one sequence every install repeats either.
_RANDOM = random.SystemRandom()
#: PINGs and empty DATA frames (frames that ask for nothing useful) a peer may send at once,
#: and how many per second it earns back (a token bucket on the ``now`` it is given). veil
#: pings at most once per 10 s of silence, with one PING outstanding, and never sends empty DATA;
#: the allowance leaves room for a peer that measures its round trip every few milliseconds.
#: Past it the session closes with PROTOCOL_ERROR, reason "PING flood": a flood of frames
#: that do nothing is hostile whoever sends it, as HTTP/2 servers judge PING, SETTINGS and
#: empty-frame floods (CVE-2019-9512/9518: nginx closes the connection). For an
#: authenticated user, closing is right rather than merely rating the frames: the per-call
#: frame budget (receive_data's ``max_frames``) already keeps other users served, but a
#: session left flooding would burn a core for as long as its user likes, and only a broken
#: or hostile client floods; the CLOSE's reason tells that client's user why in its log, and
#: reconnecting to flood again costs a TLS handshake and an authenticator each time, which
#: the per-user session and replay bounds hold.
UNPRODUCTIVE_FRAME_BURST = 1000
UNPRODUCTIVE_FRAMES_PER_S = 100.0
#: Block reports (PADDING frames tagged REPORT_TAG, veil.protocol.report) a server reads per
#: session. A client sends one, on a session that came up after a block (it holds every
#: blocked way); a few more cover blocks it learns of while the session lives. Past this
#: they are padding again (ignored, not an error): a client cannot make the server parse
#: and count without end by sending reports instead of padding.
MAX_REPORTS_PER_SESSION = 4


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Tunables of one session; the defaults are what veil ships."""

    #: Streams the peer may have open at once (the server's limit on a client).
    max_streams: int = 1024
    #: Send a PING with the next write when nothing has been received for this long
    #: (seconds): the user's demand after a silence checks the path. None: never ping. An
    #: idle session never pings, however long it stays idle.
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL
    #: Declare the peer dead when nothing arrives this long after a PING (seconds).
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    #: PING when a stream opened this long ago has heard nothing back and nothing else was
    #: received since (seconds; see DEFAULT_OPEN_PROBE); None: never.
    open_probe: float | None = DEFAULT_OPEN_PROBE
    #: Declare the peer dead when nothing answers that PING within this long (seconds).
    open_probe_timeout: float = DEFAULT_OPEN_PROBE_TIMEOUT
    #: While streams are open, PING after about this long without receiving anything (each
    #: wait drawn from IDLE_PING_JITTER times it); None: never while idle (the TLS way in, as
    #: Chromium). For carriers whose proxies cut a silent connection: a CDN drops a request
    #: that carries nothing for ~100 s (Cloudflare; nginx's proxy_read_timeout), and a
    #: WebSocket app's idle pings are what browsers' apps send through CDNs.
    idle_ping: float | None = None
    #: Which writes are padded, and how (see veil.protocol.shaping).
    shaping: ShapingPolicy = DEFAULT_SHAPING
    #: Close the session after this long with no stream open (seconds, drawn once per
    #: session from the range ``(low, high)``); None keeps idle sessions open.
    idle_close: tuple[float, float] | None = DEFAULT_IDLE_CLOSE
    #: Open no stream on a session idle this long (seconds, see :meth:`Session.reusable`);
    #: None: no limit.
    reuse_limit: float | None = DEFAULT_REUSE_LIMIT


class StreamState(enum.Enum):
    OPEN = "open"
    LOCAL_CLOSED = "local_closed"  # we sent FIN, the peer may still send
    REMOTE_CLOSED = "remote_closed"  # the peer sent FIN, we may still send
    CLOSED = "closed"


# The stream state machine as tables: an event not in its table is a protocol error.
_AFTER_SEND_FIN = {StreamState.OPEN: StreamState.LOCAL_CLOSED,
                   StreamState.REMOTE_CLOSED: StreamState.CLOSED}
_AFTER_RECV_FIN = {StreamState.OPEN: StreamState.REMOTE_CLOSED,
                   StreamState.LOCAL_CLOSED: StreamState.CLOSED}
_MAY_SEND = frozenset({StreamState.OPEN, StreamState.REMOTE_CLOSED})
_MAY_RECEIVE = frozenset({StreamState.OPEN, StreamState.LOCAL_CLOSED})


@dataclass(slots=True)
class _Stream:
    stream_id: int
    kind: StreamKind
    state: StreamState = StreamState.OPEN
    send_window: int = INITIAL_STREAM_WINDOW
    recv_credit: int = INITIAL_STREAM_WINDOW
    unacked: int = 0
    pending: bytearray = field(default_factory=bytearray)
    fin_pending: bool = False
    shaped_writes: int = 0  # writes of this stream's data still to be padded when small
    sent: int = 0  # bytes sent (the offset of the next one; veil.protocol.stripe)
    received: int = 0  # bytes received as plain DATA
    striped: bool = False  # our bytes go as CHUNKs (any session of the pool) from now on
    reassembly: Reassembly | None = None  # the peer's bytes come as CHUNKs


class Session:
    """One end of a veil session. ``client`` opens streams; the server accepts them."""

    def __init__(self, *, client: bool, now: float, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
        self.client = client
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1  # client-initiated ids are odd
        self._last_peer_stream_id = 0
        self._send_window = INITIAL_SESSION_WINDOW
        self._recv_credit = INITIAL_SESSION_WINDOW
        self._session_unacked = 0
        self._blocked: dict[int, _Stream] = {}  # streams with pending data, in arrival order
        self._out: list[bytes | memoryview] = []
        self._closed = False
        self._shaped_writes = self.config.shaping.session_writes
        self._shape_this_write = False
        # Parser state: a partial header or control frame, or the rest of a DATA payload.
        self._partial = bytearray()
        self._need = HEADER_SIZE
        self._data_left = 0
        self._data_stream: _Stream | None = None
        # Keepalive, and the idle close (see get_timer).
        self._last_received = now
        self._last_sent = now  # the latest write the caller gave a clock with
        self._idle_ping_wait = self._draw_idle_ping_wait()
        idle = self.config.idle_close
        self._idle_close_after = None if idle is None else _RANDOM.uniform(*idle)
        self._idle_since: float | None = now  # when the last stream went; None: streams open
        # Streams whose destination closed them while idle, the close held until the peer next
        # speaks (set_dormant): open, but they keep the session from being idle no longer.
        self._dormant: set[int] = set()
        self._clock = now  # the latest time the caller told us of
        self._ping_sent_at: float | None = None
        self._ping_timeout = self.config.keepalive_timeout  # the outstanding PING's
        # An OPEN went out: when (at its write), until anything is received.
        self._opened_since_write = False
        self._packets_since_write = False  # IP packets queued since the last write (client)
        self._open_unanswered_at: float | None = None
        self._ping_counter = 0
        self._ping_payload = b""
        # The answer owed to the peer's latest PING, sent with the next output unless the
        # caller's wire is congested (set_congested): one PONG owed at most, whatever the
        # number of PINGs, so a peer that pings without reading costs 16 bytes, not a queue.
        self._pong_owed: bytes | None = None
        self._congested = False
        # What the peer may still send of PINGs and empty DATA (UNPRODUCTIVE_FRAME_BURST),
        # as of _allowance_at.
        self._unproductive_allowance = float(UNPRODUCTIVE_FRAME_BURST)
        self._allowance_at = now
        # Received bytes not parsed yet because a call's frame budget ran out (max_frames):
        # a view of bytes this session owns, parsed first by the next call.
        self._held_input: memoryview | None = None
        #: Why this session closed itself for a flood ("PING flood", ...), None if it did not.
        self.flood: str | None = None
        self._reports_left = 0 if client else MAX_REPORTS_PER_SESSION
        #: FEATURE_* bits the server announced (client side; 0 until it does, and for ever
        #: with a server older than features).
        self.peer_features = 0
        #: This session's member number in its client's pool (veil.protocol.stripe): set by
        #: the client's JOIN (sent or received); None outside a pool.
        self.member: int | None = None
        self._join_answered = False

    # ------------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        return self._closed

    def reusable(self, now: float) -> bool:
        """Whether a new stream may be opened here at ``now``: open, and not idle so long
        that the peer's idle close may already be on its way (``reuse_limit``). Open streams
        that carried nothing either way for as long count as idle: the server may hold their
        destinations' closes (:meth:`set_dormant`) and close the session as idle."""
        limit = self.config.reuse_limit
        if self._closed:
            return False
        if limit is None:
            return True
        if self._has_live_streams():
            if not self.peer_holds_idle_closes:
                return True
            return now - max(self._last_received, self._last_sent) < limit
        return self._idle_since is None or now - self._idle_since < limit

    def _has_live_streams(self) -> bool:
        if not self._dormant:
            return bool(self._streams)
        self._dormant.intersection_update(self._streams)  # forget streams that went since
        return len(self._streams) > len(self._dormant)

    @property
    def peer_holds_idle_closes(self) -> bool:
        """Whether the peer may hold its destinations' idle closes and so end the session
        as idle with streams open here (then over too). Otherwise streams open at the peer's
        idle close crossed it, and are lost as on any other close. The server says so in
        its features (FEATURE_HOLDS_IDLE_CLOSES)."""
        return bool(self.peer_features & FEATURE_HOLDS_IDLE_CLOSES)

    def set_dormant(self, stream_id: int, last_active: float) -> None:
        """The destination closed ``stream_id`` after a silence, and the caller holds that
        close until the peer next speaks (``veil.protocol.idleclose``): the stream stays
        open, but counts as idle since ``last_active`` (its last byte either way, or the
        peer's last frame if later). If no other stream is open the idle close is then due
        ``idle_close`` after that moment, as nginx's keepalive_timeout runs from the last
        request, not from a stream's end."""
        if stream_id not in self._streams:
            return
        self._dormant.add(stream_id)
        if not self._has_live_streams():
            self._idle_since = max(last_active, self._last_received)

    def wake(self, stream_id: int) -> None:
        """``stream_id``'s held close is being delivered: it is an open stream again."""
        self._dormant.discard(stream_id)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        return stream.state if stream else StreamState.CLOSED

    @property
    def input_held(self) -> int:
        """Received bytes left unparsed by the last :meth:`receive_data` (its frame budget ran
        out); the next call parses them first, even an empty one."""
        held = self._held_input
        return 0 if held is None else len(held)

    def set_congested(self, congested: bool) -> None:
        """Say whether the caller's wire is congested (its unsent output is over its
        high-water mark). While it is, the answer to the peer's PINGs waits, and however many
        PINGs arrive meanwhile they are answered once, with the latest payload, when it drains:
        nothing useful is lost (any byte received is a sign of life) and nothing piles up."""
        self._congested = congested

    # ------------------------------------------------------------------ sending
    def open_stream(self, kind: StreamKind, destination: Address) -> int:
        """Open a stream (client only). Data may be sent on it at once: no round trip."""
        if not self.client:
            raise LocalProtocolError("only the client opens streams")
        self._check_open()
        stream_id = self._next_stream_id
        if stream_id > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids exhausted; start a new session",
                                     code="stream_ids_exhausted")
        self._next_stream_id += 2
        self._streams[stream_id] = _Stream(stream_id, kind,
                                           shaped_writes=self.config.shaping.stream_writes)
        self._out.append(frame(FrameType.OPEN, stream_id, bytes((kind,)) + destination.encode()))
        self._opened_since_write = True
        return stream_id

    def send_credit(self, stream_id: int) -> int:
        """How many bytes the stream may send now without anything being held back."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.pending:
            return 0
        return max(0, min(stream.send_window, self._send_window))

    def send_frame(self, stream_id: int, frame_buffer: memoryview) -> bool:
        """Send ``frame_buffer[HEADER_SIZE:]`` on a stream, writing the DATA header into the
        first HEADER_SIZE bytes so the frame leaves without being copied.

        The buffer is queued as it is: the caller must take :meth:`data_to_send` (and hand it
        to something that consumes it, like a TLS write) before reusing the buffer. Returns
        what :meth:`send_data` returns.
        """
        size = len(frame_buffer) - HEADER_SIZE
        stream = self._sendable(stream_id)
        if (stream.pending or stream.striped or size > MAX_DATA_PAYLOAD
                or size > min(stream.send_window, self._send_window)):
            return self.send_data(stream_id, frame_buffer[HEADER_SIZE:])
        HEADER.pack_into(frame_buffer, 0, (FrameType.DATA << 24) | size, stream_id)
        stream.send_window -= size
        self._send_window -= size
        stream.sent += size
        self._out.append(frame_buffer)
        self._note_stream_write(stream)
        return self._still_open(stream)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Queue ``data`` on a stream. Returns False when the stream is now blocked by flow
        control: the data is kept, but the caller should stop reading its source until a
        :class:`StreamWritable` event."""
        stream = self._sendable(stream_id)
        if stream.pending:
            stream.pending += data
            return False
        allowed = min(stream.send_window, self._send_window)
        if len(data) <= allowed:
            self._emit_data(stream, data)
            return self._still_open(stream)
        if allowed > 0:
            self._emit_data(stream, data[:allowed])
        stream.pending += data[allowed:]
        self._blocked[stream_id] = stream
        return False

    # ------------------------------------------------------------------ striping
    def send_join(self, pool_id: bytes, member: int) -> None:
        """Client: say this session is ``member`` of pool ``pool_id`` (only to a server
        that announced FEATURE_STRIPE; veil.protocol.stripe)."""
        self._check_open()
        if not self.client or self.member is not None:
            raise LocalProtocolError("JOIN is the client's, once per session")
        if len(pool_id) != POOL_ID_SIZE or not 0 <= member <= 0xFF:
            raise LocalProtocolError("bad pool id or member")
        self.member = member
        self._out.append(frame(FrameType.JOIN, 0, pool_id + bytes((member,))))

    def answer_join(self, token: bytes) -> None:
        """Server: the client's JOIN is grouped; ``token`` names the group."""
        self._check_open()
        if self.client or self.member is None or len(token) != GROUP_TOKEN_SIZE:
            raise LocalProtocolError("nothing to answer")
        self._out.append(frame(FrameType.JOIN, 0, bytes((self.member,)) + token))

    def stream_sent(self, stream_id: int) -> int:
        """Bytes sent on a stream so far (0 for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.sent

    def striped_streams(self) -> list[int]:
        """The streams whose bytes travel (either way) as CHUNKs over the pool."""
        return [sid for sid, st in self._streams.items()
                if st.striped or st.reassembly is not None]

    def stripe_take(self, stream_id: int, size: int) -> tuple[int, bool]:
        """Spend ``size`` bytes of the stream's credit on a CHUNK that another session of
        the pool carries (:meth:`send_chunk` there); return its offset and what
        :meth:`send_data` returns. From now on this stream's bytes and its end go as CHUNKs."""
        stream = self._sendable(stream_id)
        if self.member is None or stream.pending or size > min(stream.send_window,
                                                                self._send_window):
            raise LocalProtocolError("no credit to stripe", code="stream_closed")
        stream.striped = True
        stream.send_window -= size
        self._send_window -= size
        offset = stream.sent
        stream.sent += size
        self._note_stream_write(stream)
        return offset, self._still_open(stream)

    def send_chunk(self, member: int, stream_id: int, offset: int,
                   data: bytes | memoryview, fin: bool = False) -> None:
        """Carry a piece of member ``member``'s stream (its credit already spent there)."""
        self._check_open()
        view = memoryview(data)
        size = len(view)
        start = 0
        while True:
            piece = view[start : start + MAX_CHUNK_DATA]
            last = start + len(piece) >= size
            payload = pack_chunk_prefix(member, offset + start, fin and last)
            self._out.append(pack_header(FrameType.CHUNK, stream_id,
                                         CHUNK_PREFIX_SIZE + len(piece)))
            self._out.append(payload + piece)
            start += len(piece)
            if last:
                return

    def receive_chunk(self, stream_id: int, offset: int, data: bytes, fin: bool,
                      now: float) -> list[Event]:
        """A piece of one of this session's streams that another session of the pool
        carried (its ChunkReceived). A violation closes this session, as in receive_data."""
        events: list[Event] = []
        if self._closed:
            return events
        self._last_received = self._clock = now
        try:
            self._on_chunk(stream_id, offset, data, fin, events)
        except RemoteProtocolError as exc:
            code = (CloseCode.FLOW_CONTROL_ERROR if exc.code == "flow_control"
                    else CloseCode.PROTOCOL_ERROR)
            self.close(code, str(exc))
            events.append(SessionClosed(code, str(exc), False))
        return events

    def _on_chunk(self, stream_id: int, offset: int, data: bytes, fin: bool,
                  events: list[Event]) -> None:
        length = len(data)
        if length > self._recv_credit:
            raise RemoteProtocolError("session flow-control window exceeded", code="flow_control")
        self._recv_credit -= length
        stream = self._known(stream_id)
        if stream is None:
            self.consume(0, length)  # stale stream: nobody will consume it
            return
        if stream.state not in _MAY_RECEIVE:
            raise RemoteProtocolError(f"CHUNK after FIN on stream {stream_id}")
        if length > stream.recv_credit:
            raise RemoteProtocolError("stream flow-control window exceeded", code="flow_control")
        stream.recv_credit -= length
        if stream.reassembly is None:
            stream.reassembly = Reassembly(stream.received)
            # A striped stream waits behind the slowest connection: give it the window that
            # covers that (STRIPED_STREAM_WINDOW), on top of what it has.
            extra = STRIPED_STREAM_WINDOW - INITIAL_STREAM_WINDOW
            stream.recv_credit += extra
            self._grant(stream_id, extra)
        self._reassemble(stream, offset, data, fin, events)

    def _reassemble(self, stream: _Stream, offset: int, data: bytes, fin: bool,
                    events: list[Event]) -> None:
        reassembly = stream.reassembly
        assert reassembly is not None
        for piece in reassembly.add(offset, data, fin):
            events.append(DataReceived(stream.stream_id, piece))
        if reassembly.finished:
            stream.reassembly = None
            stream.received = reassembly.next
            self._on_fin(stream.stream_id, events, striped_end=True)

    def send_eof(self, stream_id: int) -> None:
        """Half-close: we send no more data on this stream (after any pending data)."""
        stream = self._sendable(stream_id)
        if stream.pending:
            stream.fin_pending = True
        else:
            self._emit_fin(stream)

    def reset(self, stream_id: int, code: ResetCode = ResetCode.CANCELLED) -> None:
        """Abort a stream in both directions. Resetting an unknown stream does nothing."""
        stream = self._streams.pop(stream_id, None)
        if stream is None or self._closed:
            return
        self._blocked.pop(stream_id, None)
        self._out.append(frame(FrameType.RESET, stream_id, bytes((code,))))

    def consume(self, stream_id: int, amount: int) -> None:
        """Say that ``amount`` received bytes were delivered onward; grants the peer credit."""
        self._session_unacked += amount
        if self._session_unacked >= INITIAL_SESSION_WINDOW // _GRANT_FRACTION:
            self._grant(0, self._session_unacked)
            self._recv_credit += self._session_unacked
            self._session_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.unacked += amount
        if (stream.unacked >= INITIAL_STREAM_WINDOW // _GRANT_FRACTION
                and stream.state in _MAY_RECEIVE):
            self._grant(stream_id, stream.unacked)
            stream.recv_credit += stream.unacked
            stream.unacked = 0

    def send_datagram(self, stream_id: int, address: Address, payload: bytes) -> None:
        """Send one datagram on a UDP stream. Datagrams are not flow controlled: like UDP,
        the caller drops them when the connection is congested."""
        stream = self._sendable(stream_id)
        if stream.kind is not StreamKind.UDP:
            raise LocalProtocolError("datagrams need a UDP stream")
        body = address.encode() + payload
        if len(body) > MAX_PAYLOAD[FrameType.DATAGRAM]:
            raise LocalProtocolError("datagram too large", code="datagram_too_large")
        self._out.append(pack_header(FrameType.DATAGRAM, stream_id, len(body)))
        self._out.append(body)

    def send_packet(self, stream_id: int, packet: bytes | memoryview) -> None:
        """Send one IP packet (offload header + packet, veil.protocol.ip) on an IP stream.

        Not flow controlled, like datagrams: the packets' own transport (TCP inside) reacts to
        loss. The packet is queued as it is, without a copy: a view must stay valid until
        :meth:`data_to_send` has been taken.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.kind is not StreamKind.IP or self._closed:
            raise LocalProtocolError(f"stream {stream_id} is not an open IP stream",
                                     code="stream_closed")
        size = len(packet)
        if size > MAX_PAYLOAD[FrameType.DATAGRAM]:
            raise LocalProtocolError("packet too large", code="datagram_too_large")
        out = self._out
        out.append(pack_header(FrameType.DATAGRAM, stream_id, size))
        out.append(packet)
        self._packets_since_write = self.client  # the server's answers are not probed

    def send_padding(self, length: int) -> None:
        """Queue a PADDING frame whose payload is ``length`` bytes (for traffic shaping)."""
        self._check_open()
        length = min(length, MAX_PAYLOAD[FrameType.PADDING])
        self._out.append(frame(FrameType.PADDING, 0, bytes(length)))

    def announce_features(self, features: int, length: int) -> None:
        """Queue a PADDING frame of ``length`` bytes that names ``features`` (server only;
        FEATURE_* bits): FEATURES_TAG, the bits, zeros. A client that does not read it takes
        it for padding."""
        self._check_open()
        if self.client:
            raise LocalProtocolError("only the server announces features")
        head = FEATURES_TAG + bytes((features & 0xFF,))
        length = min(max(length, len(head)), MAX_PAYLOAD[FrameType.PADDING])
        self._out.append(frame(FrameType.PADDING, 0, head + bytes(length - len(head))))

    def send_report(self, payload: bytes) -> None:
        """Queue a block report (client only; ``payload`` from veil.protocol.report): a
        PADDING frame, which a server that does not read reports ignores."""
        self._check_open()
        if not self.client:
            raise LocalProtocolError("only the client reports blocks")
        if not payload.startswith(REPORT_TAG) or len(payload) > MAX_PAYLOAD[FrameType.PADDING]:
            raise LocalProtocolError("not a block report")
        self._out.append(frame(FrameType.PADDING, 0, payload))

    def close(self, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        """End the session: a CLOSE frame is queued and nothing more is accepted."""
        if self._closed:
            return
        payload = bytes((code,)) + reason.encode()[: MAX_PAYLOAD[FrameType.CLOSE] - 1]
        self._out.append(frame(FrameType.CLOSE, 0, payload))
        self._shut()

    def data_to_send(self, now: float | None = None) -> bytes | memoryview:
        """Everything queued for the wire since the last call, as one buffer (a view into
        the caller's buffer when that is all there is, see :meth:`send_frame`).

        ``now``: the caller's clock. Given, and with the peer silent for the keepalive
        interval, a PING goes with this write (see DEFAULT_KEEPALIVE_INTERVAL)."""
        out = self._out
        if self._pong_owed is not None and not self._congested:
            out.append(frame(FrameType.PONG, 0, self._pong_owed))
            self._pong_owed = None
        if not out:
            return b""
        if now is not None:
            self._last_sent = now
        interval = self.config.keepalive_interval
        if (now is not None and interval is not None and self._ping_sent_at is None
                and not self._closed and now - self._last_received >= interval):
            self._clock = now
            self._send_ping(now, first=True)
        if self._packets_since_write:
            # The client's IP packets count as a new stream's OPEN (DEFAULT_OPEN_PROBE).
            self._packets_since_write = False
            self._opened_since_write = True
        if self._opened_since_write:
            self._opened_since_write = False
            if now is not None and self._open_unanswered_at is None:
                self._open_unanswered_at = now
        # The last write (ending with CLOSE) is not grown: nothing after it needs hiding, and
        # a page-sized record just before close_notify is no website's.
        if (self._shape_this_write or self._shaped_writes) and not self._closed:
            self._shape(out)
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def _send_ping(self, now: float, first: bool = False, timeout: float | None = None) -> None:
        self._ping_counter += 1
        self._ping_sent_at = now
        self._ping_timeout = self.config.keepalive_timeout if timeout is None else timeout
        self._ping_payload = self._ping_counter.to_bytes(8, "big")
        self._out.insert(0 if first else len(self._out),
                         frame(FrameType.PING, 0, self._ping_payload))

    def _shape(self, out: list[bytes | memoryview]) -> None:
        """Grow this write to the policy's size with a PADDING frame (see shaping.py)."""
        self._shape_this_write = False
        if self._shaped_writes:
            self._shaped_writes -= 1
        size = sum(len(chunk) for chunk in out)
        target = self.config.shaping.padded_size(size)
        if target - size >= HEADER_SIZE:
            pad = min(target - size - HEADER_SIZE, MAX_PAYLOAD[FrameType.PADDING])
            out.append(frame(FrameType.PADDING, 0, bytes(pad)))

    # ------------------------------------------------------------------ timers
    def _draw_idle_ping_wait(self) -> float | None:
        interval = self.config.idle_ping
        return None if interval is None else interval * _RANDOM.uniform(*IDLE_PING_JITTER)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        if self._closed:
            return None
        live = self._has_live_streams()
        if live:
            self._idle_since = None
        elif self._idle_since is None:
            # The last stream just went: handle_timer notes when, at once (the latest time
            # this session was told of has passed).
            return self._clock
        deadlines: list[float] = []
        if self._ping_sent_at is not None:
            deadlines.append(self._ping_sent_at + self._ping_timeout)
        else:
            if live and self._idle_ping_wait is not None:
                deadlines.append(self._last_received + self._idle_ping_wait)
            if self._open_unanswered_at is not None and self.config.open_probe is not None:
                deadlines.append(self._open_unanswered_at + self.config.open_probe)
        if self._idle_since is not None and self._idle_close_after is not None:
            deadlines.append(self._idle_since + self._idle_close_after)
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> list[Event]:
        """Declare the peer dead when nothing came within the keepalive timeout of a PING;
        with no stream open, close the session once it has been idle for its idle close (the
        CLOSE frame says why; the caller then closes the connection, TLS close_notify and
        FIN). Sends a PING for a new stream that heard nothing (``open_probe``) and, with an
        ``idle_ping`` configured (a CDN's carrier), after a silence while streams are open;
        the keepalive PINGs go with the user's writes (:meth:`data_to_send`)."""
        if self._closed:
            return []
        self._clock = now
        live = self._has_live_streams()
        if live:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        if self._ping_sent_at is not None:
            if self._last_received > self._ping_sent_at:
                self._ping_sent_at = None  # anything received proves the peer alive
            elif now >= self._ping_sent_at + self._ping_timeout:
                self.close(CloseCode.KEEPALIVE_TIMEOUT, "keepalive timeout")
                return [SessionClosed(CloseCode.KEEPALIVE_TIMEOUT, "keepalive timeout", False)]
        if (self._idle_since is not None and self._idle_close_after is not None
                and now >= self._idle_since + self._idle_close_after):
            self.close(CloseCode.NORMAL, IDLE_CLOSE_REASON)
            return [SessionClosed(CloseCode.NORMAL, IDLE_CLOSE_REASON, False)]
        probe = self.config.open_probe
        if (self._ping_sent_at is None and self._open_unanswered_at is not None
                and probe is not None and now >= self._open_unanswered_at + probe):
            # A new stream heard nothing, nor did the session: is the path still there?
            self._open_unanswered_at = None
            self._send_ping(now, timeout=self.config.open_probe_timeout)
        wait = self._idle_ping_wait
        if (self._ping_sent_at is None and live and wait is not None
                and now >= self._last_received + wait):
            self._send_ping(now)
            self._idle_ping_wait = self._draw_idle_ping_wait()
        return []

    # ------------------------------------------------------------------ receiving
    def receive_data(self, data: bytes | memoryview, now: float,
                     max_frames: int | None = None) -> list[Event]:
        """Parse received bytes; return what happened. A protocol violation by the peer
        closes the session (a CLOSE frame is queued) and ends the list with SessionClosed.

        ``data`` may be a view of a buffer the caller reuses: nothing keeps a reference to it
        after the call (events carry copies, and bytes held back are copied).

        With ``max_frames``, at most that many frames are parsed (the rest of a DATA frame
        already begun does not count): the bytes after them are held (:attr:`input_held`) and
        parsed first by the next call, ``receive_data(b"", now, max_frames)`` if nothing new
        arrived. A caller serving many peers on one thread uses it to bound the work one peer
        costs per turn, whatever the size of its frames."""
        events: list[Event] = []
        if self._closed:
            return events
        own = False
        held = self._held_input
        if held is not None:
            self._held_input = None
            # New bytes behind held ones (rare: the caller reads no more while it holds any)
            # are copied once; otherwise the held view is parsed as it is.
            data, own = (bytes(held) + bytes(data), True) if data else (held, True)
        if not data:
            return events
        self._last_received = self._clock = now
        self._open_unanswered_at = None
        try:
            if max_frames is None:
                self._parse(data, events, now)
            else:
                rest = self._parse(data, events, now, max_frames)
                if rest < len(data) and not self._closed:
                    self._held_input = (memoryview(data)[rest:] if own
                                        else memoryview(bytes(data[rest:])))
        except RemoteProtocolError as exc:
            code = (CloseCode.FLOW_CONTROL_ERROR if exc.code == "flow_control"
                    else CloseCode.PROTOCOL_ERROR)
            if exc.code == "flood":
                self.flood = str(exc)
            self.close(code, str(exc))
            events.append(SessionClosed(code, str(exc), False))
        return events

    def _parse(self, data: bytes | memoryview, events: list[Event], now: float,
               max_frames: int = -1) -> int:
        """Parse ``data`` up to the end, or up to the start of frame ``max_frames + 1``
        (-1: no limit); return where it stopped."""
        pos, end = 0, len(data)
        frames_left = max_frames
        while pos < end and not self._closed:
            if self._data_left:
                take = min(self._data_left, end - pos)
                self._data_left -= take
                stream = self._data_stream
                if stream is not None:
                    # One copy out of the caller's buffer (none when a bytes input is taken
                    # whole: bytes() of a bytes object is that object).
                    piece = bytes(data[pos : pos + take])
                    if stream.reassembly is None:
                        events.append(DataReceived(stream.stream_id, piece))
                    else:  # bytes before the stream's first CHUNK, which came first
                        self._reassemble(stream, stream.received, piece, False, events)
                    stream.received += take
                else:
                    self.consume(0, take)  # stale stream: nobody will consume it
                pos += take
                continue
            if self._partial:
                take = min(self._need - len(self._partial), end - pos)
                self._partial += data[pos : pos + take]
                pos += take
                if len(self._partial) < self._need:
                    return end
                partial = self._partial
                if len(partial) == HEADER_SIZE:
                    unit = bytes(partial)
                    partial.clear()
                    ftype, stream_id, length = self._check_header(unit, 0)
                    if ftype == FrameType.DATA or length == 0:
                        frames_left -= 1
                        self._on_frame(ftype, stream_id, length, b"", events, now)
                    else:
                        partial += unit
                        self._need = HEADER_SIZE + length
                else:
                    raw_type, stream_id, length = unpack_header(partial)
                    # One copy of the payload (a 64 KiB IP super-packet arrives in pieces).
                    with memoryview(partial) as view:
                        payload = bytes(view[HEADER_SIZE:])
                    partial.clear()
                    self._need = HEADER_SIZE
                    frames_left -= 1
                    self._on_frame(FrameType(raw_type), stream_id, length, payload, events, now)
                continue
            if not frames_left:
                return pos  # the budget is spent: the caller holds the rest
            if end - pos < HEADER_SIZE:
                self._partial += data[pos:]
                self._need = HEADER_SIZE
                return end
            ftype, stream_id, length = self._check_header(data, pos)
            pos += HEADER_SIZE
            if ftype == FrameType.DATA:
                frames_left -= 1
                self._on_frame(ftype, stream_id, length, b"", events, now)
            elif end - pos >= length:
                frames_left -= 1
                self._on_frame(ftype, stream_id, length, bytes(data[pos : pos + length]), events,
                               now)
                pos += length
            else:
                self._partial += data[pos - HEADER_SIZE :]
                self._need = HEADER_SIZE + length
                return end
        return pos

    def _check_header(self, buf: bytes | memoryview, offset: int) -> tuple[FrameType, int, int]:
        ftype_raw, stream_id, length = unpack_header(buf, offset)
        try:
            ftype = FrameType(ftype_raw)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {ftype_raw}") from None
        limit = MAX_PAYLOAD[ftype]
        if length > limit or (ftype in EXACT_LENGTH and length != limit):
            raise RemoteProtocolError(f"bad length {length} for {ftype.name}")
        if (ftype in SESSION_FRAMES) != (stream_id == 0) and ftype != FrameType.WINDOW:
            raise RemoteProtocolError(f"bad stream id {stream_id} for {ftype.name}")
        return ftype, stream_id, length

    def _on_frame(self, ftype: FrameType, stream_id: int, length: int, payload: bytes,
                  events: list[Event], now: float) -> None:
        if ftype == FrameType.DATA:
            if not length:
                self._spend_unproductive(now, "empty DATA flood")
            self._on_data_header(stream_id, length)
        elif ftype == FrameType.OPEN:
            self._on_open(stream_id, payload, events)
        elif ftype == FrameType.FIN:
            self._on_fin(stream_id, events)
        elif ftype == FrameType.RESET:
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                self._blocked.pop(stream_id, None)
                events.append(StreamReset(stream_id, _reset_code(payload[0]), True))
        elif ftype == FrameType.WINDOW:
            self._on_window(stream_id, unpack_u32(payload), events)
        elif ftype == FrameType.DATAGRAM:
            self._on_datagram(stream_id, payload, events)
        elif ftype == FrameType.PING:
            self._spend_unproductive(now, "PING flood")
            self._pong_owed = payload  # answered by data_to_send; a newer PING replaces it
        elif ftype == FrameType.PONG:
            if self._ping_sent_at is not None and payload == self._ping_payload:
                events.append(PongReceived(now - self._ping_sent_at))
                self._ping_sent_at = None
        elif ftype == FrameType.CHUNK:
            self._on_chunk_frame(stream_id, payload, events)
        elif ftype == FrameType.JOIN:
            self._on_join(payload, events)
        elif ftype == FrameType.CLOSE:
            code = _close_code(payload[0]) if payload else CloseCode.NORMAL
            reason = payload[1:].decode("utf-8", "replace")
            self._shut()
            events.append(SessionClosed(code, reason, True))
        elif self.client:
            # PADDING from the server: it may name the server's features; else nothing to do.
            if len(payload) > len(FEATURES_TAG) and payload.startswith(FEATURES_TAG):
                self.peer_features = payload[len(FEATURES_TAG)]
        elif self._reports_left and payload[:len(REPORT_TAG)] == REPORT_TAG:
            # PADDING that is a client's block report; any other PADDING: nothing to do.
            self._reports_left -= 1
            events.append(ReportReceived(payload))

    def _on_chunk_frame(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self.member is None or (self.client and not self._join_answered):
            raise RemoteProtocolError("CHUNK outside a pool")
        member, offset, fin = unpack_chunk_prefix(payload)
        data = payload[CHUNK_PREFIX_SIZE:]
        if member == self.member:
            self._on_chunk(stream_id, offset, data, fin, events)
        else:
            events.append(ChunkReceived(member, stream_id, offset, fin, data))

    def _on_join(self, payload: bytes, events: list[Event]) -> None:
        if self.client:
            if (self.member is None or self._join_answered
                    or len(payload) != 1 + GROUP_TOKEN_SIZE or payload[0] != self.member):
                raise RemoteProtocolError("unexpected JOIN")
            self._join_answered = True
            events.append(JoinAnswered(payload[1:]))
            return
        if self.member is not None or len(payload) != POOL_ID_SIZE + 1:
            raise RemoteProtocolError("unexpected JOIN")
        self.member = payload[POOL_ID_SIZE]
        events.append(JoinRequested(payload[:POOL_ID_SIZE], self.member))

    def _known(self, stream_id: int) -> _Stream | None:
        """The stream, None for a stream that existed and is gone; error for one that never did."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        peer_initiated = (stream_id % 2 == 1) != self.client
        limit = self._last_peer_stream_id if peer_initiated else self._next_stream_id - 2
        if stream_id > limit:
            raise RemoteProtocolError(f"frame for stream {stream_id}, which was never opened")
        return None

    def _spend_unproductive(self, now: float, flood: str) -> None:
        """Count a frame that asks for nothing useful (UNPRODUCTIVE_FRAME_BURST)."""
        allowance = min(float(UNPRODUCTIVE_FRAME_BURST), self._unproductive_allowance
                        + (now - self._allowance_at) * UNPRODUCTIVE_FRAMES_PER_S) - 1
        self._allowance_at = now
        if allowance < 0:
            raise RemoteProtocolError(flood, code="flood")
        self._unproductive_allowance = allowance

    def _on_data_header(self, stream_id: int, length: int) -> None:
        if length > self._recv_credit:
            raise RemoteProtocolError("session flow-control window exceeded", code="flow_control")
        self._recv_credit -= length
        stream = self._known(stream_id)
        if stream is not None:
            if stream.state not in _MAY_RECEIVE:
                raise RemoteProtocolError(f"DATA after FIN on stream {stream_id}")
            if length > stream.recv_credit:
                raise RemoteProtocolError("stream flow-control window exceeded",
                                          code="flow_control")
            stream.recv_credit -= length
        self._data_stream = stream
        self._data_left = length

    def _on_open(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self.client or stream_id % 2 == 0 or stream_id <= self._last_peer_stream_id:
            raise RemoteProtocolError(f"unexpected OPEN for stream {stream_id}")
        self._last_peer_stream_id = stream_id
        try:
            kind_byte = payload[0]
            destination, used = Address.decode(payload, 1)
        except RemoteProtocolError as exc:
            if exc.code == "bad_address" and _well_framed_domain_open(payload):
                # A name this side cannot read (not IDNA): refuse that stream, not the whole
                # session - one odd link in a web page must not cut every other stream.
                self._out.append(frame(FrameType.RESET, stream_id,
                                       bytes((ResetCode.REFUSED_DESTINATION,))))
                return
            raise RemoteProtocolError("malformed OPEN") from exc
        except (IndexError, ValueError, NeedMoreData) as exc:
            raise RemoteProtocolError("malformed OPEN") from exc
        if used != len(payload):
            raise RemoteProtocolError("trailing bytes in OPEN")
        try:
            kind = StreamKind(kind_byte)
        except ValueError:
            # A kind of a newer client's: refuse that stream, not the session (the client
            # learns what this server reads from its FEATURE_* announcement).
            self._out.append(frame(FrameType.RESET, stream_id,
                                   bytes((ResetCode.REFUSED_DESTINATION,))))
            return
        if len(self._streams) >= self.config.max_streams:
            self._out.append(frame(FrameType.RESET, stream_id,
                                   bytes((ResetCode.TOO_MANY_STREAMS,))))
            return
        self._streams[stream_id] = _Stream(stream_id, kind,
                                           shaped_writes=self.config.shaping.stream_writes)
        events.append(StreamOpened(stream_id, kind, destination))

    def _on_fin(self, stream_id: int, events: list[Event], striped_end: bool = False) -> None:
        stream = self._known(stream_id)
        if stream is None:
            return
        if stream.reassembly is not None and not striped_end:
            raise RemoteProtocolError(f"FIN on striped stream {stream_id}")
        try:
            stream.state = _AFTER_RECV_FIN[stream.state]
        except KeyError:
            raise RemoteProtocolError(f"second FIN on stream {stream_id}") from None
        if stream.state is StreamState.CLOSED:
            del self._streams[stream_id]
        events.append(StreamEnded(stream_id))

    def _on_window(self, stream_id: int, increment: int, events: list[Event]) -> None:
        if increment == 0:
            raise RemoteProtocolError("zero WINDOW increment")
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise RemoteProtocolError("session window overflow", code="flow_control")
            for blocked in list(self._blocked.values()):
                self._flush(blocked, events)
            return
        stream = self._known(stream_id)
        if stream is None:
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise RemoteProtocolError("stream window overflow", code="flow_control")
        if stream_id in self._blocked:
            self._flush(stream, events)

    def _on_datagram(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        stream = self._known(stream_id)
        if stream is None:
            return
        if stream.kind is StreamKind.IP:
            events.append(PacketReceived(stream_id, payload))  # no address: the packet has it
            return
        if stream.kind is not StreamKind.UDP:
            raise RemoteProtocolError(f"DATAGRAM on TCP stream {stream_id}")
        try:
            address, used = Address.decode(payload)
        except (ValueError, NeedMoreData) as exc:
            raise RemoteProtocolError("malformed DATAGRAM address") from exc
        events.append(DatagramReceived(stream_id, address, payload[used:]))

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("session is closed", code="session_closed")

    def _sendable(self, stream_id: int) -> _Stream:
        self._check_open()
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _MAY_SEND or stream.fin_pending:
            raise LocalProtocolError(f"stream {stream_id} cannot send", code="stream_closed")
        return stream

    def _note_stream_write(self, stream: _Stream) -> None:
        if stream.shaped_writes:
            stream.shaped_writes -= 1
            self._shape_this_write = True

    def _emit_data(self, stream: _Stream, data: bytes | bytearray | memoryview) -> None:
        self._note_stream_write(stream)
        size = len(data)
        stream.send_window -= size
        self._send_window -= size
        offset = stream.sent
        stream.sent += size
        if stream.striped:
            assert self.member is not None  # striped only in a pool
            self.send_chunk(self.member, stream.stream_id, offset, bytes(data))
            return
        out = self._out
        stream_id = stream.stream_id
        if size <= MAX_DATA_PAYLOAD:
            out.append(pack_header(FrameType.DATA, stream_id, size))
            out.append(bytes(data) if isinstance(data, bytearray) else data)
            return
        view = memoryview(data)
        for start in range(0, size, MAX_DATA_PAYLOAD):
            chunk = view[start : start + MAX_DATA_PAYLOAD]
            out.append(pack_header(FrameType.DATA, stream_id, len(chunk)))
            out.append(bytes(chunk))

    def _emit_fin(self, stream: _Stream) -> None:
        stream.state = _AFTER_SEND_FIN[stream.state]
        if stream.striped:
            assert self.member is not None  # striped only in a pool
            self.send_chunk(self.member, stream.stream_id, stream.sent, b"", fin=True)
        else:
            self._out.append(frame(FrameType.FIN, stream.stream_id))
        if stream.state is StreamState.CLOSED:
            del self._streams[stream.stream_id]

    def _still_open(self, stream: _Stream) -> bool:
        """False (and remember to say StreamWritable later) when the credit is used up."""
        if stream.send_window > 0 and self._send_window > 0:
            return True
        self._blocked[stream.stream_id] = stream
        return False

    def _flush(self, stream: _Stream, events: list[Event]) -> None:
        credit = min(stream.send_window, self._send_window)
        if not stream.pending:
            if credit > 0 and self._blocked.pop(stream.stream_id, None) is not None:
                events.append(StreamWritable(stream.stream_id))
            return
        allowed = min(credit, len(stream.pending))
        if allowed <= 0:
            return
        self._emit_data(stream, stream.pending[:allowed])
        del stream.pending[:allowed]
        if stream.pending:
            return
        self._blocked.pop(stream.stream_id, None)
        if stream.fin_pending:
            stream.fin_pending = False
            self._emit_fin(stream)
        else:
            events.append(StreamWritable(stream.stream_id))

    def _grant(self, stream_id: int, amount: int) -> None:
        if not self._closed:
            self._out.append(frame(FrameType.WINDOW, stream_id, pack_u32(amount)))

    def _shut(self) -> None:
        self._closed = True
        self._pong_owed = None  # nothing follows CLOSE
        self._streams.clear()
        self._blocked.clear()


def _reset_code(value: int) -> ResetCode:
    try:
        return ResetCode(value)
    except ValueError:
        return ResetCode.INTERNAL_ERROR


def _close_code(value: int) -> CloseCode:
    try:
        return CloseCode(value)
    except ValueError:
        return CloseCode.INTERNAL_ERROR


def _well_framed_domain_open(payload: bytes) -> bool:
    """An OPEN payload (kind, ATYP_DOMAIN, length, name, port) whose lengths add up."""
    return (len(payload) >= 3 and payload[1] == ATYP_DOMAIN
            and len(payload) == 1 + 2 + payload[2] + 2)
