"""Session frame layout: constants and the header codec.

Every frame is an 8-byte header followed by its payload::

    0        1                 4                 8
    +--------+-----------------+-----------------+=============+
    |  type  | length (u24 BE) | stream id (u32) |  payload    |
    +--------+-----------------+-----------------+=============+

See docs/protocol.md for the meaning of each type. Only this module knows the layout.
"""

from __future__ import annotations

import enum
import struct

HEADER = struct.Struct("!II")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct("!I")


class FrameType(enum.IntEnum):
    PADDING = 0
    OPEN = 1
    DATA = 2
    FIN = 3
    RESET = 4
    WINDOW = 5
    DATAGRAM = 6
    PING = 7
    PONG = 8
    CLOSE = 9
    #: Client: this session is member ``m`` of pool ``P`` (veil.protocol.stripe); server: the
    #: answer, naming the group the member joined. Sent only to a server that announced
    #: FEATURE_STRIPE.
    JOIN = 10
    #: A piece of a striped stream's bytes at an offset, on any session of its pool.
    CHUNK = 11


class StreamKind(enum.IntEnum):
    """What an OPEN frame asks the server to connect to."""

    TCP = 1
    UDP = 2
    #: Full-device tunnel: DATAGRAM frames carry IP packets (docs/protocol.md, "IP streams").
    IP = 3
    #: Name resolution through the tunnel: the OPEN carries a name, the server answers with its
    #: addresses as DATA, then FIN (docs/protocol.md, "Resolve streams"). Only sent to a server
    #: that announced FEATURE_RESOLVE: an older one closes the session on a kind it does not know.
    RESOLVE = 4


class ResetCode(enum.IntEnum):
    """Why a stream was reset; carried in RESET frames, mapped to SOCKS/HTTP errors by inbounds."""

    CANCELLED = 0
    REFUSED_DESTINATION = 1
    CONNECT_FAILED = 2
    RESOLVE_FAILED = 3
    UNREACHABLE = 4
    TIMEOUT = 5
    PROTOCOL_ERROR = 6
    TOO_MANY_STREAMS = 7
    INTERNAL_ERROR = 8
    FLOW_CONTROL_ERROR = 9


class CloseCode(enum.IntEnum):
    """Why a whole session ended; carried in CLOSE frames."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    FLOW_CONTROL_ERROR = 2
    KEEPALIVE_TIMEOUT = 3
    REVOKED = 4
    SHUTDOWN = 5
    INTERNAL_ERROR = 6


# Limits. DATA payloads are streamed to the application as they arrive, so a large DATA frame
# costs no buffering; the cap only bounds how long one stream can hold the line before others
# get a turn. Every other frame is buffered whole before it is parsed, so their cap bounds
# parser memory per session.
MAX_DATA_PAYLOAD = 256 * 1024
MAX_CONTROL_PAYLOAD = 4096
# A datagram carries an address (at most 1+1+255+2 bytes) and one UDP payload (at most 65,535).
MAX_DATAGRAM_PAYLOAD = 65_535 + 259
# On an IP stream a datagram is a 10-byte offload header and one IP packet, which with TSO is a
# super-packet of up to 64 KiB of TCP payload plus headers (an IPv6 packet may be 40 + 65,535).
# The frame limit must admit it whole: segmenting is left to the receiving kernel.
MAX_IP_PACKET = 40 + 65_535
MAX_PADDING_PAYLOAD = 16 * 1024
# A PADDING payload that begins with these bytes is a block report from a client
# (veil.protocol.report). veil pads with zero bytes, so no padding of veil's begins so, and a
# peer that does not read reports ignores it like any padding: the carrier old servers accept.
REPORT_TAG = b"VRPT"
# A PADDING payload from the server that begins with these bytes names what the server can do:
# the byte after the tag holds FEATURE_* bits. veil pads with zero bytes and clients before
# features ignore every PADDING payload, so an old client takes it for padding. The server
# sends it as its first PADDING (whose length stays random in SERVER_FIRST_PADDING).
FEATURES_TAG = b"VFEA"
#: The server answers OPENs of kind RESOLVE, and resets (instead of closing the session on) an
#: OPEN of a kind it does not know.
FEATURE_RESOLVE = 0x01
#: The server holds a destination's own idle close until the client next speaks, and may then
#: close the session as idle with streams open (veil.protocol.idleclose): the client counts
#: quiet streams as idle (Session.reusable) and leaves such streams' applications their
#: connections until they next write (net.driver.TcpRelay.orphan).
FEATURE_HOLDS_IDLE_CLOSES = 0x02
#: The server groups the sessions of one client's pool (JOIN) and reassembles a stream whose
#: bytes arrive as CHUNKs on any of them (veil.protocol.stripe). A client sends JOIN and
#: CHUNK only to a server that announced it: an older one closes a session on a frame type it
#: does not know.
FEATURE_STRIPE = 0x04
# A session the server accepted starts with a PADDING frame on stream 0 whose length is in
# this range (random, so that the first record has no fixed size). The client tells an
# accepted session from a cover site's answer by it: "HTTP/1.1 ..." starts with no 0x00, and
# an HTTP/2 SETTINGS frame (00 00 len 04 00 00000000) reads as PADDING of >= 1,024 bytes.
SERVER_FIRST_PADDING = (64, 512)
# With ALPN h2 the server may send nginx's HTTP/2 greeting (SETTINGS + WINDOW_UPDATE, the
# cover's first words) before it has judged the client's first bytes, when they came late
# (server/gate.py, GREETING_GRACE_S). A client skips exactly these bytes before the PADDING.
COVER_H2_GREETING = bytes.fromhex(
    "000012040000000000000300000080000400010000000500ffffff0000040800000000007fff0000")

# A CHUNK's payload: the home member (1 byte), flags (1), the offset (u48), then data. The
# data cap is a quarter of a DATA frame's: a CHUNK is buffered whole before it is parsed
# (unlike DATA), and smaller pieces spread one read over several connections.
CHUNK_PREFIX_SIZE = 8
MAX_CHUNK_DATA = 64 * 1024
CHUNK_FIN = 0x01
# JOIN: the client's pool id (16 random bytes) and its member number; the server's answer:
# the member number and a group token (8 bytes) shared by the members it grouped together.
POOL_ID_SIZE = 16
GROUP_TOKEN_SIZE = 8
MAX_JOIN_PAYLOAD = POOL_ID_SIZE + 1

MAX_PAYLOAD = {
    FrameType.PADDING: MAX_PADDING_PAYLOAD,
    FrameType.OPEN: MAX_CONTROL_PAYLOAD,
    FrameType.DATA: MAX_DATA_PAYLOAD,
    FrameType.FIN: 0,
    FrameType.RESET: 1,
    FrameType.WINDOW: 4,
    FrameType.DATAGRAM: MAX_DATAGRAM_PAYLOAD,
    FrameType.PING: 8,
    FrameType.PONG: 8,
    FrameType.CLOSE: MAX_CONTROL_PAYLOAD,
    FrameType.JOIN: MAX_JOIN_PAYLOAD,
    FrameType.CHUNK: CHUNK_PREFIX_SIZE + MAX_CHUNK_DATA,
}
# Frames whose payload must have exactly the maximum length.
EXACT_LENGTH = frozenset({FrameType.FIN, FrameType.RESET, FrameType.WINDOW, FrameType.PING,
                          FrameType.PONG})
# Frames that concern the whole session and must carry stream id 0.
SESSION_FRAMES = frozenset({FrameType.PADDING, FrameType.PING, FrameType.PONG, FrameType.CLOSE,
                            FrameType.JOIN})


def pack_header(frame_type: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack((frame_type << 24) | length, stream_id)


def unpack_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int]:
    """Return (type, stream id, payload length) of the header at ``offset``."""
    word, stream_id = HEADER.unpack_from(buf, offset)
    return word >> 24, stream_id, word & 0xFFFFFF


def frame(frame_type: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack((frame_type << 24) | len(payload), stream_id) + payload


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(buf: bytes | bytearray | memoryview) -> int:
    value: int = _U32.unpack(buf)[0]
    return value
