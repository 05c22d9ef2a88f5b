"""The TLS 1.3 key schedule (RFC 8446 §7), cipher suites and key exchange groups.

HKDF (RFC 5869) is a few HMACs, done here with the standard library; the AEADs, the curves
and ML-KEM come from ``cryptography``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from veil.transport.tls13.wire import CipherSuite, NamedGroup, p8, u16

try:  # ML-KEM arrived in cryptography 47 (with OpenSSL 3.5 or AWS-LC underneath).
    from cryptography.hazmat.primitives.asymmetric import mlkem

    HAVE_MLKEM = hasattr(mlkem, "MLKEM768PrivateKey")
except ImportError:  # pragma: no cover - depends on the installed cryptography
    HAVE_MLKEM = False


@dataclass(frozen=True, slots=True)
class SuiteInfo:
    """What a cipher suite fixes: the hash of the key schedule and the record AEAD."""

    suite: CipherSuite
    hash_name: str
    key_len: int
    aead: type[AESGCM] | type[ChaCha20Poly1305]

    @property
    def hash_len(self) -> int:
        return hashlib.new(self.hash_name).digest_size


SUITES: dict[int, SuiteInfo] = {
    CipherSuite.TLS_AES_128_GCM_SHA256: SuiteInfo(CipherSuite.TLS_AES_128_GCM_SHA256,
                                                  "sha256", 16, AESGCM),
    CipherSuite.TLS_AES_256_GCM_SHA384: SuiteInfo(CipherSuite.TLS_AES_256_GCM_SHA384,
                                                  "sha384", 32, AESGCM),
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: SuiteInfo(
        CipherSuite.TLS_CHACHA20_POLY1305_SHA256, "sha256", 32, ChaCha20Poly1305),
}
IV_LEN = 12


def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt, ikm, hash_name)


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes((counter,)), hash_name)
        out += block
        counter += 1
    return out[:length]


def hkdf_expand_label(hash_name: str, secret: bytes, label: bytes, context: bytes,
                      length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1): the label gets the "tls13 " prefix here."""
    info = u16(length) + p8(b"tls13 " + label) + p8(context)
    return hkdf_expand(hash_name, secret, info, length)


def traffic_keys(info: SuiteInfo, secret: bytes) -> tuple[bytes, bytes]:
    """The record key and IV of one direction (RFC 8446 §7.3)."""
    key = hkdf_expand_label(info.hash_name, secret, b"key", b"", info.key_len)
    iv = hkdf_expand_label(info.hash_name, secret, b"iv", b"", IV_LEN)
    return key, iv


def next_traffic_secret(info: SuiteInfo, secret: bytes) -> bytes:
    """application_traffic_secret_N+1 after a KeyUpdate (RFC 8446 §7.2)."""
    return hkdf_expand_label(info.hash_name, secret, b"traffic upd", b"", info.hash_len)


def finished_verify_data(info: SuiteInfo, base_key: bytes, transcript_hash: bytes) -> bytes:
    """Finished.verify_data (RFC 8446 §4.4.4)."""
    finished_key = hkdf_expand_label(info.hash_name, base_key, b"finished", b"", info.hash_len)
    return hmac.digest(finished_key, transcript_hash, info.hash_name)


class KeySchedule:
    """Early secret -> handshake secret -> master secret (RFC 8446 §7.1).

    ``psk``: a secret both ends hold beforehand, the input of the early secret as an external
    PSK's would be (a borrowed identity's: ``server.py``); the handshake keys then prove it.
    Without one, the early secret is from zeros, as in every handshake without a PSK.
    """

    def __init__(self, info: SuiteInfo, psk: bytes | None = None) -> None:
        self.info = info
        zeros = bytes(info.hash_len)
        self.early_secret = hkdf_extract(info.hash_name, zeros, psk or zeros)
        self.handshake_secret = b""
        self.master_secret = b""

    def derive_secret(self, secret: bytes, label: bytes, transcript_hash: bytes) -> bytes:
        return hkdf_expand_label(self.info.hash_name, secret, label, transcript_hash,
                                 self.info.hash_len)

    def _empty_hash(self) -> bytes:
        return hashlib.new(self.info.hash_name).digest()

    def handshake_secrets(self, shared_secret: bytes, hello_hash: bytes) -> tuple[bytes, bytes]:
        """(client, server) handshake traffic secrets from the (EC)DHE output and
        Hash(ClientHello..ServerHello)."""
        derived = self.derive_secret(self.early_secret, b"derived", self._empty_hash())
        self.handshake_secret = hkdf_extract(self.info.hash_name, derived, shared_secret)
        return (self.derive_secret(self.handshake_secret, b"c hs traffic", hello_hash),
                self.derive_secret(self.handshake_secret, b"s hs traffic", hello_hash))

    def application_secrets(self, handshake_hash: bytes) -> tuple[bytes, bytes]:
        """(client, server) application traffic secrets from Hash(ClientHello..server Finished)."""
        derived = self.derive_secret(self.handshake_secret, b"derived", self._empty_hash())
        self.master_secret = hkdf_extract(self.info.hash_name, derived,
                                          bytes(self.info.hash_len))
        return (self.derive_secret(self.master_secret, b"c ap traffic", handshake_hash),
                self.derive_secret(self.master_secret, b"s ap traffic", handshake_hash))


class Transcript:
    """The running transcript hash; messages arrive before the hash is known (ServerHello)."""

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._hash: hashlib._Hash | None = None

    def add(self, message: bytes) -> None:
        if self._hash is None:
            self._pending.append(message)
        else:
            self._hash.update(message)

    def start(self, hash_name: str) -> None:
        self._hash = hashlib.new(hash_name)
        for message in self._pending:
            self._hash.update(message)
        self._pending.clear()

    def restart_after_retry(self, hash_name: str) -> None:
        """After a HelloRetryRequest the first ClientHello becomes message_hash (§4.4.1)."""
        self.start(hash_name)
        assert self._hash is not None
        first = self._hash.digest()
        self._hash = hashlib.new(hash_name)
        self._hash.update(bytes((254, 0, 0, len(first))) + first)

    def digest(self) -> bytes:
        assert self._hash is not None, "the transcript hash is not chosen before ServerHello"
        return self._hash.copy().digest()


# ---------------------------------------------------------------------- key exchange
class KeyShare:
    """The client's private part for one group; ``public`` is what the key_share carries."""

    group: int
    public: bytes

    def shared_secret(self, server_share: bytes) -> bytes:
        raise NotImplementedError


class X25519Share(KeyShare):
    def __init__(self) -> None:
        self.group = NamedGroup.X25519
        self._key = x25519.X25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes_raw()

    def shared_secret(self, server_share: bytes) -> bytes:
        if len(server_share) != 32:
            raise ValueError("an X25519 key share is 32 bytes")
        peer = x25519.X25519PublicKey.from_public_bytes(server_share)
        secret = self._key.exchange(peer)  # raises on the all-zero result (RFC 8446 §7.4.2)
        return secret


_CURVES: dict[int, tuple[ec.EllipticCurve, int]] = {
    NamedGroup.SECP256R1: (ec.SECP256R1(), 65),
    NamedGroup.SECP384R1: (ec.SECP384R1(), 97),
}


class EcdheShare(KeyShare):
    def __init__(self, group: int) -> None:
        self.group = group
        curve, self._point_len = _CURVES[group]
        self._key = ec.generate_private_key(curve)
        self.public = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    def shared_secret(self, server_share: bytes) -> bytes:
        # RFC 8446 §4.2.8.2: uncompressed points only.
        if len(server_share) != self._point_len or server_share[0] != 4:
            raise ValueError("an ECDHE key share must be an uncompressed point")
        peer = ec.EllipticCurvePublicKey.from_encoded_point(self._key.curve, server_share)
        return self._key.exchange(ec.ECDH(), peer)


class X25519MlKem768Share(KeyShare):
    """The hybrid X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem): ML-KEM part first."""

    MLKEM_PUBLIC = 1184
    MLKEM_CIPHERTEXT = 1088

    def __init__(self) -> None:
        if not HAVE_MLKEM:
            raise RuntimeError("this cryptography has no ML-KEM (needs cryptography >= 47)")
        self.group = NamedGroup.X25519MLKEM768
        self._kem = mlkem.MLKEM768PrivateKey.generate()
        self._x = x25519.X25519PrivateKey.generate()
        self.public = (self._kem.public_key().public_bytes_raw()
                       + self._x.public_key().public_bytes_raw())

    def shared_secret(self, server_share: bytes) -> bytes:
        if len(server_share) != self.MLKEM_CIPHERTEXT + 32:
            raise ValueError("an X25519MLKEM768 server share is 1120 bytes")
        kem_secret = self._kem.decapsulate(server_share[: self.MLKEM_CIPHERTEXT])
        peer = x25519.X25519PublicKey.from_public_bytes(server_share[self.MLKEM_CIPHERTEXT :])
        return kem_secret + self._x.exchange(peer)


SUPPORTED_GROUPS: frozenset[int] = frozenset(
    {NamedGroup.X25519, NamedGroup.SECP256R1, NamedGroup.SECP384R1}
    | ({NamedGroup.X25519MLKEM768} if HAVE_MLKEM else set()))


def new_key_share(group: int) -> KeyShare:
    if group == NamedGroup.X25519:
        return X25519Share()
    if group == NamedGroup.X25519MLKEM768:
        return X25519MlKem768Share()
    if group in _CURVES:
        return EcdheShare(group)
    raise ValueError(f"no key exchange for group 0x{group:04x}")
