"""Striping one stream's bytes over the sessions of a client's pool (sans-IO parts).

On a lossy long link one TCP connection carries what its congestion control allows after
each loss (~57 Mbit/s at 150 ms RTT and 1% loss), and a stream on it gets no more, however
many connections the client keeps. A striped stream is opened on one session (its *home*)
as any stream; once it has carried STRIPE_AFTER_BYTES, its bytes may travel on any session
of the pool as CHUNK frames naming (home member, stream id, offset), and the receiver puts
them back in order (:class:`Reassembly`). The shape on the wire is what a browser shows a
host with several connections open (HTTP/1.1 keeps up to 6) or a download manager fetching
ranges of one file over several: parallel connections that all carry data.

The pieces:

- JOIN: a client with a pool of several sessions sends JOIN (pool id, member number) on
  each session whose server announced FEATURE_STRIPE; the server groups the sessions of one
  user and pool id and answers JOIN (member, group token). The client stripes only over
  members whose answers carry the same token (a server with several worker processes may
  group a pool's sessions apart), and only after the answer: the server then knows the
  member before any CHUNK names it.
- Flow control is the home stream's, unchanged: CHUNK bytes count against the home
  stream's and home session's windows wherever they travel, and the receiver grants credit
  only for bytes delivered in order and consumed. Bytes held out of order therefore count
  too, which bounds the reorder buffer by the stream window; STRIPED_STREAM_WINDOW (what a
  striped stream is granted) is also the farthest a CHUNK may reach past the next byte
  awaited (a protocol error beyond).
- The end: once striped, a stream's FIN is a CHUNK with CHUNK_FIN at the final offset
  (on any session), delivered when every byte before it has been.
- A session of the pool lost mid-stream may take chunks in flight with it. Nothing is
  retransmitted: each end resets its striped streams when it sees a member of their group
  go (veil.net.stripe), as a browser's download fails when one of its connections is cut.
"""

from __future__ import annotations

import struct

from veil.errors import RemoteProtocolError
from veil.protocol.frames import CHUNK_FIN, CHUNK_PREFIX_SIZE

#: A stream starts striping only after it has sent this much (bytes): page loads, API
#: calls and the start of every download keep one connection and its time to first byte;
#: only bulk transfers spread.
STRIPE_AFTER_BYTES = 512 * 1024
#: The receive window of a striped stream (bytes): the stream is granted this much in all
#: once its first CHUNK arrives (INITIAL_STREAM_WINDOW before). A striped stream's
#: bytes wait behind the slowest connection's loss recovery (one to two round trips), so its
#: window must cover rate x (RTT + recovery): 16 MiB is ~300 Mbit/s over 0.45 s. It is also
#: the reorder bound: a CHUNK ending further than this past the next byte awaited could
#: never have been sent within the window, and is a protocol error.
STRIPED_STREAM_WINDOW = 16 * 1024 * 1024
#: Pieces one stream holds out of order. Bytes are bounded by the window; this bounds the
#: bookkeeping (a peer sending 1-byte CHUNKs with gaps between them): at MAX_CHUNK_DATA a
#: piece, 16 MiB is 256 pieces, and ordinary chunks are never smaller than a TLS record.
MAX_REORDER_PIECES = 1024
#: Sessions in one pool group (the client's --connections is at most 16).
MAX_POOL_MEMBERS = 16

_PREFIX = struct.Struct("!BB")
_OFFSET_LIMIT = 1 << 48


def pack_chunk_prefix(member: int, offset: int, fin: bool) -> bytes:
    """The first CHUNK_PREFIX_SIZE bytes of a CHUNK payload."""
    return _PREFIX.pack(member, CHUNK_FIN if fin else 0) + offset.to_bytes(6, "big")


def unpack_chunk_prefix(payload: bytes) -> tuple[int, int, bool]:
    """(home member, offset, fin) of a CHUNK payload; error for a malformed one."""
    if len(payload) < CHUNK_PREFIX_SIZE:
        raise RemoteProtocolError("short CHUNK")
    member, flags = _PREFIX.unpack_from(payload)
    if flags & ~CHUNK_FIN:
        raise RemoteProtocolError("unknown CHUNK flags")
    fin = bool(flags & CHUNK_FIN)
    if not fin and len(payload) == CHUNK_PREFIX_SIZE:
        raise RemoteProtocolError("empty CHUNK")
    return member, int.from_bytes(payload[2:CHUNK_PREFIX_SIZE], "big"), fin


class Reassembly:
    """The bytes of one stream, received at offsets in any order, delivered in order.

    ``start``: the offset of the next byte awaited (what plain DATA delivered before). Each
    byte may arrive once: a duplicate or an overlap is a protocol error (nothing veil sends
    repeats a byte, so one is a broken or hostile peer), as is a piece further than
    ``limit`` past the next byte awaited, more than MAX_REORDER_PIECES held, or bytes past
    the end once it is known.
    """

    __slots__ = ("_held", "_limit", "end", "held_bytes", "next")

    def __init__(self, start: int, limit: int = STRIPED_STREAM_WINDOW) -> None:
        self.next = start
        self.held_bytes = 0
        self.end: int | None = None  # the final offset, once the FIN chunk came
        self._held: dict[int, bytes] = {}
        self._limit = limit

    @property
    def finished(self) -> bool:
        """Every byte up to the end has been delivered."""
        return self.end is not None and self.next == self.end

    def add(self, offset: int, data: bytes, fin: bool = False) -> list[bytes]:
        """Take a piece; return the bytes now deliverable in order (maybe none)."""
        stop = offset + len(data)
        if offset < self.next:
            raise RemoteProtocolError("duplicate striped bytes")
        if stop >= _OFFSET_LIMIT or stop - self.next > self._limit:
            raise RemoteProtocolError("striped bytes beyond the reorder bound",
                                      code="flow_control")
        if self.end is not None and (stop > self.end or fin):
            raise RemoteProtocolError("striped bytes after the end")
        if fin:
            if any(at + len(piece) > stop for at, piece in self._held.items()):
                raise RemoteProtocolError("striped bytes after the end")
            self.end = stop
        if not data:
            return []
        if self._held:
            self._check_overlap(offset, stop)
        if offset != self.next:
            if len(self._held) >= MAX_REORDER_PIECES:
                raise RemoteProtocolError("too many striped pieces out of order",
                                          code="flow_control")
            self._held[offset] = data
            self.held_bytes += len(data)
            return []
        ready = [data]
        self.next = stop
        held = self._held
        while (piece := held.pop(self.next, None)) is not None:
            ready.append(piece)
            self.held_bytes -= len(piece)
            self.next += len(piece)
        return ready

    def _check_overlap(self, offset: int, stop: int) -> None:
        for at, piece in self._held.items():
            if at < stop and offset < at + len(piece):
                raise RemoteProtocolError("duplicate striped bytes")
