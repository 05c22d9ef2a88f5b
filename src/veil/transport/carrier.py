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
from typing import Any, Protocol, TypeVar, cast

#: Returned by ``CarrierTransport._own_info`` for names the TCP transport answers.
NOT_MINE = object()

T = TypeVar("T")


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
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def close(self) -> None: ...
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

    @abc.abstractmethod
    def _close_notify(self) -> None:
        """Queue our close_notify alert (not waiting for the peer's)."""

    @abc.abstractmethod
    def _flush(self) -> None:
        """Write what the TLS stack has queued to the TCP transport."""

    def close(self) -> None:
        """Send our close_notify and close the TCP transport; the peer's is not awaited."""
        if self.closing or self.raw is None:
            return
        self.closing = True
        self._close_notify()
        self._flush()
        self.raw.close()

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
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

