"""The asyncio adapters: where the sans-IO cover connections meet a transport.

:class:`CoverProtocol` runs a :class:`~veil.cover.http1.CoverConnection` (HTTP/1.1),
:class:`H2CoverProtocol` an :class:`~veil.cover.http2.H2CoverConnection`. Both feed their
connection with the loop's time, and after every call do one "transmit and re-arm" step
(``_pump``): write what the connection queued, carry out its close decision, and hand its
``get_timer()`` to the one :class:`~veil.net.loop_timer.LoopTimer`. The connections read no
clock: the adapter also gives them ``wall_offset``, the Unix time at the loop's zero, for their
Date headers. How nginx's ways of closing map onto asyncio's transports is told in
:mod:`veil.cover.http1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, cast, runtime_checkable

from veil.cover.http1 import Claimed, CloseAction, CoverConnection, CoverMode, RequestJudge
from veil.cover.http2 import H2CloseAction, H2CoverConnection
from veil.cover.nginx import (
    CLIENT_HEADER_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    LINGERING_TIME,
    LINGERING_TIMEOUT,
)
from veil.cover.site import CoverSite
from veil.net.loop_timer import LoopTimer

__all__ = ["CoverProtocol", "H2CoverProtocol", "RequestClaim"]


class RequestClaim(RequestJudge, Protocol):
    """A :class:`~veil.cover.http1.RequestJudge` that takes over the connections of the
    requests it claims (the CDN carrier, veil.transport.cdn)."""

    def take_over(self, transport: asyncio.Transport, request: Claimed,
                  give_back: Callable[[asyncio.Transport, bytes], None]) -> None:
        """The connection is yours from after ``request``'s headers (``request.rest`` was
        read already). ``give_back(transport, rest)`` returns a keep-alive connection to the
        cover, as if freshly accepted with ``rest`` already received."""

#: Unsent answers (bytes waiting in the transport) past which an HTTP/1.1 cover connection
#: starts no further pipelined request and reads nothing more until they drain (the
#: transport's high-water mark): nginx parses the next pipelined request only once the
#: previous answer is written, so a client that pipelines and never reads makes the server
#: hold this much, not 1,000 answers.
H1_MAX_UNSENT_BYTES = 64 * 1024

#: Unsent answers (bytes waiting in the transport) past which an h2 cover connection stops
#: reading until they drain. nginx reads on while its answers wait and ends the connection
#: at MAX_UNSENT_FRAMES control frames (a PING flood: ~170 KiB of PING ACKs); this bound
#: sits above that, so a stranger sees nginx's flood reset, and caps what responses with
#: bodies (large frames, few of them) can make the server hold for one peer.
H2_MAX_UNSENT_BYTES = 1 << 20


class _SansIOConnection(Protocol):
    """What an adapter needs of a cover connection (both protocols give it)."""

    def receive_data(self, data: bytes, now: float) -> None: ...
    def receive_eof(self, now: float) -> None: ...
    def handle_timer(self, now: float) -> None: ...
    def get_timer(self) -> float | None: ...


_Conn = TypeVar("_Conn", bound=_SansIOConnection)


#: Makes an adapter's connection: (the loop's time now, ``wall_offset``, the transport).
_Factory = Callable[[float, float, asyncio.BaseTransport], _Conn]


class _CoverAdapter(asyncio.Protocol, Generic[_Conn]):
    """What both adapters share: the transport, the loop's time, the one timer, and reading
    paused while the peer leaves the answers unread. ``make`` builds the connection when a
    transport arrives; a subclass writes its output in :meth:`_pump`."""

    def __init__(self, make: _Factory[_Conn]) -> None:
        self._make = make
        self._conn: _Conn | None = None
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: LoopTimer | None = None

    def _start(self, transport: asyncio.BaseTransport) -> tuple[_Conn, float]:
        """Take ``transport`` and make the connection; it and the loop's time now."""
        # uvloop's transports do not subclass asyncio's classes: duck-type, do not isinstance
        self._transport = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        self._timer = LoopTimer(loop, self._on_timer)
        now = loop.time()
        # the Unix time at the loop's zero: the connection reads no clock, not even for Date
        self._conn = conn = self._make(now, time.time() - now, transport)
        return conn, now

    def _pump(self) -> None:
        raise NotImplementedError

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._conn is not None and self._loop is not None:
            self._conn.receive_data(bytes(data), self._loop.time())
            self._pump()

    def eof_received(self) -> bool:
        if self._conn is not None and self._loop is not None:
            self._conn.receive_eof(self._loop.time())
            self._pump()
        return False  # the connection has decided to close: let the transport finish it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def pause_writing(self) -> None:
        # The peer leaves our answers unread: stop reading its requests (each PING or
        # pipelined request would only add to the unsent output), so what a stranger can
        # make the server hold is the socket buffers and one read's worth of answers.
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_writing(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _on_timer(self, now: float) -> None:
        if self._conn is not None:
            self._conn.handle_timer(now)
            self._pump()


class CoverProtocol(_CoverAdapter[CoverConnection]):
    """Serves one connection with a :class:`CoverSite` over HTTP/1.1, as nginx would.

    Use it as a protocol factory's product for a listening server, or attach it to a
    running transport with :meth:`take_over`.
    """

    def __init__(self, site: CoverSite, *, mode: CoverMode = CoverMode.HTTP,
                 started_at: float | None = None,
                 header_timeout: float = CLIENT_HEADER_TIMEOUT,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME,
                 plain_on_https_port: bool = False, claim: RequestClaim | None = None) -> None:
        """``plain_on_https_port=True`` is shorthand for ``mode=PLAIN_ON_TLS_PORT``.
        ``claim``: who may take the connection over at a request (RequestClaim)."""
        if plain_on_https_port:
            mode = CoverMode.PLAIN_ON_TLS_PORT
        super().__init__(lambda now, wall_offset, transport: CoverConnection(
            site, now=now, mode=mode, started_at=started_at, header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout, lingering_timeout=lingering_timeout,
            lingering_time=lingering_time,
            tls=transport.get_extra_info("ssl_object") is not None, wall_offset=wall_offset,
            judge=claim))
        self._eof_written = False
        self._claim = claim

        def give_back(transport: asyncio.Transport, rest: bytes) -> None:
            CoverProtocol.take_over(transport, rest, site, mode=mode,
                                    header_timeout=header_timeout,
                                    keepalive_timeout=keepalive_timeout,
                                    lingering_timeout=lingering_timeout,
                                    lingering_time=lingering_time, claim=claim)

        self._give_back = give_back

    @classmethod
    def take_over(cls, transport: asyncio.Transport, initial: bytes, site: CoverSite, *,
                  mode: CoverMode = CoverMode.HTTP, started_at: float | None = None,
                  header_timeout: float = CLIENT_HEADER_TIMEOUT,
                  keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                  lingering_timeout: float = LINGERING_TIMEOUT,
                  lingering_time: float = LINGERING_TIME,
                  claim: RequestClaim | None = None) -> CoverProtocol:
        """Become ``transport``'s protocol and handle ``initial`` as if just received.

        ``started_at`` is the loop time (``loop.time()``) when the connection was accepted:
        nginx's client_header_timeout counts from there. Must be called in the loop's thread.
        """
        proto = cls(site, mode=mode, started_at=started_at, header_timeout=header_timeout,
                    keepalive_timeout=keepalive_timeout, lingering_timeout=lingering_timeout,
                    lingering_time=lingering_time, claim=claim)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if initial:
            proto.data_received(initial)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with contextlib.suppress(AttributeError, NotImplementedError):
            cast(asyncio.WriteTransport, transport).set_write_buffer_limits(
                high=H1_MAX_UNSENT_BYTES)
        self._start(transport)
        self._pump()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._conn is not None:
            self._conn.output_blocked = True

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._conn is not None:
            self._conn.output_blocked = False
            self._pump()

    def _pump(self) -> None:
        conn, transport, timer, loop = self._conn, self._transport, self._timer, self._loop
        if conn is None or transport is None or timer is None or loop is None:
            return
        while True:
            out = conn.data_to_send()
            if out and not transport.is_closing():
                transport.write(out)  # may call pause_writing: output_blocked
            if not conn.held or conn.output_blocked or transport.is_closing():
                break
            conn.resume(loop.time())
        action = conn.close_action
        if action is CloseAction.HANDOFF:
            timer.cancel()
            claimed, claim = conn.claimed, self._claim
            self._conn = self._transport = None  # the connection is no longer the cover's
            assert claimed is not None and claim is not None
            claim.take_over(transport, claimed, self._give_back)
            return
        tls = transport.get_extra_info("ssl_object") is not None
        if action is CloseAction.LINGER and not self._eof_written:
            self._eof_written = True
            if tls:
                _linger_tls(transport, close_notify=True)  # nginx: close_notify, FIN, read on
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        elif action is CloseAction.QUIET and tls:
            timer.cancel()
            _close_tls(transport, close_notify=False)  # FIN without a close_notify alert
        elif action in (CloseAction.CLOSE, CloseAction.RESET, CloseAction.QUIET):
            timer.cancel()
            if action is CloseAction.RESET:
                _set_rst_on_close(transport)
            if tls:
                _close_tls(transport, close_notify=True)
            else:
                transport.close()
        if action in (CloseAction.CLOSE, CloseAction.RESET, CloseAction.QUIET):
            return
        timer.set(conn.get_timer())


class H2CoverProtocol(_CoverAdapter[H2CoverConnection]):
    """Serves one h2 connection with a :class:`CoverSite`; attach with :meth:`take_over`."""

    def __init__(self, site: CoverSite, *, started_at: float | None = None,
                 header_timeout: float = CLIENT_HEADER_TIMEOUT,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME, preface_sent: bool = False) -> None:
        super().__init__(lambda now, wall_offset, transport: H2CoverConnection(
            site, now=now, started_at=started_at, header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout, lingering_timeout=lingering_timeout,
            lingering_time=lingering_time, preface_sent=preface_sent, wall_offset=wall_offset))
        self._shut = False
        # Our writes still in the transport's buffer, oldest first: [bytes left, frames,
        # made in this turn of the loop],
        # and the buffer's size when last seen (what drained since is taken off the front).
        self._waiting: deque[list[int]] = deque()
        self._buffered = 0
        self._paused = False
        # Frames made in this turn of the loop, sent or not: nginx writes nothing until
        # the end of a read event, which takes all the socket holds (the carrier may hand
        # it over in several data_received calls within one turn).
        self._made_this_turn = 0
        self._turn_ends: asyncio.Handle | None = None
        self._told = 0  # what the connection was last told of unsent frames

    @classmethod
    def take_over(cls, transport: asyncio.Transport, initial: bytes, site: CoverSite, *,
                  started_at: float | None = None,
                  header_timeout: float = CLIENT_HEADER_TIMEOUT,
                  keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                  lingering_timeout: float = LINGERING_TIMEOUT,
                  lingering_time: float = LINGERING_TIME,
                  preface_sent: bool = False) -> H2CoverProtocol:
        """Become ``transport``'s protocol and handle ``initial`` as if just received; the
        server preface goes out with the answer to ``initial`` (at once if it is empty),
        unless ``preface_sent``."""
        proto = cls(site, started_at=started_at, header_timeout=header_timeout,
                    keepalive_timeout=keepalive_timeout, lingering_timeout=lingering_timeout,
                    lingering_time=lingering_time, preface_sent=preface_sent)
        transport.set_protocol(proto)
        proto._attach(transport, initial)
        return proto

    def _attach(self, transport: asyncio.BaseTransport, initial: bytes) -> None:
        conn, now = self._start(transport)
        if initial:
            conn.receive_data(initial, now)
        self._pump()  # the preface goes out with the answer to ``initial``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport, b"")

    def data_received(self, data: bytes) -> None:
        conn, transport = self._conn, self._transport
        if conn is not None and transport is not None:
            conn.unsent_frames = self._told = self._unsent_frames(transport)
        super().data_received(data)

    def pause_writing(self) -> None:
        # nginx reads on while its answers wait (H2_MAX_UNSENT_BYTES, _pump): so do we
        pass

    def resume_writing(self) -> None:
        transport = self._transport
        if self._paused and transport is not None and not transport.is_closing():
            self._paused = False
            transport.resume_reading()

    def _frames_waiting(self, transport: asyncio.Transport) -> int:
        """Frames of our writes the socket has not taken yet (a write partly sent counts
        whole, as nginx frees a frame only once all of it is sent)."""
        size = transport.get_write_buffer_size()
        drained = self._buffered - size
        waiting = self._waiting
        while drained > 0 and waiting:
            if waiting[0][0] <= drained:
                drained -= waiting.popleft()[0]
            else:
                waiting[0][0] -= drained
                drained = 0
        if size == 0:
            waiting.clear()
        self._buffered = size
        return sum(frames for _, frames, _ in waiting)

    def _unsent_frames(self, transport: asyncio.Transport) -> int:
        """What nginx would count as unsent: frames still in the transport's buffer from
        earlier turns of the loop, and every frame made in this one."""
        self._frames_waiting(transport)
        earlier = sum(frames for _, frames, this_turn in self._waiting if not this_turn)
        return earlier + self._made_this_turn

    def _end_turn(self) -> None:
        self._turn_ends = None
        self._made_this_turn = 0
        for entry in self._waiting:
            entry[2] = 0

    def _pump(self) -> None:
        conn, transport, timer = self._conn, self._transport, self._timer
        if conn is None or transport is None or timer is None:
            return
        made = max(conn.unsent_frames - self._told, 0)
        if made:
            self._made_this_turn += made
            if self._turn_ends is None and self._loop is not None:
                self._turn_ends = self._loop.call_soon(self._end_turn)
        for chunk in conn.writes():
            if not transport.is_closing():
                transport.write(chunk)
        size = transport.get_write_buffer_size()
        if size > self._buffered:
            self._waiting.append([size - self._buffered, made, 1])
        self._buffered = size
        conn.unsent_frames = self._told = self._unsent_frames(transport)
        if size > H2_MAX_UNSENT_BYTES and not self._paused and not transport.is_closing():
            self._paused = True
            transport.pause_reading()
        action = conn.close_action
        if action is H2CloseAction.DROP:
            timer.cancel()
            transport.abort()  # the output that waits is dropped, not awaited
            return
        if action is H2CloseAction.QUIET:
            timer.cancel()
            _close_tls(transport, close_notify=False)  # FIN after the writes above
            return
        if action is H2CloseAction.LINGER and not self._shut:
            self._shut = True
            _linger_tls(transport, close_notify=False)  # nginx's HTTP/2 lingering close
        timer.set(conn.get_timer())


# -- the socket under a transport ------------------------------------------------------------


def _socket_copy(transport: asyncio.BaseTransport) -> socket.socket | None:
    """A duplicate of the transport's socket (uvloop's socket wrapper has no shutdown())."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except (OSError, ValueError):
        return None


@runtime_checkable
class _CarrierClose(Protocol):
    """The closes of veil's own TLS transports (transport/carrier.py): each sends its FIN
    after the bytes the event loop still holds (uvloop 0.19 queues writes until the end of
    the loop's turn, so a shutdown() or an abort right after a write lost the answer)."""

    def close_quietly(self) -> None: ...
    def end_writing(self, *, close_notify: bool) -> None: ...


def _linger_tls(transport: asyncio.BaseTransport, *, close_notify: bool) -> None:
    """nginx's lingering close under TLS: (close_notify,) FIN, and read on."""
    if isinstance(transport, _CarrierClose):
        transport.end_writing(close_notify=close_notify)
        return
    # asyncio's own TLS transport (tests serve the cover with create_server(ssl=...)) cannot
    # half-close: close() queues close_notify and reads on for the peer's.
    if close_notify:
        cast(asyncio.Transport, transport).close()
    _shutdown_write(transport)


def _close_tls(transport: asyncio.BaseTransport, *, close_notify: bool) -> None:
    """nginx's close under TLS: (close_notify,) then FIN at once, not awaiting the peer's."""
    if isinstance(transport, _CarrierClose):
        if close_notify:
            cast(asyncio.Transport, transport).close()
        else:
            transport.close_quietly()
        return
    # asyncio's own TLS transport would wait up to 30 s for the peer's close_notify.
    if close_notify:
        cast(asyncio.Transport, transport).close()
    cast(asyncio.Transport, transport).abort()


def _shutdown_write(transport: asyncio.BaseTransport) -> None:
    """Send FIN on the socket under a transport, which keeps reading (a TLS transport cannot
    half-close by itself)."""
    dup = _socket_copy(transport)
    if dup is not None:
        with dup, contextlib.suppress(OSError):
            dup.shutdown(socket.SHUT_WR)


def _set_rst_on_close(transport: asyncio.BaseTransport) -> None:
    """Make the coming close send RST, as Linux does when unread data is left."""
    dup = _socket_copy(transport)
    if dup is not None:
        with dup, contextlib.suppress(OSError):
            dup.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
