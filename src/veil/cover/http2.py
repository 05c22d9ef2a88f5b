"""The built-in cover site over HTTP/2: what nginx 1.22.1 (``listen 443 ssl http2``) does.

A client that negotiated ``h2`` by ALPN and is not a tunnel gets this instead of the HTTP/1.1
emulation of :mod:`veil.cover.http1`. Files, status codes, error pages and header values come
from the same :class:`~veil.cover.site.CoverSite`; this module adds nginx's HTTP/2 framing
around them, sans-IO (its asyncio adapter is :class:`~veil.cover.adapters.H2CoverProtocol`),
every detail measured against the real nginx 1.22.1 on loopback
(``tests/integration/test_cover_h2_vs_nginx.py``):

* Server preface: SETTINGS (MAX_CONCURRENT_STREAMS 128, INITIAL_WINDOW_SIZE 65536,
  MAX_FRAME_SIZE 16777215, in that order) and a connection WINDOW_UPDATE of 2147418112,
  queued when the connection starts and written with whatever the first read produces.
* Response headers are HPACK-encoded as nginx encodes them, byte for byte: ``:status`` from
  the static table (or a literal for codes it lacks), ``server``, ``date``, ``content-type``,
  ``content-length`` and ``last-modified`` as literals *with* incremental indexing of a
  static name (nginx never refers back to them), other headers as literals without indexing
  with a new, Huffman-coded name; Huffman coding only where it is shorter; a dynamic table
  size update (0) in the first header block after the client announced a table size.
* The same TLS record boundaries: control frames and the first HEADERS frame behind them in
  one write, the response body in the next; HEADERS and DATA together when nothing was queued
  before them; RST_STREAM(NO_ERROR) in a write of its own after answering a request whose
  body was still coming.
* Limits: at most 128 streams open and 256 new ones per read, the rest refused with
  RST_STREAM(REFUSED_STREAM), and after 129 refusals GOAWAY(NO_ERROR); the 1000th request
  (keepalive_requests) is answered behind a GOAWAY(NO_ERROR) naming it, later HEADERS are
  skipped unanswered, and the connection closes (lingering) once its answers are out.
* Flood: more than :data:`MAX_UNSENT_FRAMES` control frames unsent (the adapter says how
  many of its earlier writes still wait in :attr:`H2CoverConnection.unsent_frames`) closes
  the connection at once, nothing more written.
* Errors: GOAWAY(PROTOCOL_ERROR / FRAME_SIZE_ERROR / COMPRESSION_ERROR / ENHANCE_YOUR_CALM)
  with the last stream id, then FIN without close_notify and a lingering close; a bad
  header name draws RST_STREAM(PROTOCOL_ERROR); a bad pseudo-header a 400 page.
* Timeouts: ``client_header_timeout`` from the accept until the first request (not reset by
  PING or SETTINGS), ``keepalive_timeout`` after a request, ``client_header_timeout`` again
  while a frame is incomplete; then GOAWAY (NO_ERROR, or PROTOCOL_ERROR mid-frame) and a
  close without close_notify.

What is not emulated, and why, is in ``docs/cover-h2.md``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

import hpack
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

from veil.cover.nginx import (
    ALPHA,
    CLIENT_HEADER_TIMEOUT,
    CLIENT_MAX_BODY_SIZE,
    DIGITS,
    KEEPALIVE_REQUESTS,
    KEEPALIVE_TIMEOUT,
    LARGE_HEADER_BUFFER_SIZE,
    LARGE_HEADER_BUFFERS,
    LINGERING_TIME,
    LINGERING_TIMEOUT,
    MAX_OFF_T,
    METHOD_CHARS,
    SCHEMA_CHARS,
    UNIQUE_HEADERS,
    pads_error_pages,
)
from veil.cover.site import CoverSite, Request
from veil.cover.uri import parse_complex_uri, validate_host

__all__ = ["SERVER_PREFACE", "H2CloseAction", "H2CoverConnection"]

# -- the protocol's numbers (RFC 9113) and nginx 1.22's settings --------------------------------

CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = 9
(DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE,
 CONTINUATION) = range(10)
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS, FLAG_PADDED, FLAG_PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x9, 0xB
(SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS,
 SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE) = range(1, 6)

#: http2_max_concurrent_streams 128.
MAX_CONCURRENT_STREAMS = 128
#: New streams nginx opens in one read event (2 x concurrent streams): the rest of the read's
#: HEADERS get RST_STREAM(REFUSED_STREAM) - a burst of requests costs one read's worth.
NEW_STREAMS_PER_READ = 2 * MAX_CONCURRENT_STREAMS
#: Refused streams a connection may draw (max(concurrent streams, 100)); one more ends it
#: with GOAWAY(NO_ERROR), so a client that keeps bursting is cut off.
MAX_REFUSED_STREAMS = max(MAX_CONCURRENT_STREAMS, 100)
#: http2_preread_size 64k: nginx's INITIAL_WINDOW_SIZE.
PREREAD_SIZE = 65536
#: nginx's frames waiting to be written: one more is "http2 flood detected" and the connection
#: closes at once, without GOAWAY, its unsent output dropped (a client that sends PINGs and
#: never reads is cut off after this many answers wait, instead of growing the server).
#: Measured: the preface, the SETTINGS ACK and 9,998 PING ACKs in one read are answered; one
#: more PING is not.
MAX_UNSENT_FRAMES = 10001
#: NGX_HTTP_V2_MAX_FRAME_SIZE: what nginx announces it accepts.
NGINX_MAX_FRAME_SIZE = (1 << 24) - 1
#: NGX_HTTP_V2_MAX_WINDOW and the protocol's default window.
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME_SIZE = 16384
#: http2_chunk_size 8k: response bodies are cut into DATA frames of at most this much.
CHUNK_SIZE = 8192
#: A header field may decode to at most one large header buffer; a header block to all four
#: (nginx 1.22 sizes HTTP/2 headers by large_client_header_buffers).
FIELD_LIMIT = LARGE_HEADER_BUFFER_SIZE
HEADER_LIMIT = LARGE_HEADER_BUFFER_SIZE * LARGE_HEADER_BUFFERS
#: veil's own bound on a buffered frame payload (nginx announces 16 MiB frames but parses
#: header blocks field by field): a larger HEADERS, CONTINUATION or control frame is answered
#: as an oversized header block would be, instead of being held in memory.
MAX_BUFFERED_FRAME = 256 * 1024

_STATUS_INDEX = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}
# Static-table indices of the names nginx writes as "literal with incremental indexing".
_INDEXED_NAMES = {b"server": 54, b"date": 33, b"content-type": 31, b"content-length": 28,
                  b"last-modified": 44}
# Headers nginx's HTTP/2 filter does not send (hop-by-hop in HTTP/1.1).
_DROPPED = frozenset({b"connection", b"keep-alive", b"transfer-encoding"})
# Request headers the site looks at; the others are only validated.
_KEPT = UNIQUE_HEADERS | {b"range", b"user-agent"}
_NAME_OK = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
# Bytes that make a header name malformed (RST_STREAM); others outside _NAME_OK only make
# nginx ignore the field (ignore_invalid_headers).
_NAME_FATAL = frozenset(range(0x21)) | frozenset(range(0x41, 0x5B)) | {0x3A, 0x7F}

_INT_OCTETS = 4  # NGX_HTTP_V2_INT_OCTETS: the longest HPACK integer nginx reads

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + stream_id.to_bytes(4, "big") + payload)


#: nginx's first words on every h2 connection (ngx_http_v2_init): 40 bytes.
SERVER_PREFACE = (
    frame(SETTINGS, 0, 0, struct.pack(">HIHIHI", SETTINGS_MAX_CONCURRENT_STREAMS,
                                      MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE,
                                      PREREAD_SIZE, SETTINGS_MAX_FRAME_SIZE,
                                      NGINX_MAX_FRAME_SIZE))
    + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
)


# -- HPACK as nginx writes it ------------------------------------------------------------------


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1 integer with ``first``'s high bits as the representation's pattern."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    """ngx_http_v2_string_encode: Huffman when that is shorter, else the raw bytes."""
    coded = _HUFFMAN.encode(value)
    if len(coded) < len(value):
        return _integer(len(coded), 7, 0x80) + coded
    return _integer(len(value), 7, 0) + value


def encode_response_headers(status: int, headers: list[tuple[bytes, bytes]], *,
                            table_update: bool) -> bytes:
    """The header block nginx's ngx_http_v2_header_filter writes for this response."""
    out = bytearray(b"\x20" if table_update else b"")  # dynamic table size update to 0
    index = _STATUS_INDEX.get(status)
    if index is not None:
        out.append(0x80 | index)
    else:
        out += b"\x48\x03" + b"%03d" % status  # literal, incremental indexing, name :status
    for name, value in headers:
        name_index = _INDEXED_NAMES.get(name)
        if name_index is not None:
            out += _integer(name_index, 6, 0x40)
            # content-length is written with ngx_sprintf, never Huffman-coded
            out += (_integer(len(value), 7, 0) + value if name == b"content-length"
                    else _string(value))
        else:
            out += b"\x00" + _string(name) + _string(value)
    return bytes(out)


class _BlockLimits:
    """nginx's size limits on the literals of an HPACK block, applied as the block arrives.

    nginx sizes a literal by its longest possible decoding (a Huffman string of n bytes may
    decode to n * 8 / 5 bytes) as soon as it reads the length prefix, and refuses one over a
    large header buffer, or a block whose literals add up to more than all four buffers:
    GOAWAY(ENHANCE_YOUR_CALM). Fed piece by piece, it walks each representation once (a
    string is skipped, not read), so a block trickled in byte by byte costs no more.
    """

    def __init__(self) -> None:
        self._rest = bytearray()  # from the first representation not yet complete
        self._used = 0
        self._total = 0

    def feed(self, more: bytes | bytearray | memoryview) -> bool:
        """False once a limit is exceeded."""
        self._rest += more
        self._total += len(more)
        if self._total > MAX_BUFFERED_FRAME:
            return False
        block = self._rest
        p = 0
        while p < len(block):
            literal, got = _read_head(block, p)
            if got is None:
                break
            if not literal:
                p = got[1]
                continue
            name_index, q = got
            used = self._used
            for _ in range(2 if name_index == 0 else 1):
                got = _read_int(block, q, 7) if q < len(block) else None
                if got is None:
                    q = len(block) + 1
                    break
                size = got[0] * 8 // 5 if block[q] & 0x80 else got[0]
                used += size
                if size > FIELD_LIMIT or used > HEADER_LIMIT:
                    return False
                q = got[1] + got[0]
            if q > len(block):
                break  # the rest of this representation is still to come
            p, self._used = q, used
        del block[:p]
        return True


def _representations(block: bytes, *, more: bool) -> list[int]:
    """Where each whole HPACK representation of ``block`` ends, in order (a field cut off
    at the block's end is left out).

    ``more``: the block continues in a CONTINUATION frame. nginx then stops where fewer
    than 4 bytes (NGX_HTTP_V2_INT_OCTETS) are left before a representation or a string
    length, to join them with the next frame's first.
    """
    ends: list[int] = []
    p = 0
    while p < len(block):
        if more and len(block) - p < _INT_OCTETS:
            break
        literal, got = _read_head(block, p)
        if got is None:
            break
        name_index, p = got
        if literal:
            for _ in range(2 if name_index == 0 else 1):
                if more and len(block) - p < _INT_OCTETS:
                    return ends
                got = _read_int(block, p, 7) if p < len(block) else None
                if got is None:
                    return ends
                p = got[1] + got[0]
            if p > len(block):
                break
        ends.append(p)
    return ends


def _read_head(block: bytes | bytearray, p: int) -> tuple[bool, tuple[int, int] | None]:
    """The integer that opens the HPACK representation at ``p``: whether it is a literal
    field, and (value, next position) or None if the integer is not complete yet. A
    literal's value is its name index (0: the name follows as a string)."""
    first = block[p]
    if first & 0x80 or first & 0xE0 == 0x20:  # indexed field, table size update
        return False, _read_int(block, p, 7 if first & 0x80 else 5)
    return True, _read_int(block, p, 6 if first & 0x40 else 4)


def _read_int(data: bytes | bytearray, p: int, prefix_bits: int) -> tuple[int, int] | None:
    """(value, next position) or None if the integer is not complete yet."""
    limit = (1 << prefix_bits) - 1
    value = data[p] & limit
    p += 1
    if value < limit:
        return value, p
    shift = 0
    while p < len(data):
        byte = data[p]
        p += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, p
        if shift > 28:  # longer than any length nginx accepts: let the limit refuse it
            return 1 << 30, p
    return None


# -- the connection (sans-IO) ---------------------------------------------------------------------


class H2CloseAction(enum.Enum):
    """What the transport does once the writes are out. Under TLS nginx never sends
    close_notify on an HTTP/2 connection it ends (measured)."""

    NONE = "none"
    QUIET = "quiet"    # close: FIN without close_notify (a later client byte draws RST)
    #: close at once, what waits unsent dropped: a flood (nginx closes the socket with the
    #: client's unread bytes in it, which draws RST; waiting to send first would wait for a
    #: client that reads nothing)
    DROP = "drop"
    LINGER = "linger"  # FIN without close_notify, then read and drop until quiet, then close


class _Flood(Exception):
    """More frames wait to be written than nginx allows."""


class _ConnectionError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class _Stream:
    """A response still being sent (its body waits for flow-control credit)."""

    stream_id: int
    window: int
    body: bytes
    #: offsets where a DATA frame must begin (nginx's buffer boundaries), ascending
    cuts: list[int]
    sent: int = 0
    reset_after: bool = False  # the client had not ended its side: RST_STREAM(NO_ERROR)


class H2CoverConnection:
    """One HTTP/2 connection to the emulated nginx, sans-IO.

    Feed it :meth:`receive_data` / :meth:`receive_eof` / :meth:`handle_timer`; after each
    call take :meth:`writes` (each element one transport write, so TLS records fall where
    nginx's do) and look at :attr:`close_action` and :meth:`get_timer`. ``started_at`` is when
    the TCP connection was accepted: the first timeout counts from there, as in nginx.
    ``preface_sent``: :data:`SERVER_PREFACE` is already on the wire. ``now`` is the only clock
    it knows (it reads none); ``now + wall_offset`` is the Unix time its date headers show.
    """

    def __init__(self, site: CoverSite, *, now: float, started_at: float | None = None,
                 header_timeout: float = CLIENT_HEADER_TIMEOUT,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME, preface_sent: bool = False,
                 wall_offset: float = 0.0) -> None:
        self._site = site
        self._wall_offset = wall_offset
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._lingering_timeout = lingering_timeout
        self._lingering_time = lingering_time
        started = now if started_at is None else started_at
        self._deadline: float | None = started + header_timeout
        self._linger_end = 0.0
        self.close_action = H2CloseAction.NONE
        self._closed = False
        # nginx queues its preface when the connection starts; a caller that already wrote
        # SERVER_PREFACE (right after the handshake, as nginx does) says so
        self._queue = bytearray(b"" if preface_sent else SERVER_PREFACE)
        self._urgent = not preface_sent  # a control frame is queued: write it at once
        #: Frames written but not yet taken by the socket (the adapter keeps it current)
        #: plus the control frames queued since: over MAX_UNSENT_FRAMES is a flood.
        self.unsent_frames = 0 if preface_sent else 2
        self._recv_window = MAX_WINDOW  # what the preface's WINDOW_UPDATE made it
        self._writes: list[bytes] = []
        self._buf = bytearray()
        self._preface_left = len(CLIENT_PREFACE)
        self._incomplete = False
        self._skip = 0  # bytes of a DATA or unknown frame still to drop
        self._decoder = hpack.Decoder()
        # our own limits apply (_BlockLimits); the decoder's must not refuse first
        self._decoder.max_header_list_size = 1 << 30
        # A header block being read: bytes not decoded yet (None: no block is open), its
        # size limits, and the request its fields make up.
        self._block: bytearray | None = None
        self._limits = _BlockLimits()
        self._fed = 0  # payload bytes of the HEADERS/CONTINUATION frame arriving, sized
        self._req = _Pending(False)
        self._req_alive = False
        self._headers_span: tuple[int, int] | None = None  # of the HEADERS frame arriving
        self._block_stream = 0
        self._last_sid = 0
        self._requests = 0
        self._new_streams = 0  # opened in this read (NEW_STREAMS_PER_READ)
        self._refused = 0  # streams refused on this connection (MAX_REFUSED_STREAMS)
        self._goaway = False  # GOAWAY sent after the last request nginx allows
        self._table_update = False
        self._peer_frame_size = DEFAULT_FRAME_SIZE
        self._peer_initial_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        self._streams: dict[int, _Stream] = {}
        self._idle_timer_set = True  # the header timer set at the accept

    # -- public API ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def writes(self) -> list[bytes]:
        """The writes to make now, in order (each one becomes one or more TLS records)."""
        self._flush()
        out, self._writes = self._writes, []
        return out

    def get_timer(self) -> float | None:
        return None if self._closed and self.close_action is not H2CloseAction.LINGER \
            else self._deadline

    def receive_data(self, data: bytes, now: float) -> None:
        if self.close_action is H2CloseAction.LINGER:
            self._deadline = min(now + self._lingering_timeout, self._linger_end)
            return
        if self._closed:
            return
        self._buf += data
        self._new_streams = 0  # ngx_http_v2_read_handler: one read event
        try:
            self._process(now)
        except _Flood:
            self._writes.clear()
            self._queue.clear()
            self._close(H2CloseAction.DROP)
            return
        except _ConnectionError as exc:
            self._fail(exc.code, now)
            return
        self._flush()
        self._end_if_done(now)
        self._arm_idle(now)

    def receive_eof(self, now: float) -> None:
        """The client closed its side: nginx closes too, without a word."""
        if self._closed:
            if self.close_action is H2CloseAction.LINGER:
                self._deadline = None
                self.close_action = H2CloseAction.QUIET
            return
        self._close(H2CloseAction.QUIET)

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if self._closed:  # the lingering close is over
            self._deadline = None
            self.close_action = H2CloseAction.QUIET
            return
        # ngx_http_v2_read_handler times out reading (a frame begun) with PROTOCOL_ERROR,
        # the idle handler with NO_ERROR; then the socket closes (c->timedout: no
        # close_notify, no lingering).
        code = PROTOCOL_ERROR if self._incomplete else NO_ERROR
        self._queue += frame(GOAWAY, 0, 0, struct.pack(">II", self._last_sid, code))
        self._flush()
        self._close(H2CloseAction.QUIET)

    # -- input -----------------------------------------------------------------------------

    def _process(self, now: float) -> None:
        buf = self._buf
        pos = 0
        self._incomplete = False
        if self._preface_left:
            # nginx compares the first 16 bytes, then the last 8, each once it has them all
            have = len(CLIENT_PREFACE) - self._preface_left
            part = 16 if have < 16 else len(CLIENT_PREFACE)
            while self._preface_left:
                if len(buf) < part - have:
                    self._incomplete = True
                    return
                if bytes(buf[:part - have]) != CLIENT_PREFACE[have:part]:
                    raise _ConnectionError(PROTOCOL_ERROR)
                del buf[:part - have]
                have = part
                self._preface_left = len(CLIENT_PREFACE) - have
                part = len(CLIENT_PREFACE)
            if not buf:
                # ngx_http_v2_state_preface_end goes straight to state_head, which saves
                # an empty state: nginx counts this as a frame begun (measured: a silent
                # client after the preface gets GOAWAY(PROTOCOL_ERROR) at the timeout)
                self._incomplete = True
                return
        while True:
            if self._skip:
                take = min(self._skip, len(buf) - pos)
                self._skip -= take
                pos += take
                if self._skip:
                    self._incomplete = True
                    break
            if len(buf) - pos < _FRAME_HEADER:
                self._incomplete = len(buf) > pos
                break
            length = int.from_bytes(buf[pos:pos + 3], "big")
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if self._block is not None and kind != CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR)
            if kind == DATA:
                if flags & FLAG_PADDED:
                    if length == 0:
                        raise _ConnectionError(FRAME_SIZE_ERROR)
                    if len(buf) - pos < _FRAME_HEADER + 1:
                        self._incomplete = True
                        break
                    if buf[pos + _FRAME_HEADER] >= length:
                        raise _ConnectionError(PROTOCOL_ERROR)
                self._on_data(sid, length)
            if kind == DATA or kind > CONTINUATION:
                pos += _FRAME_HEADER
                self._skip = length
                continue
            if length > MAX_BUFFERED_FRAME:
                raise _ConnectionError(ENHANCE_YOUR_CALM)
            have = min(len(buf) - pos - _FRAME_HEADER, length)
            if kind == HEADERS and self._goaway and self._headers_span is None:
                # after its GOAWAY nginx skips HEADERS unread (their HPACK too), once it
                # has checked the frame is not too short for its flags
                size = (1 if flags & FLAG_PADDED else 0) + (5 if flags & FLAG_PRIORITY else 0)
                if length <= size:
                    raise _ConnectionError(FRAME_SIZE_ERROR)
                pos += _FRAME_HEADER
                self._skip = length
                continue
            if kind == HEADERS and self._headers_span is None:
                head = bytes(buf[pos + _FRAME_HEADER:pos + _FRAME_HEADER + min(have, 6)])
                self._headers_span = self._headers_prefix(flags, sid, length, head)
                if self._headers_span is None:
                    self._incomplete = True
                    break
                self._limits = _BlockLimits()
            if kind == CONTINUATION and (self._block is None or sid != self._block_stream):
                raise _ConnectionError(PROTOCOL_ERROR)
            if kind in (HEADERS, CONTINUATION):
                # header blocks are sized as they arrive, as nginx parses them
                low, high = self._headers_span if self._headers_span else (0, length)
                start, end = max(low, self._fed), min(high, have)
                if end > start:
                    at = pos + _FRAME_HEADER
                    if not self._limits.feed(memoryview(buf)[at + start:at + end]):
                        raise _ConnectionError(ENHANCE_YOUR_CALM)
                    self._fed = end
            if len(buf) - pos < _FRAME_HEADER + length:
                self._incomplete = True
                break
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += _FRAME_HEADER + length
            self._fed = 0
            self._on_frame(kind, flags, sid, payload, now)
            if self._closed:
                break
        del buf[:pos]

    def _headers_prefix(self, flags: int, sid: int, length: int,
                        available: bytes) -> tuple[int, int] | None:
        """ngx_http_v2_state_headers up to the header block, in its order of checks: the
        (start, end) of the block in the payload, or None until the prefix is here."""
        size = (1 if flags & FLAG_PADDED else 0) + (5 if flags & FLAG_PRIORITY else 0)
        if length <= size:  # too short, or an empty header block
            raise _ConnectionError(FRAME_SIZE_ERROR)
        if len(available) < size:
            return None
        padding = available[0] if flags & FLAG_PADDED else 0
        if padding > length - size:
            raise _ConnectionError(PROTOCOL_ERROR)
        depend = -1
        if flags & FLAG_PRIORITY:
            start = size - 5
            depend = int.from_bytes(available[start:start + 4], "big") & 0x7FFFFFFF
        if sid % 2 == 0 or sid <= self._last_sid or depend == sid:
            raise _ConnectionError(PROTOCOL_ERROR)
        self._last_sid = sid
        if length - size - padding == 0:  # padding took all: an empty block, but later
            raise _ConnectionError(FRAME_SIZE_ERROR)
        return size, length - padding

    def _on_data(self, sid: int, length: int) -> None:
        # Request bodies are never read: nginx answers on HEADERS and resets the stream; it
        # only keeps the connection's receive window open.
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR)
        if length > self._recv_window:
            raise _ConnectionError(FLOW_CONTROL_ERROR)
        self._recv_window -= length
        if self._recv_window < MAX_WINDOW // 4:
            self._control(frame(WINDOW_UPDATE, 0, 0,
                                struct.pack(">I", MAX_WINDOW - self._recv_window)))
            self._recv_window = MAX_WINDOW

    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes, now: float) -> None:
        if kind == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif kind == PING:
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR)
            if sid:
                raise _ConnectionError(PROTOCOL_ERROR)
            if not flags & FLAG_ACK:
                self._control(frame(PING, FLAG_ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif kind == RST_STREAM:
            if len(payload) != 4:
                raise _ConnectionError(FRAME_SIZE_ERROR)
            if sid == 0:
                raise _ConnectionError(PROTOCOL_ERROR)
            self._streams.pop(sid, None)
        elif kind == PRIORITY:
            if len(payload) != 5:
                raise _ConnectionError(FRAME_SIZE_ERROR)
            if sid == 0 or int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
                raise _ConnectionError(PROTOCOL_ERROR)
        elif kind == GOAWAY:
            if len(payload) < 8:
                raise _ConnectionError(FRAME_SIZE_ERROR)
            if sid:
                raise _ConnectionError(PROTOCOL_ERROR)
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR)
        elif kind == HEADERS:
            self._on_headers(flags, sid, payload, now)
        elif kind == CONTINUATION:
            if self._block is None or sid != self._block_stream:
                raise _ConnectionError(PROTOCOL_ERROR)
            self._block += payload
            self._decode_block(now, final=bool(flags & FLAG_END_HEADERS))

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR)
        if flags == FLAG_ACK:  # nginx compares the whole flags byte here (measured)
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR)
        for i in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HI", payload, i)
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR)
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.window += delta
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= NGINX_MAX_FRAME_SIZE:
                    raise _ConnectionError(PROTOCOL_ERROR)
                self._peer_frame_size = value
            elif ident == SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(PROTOCOL_ERROR)
            elif ident == SETTINGS_HEADER_TABLE_SIZE:
                self._table_update = True
        self._control(frame(SETTINGS, FLAG_ACK, 0))
        self._send_pending()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if increment == 0:  # on any stream, open or not (measured)
            raise _ConnectionError(PROTOCOL_ERROR)
        if sid == 0:
            if self._send_window + increment > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR)
            self._send_window += increment
        else:
            stream = self._streams.get(sid)
            if stream is None:
                return
            if stream.window + increment > MAX_WINDOW:
                del self._streams[sid]
                self._reset(sid, FLOW_CONTROL_ERROR)
                return
            stream.window += increment
        self._send_pending()

    def _on_headers(self, flags: int, sid: int, payload: bytes, now: float) -> None:
        assert self._headers_span is not None  # checked by _headers_prefix
        start, end = self._headers_span
        self._headers_span = None
        self._block = bytearray(payload[start:end])
        self._block_stream = sid
        self._req = _Pending(bool(flags & FLAG_END_STREAM))
        self._req_alive = True
        refuse = len(self._streams) >= MAX_CONCURRENT_STREAMS
        if not refuse:
            refuse = self._new_streams >= NEW_STREAMS_PER_READ
            self._new_streams += 1
        if refuse:
            if self._refused > MAX_REFUSED_STREAMS:
                raise _ConnectionError(NO_ERROR)
            self._refused += 1
            self._reset(sid, REFUSED_STREAM)  # its fields are still decoded, for HPACK
            self._req_alive = False
        else:
            self._requests += 1
            if self._requests >= KEEPALIVE_REQUESTS:
                # ngx_http_v2_state_headers: this request is served, behind the GOAWAY
                self._goaway = True
                self._control(frame(GOAWAY, 0, 0, struct.pack(">II", sid, NO_ERROR)))
        self._decode_block(now, final=bool(flags & FLAG_END_HEADERS))

    def _decode_block(self, now: float, *, final: bool) -> None:
        """Decode the whole fields of the block so far and act on each, as nginx does frame
        by frame: a request may be answered (400) or reset before a later field's bad index
        or Huffman code (COMPRESSION_ERROR) ends the connection, or a field cut off by
        END_HEADERS (FRAME_SIZE_ERROR). One representation per decode() call also lets a
        table size update stand anywhere, as nginx allows (hpack wants it first)."""
        block = self._block
        assert block is not None
        start = 0
        for end in _representations(bytes(block), more=not final):
            try:
                fields = self._decoder.decode(bytes(block[start:end]), raw=True)
            except hpack.HPACKError as exc:
                raise _ConnectionError(COMPRESSION_ERROR) from exc
            start = end
            for name, value in fields:
                if not name:  # "client sent zero header name length"
                    raise _ConnectionError(PROTOCOL_ERROR)
                if self._req_alive:
                    self._req_alive = self._field(self._block_stream, self._req, name, value,
                                                  now)
        del block[:start]
        literal, got = _read_head(block, 0) if block else (False, None)
        if literal and got is not None:
            # a literal whose value is still to come: nginx looks its name up at once
            table = self._decoder.header_table
            if got[0] > table.STATIC_TABLE_LENGTH + len(table.dynamic_entries):
                raise _ConnectionError(COMPRESSION_ERROR)
        if not final:
            return
        if block:
            raise _ConnectionError(FRAME_SIZE_ERROR)
        self._block = None
        if self._req_alive:
            self._req_alive = False
            self._request(self._block_stream, self._req, now)

    # -- requests --------------------------------------------------------------------------

    def _request(self, sid: int, req: _Pending, now: float) -> None:
        """All fields are in and none was refused: the checks nginx makes on a whole request
        header, then the site's answer."""
        status = req.final_status()
        if status:
            self._respond(sid, self._error(status, req, now), req.end_stream)
            return
        assert req.method is not None and req.uri is not None
        request = Request(req.method, req.uri, 2000, req.headers, req.content_length, False,
                          True, req.padding, req.path.partition(b"?")[2] if req.path else b"")
        answer = self._site.respond(request, date=now + self._wall_offset)
        self._respond(sid, answer.data, req.end_stream)

    def _field(self, sid: int, req: _Pending, name: bytes, value: bytes, now: float) -> bool:
        """One header field of a live request; False once the stream is answered."""
        pseudo = name[0] == 0x3A
        invalid = False
        for c in name[1:] if pseudo else name:  # ngx_http_v2_validate_header
            if c in _NAME_OK:
                continue
            if c in _NAME_FATAL:
                self._reset(sid, PROTOCOL_ERROR)
                return False
            invalid = True
        if any(c in b"\0\r\n" for c in value):
            self._reset(sid, PROTOCOL_ERROR)
            return False
        status = req.pseudo(name, value) if pseudo else 0 if invalid else req.header(name, value)
        if status:
            self._respond(sid, self._error(status, req, now), req.end_stream)
            return False
        return True

    def _error(self, status: int, req: _Pending, now: float) -> bytes:
        return self._site.error(status, date=now + self._wall_offset,
                                head=req.method == b"HEAD", msie_padding=req.padding)

    def _reset(self, sid: int, code: int) -> None:
        self._control(frame(RST_STREAM, 0, sid, struct.pack(">I", code)))

    def _respond(self, sid: int, http1: bytes, end_stream: bool) -> None:
        """Send the site's HTTP/1.1 answer as nginx's HTTP/2 filter would."""
        head, _, body = http1.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            lname = name.lower()
            if lname not in _DROPPED:
                headers.append((lname, value))
        block = encode_response_headers(status, headers, table_update=self._table_update)
        self._table_update = False
        flags = FLAG_END_HEADERS | (0 if body else FLAG_END_STREAM)
        headers_frame = frame(HEADERS, flags, sid, block)
        # nginx's SSL layer collects frames in its buffer and writes them out when it meets
        # one marked "flush": control frames and DATA are, HEADERS are not. So a HEADERS
        # frame goes out with the control frames queued before it, or else with its DATA.
        self._queue += headers_frame
        if self._urgent:
            self._flush()
        ctype = dict(headers).get(b"content-type", b"")
        cuts = _multipart_cuts(body, ctype) if status == 206 else []
        stream = _Stream(sid, self._peer_initial_window, body, cuts, reset_after=not end_stream)
        if body:
            self._streams[sid] = stream
            self._send_body(stream)
        else:
            self._finish(stream)

    def _send_pending(self) -> None:
        for stream in list(self._streams.values()):
            self._send_body(stream)

    def _send_body(self, stream: _Stream) -> None:
        body = stream.body
        while stream.sent < len(body):
            while stream.cuts and stream.cuts[0] <= stream.sent:
                del stream.cuts[0]
            end = stream.cuts[0] if stream.cuts else len(body)
            size = min(end - stream.sent, CHUNK_SIZE, self._peer_frame_size,
                       stream.window, self._send_window)
            if size <= 0:
                break
            chunk = body[stream.sent:stream.sent + size]
            stream.sent += size
            stream.window -= size
            self._send_window -= size
            last = stream.sent == len(body)
            self._queue += frame(DATA, FLAG_END_STREAM if last else 0, stream.stream_id, chunk)
            self._flush()  # each DATA frame is flushed: one write (one TLS record)
        if stream.sent == len(body):
            self._streams.pop(stream.stream_id, None)
            self._finish(stream)

    def _finish(self, stream: _Stream) -> None:
        if stream.reset_after:
            # queued: it goes out with the next flushed frame or at the end of this read
            self._reset(stream.stream_id, NO_ERROR)
        self._idle_timer_set = False  # the keepalive timer starts when the stream closes

    # -- output and closing ----------------------------------------------------------------

    def _control(self, data: bytes) -> None:
        self.unsent_frames += 1
        if self.unsent_frames > MAX_UNSENT_FRAMES:
            raise _Flood
        self._queue += data
        self._urgent = True

    def _flush(self) -> None:
        self._urgent = False
        if self._queue:
            self._writes.append(bytes(self._queue))
            self._queue.clear()

    def _arm_idle(self, now: float) -> None:
        if self._closed:
            return
        if self._incomplete:
            self._deadline = now + self._header_timeout
            self._idle_timer_set = False
        elif self._streams:
            self._deadline = None
            self._idle_timer_set = False
        elif not self._idle_timer_set:
            self._idle_timer_set = True
            self._deadline = now + (self._keepalive_timeout if self._requests
                                    else self._header_timeout)

    def _end_if_done(self, now: float) -> None:
        """ngx_http_v2_handle_connection: after its GOAWAY, nginx closes (lingering) once
        no stream is left."""
        if self._goaway and not self._streams and not self._closed:
            self._closed = True
            self.close_action = H2CloseAction.LINGER
            self._linger_end = now + self._lingering_time
            self._deadline = min(now + self._lingering_timeout, self._linger_end)

    def _fail(self, code: int, now: float) -> None:
        """ngx_http_v2_connection_error: GOAWAY, then a lingering close."""
        self._queue += frame(GOAWAY, 0, 0, struct.pack(">II", self._last_sid, code))
        self._flush()
        self._closed = True
        self._streams.clear()
        self.close_action = H2CloseAction.LINGER
        self._linger_end = now + self._lingering_time
        self._deadline = min(now + self._lingering_timeout, self._linger_end)

    def _close(self, action: H2CloseAction) -> None:
        self._closed = True
        self._deadline = None
        self.close_action = action


@dataclass
class _Pending:
    """What nginx knows of a request while it reads its header fields."""

    end_stream: bool
    method: bytes | None = None
    path: bytes | None = None
    uri: bytes | None = None
    scheme: bytes | None = None
    host: bool = False
    padding: bool = False
    headers: dict[bytes, bytes] = field(default_factory=dict)
    content_length: int = -1

    def pseudo(self, name: bytes, value: bytes) -> int:
        """ngx_http_v2_pseudo_header: 0, or the status to answer with."""
        if name == b":method":
            if self.method is not None or not value or any(c not in METHOD_CHARS
                                                           for c in value):
                return 400
            self.method = value
        elif name == b":path":
            if self.path is not None or not value:
                return 400
            self.path = value
            if value[0] != 0x2F or any(c <= 0x20 or c == 0x7F for c in value):
                return 400  # ngx_http_parse_uri
            self.uri = parse_complex_uri(value)
            if self.uri is None:
                return 400
        elif name == b":scheme":
            if (self.scheme is not None or not value or value[0] not in ALPHA
                    or any(c not in SCHEMA_CHARS for c in value)):
                return 400
            self.scheme = value
        elif name == b":authority":
            return self.header(b"host", value)  # nginx files it as a Host header
        else:
            return 400  # unknown pseudo-header
        return 0

    def header(self, name: bytes, value: bytes) -> int:
        """The header handlers of ngx_http_headers_in: 0, or the status to answer with."""
        if name == b"host":
            if self.host or validate_host(value) is None:
                return 400
            self.host = True
        elif name in UNIQUE_HEADERS:
            if name in self.headers:
                return 400  # "client sent duplicate header line"
            self.headers[name] = value
        elif name in _KEPT and name not in self.headers:
            self.headers[name] = value
            if name == b"user-agent":
                self.padding = pads_error_pages(value)
        return 0

    def final_status(self) -> int:
        """ngx_http_v2_construct_request_line and ngx_http_process_request_header, in
        order, then the body size limit: 0 when the site may answer."""
        if self.method is None or self.scheme is None or self.path is None:
            return 400
        if not self.host:
            return 400
        cl = self.headers.get(b"content-length")
        if cl is not None:
            if not cl or any(c not in DIGITS for c in cl) or int(cl) > MAX_OFF_T:
                return 400
            self.content_length = int(cl)
        te = self.headers.get(b"transfer-encoding")
        if te is not None:
            if te.lower() != b"chunked":
                return 501
            if cl is not None:
                return 400
        if self.method in (b"CONNECT", b"TRACE"):
            return 405
        if self.content_length > 0 and self.end_stream:
            return 400  # "client prematurely closed stream"
        if self.content_length > CLIENT_MAX_BODY_SIZE:
            return 413
        return 0


def _multipart_cuts(body: bytes, content_type: bytes) -> list[int]:
    """Where nginx starts a new DATA frame in a multipart/byteranges body: at the data of
    every range after the first (the range filter's buffers reach the HTTP/2 filter in one
    chain per range, the part header before a range riding with the previous one)."""
    marker = b"boundary="
    at = content_type.find(marker)
    if not content_type.startswith(b"multipart/byteranges") or at < 0:
        return []
    delimiter = b"\r\n--" + content_type[at + len(marker):]
    cuts: list[int] = []
    p = 0
    while body.startswith(delimiter, p) and not body.startswith(b"--", p + len(delimiter)):
        head_end = body.find(b"\r\n\r\n", p + len(delimiter))
        if head_end < 0:
            break
        head = body[p:head_end]
        spec = head[head.rfind(b"bytes ") + 6:].split(b"/")[0].split(b"-")
        data = head_end + 4
        if p:
            cuts.append(data)
        p = data + int(spec[1]) - int(spec[0]) + 1
    return cuts
