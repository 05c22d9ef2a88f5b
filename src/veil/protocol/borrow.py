"""A borrowed identity's mark: a veil client recognised from its ClientHello alone.

With a borrowed identity (docs/protocol.md, "Borrowed identity") the server relays every
stranger's TLS connection to a real site and completes the handshake only for its clients, so
it must know a client before it answers: from the ClientHello. The mark goes where a browser
puts 32 random bytes, the legacy_session_id, and looks as random to anyone without the
server's static X25519 key::

    shared  = X25519(client's X25519 key share, server's static key)     (either side)
    mask    = HKDF-SHA256(shared, salt = client random,
                          info = LABEL | "mask" | key share)[:32]
    mark    = key_id (8) | timestamp, u32 seconds (4) | tag (20)
    tag     = HMAC-SHA256(auth_key, LABEL | client random | key share | key_id | timestamp)[:20]
    session_id = mark XOR mask
    psk     = HKDF-SHA256(shared | auth_key, salt = client random, info = LABEL | "psk")

- Only the holder of the server's static key unmasks it (``shared`` needs the client's
  ephemeral key or the server's static one); to everyone else it is 32 random bytes, and two
  connections of one key share nothing.
- The tag binds the user's secret to this hello's random and key share: a spliced hello (a
  mark moved onto another key share or random) fails, and so does a forged one.
- A replayed hello carries a valid tag: the server's replay filter (``auth.py``), fed with
  (key_id, the random's first 16 bytes, timestamp), refuses it, and the server relays it to
  the real site like any stranger's. The replayer gets the site's handshake, not ours.
- ``psk`` is the key schedule's PSK input on both ends (``transport/tls13/server.py``): only
  the server that unmasked the hello (it holds the static key) and found the user (it holds
  the secret) derives the handshake keys, so the client's check of the server's Finished
  authenticates the server, without a certificate.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.protocol.auth import KEY_ID_SIZE, Credential

LABEL = b"veil-borrowed-hello-v1"
MARK_SIZE = 32  # a browser's legacy_session_id
TAG_SIZE = MARK_SIZE - KEY_ID_SIZE - 4
PSK_SIZE = 32
NONCE_SIZE = 16  # of the client random: what the replay filter remembers
_HEAD = struct.Struct("!8sI")


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _mask(shared: bytes, client_random: bytes, key_share: bytes) -> bytes:
    return _hkdf(shared, client_random, LABEL + b"mask" + key_share, MARK_SIZE)


def _tag(credential: Credential, client_random: bytes, key_share: bytes, head: bytes) -> bytes:
    message = LABEL + client_random + key_share + head
    return hmac.new(credential.auth_key, message, hashlib.sha256).digest()[:TAG_SIZE]


def _psk(shared: bytes, credential: Credential, client_random: bytes) -> bytes:
    return _hkdf(shared + credential.auth_key, client_random, LABEL + b"psk", PSK_SIZE)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class HelloSeal:
    """The client's side: seals its hello for the server's static key (``seal`` is what
    ``transport/tls13``'s ``HelloSealer`` asks for)."""

    credential: Credential
    server_key: bytes  # the server's static X25519 public key (the access key's nk=)
    now: Callable[[], float]

    def seal(self, client_random: bytes, x25519_public: bytes,
             exchange: Callable[[bytes], bytes]) -> tuple[bytes, bytes]:
        shared = exchange(self.server_key)
        head = _HEAD.pack(self.credential.key_id, int(self.now()) & 0xFFFFFFFF)
        mark = head + _tag(self.credential, client_random, x25519_public, head)
        return (_xor(mark, _mask(shared, client_random, x25519_public)),
                _psk(shared, self.credential, client_random))


@dataclass(frozen=True, slots=True)
class Unmasked:
    """A session id unmasked with the server's static key: a claim, not yet checked."""

    key_id: bytes
    timestamp: int
    tag: bytes
    shared: bytes
    client_random: bytes
    key_share: bytes

    @property
    def nonce(self) -> bytes:
        return self.client_random[:NONCE_SIZE]

    def verify(self, credential: Credential) -> bytes | None:
        """The PSK if the tag is the key's, else None."""
        head = _HEAD.pack(self.key_id, self.timestamp)
        if not hmac.compare_digest(self.tag, _tag(credential, self.client_random,
                                                  self.key_share, head)):
            return None
        return _psk(self.shared, credential, self.client_random)


def unmask(static_key: x25519.X25519PrivateKey, client_random: bytes, session_id: bytes,
           x25519_share: bytes) -> Unmasked | None:
    """The server's side: what the session id claims, or None if it cannot be a mark."""
    if len(session_id) != MARK_SIZE or len(x25519_share) != 32 or len(client_random) != 32:
        return None
    try:
        shared = static_key.exchange(x25519.X25519PublicKey.from_public_bytes(x25519_share))
    except ValueError:  # a low-order point: the all-zero shared secret
        return None
    mark = _xor(session_id, _mask(shared, client_random, x25519_share))
    key_id, timestamp = _HEAD.unpack_from(mark)
    return Unmasked(key_id, timestamp, mark[_HEAD.size:], shared, client_random, x25519_share)
