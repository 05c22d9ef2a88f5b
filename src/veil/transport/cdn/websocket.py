"""The WebSocket variant (RFC 6455 framing by wsproto, sans-IO) on both sides.

Each ``write`` is one binary message; a message's frames reach the protocol as they arrive
(wsproto hands data over frame by frame, so nothing waits for a whole message). ``close()``
sends a Close frame (1000) and closes the connection once the peer's Close arrives, or after
CLOSE_HANDSHAKE_TIMEOUT_S; a connection that ends without a Close frame is an abort
(``connection_lost`` with an error). Text messages are a protocol error (1003).

The client's first message goes out behind Ping frames of random bytes, in the same write
(one TLS record), so that the first client record after the 101 is 900-1,400 bytes: veil's
first message alone (the Noise handshake's, ~120 bytes) after a ClientHello-sized upgrade
request and the CDN's tickets and 101 is what the lab's TLS-in-TLS detector takes for an
inner client Finished. Every WebSocket server answers Pings (the server's Pongs pad the
other way the same); the client drops the Pongs. Cost: ~1 KiB each way per connection.
"""

from __future__ import annotations

import asyncio
import os

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from veil.errors import TransportError
from veil.transport.cdn.stream import ByteStream

#: How long a closing side waits for the peer's Close frame before it cuts the connection
#: (a peer or CDN that lost it must not keep the socket): a round trip through a CDN is
#: well under a second.
CLOSE_HANDSHAKE_TIMEOUT_S = 5.0
#: The size the client's first message is padded to (random in this range): the range veil's
#: session shaping pads its small first writes to (protocol/shaping.py, which the transport
#: layer does not import), so this record is as unremarkable as the ones that follow.
FIRST_MESSAGE_SIZE = range(900, 1401)
#: A control frame's payload is at most 125 bytes (RFC 6455, section 5.5).
MAX_PING_PAYLOAD = 125
#: A client's masked frame header for a payload under 126 bytes: 2 bytes and the 4-byte mask.
_SMALL_FRAME_HEADER = 6


class WebSocketStream(ByteStream, asyncio.Protocol):
    """The stream over one WebSocket connection; also the protocol of that connection."""

    def __init__(self, raw: asyncio.Transport, *, client: bool, trailing: bytes = b"") -> None:
        ByteStream.__init__(self, "websocket", {"peername": raw.get_extra_info("peername"),
                                                "sockname": raw.get_extra_info("sockname"),
                                                "http": "http/1.1"})
        self._raw = raw
        self._ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self._trailing = trailing
        self._close_timer: asyncio.TimerHandle | None = None
        self._pad_first_message = client  # see the module's docstring

    def start(self, protocol: asyncio.Protocol) -> None:
        """Become the connection's protocol and hand ``protocol`` the stream."""
        self._raw.set_protocol(self)
        self.attach(protocol)
        if self._trailing:
            trailing, self._trailing = self._trailing, b""
            self.data_received(trailing)

    # ---------------------------------------------------------------- the connection's side
    def data_received(self, data: bytes) -> None:
        try:
            self._ws.receive_data(bytes(data))
            self._events()
        except (RemoteProtocolError, LocalProtocolError) as exc:
            self._fail(TransportError(f"WebSocket: {exc}"))

    def _events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                self.deliver(bytes(event.data))
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._put(event.response())  # answer, then the connection ends
                self._end(None)
                return
            elif isinstance(event, Ping):
                self._put(event.response())
            elif isinstance(event, TextMessage):
                self._put(CloseConnection(code=CloseReason.UNSUPPORTED_DATA))
                self._end(TransportError("WebSocket: a text message on a binary carrier"))
                return

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if exc is None and self._ws.state is not ConnectionState.CLOSED:
            exc = TransportError("the WebSocket connection ended without a Close frame")
        self.lost(exc)

    def pause_writing(self) -> None:
        self.output_full()

    def resume_writing(self) -> None:
        self.output_drained()

    # ---------------------------------------------------------------- the stream's side
    def _put(self, event: Event) -> None:
        if not self._raw.is_closing():
            self._raw.write(self._ws.send(event))

    def _send(self, data: bytes) -> None:
        if self._ws.state is not ConnectionState.OPEN or self._raw.is_closing():
            return
        message = self._ws.send(Message(data=data))
        if self._pad_first_message:
            self._pad_first_message = False
            target = FIRST_MESSAGE_SIZE.start + int.from_bytes(os.urandom(2), "big") % len(
                FIRST_MESSAGE_SIZE)
            message = self._pings(target - len(message)) + message
        self._raw.write(message)

    def _pings(self, size: int) -> bytes:
        """Ping frames of random payload, about ``size`` bytes in all."""
        frames = []
        while size > _SMALL_FRAME_HEADER:
            payload = min(MAX_PING_PAYLOAD, size - _SMALL_FRAME_HEADER)
            frame = self._ws.send(Ping(payload=os.urandom(payload)))
            frames.append(frame)
            size -= len(frame)
        return b"".join(frames)

    def _finish(self) -> None:
        if self._ws.state is not ConnectionState.OPEN:
            return
        self._put(CloseConnection(code=CloseReason.NORMAL_CLOSURE))
        self._close_timer = asyncio.get_running_loop().call_later(
            CLOSE_HANDSHAKE_TIMEOUT_S, self._raw.abort)

    def _cut(self) -> None:
        self._raw.abort()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def _hold_reading(self, hold: bool) -> None:
        if hold:
            self._raw.pause_reading()
        elif not self._raw.is_closing():
            self._raw.resume_reading()

    def _end(self, exc: Exception | None) -> None:
        """The close handshake is over (or failed): close the connection, end the stream."""
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._raw.close()
        self.lost(exc)

    def _fail(self, exc: Exception) -> None:
        self._raw.abort()
        self.lost(exc)

