"""The Trojan protocol, as veil's server accepts it and veil's client speaks it (sans-IO).

Trojan (trojan-gfw) runs inside an ordinary TLS connection. The client's first bytes are::

    hex(SHA-224(password)) (56, lowercase) | CRLF | CMD (1) | ATYP ADDR PORT | CRLF | payload

CMD 1 is CONNECT (the rest of the connection is the TCP stream to the address) and 3 is UDP
ASSOCIATE (the rest of the connection is a sequence of UDP packets, each
``ATYP ADDR PORT | length (u16 BE) | CRLF | payload``; the request's own address is not used).
There is no answer: the server relays, or closes.

veil derives each user's Trojan password from the user's 32-byte secret (HKDF-SHA256,
``info = "veil trojan password"``, 18 bytes, base64url: 24 characters a person can type), so
every user has one without storing anything new but its hash. See docs/protocol.md, section 5.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import ipaddress
import re
import struct
from dataclasses import dataclass
from urllib.parse import quote, unquote

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.errors import ConfigError, RemoteProtocolError
from veil.protocol.address import Address, NeedMoreData
from veil.protocol.uri import (
    UriError,
    b64url_decode,
    b64url_encode,
    format_authority_uri,
    parse_authority_uri,
)

SCHEME = "trojan"
CRLF = b"\r\n"
HASH_SIZE = 56  # SHA-224 in hex
PASSWORD_BYTES = 18  # base64url of 18 bytes is 24 characters, without padding
# The longest request: hash, CRLF, CMD, ATYP, a 255-byte name with its length byte, port, CRLF.
MAX_REQUEST_SIZE = HASH_SIZE + 2 + 1 + 1 + 1 + 255 + 2 + 2
# One UDP packet on the stream: the longest address, the length, CRLF and a u16 of payload.
MAX_UDP_PAYLOAD = 0xFFFF
MAX_UDP_PACKET = 1 + 1 + 255 + 2 + 2 + 2 + MAX_UDP_PAYLOAD
# Where UDP ASSOCIATE requests point when there is no first datagram to name.
UDP_ANY = Address("0.0.0.0", 0)

_HEX = re.compile(rb"[0-9a-f]*\Z")
_LENGTH = struct.Struct("!H")


class Command(enum.IntEnum):
    CONNECT = 1
    UDP_ASSOCIATE = 3


# ------------------------------------------------------------------ passwords
def password_for_secret(secret: bytes) -> str:
    """The Trojan password of the user with ``secret``: printable, 24 characters."""
    key = HKDF(algorithm=hashes.SHA256(), length=PASSWORD_BYTES, salt=None,
               info=b"veil trojan password").derive(secret)
    return base64.urlsafe_b64encode(key).decode()


def password_hash(password: str) -> str:
    """What a Trojan client sends: the lowercase hex SHA-224 of the UTF-8 password."""
    return hashlib.sha224(password.encode()).hexdigest()


def password_hash_for_secret(secret: bytes) -> str:
    return password_hash(password_for_secret(secret))


# ------------------------------------------------------------------ requests
@dataclass(frozen=True, slots=True)
class TrojanRequest:
    """A complete Trojan request at the start of a connection."""

    password_hash: str  # 56 lowercase hex characters
    command: Command
    destination: Address  # CONNECT: where to; UDP ASSOCIATE: ignored
    size: int  # bytes the request took; the payload starts here


@dataclass(frozen=True, slots=True)
class Incomplete:
    """The bytes are a valid beginning of a request that has not fully arrived."""

    password_hash: str | None  # known once the hash and its CRLF are in


@dataclass(frozen=True, slots=True)
class NotTrojan:
    """The bytes cannot be (the beginning of) a Trojan request."""

    reason: str  # "not_hex" (not Trojan-shaped at all), "bad_crlf", "bad_command", ...
    password_hash: str | None = None  # set when the hash itself was well-formed


def parse_request(data: bytes | bytearray | memoryview) -> TrojanRequest | Incomplete | NotTrojan:
    """Parse the first bytes of a connection. Total: never raises, whatever ``data`` is."""
    head = bytes(data[:HASH_SIZE])
    if not _HEX.match(head):
        return NotTrojan("not_hex")
    if len(data) < HASH_SIZE:
        return Incomplete(None)
    crlf = bytes(data[HASH_SIZE : HASH_SIZE + 2])
    if not CRLF.startswith(crlf):
        return NotTrojan("bad_crlf")
    if len(crlf) < 2:
        return Incomplete(None)
    digest = head.decode()
    if len(data) <= HASH_SIZE + 2:
        return Incomplete(digest)
    try:
        command = Command(data[HASH_SIZE + 2])
    except ValueError:
        return NotTrojan("bad_command", digest)
    try:
        destination, end = Address.decode(data, HASH_SIZE + 3)
    except NeedMoreData:
        return Incomplete(digest)
    except (RemoteProtocolError, ValueError):
        return NotTrojan("bad_address", digest)
    tail = bytes(data[end : end + 2])
    if not CRLF.startswith(tail):
        return NotTrojan("bad_crlf", digest)
    if len(tail) < 2:
        return Incomplete(digest)
    return TrojanRequest(digest, command, destination, end + 2)


def build_request(digest: str, command: Command, destination: Address) -> bytes:
    """The request a client sends first (the payload may follow in the same write)."""
    return digest.encode() + CRLF + bytes((command,)) + destination.encode() + CRLF


# ------------------------------------------------------------------ UDP packets
def encode_udp_packet(address: Address, payload: bytes | memoryview) -> bytes:
    if len(payload) > MAX_UDP_PAYLOAD:
        raise ValueError("UDP payload longer than 65,535 bytes")
    return address.encode() + _LENGTH.pack(len(payload)) + CRLF + bytes(payload)


class UdpPacketDecoder:
    """Splits the byte stream of a UDP ASSOCIATE connection into datagrams.

    Holds at most one incomplete packet (:data:`MAX_UDP_PACKET`), so its memory is bounded.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[tuple[Address, bytes]]:
        """The complete packets so far; RemoteProtocolError if the stream is not packets."""
        buf = self._buffer
        buf += data
        packets: list[tuple[Address, bytes]] = []
        offset = 0
        while offset < len(buf):
            try:
                address, end = Address.decode(buf, offset)
            except NeedMoreData:
                break
            except ValueError as exc:
                raise RemoteProtocolError("bad address in a UDP packet",
                                          code="bad_address") from exc
            if len(buf) < end + 4:
                break
            (length,) = _LENGTH.unpack_from(buf, end)
            if buf[end + 2 : end + 4] != CRLF:
                raise RemoteProtocolError("UDP packet without CRLF", code="bad_packet")
            start = end + 4
            if len(buf) < start + length:
                break
            packets.append((address, bytes(buf[start : start + length])))
            offset = start + length
        del buf[:offset]
        return packets


# ------------------------------------------------------------------ trojan:// links
# What each shape error of protocol.uri says about a link ("{}": urlsplit's reason).
_URI_ERRORS = {
    "unreadable": "invalid trojan link: {}",
    "wrong_scheme": f"a trojan link starts with {SCHEME}://",
    "no_user_or_host": "invalid trojan link: needs PASSWORD@HOST[:PORT]",
    "bad_ipv6": "invalid trojan link: bad IPv6 address",
}


@dataclass(frozen=True, slots=True)
class TrojanLink:
    """A ``trojan://PASSWORD@HOST:PORT?sni=NAME&allowInsecure=1&pin=PIN&fp=chrome#LABEL`` URI.

    ``sni`` and ``allowInsecure`` are what Trojan clients commonly read; ``pin`` is veil's
    extension (the SHA-256 of the server certificate's public key, base64url, as in veil
    keys): with it the client checks that key and nothing else, so a self-signed server is
    trusted without turning verification off. Other clients ignore it. ``fp`` names the
    browser whose ClientHello the app should send (uTLS), as in the share-link convention
    v2rayN and v2rayNG read; veil's own Trojan client keeps it and does not use it.
    """

    server: Address
    password: str
    sni: str | None = None
    insecure: bool = False
    pin: bytes | None = None
    label: str = ""
    fingerprint: str | None = None  # ``fp``: a uTLS ClientHello name ("chrome")
    #: ``type``: the apps' transport ("tcp", or "ws" for Trojan over WebSocket through a
    #: CDN, with ``path`` and ``host``); veil's own Trojan client speaks only "tcp".
    network: str = "tcp"

    def to_uri(self) -> str:
        params = []
        if self.sni:
            params.append(f"sni={quote(self.sni, safe='')}")
        if self.insecure:
            params.append("allowInsecure=1")
        if self.pin is not None:
            params.append(f"pin={b64url_encode(self.pin)}")
        if self.fingerprint:
            params.append(f"fp={quote(self.fingerprint, safe='')}")
        return format_authority_uri(SCHEME, quote(self.password, safe=""), str(self.server),
                                    params, self.label)

    @classmethod
    def parse(cls, uri: str) -> TrojanLink:
        """Parse a link; ConfigError with a one-line reason when it is not a valid one."""
        try:
            parts = parse_authority_uri(uri, SCHEME)
        except UriError as exc:
            raise ConfigError(_URI_ERRORS[exc.code].format(exc)) from exc
        query = parts.query
        names = query.get("sni") or query.get("peer")
        sni = names[0] if names else None
        insecure = (query.get("allowInsecure") or query.get("insecure") or ["0"])[0]
        pin = None
        if "pin" in query:
            try:
                pin = b64url_decode(query["pin"][0])
            except (binascii.Error, ValueError) as exc:
                raise ConfigError("invalid trojan link: bad pin") from exc
            if len(pin) != 32:
                raise ConfigError("invalid trojan link: wrong pin length")
        fingerprint = (query.get("fp") or [""])[0] or None
        network = (query.get("type") or ["tcp"])[0].lower() or "tcp"
        host = parts.host
        with contextlib.suppress(ValueError):  # the canonical form of an IP literal
            host = str(ipaddress.ip_address(host))
        # All of the userinfo is the password: it may hold ":".
        return cls(Address(host, parts.port or 443), unquote(parts.userinfo), sni,
                   insecure.lower() in ("1", "true"), pin, parts.fragment, fingerprint, network)
