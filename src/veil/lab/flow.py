"""Flows as a censor's middlebox sees them: packets in, per-direction byte streams out.

Sans-IO: :class:`FlowTable` takes :class:`Packet` values (already decoded from whatever
capture format, see :mod:`veil.lab.pcap`) and builds :class:`Flow` objects. TCP is
reassembled per direction just far enough for the detectors: the first data packet of the
client exactly as it was sent (the fully-encrypted rule looks at one packet, not a stream),
and the in-order bytes of each direction with the time each chunk completed (TLS records and
their sizes and directions). UDP keeps its first datagrams; other IP protocols (GRE) keep
their first packets.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# A censor looks at the beginning of a flow; keeping every byte of a large download would
# only cost memory. Bytes beyond this per direction are counted but not stored.
MAX_STREAM_BYTES = 256 * 1024
# Datagrams kept per UDP flow (handshakes are in the first few).
MAX_DATAGRAMS = 64
# Out-of-order TCP segments held per direction while waiting for a gap to fill.
MAX_PENDING_SEGMENTS = 512

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10
SEQ_MOD = 1 << 32


class Direction(enum.Enum):
    """Which way bytes went: from the flow's client (who opened it) or from its server."""

    CLIENT = "c2s"
    SERVER = "s2c"


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Packet:
    """One captured IP packet, decoded: what the flow table needs and nothing else."""

    time: float
    proto: str  # "tcp", "udp", or "ip:N" for another IP protocol (GRE is "ip:47")
    src: Endpoint
    dst: Endpoint
    payload: bytes
    tcp_flags: int = 0
    seq: int = 0
    ack: int = 0
    """The acknowledgement number (meaningful when ``tcp_flags`` has ACK): the sender's
    next expected byte, which an in-path censor needs to forge an RST the sender accepts."""


@dataclass(frozen=True)
class Chunk:
    """Application bytes that became available in one direction at ``time``.

    For TCP, a chunk is the new in-order bytes one segment delivered (a retransmission
    delivers nothing; a segment that fills a gap delivers everything up to the next gap). For
    UDP and other protocols, a chunk is one datagram's payload.
    """

    direction: Direction
    time: float
    data: bytes


@dataclass
class Flow:
    """One connection (TCP) or one 5-tuple's exchange (UDP), from its first packet."""

    transport: str
    client: Endpoint
    server: Endpoint
    start: float
    chunks: list[Chunk] = field(default_factory=list)
    first_client_packet: bytes | None = None
    """The payload of the client's first data-carrying packet, as it crossed the wire."""
    saw_handshake: bool = False
    """A SYN (TCP) was seen, so client and server are known, not guessed."""
    close: str = "open"
    """How the flow ended in the capture: ``fin``, ``rst`` or ``open``."""
    ends: dict[Direction, float] = field(default_factory=dict)
    """When each side's first FIN or RST was seen: who closed, and when."""
    bytes_total: dict[Direction, int] = field(
        default_factory=lambda: {Direction.CLIENT: 0, Direction.SERVER: 0})
    packets_total: int = 0
    truncated: bool = False
    """More bytes went by than were kept (see MAX_STREAM_BYTES and MAX_DATAGRAMS)."""

    @property
    def key(self) -> str:
        return f"{self.transport} {self.client} -> {self.server}"

    def stream(self, direction: Direction) -> bytes:
        """The in-order bytes kept for one direction."""
        return b"".join(c.data for c in self.chunks if c.direction is direction)

    def datagrams(self, direction: Direction) -> list[bytes]:
        return [c.data for c in self.chunks if c.direction is direction]

    def first_data(self, direction: Direction) -> bytes | None:
        for chunk in self.chunks:
            if chunk.direction is direction and chunk.data:
                return chunk.data
        return None

    def summary(self) -> dict[str, object]:
        return {"flow": self.key, "transport": self.transport, "client": str(self.client),
                "server": str(self.server), "start": self.start, "close": self.close,
                "client_bytes": self.bytes_total[Direction.CLIENT],
                "server_bytes": self.bytes_total[Direction.SERVER],
                "packets": self.packets_total}


class _TcpDirection:
    """Reassembly state of one direction of a TCP connection."""

    def __init__(self) -> None:
        self.next_seq: int | None = None  # sequence number of the next byte we expect
        self.pending: dict[int, bytes] = {}  # out-of-order segments by sequence number
        self.stored = 0

    def start(self, isn_plus_one: int) -> None:
        if self.next_seq is None:
            self.next_seq = isn_plus_one % SEQ_MOD

    def deliver(self, seq: int, payload: bytes) -> bytes:
        """The new in-order bytes after this segment arrives (possibly none)."""
        if self.next_seq is None:
            # Mid-stream capture with no SYN: take the first data we see as the start.
            self.next_seq = seq
        if len(self.pending) < MAX_PENDING_SEGMENTS and len(payload) > len(
                self.pending.get(seq, b"")):
            self.pending[seq] = payload  # a retransmission may carry more than the original
        out = bytearray()
        progressed = True
        while progressed:
            progressed = False
            for s in list(self.pending):
                data = self.pending[s]
                offset = (self.next_seq - s) % SEQ_MOD
                if offset >= SEQ_MOD // 2:
                    continue  # starts after the next expected byte: a gap remains
                del self.pending[s]
                if offset < len(data):
                    new = data[offset:]
                    out += new
                    self.next_seq = (self.next_seq + len(new)) % SEQ_MOD
                    progressed = True
        return bytes(out)


@dataclass
class _TcpState:
    flow: Flow
    directions: dict[Direction, _TcpDirection]


class FlowTable:
    """Builds flows from packets in capture order."""

    def __init__(self) -> None:
        self._flows: list[Flow] = []
        self._tcp: dict[tuple[Endpoint, Endpoint], _TcpState] = {}
        self._other: dict[tuple[str, Endpoint, Endpoint], Flow] = {}

    @property
    def flows(self) -> list[Flow]:
        """Every flow, in the order its first packet was seen."""
        return list(self._flows)

    def add(self, packet: Packet) -> Flow:
        """Account ``packet`` to its flow (a new one if needed) and return that flow."""
        if packet.proto == "tcp":
            return self._add_tcp(packet)
        return self._add_datagram(packet)

    def forget(self, flow: Flow) -> None:
        """Drop a flow from the table (a live observer's memory bound); later packets of
        the same 5-tuple start a new flow."""
        for key in [k for k, state in self._tcp.items() if state.flow is flow]:
            del self._tcp[key]
        for other in [k for k, f in self._other.items() if f is flow]:
            del self._other[other]
        self._flows = [f for f in self._flows if f is not flow]

    # ------------------------------------------------------------------ TCP
    def _add_tcp(self, p: Packet) -> Flow:
        syn_only = p.tcp_flags & TCP_SYN and not p.tcp_flags & TCP_ACK
        state = self._tcp.get((p.src, p.dst))
        if state is None:
            reverse = self._tcp.get((p.dst, p.src))
            if reverse is not None and not syn_only:
                state = reverse
        elif syn_only and (state.flow.chunks or state.flow.close != "open"):
            state = None  # a new connection reusing the same ports
        if state is None:
            client, server = self._guess_roles(p)
            flow = Flow("tcp", client, server, p.time, saw_handshake=bool(syn_only))
            state = _TcpState(flow, {Direction.CLIENT: _TcpDirection(),
                                     Direction.SERVER: _TcpDirection()})
            self._flows.append(flow)
            self._tcp[(client, server)] = state
            self._tcp[(server, client)] = state
        flow = state.flow
        flow.packets_total += 1
        direction = Direction.CLIENT if p.src == flow.client else Direction.SERVER
        half = state.directions[direction]
        if p.tcp_flags & TCP_SYN:
            half.start(p.seq + 1)
        if p.tcp_flags & TCP_RST:
            flow.close = "rst"
        elif p.tcp_flags & TCP_FIN and flow.close == "open":
            flow.close = "fin"
        if p.tcp_flags & (TCP_RST | TCP_FIN):
            flow.ends.setdefault(direction, p.time)
        if not p.payload:
            return flow
        if direction is Direction.CLIENT and flow.first_client_packet is None:
            flow.first_client_packet = p.payload
        new = half.deliver(p.seq, p.payload)
        if new:
            self._store(flow, half, direction, p.time, new)
        return flow

    def _store(self, flow: Flow, half: _TcpDirection, direction: Direction, time: float,
               data: bytes) -> None:
        flow.bytes_total[direction] += len(data)
        room = MAX_STREAM_BYTES - half.stored
        if room <= 0:
            flow.truncated = True
            return
        if len(data) > room:
            data = data[:room]
            flow.truncated = True
        half.stored += len(data)
        flow.chunks.append(Chunk(direction, time, data))

    @staticmethod
    def _guess_roles(p: Packet) -> tuple[Endpoint, Endpoint]:
        """Client and server of a new flow: the SYN's sender, else the ephemeral port's side."""
        if p.tcp_flags & TCP_SYN and p.tcp_flags & TCP_ACK:
            return p.dst, p.src  # we missed the SYN; the SYN-ACK comes from the server
        if p.tcp_flags & TCP_SYN:
            return p.src, p.dst
        if p.src.port < 1024 <= p.dst.port:
            return p.dst, p.src
        return p.src, p.dst

    # ------------------------------------------------------------------ UDP and others
    def _add_datagram(self, p: Packet) -> Flow:
        flow = self._other.get((p.proto, p.src, p.dst))
        if flow is None:
            client, server = p.src, p.dst
            if p.proto == "udp" and p.src.port < 1024 <= p.dst.port and p.src.port != p.dst.port:
                client, server = p.dst, p.src  # a reply from a well-known port
            flow = Flow(p.proto, client, server, p.time)
            self._flows.append(flow)
            self._other[(p.proto, client, server)] = flow
            self._other[(p.proto, server, client)] = flow
        flow.packets_total += 1
        direction = Direction.CLIENT if p.src == flow.client else Direction.SERVER
        flow.bytes_total[direction] += len(p.payload)
        if direction is Direction.CLIENT and flow.first_client_packet is None and p.payload:
            flow.first_client_packet = p.payload
        if len(flow.chunks) >= MAX_DATAGRAMS:
            flow.truncated = True
            return flow
        flow.chunks.append(Chunk(direction, p.time, p.payload))
        return flow
