"""Both sides of a carrier: what every byte carrier here does alike, and hands its protocol.

A carrier is an asyncio protocol on a TCP transport that turns its bytes into something else
(TLS records, for both of veil's TLS stacks); :class:`CarrierProtocol` is what the two TLS
carriers share (how they close, abort and fail their handshake). The application above it
sees a :class:`CarrierTransport`: an ordinary :class:`asyncio.Transport` whose writes and
closes go through the carrier, while flow control and socket details go straight to the TCP
transport.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from typing import Any, Protocol, TypeVar, cast

#: Returned by ``CarrierTransport._own_info`` for names the TCP transport answers.
NOT_MINE = object()

#: How far the ciphertext the socket has not accepted may exceed the TCP transport's high-water
#: mark before the carrier stops reading the socket (until the transport says it has drained
#: below its low-water mark). A protocol that heeds pause_writing overshoots the mark by a
#: frame or two (a 256 KiB DATA frame is the largest), so it never gets here; one that answers
#: every read regardless (a PING, a pipelined request) would otherwise make the carrier buffer
#: as much as the peer sends without reading. Legitimate traffic must never reach it: if both
#: ends stopped reading while sending in bulk, neither would drain the other.
UNSENT_READ_SLACK = 1024 * 1024


class ReadHold(enum.Flag):
    """Why a carrier is not reading its socket; it reads again once no reason is left."""

    NONE = 0
    APP = enum.auto()  # the protocol above asked (TlsTransport.pause_reading)
    THROTTLE = enum.auto()  # a rate limit's bucket is empty
    BACKLOG = enum.auto()  # its unsent output is over the mark (UNSENT_READ_SLACK)
    TURN = enum.auto()  # it read a full buffer: other connections get the loop first

T = TypeVar("T")

#: How long a closed connection may take to send what it still holds before it is cut: a
#: peer that stops reading would otherwise keep the socket and its buffer for ever (nginx's
#: send_timeout, 60 s).
CLOSE_FLUSH_TIMEOUT_S = 60.0


async def finish_handshake(raw: asyncio.Transport, handshake: asyncio.Future[T],
                           timeout: float) -> T:
    """Wait up to ``timeout`` for a carrier's ``handshake`` on the TCP transport ``raw``.

    On any failure (the handshake's, the timeout, cancellation) ``raw`` is aborted, so no
    half-open connection outlives the call. The handshake future is shielded: giving up on
    the wait does not cancel it, the carrier still settles it (the abort fails it).
    """
    try:
        return await asyncio.wait_for(asyncio.shield(handshake), timeout)
    except BaseException:
        raw.abort()
        raise


class Carrier(Protocol):
    raw: asyncio.Transport | None
    app: asyncio.Protocol | None
    closing: bool

    def set_app(self, protocol: asyncio.Protocol) -> None: ...
    def hold_reading(self, reason: ReadHold) -> None: ...
    def release_reading(self, reason: ReadHold) -> None: ...
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def close(self) -> None: ...
    def close_quietly(self) -> None: ...
    def end_writing(self, *, close_notify: bool) -> None: ...
    def abort(self) -> None: ...


class CarrierProtocol(asyncio.BufferedProtocol, metaclass=abc.ABCMeta):
    """The TCP side of a TLS carrier: the parts both TLS stacks do the same way.

    Subclasses set ``raw`` in ``connection_made``, make ``handshake`` (resolved with the
    application's transport, or failed), and say how their TLS stack queues its close_notify
    (:meth:`_close_notify`) and how its pending output reaches the socket (:meth:`_flush`).
    """

    raw: asyncio.Transport | None
    closing: bool
    handshake: asyncio.Future[Any]
    # Why the socket is not being read (see ReadHold); starts reading.
    _read_holds: ReadHold = ReadHold.NONE
    # Our FIN is queued (end_writing): nothing more may be written, reading goes on.
    _writing_ended = False

    @abc.abstractmethod
    def _close_notify(self) -> None:
        """Queue our close_notify alert (not waiting for the peer's)."""

    @abc.abstractmethod
    def _flush(self) -> None:
        """Write what the TLS stack has queued to the TCP transport."""

    # ------------------------------------------------------------------ reading
    def hold_reading(self, reason: ReadHold) -> None:
        """Stop reading the socket for ``reason`` (until :meth:`release_reading` with it)."""
        self._read_holds |= reason
        if self.raw is not None:
            self.raw.pause_reading()

    def release_reading(self, reason: ReadHold) -> None:
        """Drop ``reason``; the socket is read again when no other reason is left."""
        self._read_holds &= ~reason
        if self.raw is not None and not self._read_holds and not self.closing:
            self.raw.resume_reading()

    def _write_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Write ciphertext to the socket; stop reading it while too much is unsent."""
        raw = self.raw
        if raw is None or self._writing_ended or raw.is_closing():
            # A closed TCP transport takes nothing more (uvloop raises): what a close after
            # the connection was lost would write (a close_notify) has nowhere to go.
            return
        raw.write(data)
        if (not self._read_holds & ReadHold.BACKLOG
                and raw.get_write_buffer_size() > raw.get_write_buffer_limits()[1]
                + UNSENT_READ_SLACK):
            # The TCP transport, over its high-water mark, has told us pause_writing (and
            # we our protocol); its resume_writing (drained below its low-water mark) is
            # what ends this hold, see _unsent_drained.
            self.hold_reading(ReadHold.BACKLOG)

    def _unsent_drained(self) -> None:
        """The TCP transport is below its low-water mark: read again if that was why not."""
        if self._read_holds & ReadHold.BACKLOG:
            self.release_reading(ReadHold.BACKLOG)

    def _take_turns(self, nbytes: int, size: int) -> None:
        """After a full read (``nbytes == size``: more is likely waiting) let the event loop
        serve other connections before this one reads again.

        uvloop (libuv) reads a socket up to 32 times in one callback while each read fills
        the buffer: 8 MiB of tiny frames from one peer then keep the loop for seconds, and
        every other user waits. One read per turn bounds that to one buffer's work.
        """
        if nbytes == size and not self._read_holds & ReadHold.TURN and not self.closing:
            self.hold_reading(ReadHold.TURN)
            asyncio.get_running_loop().call_soon(self.release_reading, ReadHold.TURN)

    def close(self) -> None:
        """Send our close_notify and close the TCP transport; the peer's is not awaited."""
        if self.closing or self.raw is None:
            return
        self.closing = True
        self._close_notify()
        self._flush()
        self._close_raw(self.raw)

    def close_quietly(self) -> None:
        """Close the TCP connection without a close_notify (nginx's quiet shutdown), after
        what was written before."""
        self.closing = True
        if self.raw is not None:
            self._close_raw(self.raw)

    def _close_raw(self, raw: asyncio.Transport) -> None:
        """Close ``raw`` once what it holds is sent, and cut it if a peer that reads nothing
        keeps that from happening for CLOSE_FLUSH_TIMEOUT_S (nginx's send_timeout)."""
        raw.close()
        if raw.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT_S, raw.abort)

    def end_writing(self, *, close_notify: bool) -> None:
        """A lingering close's first half: our close_notify (or none, as nginx's HTTP/2
        does), then FIN, and the socket is read on until the application closes.

        The TCP transport's write_eof sends the FIN after the bytes it still holds; a
        shutdown() on the socket itself would overtake them (uvloop 0.19 queues writes until
        the end of the loop's turn: the peer got a bare FIN).
        """
        raw = self.raw
        if raw is None or self.closing or self._writing_ended or raw.is_closing():
            return
        if close_notify:
            self._close_notify()
            self._flush()
        self._writing_ended = True
        if raw.can_write_eof():
            raw.write_eof()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def _fail_handshake(self, exc: Exception) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)


class CarrierTransport(asyncio.Transport):
    """Delegates to a carrier (data, close) and to its TCP transport (everything else)."""

    def __init__(self, carrier: Carrier) -> None:
        super().__init__()
        self._carrier = carrier
        assert carrier.raw is not None
        self._raw = carrier.raw

    def _own_info(self, name: str) -> Any:
        """The carrier's own extra info (``tls_unique``, ...); ``NOT_MINE`` for the rest."""
        return NOT_MINE

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        value = self._own_info(name)
        return self._raw.get_extra_info(name, default) if value is NOT_MINE else value

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._carrier.set_app(cast(asyncio.Protocol, protocol))

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._carrier.app is not None
        return self._carrier.app

    def is_closing(self) -> bool:
        return self._carrier.closing or self._raw.is_closing()

    def close(self) -> None:
        self._carrier.close()

    def close_quietly(self) -> None:
        """FIN after what was written, without a close_notify."""
        self._carrier.close_quietly()

    def end_writing(self, *, close_notify: bool) -> None:
        """(close_notify,) then FIN after what was written; reading goes on."""
        self._carrier.end_writing(close_notify=close_notify)

    def abort(self) -> None:
        self._carrier.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._carrier.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._carrier.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # TLS 1.3 has no half-close: close_notify ends both directions

    def write_eof(self) -> None:
        raise NotImplementedError("TLS cannot half-close")

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def pause_reading(self) -> None:
        self._carrier.hold_reading(ReadHold.APP)

    def resume_reading(self) -> None:
        self._carrier.release_reading(ReadHold.APP)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

