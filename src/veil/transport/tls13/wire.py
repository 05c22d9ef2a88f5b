"""TLS 1.3 wire format: code points (RFC 8446 §4, §5, §6 and later registrations) and a reader.

Only what a client needs. Names follow the IANA registries so that a capture in Wireshark and
this file read alike.
"""

from __future__ import annotations

import enum
import struct


class ContentType(enum.IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(enum.IntEnum):
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    NEW_SESSION_TICKET = 4
    END_OF_EARLY_DATA = 5
    ENCRYPTED_EXTENSIONS = 8
    CERTIFICATE = 11
    CERTIFICATE_REQUEST = 13
    CERTIFICATE_VERIFY = 15
    FINISHED = 20
    KEY_UPDATE = 24
    COMPRESSED_CERTIFICATE = 25  # RFC 8879
    MESSAGE_HASH = 254


class ExtensionType(enum.IntEnum):
    SERVER_NAME = 0
    STATUS_REQUEST = 5
    SUPPORTED_GROUPS = 10
    EC_POINT_FORMATS = 11
    SIGNATURE_ALGORITHMS = 13
    ALPN = 16
    SIGNED_CERTIFICATE_TIMESTAMP = 18
    PADDING = 21
    EXTENDED_MASTER_SECRET = 23
    COMPRESS_CERTIFICATE = 27  # RFC 8879
    RECORD_SIZE_LIMIT = 28
    SESSION_TICKET = 35
    PRE_SHARED_KEY = 41
    EARLY_DATA = 42
    SUPPORTED_VERSIONS = 43
    COOKIE = 44
    PSK_KEY_EXCHANGE_MODES = 45
    CERTIFICATE_AUTHORITIES = 47
    POST_HANDSHAKE_AUTH = 49
    SIGNATURE_ALGORITHMS_CERT = 50
    KEY_SHARE = 51
    APPLICATION_SETTINGS_OLD = 0x4469  # ALPS, Chrome's first code point
    APPLICATION_SETTINGS = 0x44CD  # ALPS, Chrome's code point since 2025
    TRUST_ANCHORS = 0xCA34  # draft-ietf-tls-trust-anchor-ids (Chrome's code point)
    ENCRYPTED_CLIENT_HELLO = 0xFE0D
    RENEGOTIATION_INFO = 0xFF01


class AlertDescription(enum.IntEnum):
    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    MISSING_EXTENSION = 109
    UNSUPPORTED_EXTENSION = 110
    UNRECOGNIZED_NAME = 112
    BAD_CERTIFICATE_STATUS_RESPONSE = 113
    UNKNOWN_PSK_IDENTITY = 115
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120

    @classmethod
    def name_of(cls, value: int) -> str:
        try:
            return cls(value).name.lower()
        except ValueError:
            return f"alert {value}"


class CipherSuite(enum.IntEnum):
    TLS_AES_128_GCM_SHA256 = 0x1301
    TLS_AES_256_GCM_SHA384 = 0x1302
    TLS_CHACHA20_POLY1305_SHA256 = 0x1303


class NamedGroup(enum.IntEnum):
    SECP256R1 = 0x0017
    SECP384R1 = 0x0018
    X25519 = 0x001D
    X25519MLKEM768 = 0x11EC


class SignatureScheme(enum.IntEnum):
    RSA_PKCS1_SHA256 = 0x0401
    RSA_PKCS1_SHA384 = 0x0501
    RSA_PKCS1_SHA512 = 0x0601
    ECDSA_SECP256R1_SHA256 = 0x0403
    ECDSA_SECP384R1_SHA384 = 0x0503
    ECDSA_SECP521R1_SHA512 = 0x0603
    RSA_PSS_RSAE_SHA256 = 0x0804
    RSA_PSS_RSAE_SHA384 = 0x0805
    RSA_PSS_RSAE_SHA512 = 0x0806
    ED25519 = 0x0807
    MLDSA44 = 0x0904  # draft-ietf-tls-mldsa
    MLDSA65 = 0x0905
    MLDSA87 = 0x0906


class CertificateCompression(enum.IntEnum):
    ZLIB = 1
    BROTLI = 2
    ZSTD = 3


TLS12 = 0x0303
TLS13 = 0x0304
# ServerHello.random of a HelloRetryRequest: SHA-256("HelloRetryRequest") (RFC 8446 §4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
# The last 8 bytes of ServerHello.random from a TLS 1.3 server negotiating an older version.
DOWNGRADE_TLS12 = b"DOWNGRD\x01"
DOWNGRADE_TLS11 = b"DOWNGRD\x00"


def is_grease(value: int) -> bool:
    """RFC 8701's reserved values 0x0A0A, 0x1A1A, ..., 0xFAFA."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


class DecodeError(ValueError):
    """A message is shorter than its lengths say, or has bytes left over."""


class Reader:
    """Reads big-endian integers and length-prefixed vectors from a message, bounds-checked."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes | memoryview, start: int = 0, end: int | None = None) -> None:
        self._data = bytes(data)
        self._pos = start
        self._end = len(self._data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def u8(self) -> int:
        if self._pos + 1 > self._end:
            raise DecodeError("truncated (u8)")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def u16(self) -> int:
        if self._pos + 2 > self._end:
            raise DecodeError("truncated (u16)")
        (value,) = struct.unpack_from(">H", self._data, self._pos)
        self._pos += 2
        return int(value)

    def u24(self) -> int:
        if self._pos + 3 > self._end:
            raise DecodeError("truncated (u24)")
        value = int.from_bytes(self._data[self._pos : self._pos + 3], "big")
        self._pos += 3
        return value

    def raw(self, length: int) -> bytes:
        if self._pos + length > self._end:
            raise DecodeError(f"truncated ({length} bytes wanted, {self.remaining} left)")
        value = self._data[self._pos : self._pos + length]
        self._pos += length
        return value

    def vec8(self) -> bytes:
        return self.raw(self.u8())

    def vec16(self) -> bytes:
        return self.raw(self.u16())

    def vec24(self) -> bytes:
        return self.raw(self.u24())

    def sub16(self) -> Reader:
        """The next u16-length-prefixed vector, as a reader of its own."""
        return Reader(self.vec16())

    def done(self) -> None:
        if self._pos != self._end:
            raise DecodeError(f"{self._end - self._pos} unexpected bytes at the end")


def u16_list(data: bytes) -> list[int]:
    if len(data) % 2:
        raise DecodeError("odd length of a u16 list")
    return [v for (v,) in struct.iter_unpack(">H", data)]


def extensions(reader: Reader) -> list[tuple[int, bytes]]:
    """An extension block (u16 length, then type/u16-data pairs); duplicates are an error."""
    block = reader.sub16()
    seen: set[int] = set()
    out: list[tuple[int, bytes]] = []
    while block.remaining:
        ext_type = block.u16()
        data = block.vec16()
        if ext_type in seen:
            raise DecodeError(f"extension {ext_type} appears twice")
        seen.add(ext_type)
        out.append((ext_type, data))
    return out


def p8(data: bytes) -> bytes:
    return bytes((len(data),)) + data


def p16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def p24(data: bytes) -> bytes:
    return len(data).to_bytes(3, "big") + data


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def handshake(msg_type: int, body: bytes) -> bytes:
    """A handshake message: type, u24 length, body."""
    return bytes((msg_type,)) + p24(body)


def extension(ext_type: int, body: bytes) -> bytes:
    return u16(ext_type) + p16(body)
