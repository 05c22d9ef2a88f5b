"""The carrier's shapes on the wire, sans-IO: paths, requests, packet-up reordering, the
downlink's preamble and chunked body.

One secret path per server, ``/<token>/`` (``token``: 16 random bytes, base64url without
padding, 22 characters). Under it:

- ``GET /<token>/`` with a WebSocket upgrade (RFC 6455, version 13): the WebSocket variant;
- ``GET /<token>/<session>``: packet-up's downlink, one long chunked response;
- ``POST /<token>/<session>/<seq>``: packet-up's uplink, one packet per request (``seq``
  counts from 0 per session, decimal).

``session`` is 16 random bytes the client draws, base64url (22 characters). Anything else,
including a POST for a session the server does not hold, is not claimed: the cover serves it
as it serves any unknown path (nginx's 404, byte for byte).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from veil.errors import TransportError

#: Random bytes in a secret path and in a session id: unguessable (128 bits).
TOKEN_BYTES = 16
#: One uplink packet. A CDN buffers each request body whole before it forwards it (nginx's
#: proxy_request_buffering, Cloudflare's default), so a packet's bytes wait at the CDN until
#: its last one arrives: small packets keep that latency low. Under nginx's default
#: client_max_body_size (1 MiB), which a CDN in front of veil is likely to keep.
MAX_POST_BYTES = 64 * 1024
#: Uplink POSTs a client has unanswered at once (one per uplink connection): a CDN forwards
#: requests on parallel connections, so packets may reach the server out of order.
MAX_POSTS_IN_FLIGHT = 4
#: Out-of-order packets the server holds per session before it gives up on the session: the
#: client never has more than MAX_POSTS_IN_FLIGHT outstanding, so a packet this far ahead of
#: the one awaited is a broken or hostile client; bounds the memory a session holds to
#: MAX_HELD_POSTS * MAX_POST_BYTES (2 MiB).
MAX_HELD_POSTS = 32
#: Digits of a packet's sequence number: 10**12 packets of up to 64 KiB outlast any session.
MAX_SEQ_DIGITS = 12

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
_TOKEN = rb"[A-Za-z0-9_-]{22}"
_SESSION_PATH = re.compile(rb"(" + _TOKEN + rb")(?:/([0-9]{1,%d}))?" % MAX_SEQ_DIGITS)

#: Headers a judge of the carrier's requests needs to see.
HEADER_NAMES = frozenset({b"upgrade", b"connection", b"sec-websocket-key",
                          b"sec-websocket-version", b"content-length", b"transfer-encoding"})


def new_token() -> str:
    """16 random bytes, base64url without padding (22 characters)."""
    return base64.urlsafe_b64encode(os.urandom(TOKEN_BYTES)).rstrip(b"=").decode("ascii")


def new_secret_path() -> str:
    """A fresh secret path, ``/<token>/``."""
    return f"/{new_token()}/"


def check_secret_path(path: str) -> bytes:
    """``path`` as the server matches it; raises TransportError unless it is ``/.../`` with
    a long enough random part to stay unguessable (an operator's ``--via`` path included)."""
    raw = path.encode("utf-8")
    if not raw.startswith(b"/") or not raw.endswith(b"/") or len(raw) < 2 + 16:
        raise TransportError("a carrier path must look like /SECRET/ with at least 16 "
                             "characters of secret")
    if not re.fullmatch(rb"/[A-Za-z0-9_\-/.~]+/", raw) or b"//" in raw or b"/." in raw:
        raise TransportError("a carrier path may hold only letters, digits and -_.~/ and "
                             "no empty or dot segments (the cover normalises those away)")
    return raw


@dataclass(frozen=True, slots=True)
class WebSocketOpen:
    """``GET /<token>/`` with a WebSocket upgrade."""

    key: bytes  # Sec-WebSocket-Key as sent

    def accept_response(self) -> bytes:
        accept = base64.b64encode(hashlib.sha1(self.key + _WS_GUID).digest())  # noqa: S324 - RFC 6455
        return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")


@dataclass(frozen=True, slots=True)
class DownlinkOpen:
    """``GET /<token>/<session>``: the server's bytes, as one chunked response."""

    session: bytes


@dataclass(frozen=True, slots=True)
class UplinkPacket:
    """``POST /<token>/<session>/<seq>`` with a ``length``-byte body."""

    session: bytes
    seq: int
    length: int
    close: bool  # the request said Connection: close


CarrierRequest = WebSocketOpen | DownlinkOpen | UplinkPacket

# The server's answer heads. X-Accel-Buffering tells nginx (and CDNs built on it) to pass
# the downlink on as it comes instead of filling its proxy buffers first.
DOWNLINK_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-store\r\nX-Accel-Buffering: no\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
UPLINK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nCache-Control: no-store\r\n\r\n"
UPLINK_RESPONSE_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nCache-Control: no-store\r\n"
                         b"Connection: close\r\n\r\n")
DOWNLINK_END = b"0\r\n\r\n"


#: The downlink's body opens with a preamble the client drops: 2 bytes (big-endian) of
#: length, then that many random bytes. A proxy may hold a response's head until its body
#: starts (nginx does on h2), and the client waits for that head before its first packet,
#: while the server has nothing to say before the client's first packet (Noise's initiator
#: speaks first): without bytes from the server first, neither side would move. A random
#: length, so the first downlink record has no fixed size.
PREAMBLE_PADDING = range(16, 257)
_PREAMBLE_LENGTH_BYTES = 2


def downlink_preamble() -> bytes:
    """The first chunk of every downlink (see PREAMBLE_PADDING)."""
    spread = len(PREAMBLE_PADDING)
    length = PREAMBLE_PADDING.start + int.from_bytes(os.urandom(2), "big") % spread
    return chunk(length.to_bytes(_PREAMBLE_LENGTH_BYTES, "big") + os.urandom(length))


class PreambleReader:
    """The client's side of the downlink preamble: :meth:`feed` returns what follows it."""

    def __init__(self) -> None:
        self._head = bytearray()  # the preamble's length field, until it is whole
        self._skip: int | None = None  # preamble bytes still to drop, once known

    def feed(self, data: bytes) -> bytes:
        if self._skip is None:
            need = _PREAMBLE_LENGTH_BYTES - len(self._head)
            self._head += data[:need]
            data = data[need:]
            if len(self._head) < _PREAMBLE_LENGTH_BYTES:
                return b""
            self._skip = int.from_bytes(self._head, "big")
            if self._skip not in PREAMBLE_PADDING:
                raise TransportError(f"the downlink's preamble says {self._skip} bytes: "
                                     "not a veil server")
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        return data


def chunk(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as one chunk of a chunked body (never an empty chunk: that ends the body)."""
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))  # one copy of the data


#: A chunk-size line's longest form (hex digits and any chunk extension a proxy adds), and a
#: trailer section's: nginx and Cloudflare send neither beyond a few bytes; a longer one is
#: not a CDN's answer, and must not grow the reader's buffer.
MAX_CHUNK_LINE = 1024
MAX_TRAILER_BYTES = 8 * 1024
#: A chunk's size in hex digits: 2**60 bytes is past any body.
_MAX_SIZE_DIGITS = 15
_HEX = frozenset(b"0123456789abcdefABCDEF")


class ChunkedReader:
    """packet-up's downlink body, chunked (RFC 9112, section 7.1), sans-IO: :meth:`feed`
    returns the data the bytes carried, in one piece per call; ``done`` once the last chunk
    and the trailer section are in. Raises TransportError on anything else.

    h11 gives the same body as one event per chunk, and a CDN forwards the origin's stream in
    small chunks (nginx: one per 4-8 KiB read): its per-event work was the downlink's hot
    spot (measured: a third of the client's time at 227 Mbit/s through nginx).
    """

    def __init__(self) -> None:
        self._pending = b""  # an incomplete size line, CRLF or trailer line
        self._left = 0  # data bytes of the current chunk still to come
        self._crlf = False  # the CRLF after a chunk's data is next
        self._trailer: int | None = None  # trailer bytes so far, once the last chunk came
        self.done = False
        self.failed = False  # feed raised: the body is broken, nothing more is read

    def feed(self, data: bytes) -> bytes:
        try:
            return self._feed(data)
        except TransportError:
            self.failed = True
            raise

    def _feed(self, data: bytes) -> bytes:
        if self.failed:
            raise TransportError("the downlink's chunked body is broken")
        if self._pending:
            data, self._pending = self._pending + data, b""
        if self.done:
            if data:
                raise TransportError("bytes after the downlink's last chunk")
            return b""
        view = memoryview(data)
        pieces: list[memoryview] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                pieces.append(view[pos:pos + take])
                pos += take
                self._left -= take
                self._crlf = not self._left
                continue
            if self._crlf:
                if end - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise TransportError("a chunk of the downlink does not end in CRLF")
                pos += 2
                self._crlf = False
                continue
            line_end = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
            if line_end < 0:
                if end - pos > MAX_CHUNK_LINE:
                    raise TransportError("a line of the downlink's chunked body is too long")
                break
            line = data[pos:line_end]
            pos = line_end + 2
            if self._trailer is not None:
                self._trailer += len(line) + 2
                if self._trailer > MAX_TRAILER_BYTES:
                    raise TransportError("the downlink's trailer section is too long")
                if not line:
                    self.done = True
                    if pos < end:
                        raise TransportError("bytes after the downlink's last chunk")
                continue
            digits = line.split(b";", 1)[0].rstrip(b" \t")
            if not digits or len(digits) > _MAX_SIZE_DIGITS or not _HEX.issuperset(digits):
                raise TransportError(f"not a chunk size in the downlink: {line[:40]!r}")
            size = int(digits, 16)
            if size:
                self._left = size
            else:
                self._trailer = 0
        self._pending = data[pos:]
        return b"".join(pieces)


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def judge(method: bytes, path: bytes, headers: Mapping[bytes, bytes],
          secret_paths: frozenset[bytes]) -> CarrierRequest | None:
    """The carrier request this is, or None (then the cover serves it)."""
    prefix = next((p for p in secret_paths if path.startswith(p)), None)
    if prefix is None:
        return None
    tail = path[len(prefix):]
    upgrade = headers.get(b"upgrade")
    has_body = b"content-length" in headers or b"transfer-encoding" in headers
    if not tail:
        if (method != b"GET" or upgrade is None or upgrade.lower() != b"websocket"
                or b"upgrade" not in _tokens(headers.get(b"connection", b""))
                or headers.get(b"sec-websocket-version") != b"13" or has_body):
            return None
        key = headers.get(b"sec-websocket-key", b"")
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                return None
        except (binascii.Error, ValueError):
            return None
        return WebSocketOpen(key)
    match = _SESSION_PATH.fullmatch(tail)
    if match is None or upgrade is not None:
        return None
    session, seq = match.group(1), match.group(2)
    if seq is None:
        return DownlinkOpen(session) if method == b"GET" and not has_body else None
    length = headers.get(b"content-length", b"")
    if (method != b"POST" or b"transfer-encoding" in headers or not length.isdigit()
            or not 0 < int(length) <= MAX_POST_BYTES):
        return None
    close = b"close" in _tokens(headers.get(b"connection", b""))
    return UplinkPacket(session, int(seq), int(length), close)


class Reorder:
    """Packet-up's uplink in order: packets in by sequence number, bytes out in order."""

    def __init__(self) -> None:
        self.next_seq = 0
        self._held: dict[int, bytes] = {}

    def push(self, seq: int, data: bytes) -> list[bytes]:
        """The packets now deliverable, in order. Raises TransportError for a packet seen
        before or too far ahead (MAX_HELD_POSTS)."""
        if seq < self.next_seq or seq in self._held:
            raise TransportError(f"packet {seq} arrived twice")
        if seq >= self.next_seq + MAX_HELD_POSTS:
            raise TransportError(f"packet {seq} is more than {MAX_HELD_POSTS} ahead of "
                                 f"{self.next_seq}")
        self._held[seq] = data
        ready = []
        while self.next_seq in self._held:
            ready.append(self._held.pop(self.next_seq))
            self.next_seq += 1
        return ready

    @property
    def held(self) -> int:
        return len(self._held)
