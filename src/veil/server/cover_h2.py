"""The built-in cover site over HTTP/2: what nginx 1.22.1 (``listen 443 ssl http2``) does.

A client that negotiated ``h2`` by ALPN and is not a tunnel gets this instead of the HTTP/1.1
emulation of :mod:`veil.server.cover`. Files, status codes, error pages and header values come
from the same :class:`~veil.server.cover.CoverSite`; this module adds nginx's HTTP/2 framing
around them, every detail measured against the real nginx 1.22.1 on loopback
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
* Errors: GOAWAY(PROTOCOL_ERROR / FRAME_SIZE_ERROR / COMPRESSION_ERROR / ENHANCE_YOUR_CALM)
  with the last stream id, then FIN without close_notify and a lingering close; a bad
  header name draws RST_STREAM(PROTOCOL_ERROR); a bad pseudo-header a 400 page.
* Timeouts: ``client_header_timeout`` from the accept until the first request (not reset by
  PING or SETTINGS), ``keepalive_timeout`` after a request, ``client_header_timeout`` again
  while a frame is incomplete; then GOAWAY (NO_ERROR, or PROTOCOL_ERROR mid-frame) and a
  close without close_notify.

The limits of the emulation are in ``docs/cover.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import hpack
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

from veil.server.cover import (
    CLIENT_HEADER_TIMEOUT,
    CLIENT_MAX_BODY_SIZE,
    KEEPALIVE_TIMEOUT,
    LARGE_HEADER_BUFFER_SIZE,
    LARGE_HEADER_BUFFERS,
    LINGERING_TIME,
    LINGERING_TIMEOUT,
    CoverSite,
    Request,
    parse_complex_uri,
    validate_host,
)

__all__ = ["SERVER_PREFACE", "H2CloseAction", "H2CoverConnection", "H2CoverProtocol"]

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
#: http2_preread_size 64k: nginx's INITIAL_WINDOW_SIZE.
PREREAD_SIZE = 65536
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
_UNIQUE = frozenset({b"if-modified-since", b"if-unmodified-since", b"if-match",
                     b"if-none-match", b"content-length", b"content-range", b"if-range",
                     b"transfer-encoding", b"expect", b"authorization"})
_KEPT = _UNIQUE | {b"range", b"user-agent"}
_NAME_OK = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
_METHOD_OK = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
_SCHEME_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.")

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


def _within_limits(block: bytes) -> bool:
    """nginx's size limits on the literals of an HPACK block, applied as it arrives.

    nginx sizes a literal by its longest possible decoding (a Huffman string of n bytes may
    decode to n * 8 / 5 bytes) as soon as it reads the length prefix, and refuses one over a
    large header buffer, or a block whose literals add up to more than all four buffers:
    GOAWAY(ENHANCE_YOUR_CALM). ``block`` may be cut anywhere.
    """
    used = 0
    p = 0
    while p < len(block):
        first = block[p]
        if first & 0x80 or first & 0xE0 == 0x20:  # indexed field, table size update
            got = _read_int(block, p, 7 if first & 0x80 else 5)
            if got is None:
                return True
            p = got[1]
            continue
        got = _read_int(block, p, 6 if first & 0x40 else 4)
        if got is None:
            return True
        name_index, p = got
        for _ in range(2 if name_index == 0 else 1):
            if p >= len(block):
                return True
            huffman = block[p] & 0x80
            got = _read_int(block, p, 7)
            if got is None:
                return True
            length, p = got
            size = length * 8 // 5 if huffman else length
            used += size
            if size > FIELD_LIMIT or used > HEADER_LIMIT:
                return False
            p += length
    return True


def _read_int(data: bytes, p: int, prefix_bits: int) -> tuple[int, int] | None:
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
    LINGER = "linger"  # FIN without close_notify, then read and drop until quiet, then close


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
    sent: int = 0
    reset_after: bool = False  # the client had not ended its side: RST_STREAM(NO_ERROR)


class H2CoverConnection:
    """One HTTP/2 connection to the emulated nginx, sans-IO.

    Feed it :meth:`receive_data` / :meth:`receive_eof` / :meth:`handle_timer`; after each
    call take :meth:`writes` (each element one transport write, so TLS records fall where
    nginx's do) and look at :attr:`close_action` and :meth:`get_timer`. ``started_at`` is when
    the TCP connection was accepted: the first timeout counts from there, as in nginx.
    """

    def __init__(self, site: CoverSite, *, now: float, started_at: float | None = None,
                 header_timeout: float = CLIENT_HEADER_TIMEOUT,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME) -> None:
        self._site = site
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._lingering_timeout = lingering_timeout
        self._lingering_time = lingering_time
        started = now if started_at is None else started_at
        self._deadline: float | None = started + header_timeout
        self._linger_end = 0.0
        self.close_action = H2CloseAction.NONE
        self._closed = False
        self._queue = bytearray(SERVER_PREFACE)
        self._writes: list[bytes] = []
        self._buf = bytearray()
        self._preface_left = len(CLIENT_PREFACE)
        self._incomplete = False
        self._skip = 0  # bytes of a DATA or unknown frame still to drop
        self._decoder = hpack.Decoder()
        # our own limits apply (_BlockLimits); the decoder's must not refuse first
        self._decoder.max_header_list_size = 1 << 30
        self._block: bytearray | None = None  # a header block waiting for CONTINUATION
        self._block_stream = 0
        self._block_end_stream = False
        self._block_refused = False
        self._last_sid = 0
        self._requests = 0
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
        try:
            self._process(now)
        except _ConnectionError as exc:
            self._fail(exc.code, now)
            return
        self._flush()
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
            if kind == DATA or kind > CONTINUATION:
                pos += _FRAME_HEADER
                if kind == DATA:
                    self._on_data(sid, flags, length)
                self._skip = length
                continue
            if length > MAX_BUFFERED_FRAME:
                raise _ConnectionError(ENHANCE_YOUR_CALM)
            if kind in (HEADERS, CONTINUATION):
                # header blocks are sized as they arrive, as nginx parses them
                self._early_limits(kind, flags, sid, bytes(buf[pos + 9:pos + 9 + length]))
            if len(buf) - pos < _FRAME_HEADER + length:
                self._incomplete = True
                break
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += _FRAME_HEADER + length
            self._on_frame(kind, flags, sid, payload, now)
            if self._closed:
                break
        del buf[:pos]

    def _early_limits(self, kind: int, flags: int, sid: int, partial: bytes) -> None:
        if kind == HEADERS:
            if sid % 2 == 0 or sid <= self._last_sid:
                raise _ConnectionError(PROTOCOL_ERROR)
            start = (1 if flags & FLAG_PADDED else 0) + (5 if flags & FLAG_PRIORITY else 0)
            block = partial[start:]
        else:
            if self._block is None:
                raise _ConnectionError(PROTOCOL_ERROR)
            block = bytes(self._block) + partial
        if not _within_limits(block):
            self._last_sid = max(self._last_sid, sid)
            raise _ConnectionError(ENHANCE_YOUR_CALM)

    def _on_data(self, sid: int, flags: int, length: int) -> None:
        # Request bodies are never read: nginx answers on HEADERS and resets the stream.
        # The connection window it announced (2^31 - 1) outlasts any cover connection.
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR)

    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes, now: float) -> None:
        if kind == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif kind == PING:
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR)
            if sid:
                raise _ConnectionError(PROTOCOL_ERROR)
            if not flags & FLAG_ACK:
                self._queue += frame(PING, FLAG_ACK, 0, payload)
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
            if sid == 0:
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
            if flags & FLAG_END_HEADERS:
                self._end_block(now)

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR)
        if flags & FLAG_ACK:
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
        self._queue += frame(SETTINGS, FLAG_ACK, 0)
        self._send_pending()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR)
            if self._send_window + increment > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR)
            self._send_window += increment
        else:
            stream = self._streams.get(sid)
            if stream is None:
                return
            if increment == 0 or stream.window + increment > MAX_WINDOW:
                code = PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR
                del self._streams[sid]
                self._queue += frame(RST_STREAM, 0, sid, struct.pack(">I", code))
                return
            stream.window += increment
        self._send_pending()

    def _on_headers(self, flags: int, sid: int, payload: bytes, now: float) -> None:
        if sid % 2 == 0 or sid <= self._last_sid:
            raise _ConnectionError(PROTOCOL_ERROR)
        self._last_sid = sid
        start, end = 0, len(payload)
        if flags & FLAG_PADDED:
            if not payload:
                raise _ConnectionError(PROTOCOL_ERROR)
            end -= payload[0]
            start = 1
        if flags & FLAG_PRIORITY:
            start += 5
        if start > end:
            raise _ConnectionError(PROTOCOL_ERROR)
        self._block = bytearray(payload[start:end])
        self._block_stream = sid
        self._block_end_stream = bool(flags & FLAG_END_STREAM)
        self._block_refused = len(self._streams) >= MAX_CONCURRENT_STREAMS
        if flags & FLAG_END_HEADERS:
            self._end_block(now)

    def _end_block(self, now: float) -> None:
        assert self._block is not None
        block, sid = bytes(self._block), self._block_stream
        self._block = None
        try:
            fields = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR) from exc
        if self._block_refused:
            self._queue += frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM))
            return
        self._requests += 1
        self._request(sid, cast(list[tuple[bytes, bytes]], fields), self._block_end_stream)

    # -- requests --------------------------------------------------------------------------

    def _request(self, sid: int, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        method = path = scheme = None
        headers: dict[bytes, bytes] = {}
        host_seen = False
        bad = False
        user_agent = b""
        for name, value in fields:
            if name.startswith(b":"):
                if name == b":method" and method is None:
                    method = value
                elif name == b":path" and path is None:
                    path = value
                elif name == b":scheme" and scheme is None:
                    scheme = value
                elif name == b":authority" and not host_seen:
                    host_seen = True
                    bad = bad or validate_host(value) is None
                else:
                    bad = True  # unknown or repeated pseudo-header
                continue
            if any(c not in _NAME_OK for c in name) or not name:
                if any(c <= 0x20 or c == 0x7F or 0x41 <= c <= 0x5A or c == 0x3A
                       for c in name):
                    self._reset(sid, PROTOCOL_ERROR)
                    return
                continue  # ignore_invalid_headers (e.g. an underscore): dropped
            if any(c in b"\0\r\n" for c in value):
                self._reset(sid, PROTOCOL_ERROR)
                return
            if name == b"host":
                if host_seen or validate_host(value) is None:
                    bad = True
                host_seen = True
            elif name in _UNIQUE and name in headers:
                bad = True
            elif name in _KEPT and name not in headers:
                headers[name] = value
                if name == b"user-agent":
                    user_agent = value
        padding = _msie_or_chrome(user_agent)
        if (bad or method is None or path is None or scheme is None or not method
                or any(c not in _METHOD_OK for c in method) or not scheme
                or any(c not in _SCHEME_OK for c in scheme)
                or not path.startswith(b"/") or any(c <= 0x20 or c == 0x7F for c in path)):
            self._respond(sid, self._error(400, method, padding), end_stream)
            return
        uri = parse_complex_uri(path)
        if uri is None or not host_seen:
            self._respond(sid, self._error(400, method, padding), end_stream)
            return
        content_length = -1
        cl = headers.get(b"content-length")
        if cl is not None:
            if not cl or any(c not in b"0123456789" for c in cl):
                self._respond(sid, self._error(400, method, padding), end_stream)
                return
            content_length = int(cl)
        if method in (b"TRACE", b"CONNECT"):
            self._respond(sid, self._error(405, method, padding), end_stream)
            return
        if content_length > CLIENT_MAX_BODY_SIZE:
            self._respond(sid, self._error(413, method, padding), end_stream)
            return
        req = Request(method, uri, 2000, headers, content_length, False, True, padding)
        self._respond(sid, self._site.respond(req).data, end_stream)

    def _error(self, status: int, method: bytes | None, padding: bool) -> bytes:
        return self._site.error(status, head=method == b"HEAD", msie_padding=padding)

    def _reset(self, sid: int, code: int) -> None:
        self._queue += frame(RST_STREAM, 0, sid, struct.pack(">I", code))

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
        if self._queue:
            # frames queued ahead of the first HEADERS go out with it, the body separately
            self._queue += headers_frame
            self._flush()
        else:
            self._queue += headers_frame
        stream = _Stream(sid, self._peer_initial_window, body, reset_after=not end_stream)
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
        wrote = False
        while stream.sent < len(body):
            size = min(len(body) - stream.sent, CHUNK_SIZE, self._peer_frame_size,
                       stream.window, self._send_window)
            if size <= 0:
                break
            chunk = body[stream.sent:stream.sent + size]
            stream.sent += size
            stream.window -= size
            self._send_window -= size
            last = stream.sent == len(body)
            self._queue += frame(DATA, FLAG_END_STREAM if last else 0, stream.stream_id, chunk)
            wrote = True
        if wrote:
            self._flush()
        if stream.sent == len(body):
            self._streams.pop(stream.stream_id, None)
            self._finish(stream)

    def _finish(self, stream: _Stream) -> None:
        self._flush()
        if stream.reset_after:
            self._queue += frame(RST_STREAM, 0, stream.stream_id, struct.pack(">I", NO_ERROR))
            self._flush()
        self._idle_timer_set = False  # the keepalive timer starts when the stream closes

    # -- output and closing ----------------------------------------------------------------

    def _flush(self) -> None:
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


def _msie_or_chrome(ua: bytes) -> bool:
    """Whether nginx pads error pages for this User-Agent (its MSIE / Chrome test)."""
    msie = ua.find(b"MSIE ")
    if msie >= 0 and msie + 7 < len(ua) and b"Opera" not in ua:
        return True
    return b"Opera" not in ua and b"Gecko/" not in ua and b"Chrome/" in ua


# -- asyncio adapter ------------------------------------------------------------------------


class H2CoverProtocol(asyncio.Protocol):
    """Serves one h2 connection with a :class:`CoverSite`; attach with :meth:`take_over`."""

    def __init__(self, site: CoverSite, *, started_at: float | None = None,
                 header_timeout: float = CLIENT_HEADER_TIMEOUT,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME) -> None:
        self._make: Callable[[float], H2CoverConnection] = lambda now: H2CoverConnection(
            site, now=now, started_at=started_at, header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout, lingering_timeout=lingering_timeout,
            lingering_time=lingering_time)
        self._conn: H2CoverConnection | None = None
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._shut = False

    @classmethod
    def take_over(cls, transport: asyncio.Transport, initial: bytes, site: CoverSite, *,
                  started_at: float | None = None,
                  header_timeout: float = CLIENT_HEADER_TIMEOUT,
                  keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                  lingering_timeout: float = LINGERING_TIMEOUT,
                  lingering_time: float = LINGERING_TIME) -> H2CoverProtocol:
        """Become ``transport``'s protocol and handle ``initial`` as if just received; the
        server preface goes out with the answer to ``initial`` (at once if it is empty)."""
        proto = cls(site, started_at=started_at, header_timeout=header_timeout,
                    keepalive_timeout=keepalive_timeout, lingering_timeout=lingering_timeout,
                    lingering_time=lingering_time)
        transport.set_protocol(proto)
        proto._attach(transport, initial)
        return proto

    def _attach(self, transport: asyncio.BaseTransport, initial: bytes) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._conn = self._make(self._loop.time())
        if initial:
            self._conn.receive_data(initial, self._loop.time())
        self._pump()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport, b"")

    def data_received(self, data: bytes) -> None:
        if self._conn is not None and self._loop is not None:
            self._conn.receive_data(bytes(data), self._loop.time())
            self._pump()

    def eof_received(self) -> bool:
        if self._conn is not None and self._loop is not None:
            self._conn.receive_eof(self._loop.time())
            self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._conn is not None and self._loop is not None:
            self._conn.handle_timer(self._loop.time())
            self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    def _pump(self) -> None:
        conn, transport, loop = self._conn, self._transport, self._loop
        if conn is None or transport is None or loop is None:
            return
        for chunk in conn.writes():
            if not transport.is_closing():
                transport.write(chunk)
        action = conn.close_action
        if action is H2CloseAction.QUIET:
            self._cancel_timer()
            transport.abort()  # FIN, no close_notify (the writes above are on the socket)
            return
        if action is H2CloseAction.LINGER and not self._shut:
            self._shut = True
            _shutdown_write(transport)
        when = conn.get_timer()
        if when != self._timer_at:
            self._cancel_timer()
            if when is not None:
                self._timer = loop.call_at(when, self._on_timer)
                self._timer_at = when


def _shutdown_write(transport: asyncio.BaseTransport) -> None:
    """FIN on the socket under the (TLS) transport, without a close_notify, as nginx's
    ngx_http_v2_lingering_close does; the transport keeps reading."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError):
        dup = socket.socket(fileno=socket.dup(sock.fileno()))
        with dup:
            dup.shutdown(socket.SHUT_WR)
