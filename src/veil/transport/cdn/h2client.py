"""One HTTP/2 client connection to a CDN, as Chrome opens it (the ``h2`` library, sans-IO).

packet-up rides it when the CDN picks ``h2`` from Chrome's ALPN: the downlink GET and every
uplink POST are streams of this one connection, as a web app's ``fetch`` calls are. What a
censor on the client->CDN leg can compare with Chrome, we make Chrome's (Chrome 120-156, its
"Akamai" HTTP/2 fingerprint ``1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p``):

- the SETTINGS frame: HEADER_TABLE_SIZE 65536, ENABLE_PUSH 0, INITIAL_WINDOW_SIZE 6291456,
  MAX_HEADER_LIST_SIZE 262144, in that order and nothing else (h2's own defaults would
  add MAX_FRAME_SIZE, MAX_CONCURRENT_STREAMS, ENABLE_CONNECT_PROTOCOL);
- then a WINDOW_UPDATE of 15663105 on the connection (a 15 MiB receive window), in the
  same write as the preface and SETTINGS;
- no PRIORITY frames; each HEADERS carries the priority flag (exclusive, on stream 0,
  weight 220: Chrome's for a ``fetch``, whose RFC 9218 header ``priority: u=1, i`` it also
  sends); pseudo-headers in Chrome's order (``:method :authority :scheme :path``), names in
  lower case, HPACK with Huffman coding (h2's encoder, like Chrome's).

What differs, because h2 does not let us choose: HPACK's choice of which headers to index
(Chrome never indexes ``:path``; h2 indexes by its own rules), when WINDOW_UPDATEs for
received data go out (h2 acknowledges the connection's window when half of it is used;
Chrome when a third is), and the stream's DATA frame sizes (h2 sends up to the peer's
MAX_FRAME_SIZE, 16 KiB, as Chrome does, but splits on flow control differently).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from veil.errors import TransportError

#: Chrome's SETTINGS, in its order.
CHROME_SETTINGS = {
    SettingCodes.HEADER_TABLE_SIZE: 65536,
    SettingCodes.ENABLE_PUSH: 0,
    SettingCodes.INITIAL_WINDOW_SIZE: 6291456,
    SettingCodes.MAX_HEADER_LIST_SIZE: 262144,
}
#: Chrome's connection-level WINDOW_UPDATE after SETTINGS: its window becomes 15 MiB.
CHROME_CONNECTION_WINDOW_INCREMENT = 15663105
#: The HEADERS priority Chrome gives a ``fetch`` (RequestPriority HIGH -> weight 220).
FETCH_PRIORITY_WEIGHT = 220


class StreamUnprocessed(TransportError):
    """The CDN did not process this stream (above a GOAWAY's last stream id, or refused
    with REFUSED_STREAM): it may be sent again on another connection (RFC 9113, 8.7)."""


class _DrainingStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2 closes the whole connection when a GOAWAY arrives and then refuses every frame,
    where RFC 9113 (6.8) lets the streams the GOAWAY covers finish: the GET's DATA and the
    POSTs' answers still come. Here the connection stays open; :class:`H2Connection` opens
    no stream after a GOAWAY (``going_away``)."""

    def __init__(self) -> None:
        super().__init__()
        self._transitions = {
            **h2.connection.H2ConnectionStateMachine._transitions,
            (h2.connection.ConnectionState.CLIENT_OPEN,
             h2.connection.ConnectionInputs.RECV_GOAWAY):
                (None, h2.connection.ConnectionState.CLIENT_OPEN),
        }


class _ChromeSettings(h2.settings.Settings):
    """Settings that announce only Chrome's four, in Chrome's order; h2 still knows the
    defaults of the others (MAX_FRAME_SIZE 16384 and so on), as the peer does."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(CHROME_SETTINGS)


class H2Stream:
    """One request's stream: its response status, its body (to a consumer once there is
    one), and what is left of its request body to send."""

    def __init__(self, connection: H2Connection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status.add_done_callback(_retrieve)
        self.ended.add_done_callback(_retrieve)
        self.unsent = bytearray()
        self.end_after_unsent = False
        # Body bytes before a consumer took the stream over, with their flow-controlled
        # lengths (acknowledged as the consumer gets them).
        self._queued: list[tuple[bytes, int]] = []
        self._consumer: Callable[[bytes], None] | None = None
        self._on_end: Callable[[BaseException | None], None] | None = None
        self.held = False  # the consumer paused reading: body bytes wait, unacknowledged
        self._end_told = False

    def consume(self, on_data: Callable[[bytes], None],
                on_end: Callable[[BaseException | None], None]) -> None:
        self._consumer, self._on_end = on_data, on_end
        self._release()

    def held_bytes(self) -> int:
        """Body bytes received and not yet handed to the consumer."""
        return sum(len(data) for data, _flow in self._queued)

    def hold(self, hold: bool) -> None:
        """Stop acknowledging (and handing up) body bytes while held: the CDN stops sending
        once the stream's window (6 MiB, Chrome's) is used, as it would for Chrome."""
        self.held = hold
        if not hold:
            self._release()

    def _release(self) -> None:
        while self._queued and self._consumer is not None and not self.held:
            data, flow = self._queued.pop(0)
            self.connection.acknowledge(self.stream_id, flow)
            self._consumer(data)
        self._tell_end()

    def _tell_end(self) -> None:
        """The consumer learns of the end once it has had every byte before it."""
        if (self._on_end is not None and self.ended.done() and not self._queued
                and not self._end_told):
            self._end_told = True
            self._on_end(self.ended.exception())

    def data(self, data: bytes, flow: int) -> None:
        if self._consumer is None or self.held or self._queued:
            self._queued.append((data, flow))
        else:
            self.connection.acknowledge(self.stream_id, flow)
            self._consumer(data)

    def end(self, exc: BaseException | None) -> None:
        if not self.status.done():
            self.status.set_exception(exc or TransportError("the stream ended without an answer"))
        if not self.ended.done():
            if exc is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(exc)
            self._tell_end()

    def reset(self) -> None:
        """Cancel the stream (RST_STREAM CANCEL, as Chrome does for an aborted fetch)."""
        self.connection.reset(self.stream_id)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class H2Connection(asyncio.Protocol):
    """The connection: Chrome's preface, streams opened by :meth:`request`, flow control
    both ways, GOAWAY noted (no new streams after it, those in flight finish)."""

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = _ChromeSettings(client=True, initial_values=CHROME_SETTINGS)
        self.h2.state_machine = _DrainingStateMachine()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.going_away = False
        self.lost: BaseException | None = None

    @property
    def usable(self) -> bool:
        return not self.going_away and self.lost is None and self.transport is not None \
            and not self.transport.is_closing()

    # ------------------------------------------------------------------ transport side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CHROME_CONNECTION_WINDOW_INCREMENT)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(bytes(data))
        except h2.exceptions.ProtocolError as exc:
            self._fail(TransportError(f"the CDN's answer is not HTTP/2: {exc}"))
            return
        for event in events:
            self._event(event)
        self._flush()

    def _event(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            status = dict(event.headers or []).get(b":status", b"0")
            if not stream.status.done():
                stream.status.set_result(int(status) if status.isdigit() else 0)
        elif isinstance(event, h2.events.DataReceived) and stream is not None:
            stream.data(event.data or b"", event.flow_controlled_length or 0)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            self.streams.pop(stream.stream_id, None)
            stream.end(None)
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            self.streams.pop(stream.stream_id, None)
            refused = event.error_code == ErrorCodes.REFUSED_STREAM
            stream.end((StreamUnprocessed if refused else TransportError)(
                f"the CDN reset the stream ({event.error_code!r})"))
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._pump()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.going_away = True
            last = event.last_stream_id or 0
            for stream_id, gone in list(self.streams.items()):
                if stream_id > last:
                    self.streams.pop(stream_id, None)
                    gone.end(StreamUnprocessed(f"the CDN is closing the connection "
                                               f"({event.error_code!r}) before stream "
                                               f"{stream_id}"))
                elif event.error_code != ErrorCodes.NO_ERROR:
                    self.streams.pop(stream_id, None)
                    gone.end(TransportError(
                        f"the CDN closed the connection ({event.error_code!r})"))
        elif isinstance(event, h2.events.DataReceived):
            # a stream we no longer follow: give its window back all the same
            self.acknowledge(event.stream_id, event.flow_controlled_length or 0)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("the CDN closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.end(TransportError(f"the carrier's connection ended: {exc}"))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # ------------------------------------------------------------------ requests
    def request(self, headers: list[tuple[bytes, bytes]], body: bytes | None = None) -> H2Stream:
        """Open a stream: ``headers`` (pseudo-headers first), then ``body`` (none: the
        request ends with its HEADERS, as a GET does)."""
        if not self.usable:
            raise TransportError("the CDN's HTTP/2 connection is going away")
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.h2.send_headers(stream_id, headers, end_stream=body is None,
                             priority_weight=FETCH_PRIORITY_WEIGHT, priority_depends_on=0,
                             priority_exclusive=True)
        if body is not None:
            stream.unsent += body
            stream.end_after_unsent = True
        self._pump()
        self._flush()
        return stream

    def _pump(self) -> None:
        """Send what flow control lets through, stream by stream, in frames of at most the
        CDN's MAX_FRAME_SIZE."""
        for stream in list(self.streams.values()):
            while stream.unsent:
                window = min(self.h2.local_flow_control_window(stream.stream_id),
                             self.h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = bytes(stream.unsent[:window])
                del stream.unsent[:window]
                last = not stream.unsent and stream.end_after_unsent
                self.h2.send_data(stream.stream_id, chunk, end_stream=last)
                if last:
                    stream.end_after_unsent = False
        self._flush()

    def acknowledge(self, stream_id: int, flow: int) -> None:
        if flow <= 0:
            return
        try:
            # (h2 still credits the connection's window for a stream already closed)
            self.h2.acknowledge_received_data(flow, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def reset(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        try:
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            return  # already closed both ways
        self._flush()

    def close(self) -> None:
        """GOAWAY (no error), then close the TLS connection."""
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        self._flush()
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
