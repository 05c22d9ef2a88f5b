"""The built-in cover site over HTTP/1.1: nginx 1.22's request parser and connection, sans-IO.

Anyone who reaches veil's port without a valid access key is handed to this module, together
with the bytes the gate already read. From then on the connection must be indistinguishable
from Debian 12's nginx 1.22.1 serving a directory with its default settings (``root``,
``index index.html``, ``server_tokens on``, ``mime.types``, no gzip): same status lines, same
header order, same error pages byte for byte, same *moment* of rejection for garbage, and the
same way of closing.

The parts, one module each
    :mod:`veil.cover.nginx`     nginx's limits, status lines, error pages, dates, byte tables.
    :mod:`veil.cover.site`      :class:`~veil.cover.site.CoverSite`: the files and the HTTP
                                semantics (static, index, conditional and range requests, error
                                pages, MSIE/Chrome padding).
    :mod:`veil.cover.uri`       nginx's Host and path normalisation.
    this module                 :class:`CoverConnection`, sans-IO: bytes and ``now`` in, bytes
                                out plus a close decision and one timer. It reproduces nginx's
                                incremental request-line and header parser (rejecting on the
                                first invalid byte), its buffer model (1 KiB
                                ``client_header_buffer_size``, then up to 4
                                ``large_client_header_buffers`` of 8 KiB), keep-alive,
                                pipelining, body discarding and lingering close.
    :mod:`veil.cover.adapters`  :class:`~veil.cover.adapters.CoverProtocol`, the asyncio
                                adapter; ``take_over`` attaches it to a running transport (TCP or
                                TLS) with bytes already read. It carries out the close
                                decisions below.

How nginx closes, and what is emulated (each measured against nginx 1.22.1 on loopback)
    * After a response that keeps the connection alive, nginx waits ``keepalive_timeout``
      (75 s) then closes with FIN. Before a request is complete it waits
      ``client_header_timeout`` (60 s) counted from the accept, not reset by partial data
      (``started_at`` carries the accept time through a gate), and closes with FIN without a
      response. A client that half-closes mid-request gets no response, only FIN.
    * After a response that ends the connection, nginx either closes at once (a later
      client byte draws RST), or does a *lingering close*: FIN at once, then it reads and
      drops data until 5 s of silence (``lingering_timeout``) or 30 s in all
      (``lingering_time``). It lingers when unparsed bytes remain in its buffer (so after
      every parse error), for requests with a body, for pipelined requests, after 494, and on
      TCP when the last read filled its buffer. A body it still expects after answering is
      drained the same way (413 answers, then FIN after 5 s of silence).
    * Under TLS nginx sends close_notify before its FIN, except when a request it had
      started reading times out (quiet shutdown). veil's TLS transports do each as nginx:
      close_notify then FIN at once (the peer's alert is not awaited), FIN alone, and a
      lingering close's close_notify, FIN and reading on (cover/adapters.py).
    * 412 is answered with "Connection: keep-alive" and then closed at once, as nginx does.

Remaining differences (not emulated)
    * TCP-level details below the transport: window sizes, segment boundaries, delays of a
      fraction of a millisecond, and nginx's once-a-second cached ``Date``. The ``Date``
      follows the event loop's clock from the connection's start (``wall_offset``), so a step
      of the system clock shows in the connections accepted after it.
    * The multipart/byteranges boundary counts up per process (00000000000000000001, ...)
      like nginx's; nginx also spends numbers on temporary files, so the sequences differ
      once a real nginx would have buffered request bodies to disk.
    * gzip (Debian's nginx.conf turns it on for text/html) is off, as in nginx's defaults;
      the site is flat, so there are no directory redirects (301) or listings (403).
    * Chunked request bodies are skipped with a simplified parser; nginx's limits on chunk
      sizes, extensions and trailers may differ in corner cases.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol

from veil.cover.nginx import (
    ALPHA,
    CLIENT_HEADER_BUFFER_SIZE,
    CLIENT_HEADER_TIMEOUT,
    CLIENT_MAX_BODY_SIZE,
    DIGITS,
    HEADER_NAME_CHARS,
    HOST_CHARS,
    IP_LITERAL_CHARS,
    KEEPALIVE_REQUESTS,
    KEEPALIVE_TIME,
    KEEPALIVE_TIMEOUT,
    LARGE_HEADER_BUFFER_SIZE,
    LARGE_HEADER_BUFFERS,
    LINGERING_TIME,
    LINGERING_TIMEOUT,
    MAX_OFF_T,
    METHOD_CHARS,
    SCHEMA_CHARS,
    STATUS_HEADER_TOO_LARGE,
    STATUS_TO_HTTPS,
    UNIQUE_HEADERS,
    USUAL,
    pads_error_pages,
)
from veil.cover.site import CoverSite, Request, Response
from veil.cover.uri import parse_complex_uri, validate_host

__all__ = ["Claimed", "CloseAction", "CoverConnection", "CoverMode", "RequestJudge"]


class RequestJudge(Protocol):
    """Something on the same port that may take a connection over at a request (the CDN
    carrier, veil.transport.cdn). The cover asks it about every HTTP/1.1 request that nginx
    would hand to its content handler; a request it does not claim is served as always, so
    a judge that claims nothing a stranger can send changes nothing a stranger sees."""

    #: Lower-case header names it needs (the cover keeps only its own otherwise).
    header_names: frozenset[bytes]

    def claims(self, method: bytes, path: bytes, headers: Mapping[bytes, bytes]) -> bool:
        """Whether this request (normalised path, first value of each named header) is its."""


class Claimed:
    """A request a :class:`RequestJudge` claimed, and the bytes read after its headers."""

    __slots__ = ("headers", "method", "path", "rest")

    def __init__(self, method: bytes, path: bytes, headers: dict[bytes, bytes],
                 rest: bytes) -> None:
        self.method, self.path, self.headers, self.rest = method, path, headers, rest

#: ngx_http_parse_chunked refuses chunk sizes that would overflow off_t; we cap the hex digits.
MAX_CHUNK_SIZE_DIGITS = 15

#: Headers the site looks at (the first value is kept).
_KEPT_HEADERS = UNIQUE_HEADERS | {b"range", b"user-agent", b"connection", b"keep-alive"}


class CoverMode(enum.Enum):
    """Where the connection came from."""

    #: plain HTTP, or HTTP inside TLS after the handshake: serve the site.
    HTTP = "http"
    #: plain bytes on the TLS port: complete requests get 400 "The plain HTTP request was
    #: sent to HTTPS port", garbage the usual 400.
    PLAIN_ON_TLS_PORT = "plain_on_tls_port"


class CloseAction(enum.Enum):
    """What the transport should do once the pending output is written."""

    NONE = "none"        # keep the connection
    LINGER = "linger"    # half-close (FIN) now, keep reading and discarding
    CLOSE = "close"      # close (FIN); under TLS after a close_notify alert
    QUIET = "quiet"      # close after a request timed out: no close_notify (nginx sets
                         # c->timedout, which makes its SSL shutdown quiet)
    RESET = "reset"      # close with unread data: RST, as the kernel does for nginx
    HANDOFF = "handoff"  # a RequestJudge claimed the request: hand it the transport as is


class _Phase(enum.Enum):
    WAIT = "wait"              # no byte of the next request yet
    LINE = "line"              # parsing the request line
    HEADERS = "headers"        # parsing header lines
    DISCARD = "discard"        # response sent, skipping the rest of the request body
    LINGER = "linger"          # write side shut, reading and dropping until quiet
    CLOSED = "closed"


class _ParseError(Exception):
    """Rejected. ``at_byte``: the parser stopped on a bad byte, which stays unparsed."""

    def __init__(self, status: int, *, at_byte: bool = True) -> None:
        super().__init__(status)
        self.status = status
        self.at_byte = at_byte


# Offsets into the header buffer that move when nginx copies a line to a larger buffer.
_OFFSETS = ("_line_start", "_uri_start", "_uri_end", "_args_start", "_host_start",
            "_host_end", "_schema_end", "_hname_end", "_hvalue_start", "_hvalue_end")

# Request-line parser states (ngx_http_parse_request_line).
(_S_START, _S_METHOD, _S_SPACES_BEFORE_URI, _S_SCHEMA, _S_SCHEMA_SLASH, _S_SCHEMA_SLASH_SLASH,
 _S_HOST_START, _S_HOST, _S_HOST_END, _S_HOST_IP_LITERAL, _S_PORT, _S_AFTER_SLASH_IN_URI,
 _S_CHECK_URI, _S_URI, _S_HTTP_09, _S_HTTP_H, _S_HTTP_HT, _S_HTTP_HTT, _S_HTTP_HTTP,
 _S_FIRST_MAJOR_DIGIT, _S_MAJOR_DIGIT, _S_FIRST_MINOR_DIGIT, _S_MINOR_DIGIT,
 _S_SPACES_AFTER_DIGIT, _S_ALMOST_DONE) = range(25)

# Header-line parser states (ngx_http_parse_header_line).
(_H_START, _H_NAME, _H_SPACE_BEFORE_VALUE, _H_VALUE, _H_SPACE_AFTER_VALUE, _H_ALMOST_DONE,
 _H_HEADER_ALMOST_DONE) = range(7)



class CoverConnection:
    """One connection to the emulated nginx, sans-IO.

    Feed it with :meth:`receive_data` / :meth:`receive_eof` / :meth:`handle_timer`; after each
    call take :meth:`data_to_send` and look at :attr:`close_action` and :meth:`get_timer`.
    ``now`` is any monotonic clock in seconds, the only clock it knows (it reads none);
    ``now + wall_offset`` is the Unix time its Date headers show. ``started_at`` is when the
    connection was accepted (the header timeout runs from then, as in nginx). ``tls``: the
    bytes come out of TLS (this changes one closing decision, see :meth:`_finalize`).
    """

    def __init__(self, site: CoverSite, *, now: float, mode: CoverMode = CoverMode.HTTP,
                 started_at: float | None = None,
                 header_timeout: float = CLIENT_HEADER_TIMEOUT,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME, tls: bool = False,
                 wall_offset: float = 0.0, judge: RequestJudge | None = None) -> None:
        self._site = site
        self._judge = judge
        #: Set with CloseAction.HANDOFF: the request the judge claimed.
        self.claimed: Claimed | None = None
        self._wall_offset = wall_offset
        self._mode = mode
        self._tls = tls
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._lingering_timeout = lingering_timeout
        self._lingering_time = lingering_time
        self._started = now if started_at is None else started_at
        self._out = bytearray()
        self.close_action = CloseAction.NONE
        self._phase = _Phase.WAIT
        self._deadline: float | None = self._started + header_timeout
        self._linger_end = 0.0
        self._requests = 0
        # "kernel" bytes not yet read into a header buffer
        self._pending = bytearray()
        self._eof = False
        #: The transport holds more unsent output than it should (the adapter sets it): no
        #: pipelined request is started until it clears and :meth:`resume` is called.
        self.output_blocked = False
        self._held = False
        self._fresh_buffers()
        self._reset_request()

    # -- public API ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._phase is _Phase.CLOSED

    def data_to_send(self) -> bytes:
        """The bytes to write now (may be empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next, or None."""
        return None if self._phase is _Phase.CLOSED else self._deadline

    def receive_data(self, data: bytes, now: float) -> None:
        if self._phase is _Phase.CLOSED:
            return
        if self._phase is _Phase.LINGER:
            self._deadline = min(now + self._lingering_timeout, self._linger_end)
            return
        self._pending += data
        self._run(now)

    @property
    def held(self) -> bool:
        """A pipelined request waits for the answers before it to be written (nginx
        parses the next request only once the previous answer is sent): take
        :meth:`data_to_send`, then call :meth:`resume` unless :attr:`output_blocked`."""
        return self._held

    def resume(self, now: float) -> None:
        """Go on with the pipelined requests held back."""
        self._held = False
        if self._phase not in (_Phase.CLOSED, _Phase.LINGER):
            self._run(now)

    def receive_eof(self, now: float) -> None:
        """The peer half-closed. nginx then closes without answering a partial request."""
        if self._phase is _Phase.CLOSED:
            return
        self._eof = True
        self._run(now)
        if not self.closed:
            self._close(CloseAction.CLOSE)

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline or self._phase is _Phase.CLOSED:
            return
        # client_header_timeout, keepalive_timeout, lingering: nginx closes without a word.
        # A request it had started reading (or whose body it was dropping) times out with
        # c->timedout set, so under TLS it does not even send close_notify (measured).
        if self._pending:
            self._close(CloseAction.RESET)
        elif self._phase in (_Phase.LINE, _Phase.HEADERS, _Phase.DISCARD):
            self._close(CloseAction.QUIET)
        else:
            self._close(CloseAction.CLOSE)

    # -- buffers -------------------------------------------------------------------------

    def _fresh_buffers(self) -> None:
        self._buf = bytearray()          # the current header buffer's bytes
        self._cap = CLIENT_HEADER_BUFFER_SIZE
        self._pos = 0                    # parse position in _buf
        self._nbusy = 0
        self._nfree = 0
        self._ready = False              # nginx's rev->ready after the last recv

    def _recv(self) -> bool:
        room = self._cap - len(self._buf)
        if not self._pending or room <= 0:
            return False
        take = min(room, len(self._pending))
        self._buf += self._pending[:take]
        del self._pending[:take]
        self._ready = take == room
        return True

    def _alloc_large(self, old: int, state: int, *, request_line: bool) -> bool:
        """ngx_http_alloc_large_header_buffer: False means DECLINED (414 / 494)."""
        if request_line and state == 0:
            # only CR/LF so far: nginx empties the buffer and reads on, without limit
            self._buf = bytearray()
            self._pos = 0
            return True
        if state != 0 and self._pos - old >= LARGE_HEADER_BUFFER_SIZE:
            return False
        if self._nfree:
            self._nfree -= 1
        elif self._nbusy >= LARGE_HEADER_BUFFERS:
            return False
        self._nbusy += 1
        keep = self._buf[old:self._pos] if state != 0 else bytearray()
        self._buf = bytearray(keep)
        self._cap = LARGE_HEADER_BUFFER_SIZE
        self._pos = len(self._buf)
        if state != 0:
            for attr in _OFFSETS:
                value = getattr(self, attr)
                if value >= 0:
                    setattr(self, attr, value - old)
        return True

    # -- request state -------------------------------------------------------------------

    def _reset_request(self) -> None:
        self._state = 0
        self._line_start = self._pos
        self._method = b""
        self._method_end = 0
        self._uri_start = -1
        self._uri_end = -1
        self._args_start = -1
        self._host_start = -1
        self._host_end = -1
        self._schema_end = -1
        self._complex = False
        self._quoted = False
        self._empty_path = False
        self._major = 0
        self._minor = 0
        self._version = 1000
        self._request_line = b""
        self._headers: dict[bytes, bytes] = {}
        self._has_host = False
        self._host_in_line = False
        self._connection = 0  # 0 none, 1 close, 2 keep-alive
        self._padding = False  # error pages get the MSIE/Chrome padding
        self._hname_end = 0
        self._hvalue_start = 0
        self._hvalue_end = 0
        self._invalid_header = False
        self._judged_headers: dict[bytes, bytes] = {}

    # -- the main loop ---------------------------------------------------------------------

    def _run(self, now: float) -> None:
        while self._phase in (_Phase.WAIT, _Phase.LINE, _Phase.HEADERS, _Phase.DISCARD):
            if (self._phase is _Phase.WAIT and (self._out or self.output_blocked)
                    and not self._eof and (self._pos < len(self._buf) or self._pending)):
                # one request at a time, as nginx: the next once this answer is written,
                # so pipelined requests never pile up answers in memory
                self._held = True
                return
            if self._phase is _Phase.DISCARD:
                if not self._discard(now):
                    return
                continue
            if self._pos >= len(self._buf):
                if len(self._buf) >= self._cap:
                    if not self._buffer_full(now):
                        return
                    continue
                if not self._recv():
                    if self._eof and self._phase is not _Phase.WAIT:
                        # "client prematurely closed connection": no response
                        self._close(CloseAction.CLOSE)
                    return
            if self._phase is _Phase.WAIT:
                self._phase = _Phase.LINE
                if self._requests > 0 and not self._pipelined:
                    # keepalive handler: a new request gets client_header_timeout from now
                    self._deadline = now + self._header_timeout
            try:
                if self._phase is _Phase.LINE:
                    self._parse_line()
                else:
                    self._parse_headers()
            except _ParseError as e:
                self._finish_error(e.status, now, parse_error=e.at_byte)
                return
            if self._phase is _Phase.HEADERS and self._state == -1:
                self._state = 0
                self._request_ready(now)

    def _buffer_full(self, now: float) -> bool:
        if self._phase in (_Phase.LINE, _Phase.WAIT):
            if not self._alloc_large(self._line_start, self._state, request_line=True):
                self._finish_error(414, now, parse_error=False)
                return False
        elif not self._alloc_large(self._line_start, self._state, request_line=False):
            self._finish_error(STATUS_HEADER_TOO_LARGE, now, parse_error=False, linger=True)
            return False
        return True

    # -- request line --------------------------------------------------------------------

    def _parse_line(self) -> None:
        buf = self._buf
        state = self._state
        p = self._pos
        end = len(buf)
        while p < end:
            ch = buf[p]
            if state == _S_START:
                self._line_start = p
                if ch not in (0x0D, 0x0A):
                    if ch not in METHOD_CHARS:
                        raise _ParseError(400)
                    state = _S_METHOD
            elif state == _S_METHOD:
                if ch == 0x20:
                    self._method = bytes(buf[self._line_start:p])
                    state = _S_SPACES_BEFORE_URI
                elif ch not in METHOD_CHARS:
                    raise _ParseError(400)
            elif state == _S_SPACES_BEFORE_URI:
                if ch == 0x2F:
                    self._uri_start = p
                    state = _S_AFTER_SLASH_IN_URI
                elif ch in ALPHA:
                    state = _S_SCHEMA
                elif ch != 0x20:
                    raise _ParseError(400)
            elif state == _S_SCHEMA:
                if ch == 0x3A:
                    self._schema_end = p
                    state = _S_SCHEMA_SLASH
                elif ch not in SCHEMA_CHARS:
                    raise _ParseError(400)
            elif state == _S_SCHEMA_SLASH:
                if ch != 0x2F:
                    raise _ParseError(400)
                state = _S_SCHEMA_SLASH_SLASH
            elif state == _S_SCHEMA_SLASH_SLASH:
                if ch != 0x2F:
                    raise _ParseError(400)
                state = _S_HOST_START
            elif state in (_S_HOST_START, _S_HOST, _S_HOST_END):
                if state == _S_HOST_START:
                    self._host_start = p
                    if ch == 0x5B:
                        state = _S_HOST_IP_LITERAL
                        p += 1
                        continue
                    state = _S_HOST
                if state == _S_HOST and ch in HOST_CHARS:
                    p += 1
                    continue
                if ch == 0x3A:
                    state = _S_PORT
                else:
                    self._host_end = p
                    state = self._after_host(ch, p)
            elif state == _S_HOST_IP_LITERAL:
                if ch == 0x5D:
                    state = _S_HOST_END
                elif ch not in IP_LITERAL_CHARS:
                    raise _ParseError(400)
            elif state == _S_PORT:
                if ch not in DIGITS:
                    self._host_end = p
                    state = self._after_host(ch, p)
            elif state == _S_AFTER_SLASH_IN_URI:
                if ch in USUAL:
                    state = _S_CHECK_URI
                elif ch == 0x20:
                    self._uri_end = p
                    state = _S_HTTP_09
                elif ch == 0x0D:
                    self._uri_end = p
                    self._minor = 9
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._uri_end = p
                    self._minor = 9
                    self._line_done(p)
                    return
                elif ch in (0x2E, 0x2F, 0x23):
                    self._complex = True
                    state = _S_URI
                elif ch == 0x25:
                    self._quoted = True
                    state = _S_URI
                elif ch == 0x3F:
                    self._args_start = p + 1
                    state = _S_URI
                elif ch == 0x2B:
                    pass
                elif ch < 0x20 or ch == 0x7F:
                    raise _ParseError(400)
                else:
                    state = _S_CHECK_URI
            elif state == _S_CHECK_URI:
                if ch in USUAL:
                    pass
                elif ch == 0x2F:
                    state = _S_AFTER_SLASH_IN_URI
                elif ch in (0x2E, 0x2B):
                    pass
                elif ch == 0x20:
                    self._uri_end = p
                    state = _S_HTTP_09
                elif ch == 0x0D:
                    self._uri_end = p
                    self._minor = 9
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._uri_end = p
                    self._minor = 9
                    self._line_done(p)
                    return
                elif ch == 0x25:
                    self._quoted = True
                    state = _S_URI
                elif ch == 0x3F:
                    self._args_start = p + 1
                    state = _S_URI
                elif ch == 0x23:
                    self._complex = True
                    state = _S_URI
                elif ch < 0x20 or ch == 0x7F:
                    raise _ParseError(400)
            elif state == _S_URI:
                if ch in USUAL:
                    pass
                elif ch == 0x20:
                    self._uri_end = p
                    state = _S_HTTP_09
                elif ch == 0x0D:
                    self._uri_end = p
                    self._minor = 9
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._uri_end = p
                    self._minor = 9
                    self._line_done(p)
                    return
                elif ch == 0x23:
                    self._complex = True
                elif ch < 0x20 or ch == 0x7F:
                    raise _ParseError(400)
            elif state == _S_HTTP_09:
                if ch == 0x20:
                    pass
                elif ch == 0x0D:
                    self._minor = 9
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._minor = 9
                    self._line_done(p)
                    return
                elif ch == 0x48:
                    state = _S_HTTP_H
                else:
                    raise _ParseError(400)
            elif state == _S_HTTP_H:
                if ch != 0x54:
                    raise _ParseError(400)
                state = _S_HTTP_HT
            elif state == _S_HTTP_HT:
                if ch != 0x54:
                    raise _ParseError(400)
                state = _S_HTTP_HTT
            elif state == _S_HTTP_HTT:
                if ch != 0x50:
                    raise _ParseError(400)
                state = _S_HTTP_HTTP
            elif state == _S_HTTP_HTTP:
                if ch != 0x2F:
                    raise _ParseError(400)
                state = _S_FIRST_MAJOR_DIGIT
            elif state == _S_FIRST_MAJOR_DIGIT:
                if not 0x31 <= ch <= 0x39:
                    raise _ParseError(400)
                self._major = ch - 0x30
                if self._major > 1:
                    raise _ParseError(505)
                state = _S_MAJOR_DIGIT
            elif state == _S_MAJOR_DIGIT:
                if ch == 0x2E:
                    state = _S_FIRST_MINOR_DIGIT
                elif ch not in DIGITS:
                    raise _ParseError(400)
                else:
                    self._major = self._major * 10 + ch - 0x30
                    if self._major > 1:
                        raise _ParseError(505)
            elif state == _S_FIRST_MINOR_DIGIT:
                if ch not in DIGITS:
                    raise _ParseError(400)
                self._minor = ch - 0x30
                state = _S_MINOR_DIGIT
            elif state == _S_MINOR_DIGIT:
                if ch == 0x0D:
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._line_done(p)
                    return
                elif ch == 0x20:
                    state = _S_SPACES_AFTER_DIGIT
                elif ch not in DIGITS:
                    raise _ParseError(400)
                else:
                    if self._minor > 99:
                        raise _ParseError(400)
                    self._minor = self._minor * 10 + ch - 0x30
            elif state == _S_SPACES_AFTER_DIGIT:
                if ch == 0x0D:
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._line_done(p)
                    return
                elif ch != 0x20:
                    raise _ParseError(400)
            elif state == _S_ALMOST_DONE:
                if ch != 0x0A:
                    raise _ParseError(400)
                self._line_done(p)
                return
            p += 1
        self._pos = p
        self._state = state

    def _after_host(self, ch: int, p: int) -> int:
        if ch == 0x2F:
            self._uri_start = p
            return _S_AFTER_SLASH_IN_URI
        if ch == 0x3F:
            self._uri_start = p
            self._args_start = p + 1
            self._empty_path = True
            return _S_URI
        if ch == 0x20:
            self._uri_start = -2  # "/" taken from the schema's "://"
            self._uri_end = p
            return _S_HTTP_09
        raise _ParseError(400)

    def _line_done(self, p: int) -> None:
        """The request line ended at ``p`` (its LF): validate it as nginx does after NGX_OK."""
        self._pos = p + 1
        buf = self._buf
        self._version = self._major * 1000 + self._minor
        if self._version == 9 and self._method != b"GET":
            raise _ParseError(400, at_byte=False)
        raw = b"/" if self._uri_start == -2 else bytes(buf[self._uri_start:self._uri_end])
        if self._complex or self._quoted or self._empty_path:
            uri = parse_complex_uri(raw, empty_path=self._empty_path)
            if uri is None:
                raise _ParseError(400, at_byte=False)
        elif self._args_start >= 0:
            uri = raw[:self._args_start - 1 - self._uri_start]
        else:
            uri = raw
        self._uri = uri
        self._args = raw.partition(b"?")[2] if self._args_start >= 0 else b""
        if self._host_start >= 0:
            if validate_host(bytes(buf[self._host_start:self._host_end])) is None:
                raise _ParseError(400, at_byte=False)
            self._host_in_line = True
        self._state = 0
        self._line_start = self._pos
        if self._version < 1000:
            self._state = -1  # no headers in HTTP/0.9: the request is complete
        self._phase = _Phase.HEADERS
        if self._version >= 1000:
            self._parse_headers()

    # -- header lines ---------------------------------------------------------------------

    def _parse_headers(self) -> None:
        buf = self._buf
        state = self._state
        p = self._pos
        end = len(buf)
        while p < end:
            ch = buf[p]
            if state == _H_START:
                self._line_start = p
                self._invalid_header = False
                if ch == 0x0D:
                    state = _H_HEADER_ALMOST_DONE
                elif ch == 0x0A:
                    self._pos = p + 1
                    self._state = -1
                    return
                else:
                    state = _H_NAME
                    if ch not in HEADER_NAME_CHARS:
                        if ch <= 0x20 or ch in (0x7F, 0x3A):
                            raise _ParseError(400)
                        self._invalid_header = True
            elif state == _H_NAME:
                if ch in HEADER_NAME_CHARS:
                    pass
                elif ch == 0x3A:
                    self._hname_end = p
                    state = _H_SPACE_BEFORE_VALUE
                elif ch == 0x0D:
                    self._hname_end = self._hvalue_start = self._hvalue_end = p
                    state = _H_ALMOST_DONE
                elif ch == 0x0A:
                    self._hname_end = self._hvalue_start = self._hvalue_end = p
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                elif ch <= 0x20 or ch == 0x7F:
                    raise _ParseError(400)
                else:
                    self._invalid_header = True
            elif state == _H_SPACE_BEFORE_VALUE:
                if ch in (0x20, 0x09):
                    pass
                elif ch == 0x0D:
                    self._hvalue_start = self._hvalue_end = p
                    state = _H_ALMOST_DONE
                elif ch == 0x0A:
                    self._hvalue_start = self._hvalue_end = p
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                elif ch == 0:
                    raise _ParseError(400)
                else:
                    self._hvalue_start = p
                    state = _H_VALUE
            elif state == _H_VALUE:
                if ch in (0x20, 0x09):
                    self._hvalue_end = p
                    state = _H_SPACE_AFTER_VALUE
                elif ch == 0x0D:
                    self._hvalue_end = p
                    state = _H_ALMOST_DONE
                elif ch == 0x0A:
                    self._hvalue_end = p
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                elif ch == 0:
                    raise _ParseError(400)
            elif state == _H_SPACE_AFTER_VALUE:
                if ch in (0x20, 0x09):
                    pass
                elif ch == 0x0D:
                    state = _H_ALMOST_DONE
                elif ch == 0x0A:
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                elif ch == 0:
                    raise _ParseError(400)
                else:
                    state = _H_VALUE
            elif state == _H_ALMOST_DONE:
                if ch == 0x0A:
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                if ch != 0x0D:
                    raise _ParseError(400)
            elif state == _H_HEADER_ALMOST_DONE:
                if ch != 0x0A:
                    raise _ParseError(400)
                self._pos = p + 1
                self._state = -1
                return
            p += 1
        self._pos = p
        self._state = state

    def _header_done(self) -> None:
        """One header line is complete: apply nginx's per-header handlers."""
        self._state = _H_START
        start = self._line_start
        self._line_start = self._pos
        if self._invalid_header:
            return  # ignore_invalid_headers on: dropped silently
        buf = self._buf
        name = bytes(buf[start:self._hname_end]).lower()
        value = bytes(buf[self._hvalue_start:self._hvalue_end])
        if name == b"host":
            if self._has_host or validate_host(value) is None:
                raise _ParseError(400, at_byte=False)
            self._has_host = True
            return
        if name in UNIQUE_HEADERS and name in self._headers:
            raise _ParseError(400, at_byte=False)
        if name == b"connection":
            low = value.lower()
            if b"close" in low:
                self._connection = 1
            elif b"keep-alive" in low:
                self._connection = 2
        elif name == b"user-agent" and name not in self._headers:
            self._padding = pads_error_pages(value)
        if name in _KEPT_HEADERS and name not in self._headers:
            self._headers[name] = value
        if (self._judge is not None and name in self._judge.header_names
                and name not in self._judged_headers):
            self._judged_headers[name] = value

    # -- a complete request ----------------------------------------------------------------

    def _request_ready(self, now: float) -> None:
        """Headers are complete (ngx_http_process_request_header and what follows)."""
        version = self._version
        headers = self._headers
        self._requests += 1
        self._deadline = None  # ngx_http_process_request deletes the header timer
        if version > 1000 and not self._has_host:
            self._finish_error(400, now, parse_error=False)
            return
        # ngx_http_process_request_header, in 1.22's order: Content-Length is parsed first,
        # so the errors after it still wait for (and drop) a body of that length.
        content_length = -1
        chunked = False
        cl = headers.get(b"content-length")
        if cl is not None:
            if not cl or not all(c in DIGITS for c in cl) or int(cl) > MAX_OFF_T:
                self._finish_error(400, now, parse_error=False)
                return
            content_length = int(cl)
        status = 0
        te = headers.get(b"transfer-encoding")
        if te is not None:
            if version < 1001 or (te.lower() == b"chunked" and cl is not None):
                status = 400
            elif te.lower() == b"chunked":
                chunked = True
            else:
                status = 501
        if not status and self._method in (b"TRACE", b"CONNECT"):
            status = 405
        if not status and self._mode is CoverMode.PLAIN_ON_TLS_PORT:
            status = STATUS_TO_HTTPS
        if status:
            req = Request(self._method, self._uri, version, {}, content_length, chunked,
                          False, self._padding)
            self._send_response(self._site.fail(req, status, date=now + self._wall_offset),
                                content_length, chunked, now, handled=False)
            return
        if (self._judge is not None and version >= 1001
                and self._judge.claims(self._method, self._uri, self._judged_headers)):
            self.claimed = Claimed(self._method, self._uri, dict(self._judged_headers),
                                   bytes(self._buf[self._pos:]) + bytes(self._pending))
            self._buf.clear()
            self._pending.clear()
            self._close(CloseAction.HANDOFF)
            return
        if self._connection == 1:
            keepalive = False
        elif self._connection == 2:
            keepalive = True
        else:
            keepalive = version > 1000
        if (self._requests >= KEEPALIVE_REQUESTS
                or now - self._started > KEEPALIVE_TIME or self._keepalive_timeout <= 0):
            keepalive = False
        req = Request(self._method, self._uri, version, dict(headers), content_length,
                      chunked, keepalive, self._padding, self._args)
        date = now + self._wall_offset
        if content_length > CLIENT_MAX_BODY_SIZE:
            resp = self._site.fail(req, 413, date=date)
        else:
            resp = self._site.respond(req, date=date)
        self._send_response(resp, content_length, chunked, now, handled=True)

    def _send_response(self, resp: Response, content_length: int, chunked: bool,
                       now: float, *, handled: bool) -> None:
        """Queue ``resp``, then drop the request body and keep alive, linger or close.

        ``handled``: the request reached ngx_http_handler, which sets r->lingering_close for
        requests with a body; the special response handler clears it again for 400 and 497.
        """
        if resp.continue_first:
            self._out += b"HTTP/1.1 100 Continue\r\n\r\n"
        self._out += resp.data
        # the request had a body: nginx reads and drops it (r->lingering_close is set)
        body = content_length > 0 or chunked
        self._body_left = content_length if content_length > 0 else 0
        self._chunk_state = _ChunkState() if chunked else None
        if resp.terminate:
            self._close(CloseAction.RESET if self._pending else CloseAction.CLOSE)
            return
        if body:
            self._linger_flag = handled and resp.status not in (400, STATUS_TO_HTTPS)
            self._discard_from_buffer()
            if not self._body_done():
                self._keepalive_after_discard = resp.keepalive
                self._phase = _Phase.DISCARD
                self._linger_end = now + self._lingering_time
                self._deadline = now + self._lingering_timeout
                return
        else:
            self._linger_flag = False
        self._finalize(resp.keepalive, now)

    def _body_done(self) -> bool:
        if self._chunk_state is not None:
            return self._chunk_state.done
        return self._body_left <= 0

    def _discard_from_buffer(self) -> None:
        avail = len(self._buf) - self._pos
        if self._chunk_state is not None:
            used = self._chunk_state.feed(self._buf, self._pos)
            self._pos += used
        else:
            used = min(avail, self._body_left)
            self._pos += used
            self._body_left -= used

    def _discard(self, now: float) -> bool:
        """Skip body bytes after the response; True when the body is complete."""
        if self._pos < len(self._buf):
            self._discard_from_buffer()
        if not self._body_done() and self._pending:
            if self._chunk_state is not None:
                used = self._chunk_state.feed(self._pending, 0)
            else:
                used = min(len(self._pending), self._body_left)
                self._body_left -= used
            del self._pending[:used]
            self._deadline = min(now + self._lingering_timeout, self._linger_end)
        if self._chunk_state is not None and self._chunk_state.error:
            self._close(CloseAction.CLOSE)
            return False
        if not self._body_done():
            if self._eof:
                self._close(CloseAction.CLOSE)
            return False
        # discarded completely; r->lingering_close stays set (measured: a later byte draws no RST)
        self._finalize(self._keepalive_after_discard, now)
        return self._phase in (_Phase.WAIT, _Phase.DISCARD)

    def _finalize(self, keepalive: bool, now: float) -> None:
        """ngx_http_finalize_connection: keep alive, linger or close."""
        pipelined = self._pos < len(self._buf)
        if keepalive and not self._eof:
            if pipelined:
                if self._cap == LARGE_HEADER_BUFFER_SIZE:
                    self._nfree += self._nbusy - 1
                    self._nbusy = 1
            else:
                leftover = self._pending
                self._fresh_buffers()
                self._pending = leftover
            self._pipelined = pipelined
            self._phase = _Phase.WAIT
            self._reset_request()
            self._line_start = self._pos
            self._deadline = now + (self._header_timeout if pipelined
                                    else self._keepalive_timeout)
            return
        if self._eof:
            self._close(CloseAction.CLOSE)
        elif self._linger_flag or pipelined or self._pipelined:
            self._start_linger(now)
        elif not self._tls and (self._ready or self._pending):
            # rev->ready after a read that filled the buffer: more may be waiting. Under TLS
            # nginx does not take this path (measured: a 10 KiB request line gets 414 and a
            # plain close over TLS, a lingering close over TCP).
            self._start_linger(now)
        else:
            self._close(CloseAction.CLOSE)

    def _finish_error(self, status: int, now: float, *, parse_error: bool,
                      linger: bool = False) -> None:
        """An error before the request was handed to the site (400, 414, 494, 505...)."""
        data = self._site.error(status, date=now + self._wall_offset, version=self._version,
                                head=self._method == b"HEAD", keepalive=False,
                                msie_padding=self._padding)
        self._out += data
        self._linger_flag = linger
        if parse_error:
            # the parser stops at the bad byte: unparsed bytes remain in the buffer
            self._pos = min(self._pos, len(self._buf) - 1)
        self._finalize(False, now)

    def _start_linger(self, now: float) -> None:
        self._phase = _Phase.LINGER
        self._pending.clear()
        self._linger_end = now + self._lingering_time
        self._deadline = min(now + self._lingering_timeout, self._linger_end)
        self.close_action = CloseAction.LINGER

    def _close(self, action: CloseAction) -> None:
        self._phase = _Phase.CLOSED
        self._deadline = None
        self.close_action = action

    _pipelined = False
    _body_left = 0
    _chunk_state: _ChunkState | None = None
    _keepalive_after_discard = False
    _linger_flag = False
    _uri = b"/"
    _args = b""


class _ChunkState:
    """A small chunked-body skipper: counts chunk sizes, drops data, stops after the trailer."""

    def __init__(self) -> None:
        self.done = False
        self.error = False
        self._state = 0  # 0 size, 1 ext, 2 lf after size, 3 data, 4 cr after data,
        # 5 lf after data, 6 trailer line start, 7 trailer line, 8 final lf
        self._size = 0
        self._digits = 0

    def feed(self, data: bytearray, start: int) -> int:
        p = start
        n = len(data)
        while p < n and not self.done and not self.error:
            ch = data[p]
            s = self._state
            if s == 0:
                if ch in DIGITS or 0x61 <= (ch | 0x20) <= 0x66:
                    self._size = self._size * 16 + int(chr(ch), 16)
                    self._digits += 1
                    if self._digits > MAX_CHUNK_SIZE_DIGITS:
                        self.error = True
                elif self._digits and ch == 0x0D:
                    self._state = 2
                elif self._digits and ch == 0x0A:
                    self._state = 6 if self._size == 0 else 3
                elif self._digits and ch in (0x3B, 0x20, 0x09):
                    self._state = 1
                else:
                    self.error = True
            elif s == 1:
                if ch == 0x0D:
                    self._state = 2
                elif ch == 0x0A:
                    self._state = 6 if self._size == 0 else 3
            elif s == 2:
                if ch != 0x0A:
                    self.error = True
                self._state = 6 if self._size == 0 else 3
            elif s == 3:
                take = min(self._size, n - p)
                self._size -= take
                p += take
                if self._size == 0:
                    self._state = 4
                continue
            elif s == 4:
                if ch == 0x0D:
                    self._state = 5
                elif ch == 0x0A:
                    self._state, self._digits = 0, 0
                else:
                    self.error = True
            elif s == 5:
                if ch != 0x0A:
                    self.error = True
                self._state, self._digits = 0, 0
            elif s == 6:
                if ch == 0x0D:
                    self._state = 8
                elif ch == 0x0A:
                    self.done = True
                else:
                    self._state = 7
            elif s == 7:
                if ch == 0x0A:
                    self._state = 6
            elif s == 8:
                if ch != 0x0A:
                    self.error = True
                self.done = True
            p += 1
        return p - start


# -- asyncio adapter ---------------------------------------------------------------------
