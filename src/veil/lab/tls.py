"""TLS as a passive observer reads it: records, and the handshake messages sent in clear.

Written from RFC 8446 (TLS 1.3) and RFC 5246 (TLS 1.2): record layer (5.1 / 6.2), handshake
framing (4 / 7.4), ClientHello and its extensions (4.1.2, 4.2), ServerHello, and the TLS 1.2
Certificate message (7.4.2), the only place a certificate is visible on the wire (TLS 1.3
encrypts it). Everything malformed is reported as "not TLS" (None or an empty list), never
an exception: detectors judge hostile bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from veil.lab.flow import Direction, Flow

CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
CONTENT_TYPES = {CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA, 24}
RECORD_HEADER = 5
# RFC 8446 5.2: a ciphertext record is at most 2^14 + 256 bytes; TLS 1.2 allows 2^14 + 2048.
MAX_RECORD_BODY = 2**14 + 2048

HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2
HS_CERTIFICATE = 11

EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
EXT_EC_POINT_FORMATS = 0x000B
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_ENCRYPTED_SERVER_NAME = 0xFFCE  # draft ESNI, blocked by the GFW since 2020
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE values: 0x0A0A, 0x1A1A, ..., 0xFAFA."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


@dataclass(frozen=True)
class Record:
    """One TLS record's header, with where and when it went."""

    direction: Direction
    content_type: int
    version: int
    length: int
    """Length of the record body (the header's length field), i.e. ciphertext size."""
    order: int
    """Index in the flow's chunk list of the chunk that completed this record."""
    time: float
    body: bytes = field(repr=False, compare=False, default=b"")

def split_records(flow: Flow, direction: Direction) -> tuple[list[Record], bool]:
    """The TLS records of one direction, and whether the whole kept stream parsed as TLS."""
    buffer = bytearray()
    records: list[Record] = []
    consumed = 0
    for order, chunk in enumerate(flow.chunks):
        if chunk.direction is not direction:
            continue
        buffer += chunk.data
        while len(buffer) - consumed >= RECORD_HEADER:
            head = bytes(buffer[consumed:consumed + RECORD_HEADER])
            content_type, version, length = struct.unpack("!BHH", head)
            if content_type not in CONTENT_TYPES or version >> 8 != 3 or length > MAX_RECORD_BODY:
                return records, False
            end = consumed + RECORD_HEADER + length
            if end > len(buffer):
                break
            body = bytes(buffer[consumed + RECORD_HEADER:end]) if content_type != \
                APPLICATION_DATA else b""
            records.append(Record(direction, content_type, version, length, order, chunk.time,
                                  body))
            consumed = end
        if consumed > 65536:  # keep the buffer small on long streams
            del buffer[:consumed]
            consumed = 0
    return records, True


def flow_records(flow: Flow) -> list[Record]:
    """Both directions' records, in the order they were completed on the wire."""
    client, _ = split_records(flow, Direction.CLIENT)
    server, _ = split_records(flow, Direction.SERVER)
    return sorted(client + server, key=lambda r: (r.order, r.direction is Direction.SERVER))


def handshake_messages(records: list[Record]) -> list[tuple[int, bytes]]:
    """(type, body) of the handshake messages sent in clear, until encryption starts."""
    data = bytearray()
    for record in records:
        if record.content_type == CHANGE_CIPHER_SPEC:
            break  # what follows in this direction is encrypted
        if record.content_type == HANDSHAKE:
            data += record.body
        elif record.content_type == APPLICATION_DATA:
            break
    messages = []
    pos = 0
    while pos + 4 <= len(data):
        msg_type = data[pos]
        length = int.from_bytes(data[pos + 1:pos + 4], "big")
        if pos + 4 + length > len(data):
            break
        messages.append((msg_type, bytes(data[pos + 4:pos + 4 + length])))
        pos += 4 + length
    return messages


@dataclass(frozen=True)
class ClientHello:
    """The fields of a ClientHello that fingerprints and censors use."""

    legacy_version: int
    session_id: bytes
    ciphers: tuple[int, ...]
    compression: bytes
    extensions: tuple[tuple[int, bytes], ...]

    def extension(self, ext_type: int) -> bytes | None:
        for t, data in self.extensions:
            if t == ext_type:
                return data
        return None

    @property
    def extension_types(self) -> tuple[int, ...]:
        return tuple(t for t, _ in self.extensions)

    @property
    def server_name(self) -> str | None:
        data = self.extension(EXT_SERVER_NAME)
        if data is None or len(data) < 5:
            return None
        pos = 2
        while pos + 3 <= len(data):
            name_type = data[pos]
            (n,) = struct.unpack_from("!H", data, pos + 1)
            if name_type == 0:
                try:
                    return data[pos + 3:pos + 3 + n].decode("ascii").lower()
                except UnicodeDecodeError:
                    return None
            pos += 3 + n
        return None

    @property
    def alpn(self) -> tuple[str, ...]:
        data = self.extension(EXT_ALPN)
        if data is None or len(data) < 2:
            return ()
        out = []
        pos = 2
        while pos < len(data):
            n = data[pos]
            out.append(data[pos + 1:pos + 1 + n].decode("latin-1"))
            pos += 1 + n
        return tuple(out)

    def _u16_list(self, ext_type: int, length_bytes: int) -> tuple[int, ...]:
        data = self.extension(ext_type)
        if data is None or len(data) < length_bytes:
            return ()
        body = data[length_bytes:]
        return tuple(struct.unpack_from("!H", body, i)[0] for i in range(0, len(body) - 1, 2))

    @property
    def supported_versions(self) -> tuple[int, ...]:
        return self._u16_list(EXT_SUPPORTED_VERSIONS, 1)

    @property
    def supported_groups(self) -> tuple[int, ...]:
        return self._u16_list(EXT_SUPPORTED_GROUPS, 2)

    @property
    def signature_algorithms(self) -> tuple[int, ...]:
        return self._u16_list(EXT_SIGNATURE_ALGORITHMS, 2)

    @property
    def ec_point_formats(self) -> tuple[int, ...]:
        data = self.extension(EXT_EC_POINT_FORMATS)
        return tuple(data[1:1 + data[0]]) if data else ()

    @property
    def highest_version(self) -> int:
        """The version JA4 names: the highest non-GREASE supported_version, else legacy."""
        versions = [v for v in self.supported_versions if not is_grease(v)]
        return max(versions) if versions else self.legacy_version


def parse_client_hello(body: bytes) -> ClientHello | None:
    """A ClientHello handshake body (without the 4-byte handshake header), or None."""
    try:
        (legacy_version,) = struct.unpack_from("!H", body, 0)
        pos = 2 + 32
        sid_len = body[pos]
        session_id = body[pos + 1:pos + 1 + sid_len]
        pos += 1 + sid_len
        (n,) = struct.unpack_from("!H", body, pos)
        if n % 2:
            return None
        ciphers = struct.unpack_from(f"!{n // 2}H", body, pos + 2)
        pos += 2 + n
        comp_len = body[pos]
        compression = body[pos + 1:pos + 1 + comp_len]
        pos += 1 + comp_len
        extensions: list[tuple[int, bytes]] = []
        if pos < len(body):
            (ext_total,) = struct.unpack_from("!H", body, pos)
            pos += 2
            end = pos + ext_total
            if end > len(body):
                return None
            while pos + 4 <= end:
                ext_type, ext_len = struct.unpack_from("!HH", body, pos)
                if pos + 4 + ext_len > end:
                    return None
                extensions.append((ext_type, body[pos + 4:pos + 4 + ext_len]))
                pos += 4 + ext_len
    except (IndexError, struct.error):
        return None
    return ClientHello(legacy_version, bytes(session_id), tuple(ciphers), bytes(compression),
                       tuple(extensions))


@dataclass(frozen=True)
class ServerHello:
    version: int
    """The negotiated version: supported_versions if present, else legacy_version."""
    cipher: int


def parse_server_hello(body: bytes) -> ServerHello | None:
    try:
        (legacy_version,) = struct.unpack_from("!H", body, 0)
        pos = 2 + 32
        pos += 1 + body[pos]
        (cipher,) = struct.unpack_from("!H", body, pos)
        pos += 3  # cipher suite, compression method
        version = legacy_version
        if pos + 2 <= len(body):
            (ext_total,) = struct.unpack_from("!H", body, pos)
            pos += 2
            end = min(pos + ext_total, len(body))
            while pos + 4 <= end:
                ext_type, ext_len = struct.unpack_from("!HH", body, pos)
                if ext_type == EXT_SUPPORTED_VERSIONS and ext_len == 2:
                    (version,) = struct.unpack_from("!H", body, pos + 4)
                pos += 4 + ext_len
    except (IndexError, struct.error):
        return None
    return ServerHello(version, cipher)


def parse_certificate_list(body: bytes) -> list[bytes]:
    """The DER certificates of a TLS 1.2 Certificate message body (leaf first)."""
    certs = []
    try:
        total = int.from_bytes(body[0:3], "big")
        pos, end = 3, min(3 + total, len(body))
        while pos + 3 <= end:
            n = int.from_bytes(body[pos:pos + 3], "big")
            certs.append(bytes(body[pos + 3:pos + 3 + n]))
            pos += 3 + n
    except IndexError:
        return certs
    return certs


@dataclass(frozen=True)
class Handshake:
    """What the clear part of a TLS connection's handshake shows."""

    client_hello: ClientHello | None
    server_hello: ServerHello | None
    certificates: tuple[bytes, ...]
    """Server certificates, when sent in clear (TLS 1.2 and older); empty for TLS 1.3."""


def read_handshake(flow: Flow) -> Handshake | None:
    """The clear handshake of a TCP flow that starts with TLS; None if it does not."""
    if flow.transport != "tcp":
        return None
    client_records, _ = split_records(flow, Direction.CLIENT)
    if not client_records or client_records[0].content_type != HANDSHAKE:
        return None
    hello = None
    for msg_type, body in handshake_messages(client_records):
        if msg_type == HS_CLIENT_HELLO:
            hello = parse_client_hello(body)
            break
    if hello is None:
        return None
    server_records, _ = split_records(flow, Direction.SERVER)
    server_hello = None
    certs: tuple[bytes, ...] = ()
    for msg_type, body in handshake_messages(server_records):
        if msg_type == HS_SERVER_HELLO and server_hello is None:
            server_hello = parse_server_hello(body)
        elif msg_type == HS_CERTIFICATE and not certs:
            certs = tuple(parse_certificate_list(body))
    return Handshake(hello, server_hello, certs)
