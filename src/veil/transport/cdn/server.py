"""The server's side: claims the carrier's requests from the cover site, serves them.

:class:`CarrierServer` is what :class:`veil.cover.backends.BuiltinCover` takes as ``claim``
(the cover's ``RequestClaim``; this module does not import the cover: it matches that
interface by shape). The cover asks it about every HTTP/1.1 request over TLS that nginx would
hand to its content handler; the ones on a secret path with the carrier's shape
(:mod:`.wire`) it takes over, everything else the cover serves as always.

Each new stream (a WebSocket, or a packet-up session once its downlink GET arrives) gets a
protocol from ``protocol_factory`` and is handed over as an asyncio transport
(:class:`~.stream.ByteStream`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from veil.errors import TransportError
from veil.transport.cdn import wire
from veil.transport.cdn.stream import ByteStream
from veil.transport.cdn.websocket import WebSocketStream

log = logging.getLogger("veil.server")

#: How long an uplink POST's body may take to arrive once its headers have (nginx's
#: client_body_timeout default). A CDN buffers the body before it sends the headers, so it
#: comes at once; a connection that stalls here is cut.
UPLINK_BODY_TIMEOUT_S = 60.0
#: Packet-up sessions held at once, over all clients: each holds up to MAX_HELD_POSTS packets;
#: only holders of the secret path can open one, this caps what a leaked path can cost.
MAX_PACKET_UP_SESSIONS = 4096
#: Downlink bytes the server buffers for a session before it tells its protocol to pause
#: (the GET's connection is the only way out; TCP's own buffers come on top).
DOWNLINK_HIGH_WATER = 256 * 1024


class _Claimed(Protocol):
    """What the cover hands over (veil.cover.http1.Claimed)."""

    method: bytes
    path: bytes
    headers: dict[bytes, bytes]
    rest: bytes


GiveBack = Callable[[asyncio.Transport, bytes], None]


class CarrierServer:
    """The carrier's requests on ``secret_paths`` (each ``/SECRET/``, see wire.py)."""

    header_names = wire.HEADER_NAMES

    def __init__(self, secret_paths: Iterable[str],
                 protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self.secret_paths = frozenset(wire.check_secret_path(p) for p in secret_paths)
        self.protocol_factory = protocol_factory
        self.sessions: dict[bytes, PacketUpSession] = {}
        self.websockets: set[WebSocketStream] = set()
        self.opened = {"websocket": 0, "packet-up": 0}
        self.out_of_order = 0  # uplink packets that arrived before one they follow

    # ------------------------------------------------------------- the cover's questions
    def claims(self, method: bytes, path: bytes, headers: Mapping[bytes, bytes]) -> bool:
        request = wire.judge(method, path, headers, self.secret_paths)
        if isinstance(request, wire.DownlinkOpen):
            return (request.session not in self.sessions
                    and len(self.sessions) < MAX_PACKET_UP_SESSIONS)
        if isinstance(request, wire.UplinkPacket):
            session = self.sessions.get(request.session)
            return session is not None and not session.is_closing()
        return request is not None

    def take_over(self, transport: asyncio.Transport, claimed: _Claimed,
                  give_back: GiveBack) -> None:
        request = wire.judge(claimed.method, claimed.path, claimed.headers, self.secret_paths)
        if isinstance(request, wire.WebSocketOpen):
            transport.write(request.accept_response())
            stream = WebSocketStream(transport, client=False, trailing=claimed.rest)
            self.websockets.add(stream)
            self.opened["websocket"] += 1
            stream.start(_Untrack(self.protocol_factory(), lambda: self.websockets.discard(stream)))
        elif isinstance(request, wire.DownlinkOpen):
            session = PacketUpSession(self, request.session, transport)
            self.sessions[request.session] = session
            self.opened["packet-up"] += 1
            session.attach(self.protocol_factory())
        elif isinstance(request, wire.UplinkPacket):
            held = self.sessions.get(request.session)
            if held is None:  # gone between the claim and now: nothing to deliver to
                transport.abort()
                return
            _UplinkReader(held, request, transport, claimed.rest, give_back)
        else:  # the cover asked claims() a moment ago: cannot happen
            transport.abort()

    def close(self) -> None:
        """The server is stopping: cut every carrier."""
        for stream in list(self.websockets):
            stream.abort()
        for session in list(self.sessions.values()):
            session.abort()


class _Untrack(asyncio.Protocol):
    """Passes everything to ``inner``; calls ``done`` when the stream is lost."""

    def __init__(self, inner: asyncio.Protocol, done: Callable[[], None]) -> None:
        self.inner, self.done = inner, done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class PacketUpSession(ByteStream):
    """One packet-up stream: the downlink GET's connection and the packets POSTed to it."""

    def __init__(self, server: CarrierServer, session: bytes, downlink: asyncio.Transport) -> None:
        super().__init__("packet-up", {"peername": downlink.get_extra_info("peername"),
                                       "sockname": downlink.get_extra_info("sockname")})
        self.server, self.id = server, session
        self.reorder = wire.Reorder()
        self._down = downlink
        self._ready: list[bytes] = []  # in order, waiting while reading is paused
        self._unanswered: list[_UplinkReader] = []  # uplink 200s held while paused
        downlink.set_protocol(_Downlink(self))
        downlink.set_write_buffer_limits(high=DOWNLINK_HIGH_WATER)
        downlink.write(wire.DOWNLINK_RESPONSE + wire.downlink_preamble())

    def packet(self, seq: int, data: bytes, reader: _UplinkReader) -> None:
        """A whole uplink packet; its POST is answered at once unless reading is paused
        (then once resumed: the client has only MAX_POSTS_IN_FLIGHT unanswered, so a paused
        reader slows it down)."""
        if self.is_closing():
            reader.transport.abort()
            return
        if seq != self.reorder.next_seq:
            self.server.out_of_order += 1
        try:
            self._ready += self.reorder.push(seq, data)
        except TransportError as exc:
            log.info("packet-up session ended: %s", exc)
            reader.transport.abort()
            self.abort()
            return
        self._unanswered.append(reader)
        self._drain()

    def _drain(self) -> None:
        while self._ready and not self._reading_paused and not self.is_closing():
            self.deliver(self._ready.pop(0))
        if not self._reading_paused:
            readers, self._unanswered = self._unanswered, []
            for reader in readers:
                reader.answer()

    def _send(self, data: bytes) -> None:
        self._down.write(wire.chunk(data))

    def _finish(self) -> None:
        self._down.write(wire.DOWNLINK_END)
        self._down.close()

    def _cut(self) -> None:
        self._down.abort()

    def _hold_reading(self, hold: bool) -> None:
        if not hold:
            self._drain()

    def get_write_buffer_size(self) -> int:
        return self._down.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._down.get_write_buffer_limits()

    def downlink_lost(self, exc: Exception | None) -> None:
        self.server.sessions.pop(self.id, None)
        readers, self._unanswered = self._unanswered, []
        for reader in readers:
            reader.transport.abort()
        self.lost(exc)


class _Downlink(asyncio.Protocol):
    """The downlink GET's connection: the client says nothing more on it; its end ends the
    session (a client closes its stream by closing this request)."""

    def __init__(self, session: PacketUpSession) -> None:
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.abort()  # a proxy sends nothing after a GET's headers

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.downlink_lost(exc)

    def pause_writing(self) -> None:
        self.session.output_full()

    def resume_writing(self) -> None:
        self.session.output_drained()


class _UplinkReader(asyncio.Protocol):
    """Reads one POST's body, hands the packet to its session, answers 200 and gives the
    connection back to the cover for the proxy's next request (or closes it)."""

    def __init__(self, session: PacketUpSession, request: wire.UplinkPacket,
                 transport: asyncio.Transport, rest: bytes, give_back: GiveBack) -> None:
        self.session, self.request, self.transport = session, request, transport
        self.give_back = give_back
        self.body = bytearray()
        self.done = False
        self.extra = b""  # bytes of the proxy's next request, read with the body's end
        loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = loop.call_later(UPLINK_BODY_TIMEOUT_S,
                                                                  transport.abort)
        transport.set_protocol(self)
        if rest:
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        need = self.request.length - len(self.body)
        self.body += data[:need]
        if len(self.body) < self.request.length:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.pause_reading()  # until answered: the next request waits for the 200
        self.extra = bytes(data[need:])
        self.session.packet(self.request.seq, bytes(self.body), self)

    def answer(self) -> None:
        transport, extra = self.transport, self.extra
        if transport.is_closing():
            return
        if self.request.close:
            transport.write(wire.UPLINK_RESPONSE_CLOSE)
            transport.close()
            return
        transport.write(wire.UPLINK_RESPONSE)
        transport.resume_reading()
        self.give_back(transport, extra)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

