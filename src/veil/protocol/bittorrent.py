"""Whether a stream's first bytes or a datagram are BitTorrent (``veil serve --block-bittorrent``).

An operator's abuse control, not a censor's: a swarm sees the server's address, and copyright
notices go to whoever holds it. What is recognised is what BitTorrent sends in the clear and
nothing else sends (sing-box's and Xray's sniffers look at the same fields):

* TCP, the peer wire handshake (BEP 3): byte 19 then ``BitTorrent protocol``; the infohash
  follows 8 bytes later, so refusing at the 20th byte keeps the torrent's identity from the peer;
* TCP, an HTTP tracker announce or scrape (BEP 3, BEP 48): ``GET /announce?`` or
  ``GET /scrape?`` with ``info_hash=`` in the first request line;
* UDP, a DHT message (BEP 5): a bencoded dictionary whose first key is ``a`` (queries) or ``r``
  (responses), holding the node's 20-byte ``id`` first;
* UDP, a tracker's connect request (BEP 15): the protocol's 64-bit magic, action 0;
* UDP, a uTP connection's SYN (BEP 29): type ST_SYN and version 1 in the first byte, a known
  extension in the second, exactly the 20-byte header.

Message stream encryption (MSE/PE) makes the TCP handshake random bytes on purpose: it is not
recognised, and cannot be without flagging every fully encrypted protocol (veil's lab shows how
a censor's guess at that goes). Sans-IO: bytes in, a verdict out.
"""

from __future__ import annotations

HANDSHAKE = b"\x13BitTorrent protocol"
_TRACKER_REQUESTS = (b"GET /announce?", b"GET /scrape?")
#: A stream's bytes examined at most: the handshake is 68 bytes, an announce's request line
#: a few hundred; later bytes are the connection's business.
SNIFF_LIMIT = 512
_DHT_PREFIXES = (b"d1:ad2:id20:", b"d1:rd2:id20:")
_UDP_TRACKER_CONNECT = bytes.fromhex("0000041727101980") + b"\x00\x00\x00\x00"
_UTP_SYN = 0x41  # type 4 (ST_SYN) << 4 | version 1
_UTP_HEADER = 20
_UTP_EXTENSIONS = (0, 1, 2)  # none, selective ack, extension bits


def stream_is_bittorrent(first: bytes | bytearray) -> bool:
    """Whether a TCP stream that began with ``first`` is BitTorrent; call it again with more
    of the beginning (up to SNIFF_LIMIT bytes) while the answer may still change."""
    if first.startswith(HANDSHAKE):
        return True
    if first.startswith(_TRACKER_REQUESTS):
        line = bytes(first).split(b"\r\n", 1)[0]
        return b"info_hash=" in line
    return False


def datagram_is_bittorrent(payload: bytes | bytearray) -> bool:
    """Whether one UDP datagram is a DHT message, a UDP tracker connect or a uTP SYN."""
    if payload.startswith(_DHT_PREFIXES):
        return True
    if len(payload) == 16 and payload[:12] == _UDP_TRACKER_CONNECT:
        return True
    return (len(payload) == _UTP_HEADER and payload[0] == _UTP_SYN
            and payload[1] in _UTP_EXTENSIONS)


class StreamSniffer:
    """Keeps a copy of a stream's first SNIFF_LIMIT bytes, which pass on meanwhile: nothing
    is held back, so ordinary streams pay one comparison per read and none after the limit."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: bytearray | None = bytearray()

    @property
    def done(self) -> bool:
        return self._seen is None

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether the stream, with ``data`` added, is BitTorrent (``data`` must not pass)."""
        seen = self._seen
        if seen is None:
            return False
        seen += data[: SNIFF_LIMIT - len(seen)]
        if stream_is_bittorrent(seen):
            self._seen = None
            return True
        if len(seen) >= SNIFF_LIMIT or not _may_become_bittorrent(seen):
            self._seen = None
        return False


def _may_become_bittorrent(seen: bytearray) -> bool:
    """Whether more bytes could still make ``seen`` (not BitTorrent yet) BitTorrent."""
    if len(seen) < len(HANDSHAKE) and HANDSHAKE.startswith(seen):
        return True
    for request in _TRACKER_REQUESTS:
        if len(seen) < len(request):
            if request.startswith(seen):
                return True
        elif seen.startswith(request):
            return b"\r\n" not in seen  # the request line is not complete yet
    return False
