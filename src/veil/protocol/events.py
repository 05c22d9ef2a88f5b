"""Events a :class:`veil.protocol.session.Session` reports; one frozen class per happening."""

from __future__ import annotations

from dataclasses import dataclass

from veil.protocol.address import Address
from veil.protocol.frames import CloseCode, ResetCode, StreamKind


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream (server side): connect ``kind`` to ``destination``."""

    stream_id: int
    kind: StreamKind
    destination: Address


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Stream bytes arrived. Call ``Session.consume`` once they have been delivered onward."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer will send no more data on this stream (half-close)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone (reset by the peer, or by us for a protocol or flow-control fault)."""

    stream_id: int
    code: ResetCode
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """A stream that ``send_data`` reported as blocked may take data again."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    """One UDP datagram on a UDP stream; ``address`` is its destination (to the server) or
    its source (to the client)."""

    stream_id: int
    address: Address
    payload: bytes


@dataclass(frozen=True, slots=True)
class PacketReceived:
    """One IP packet on an IP stream: ``packet`` is the offload header and the packet, as
    they go to a TUN device (veil.protocol.ip)."""

    stream_id: int
    packet: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """Our keepalive ping came back after ``rtt`` seconds."""

    rtt: float


@dataclass(frozen=True, slots=True)
class ReportReceived:
    """A client sent a block report (server side): ``payload`` is the PADDING payload, tag
    included, for veil.protocol.report.decode_report."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is over; no further events follow. ``remote`` tells who closed it."""

    code: CloseCode
    reason: str
    remote: bool


@dataclass(frozen=True, slots=True)
class JoinRequested:
    """Server: the client says this session is ``member`` of its pool ``pool_id``
    (veil.protocol.stripe); answer with :meth:`Session.answer_join` to group it."""

    pool_id: bytes
    member: int


@dataclass(frozen=True, slots=True)
class JoinAnswered:
    """Client: the server grouped this session; members with the same ``token`` are in one
    group, and a stream may be striped over them."""

    token: bytes


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """A piece of a stream whose home is another session of the pool (``member``): hand it
    to that session's :meth:`Session.receive_chunk`."""

    member: int
    stream_id: int
    offset: int
    fin: bool
    data: bytes


Event = (StreamOpened | DataReceived | StreamEnded | StreamReset | StreamWritable
         | DatagramReceived | PacketReceived | PongReceived | ReportReceived | SessionClosed
         | JoinRequested | JoinAnswered | ChunkReceived)
