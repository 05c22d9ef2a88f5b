"""The byte stream both ends of the carrier hand their protocol: an asyncio transport.

Whatever carries it (WebSocket messages, packet-up's POSTs and chunked GET), the protocol
above sees an ordinary :class:`asyncio.Transport`: ``write`` takes opaque bytes, they arrive
in order at the other end's ``data_received``; ``close`` ends the stream cleanly (the other
end gets ``eof_received`` then ``connection_lost(None)``), ``abort`` cuts it;
``pause_writing``/``resume_writing`` and ``pause_reading``/``resume_reading`` work as on TCP.
``get_extra_info("carrier")`` says which variant ("websocket" or "packet-up").
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any


class ByteStream(asyncio.Transport, metaclass=abc.ABCMeta):
    """A carrier's stream; subclasses say how bytes go out and how it ends."""

    def __init__(self, kind: str, extra: dict[str, Any]) -> None:
        super().__init__({"carrier": kind, **extra})
        self._protocol: asyncio.Protocol | None = None
        self._closing = False
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False

    # -------------------------------------------------------------- for the variants
    def attach(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)

    def deliver(self, data: bytes) -> None:
        if self._protocol is not None and not self._lost:
            self._protocol.data_received(data)

    def lost(self, exc: Exception | None) -> None:
        """The carrier is gone: a clean end gives eof_received first (as TCP's FIN would)."""
        if self._lost:
            return
        self._lost = self._closing = True
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        if exc is None:
            protocol.eof_received()
        protocol.connection_lost(exc)

    def output_full(self) -> None:
        if not self._writing_paused and self._protocol is not None and not self._lost:
            self._writing_paused = True
            self._protocol.pause_writing()

    def output_drained(self) -> None:
        if self._writing_paused and self._protocol is not None and not self._lost:
            self._writing_paused = False
            self._protocol.resume_writing()

    @abc.abstractmethod
    def _send(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def _finish(self) -> None:
        """Close cleanly once what was written is out."""

    @abc.abstractmethod
    def _cut(self) -> None:
        """Close at once."""

    @abc.abstractmethod
    def _hold_reading(self, hold: bool) -> None: ...

    @abc.abstractmethod
    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet sent on (what the variant holds, or its socket's)."""

    @abc.abstractmethod
    def get_write_buffer_limits(self) -> tuple[int, int]:
        """(low, high): ``pause_writing`` past high, ``resume_writing`` at or under low."""

    # -------------------------------------------------------------- asyncio.Transport
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._closing:
            self._send(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # neither variant half-closes: close() ends both directions

    def write_eof(self) -> None:
        raise NotImplementedError("the carrier cannot half-close")

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._finish()

    def abort(self) -> None:
        self._closing = True
        self._cut()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_reading(self) -> bool:
        return not self._reading_paused

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._hold_reading(True)

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._hold_reading(False)
