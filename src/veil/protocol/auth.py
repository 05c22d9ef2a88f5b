"""Client authentication inside TLS, and the server's replay filter.

The construction (docs/protocol.md, "Authentication"): TLS 1.3 with the server's key pinned by
the client gives server authentication and forward secrecy; the client then proves it holds a
user secret with an HMAC bound to this very TLS connection (the ``tls-unique`` channel binding,
RFC 5929, which OpenSSL exposes for TLS 1.3 as the client's Finished), to the current time and
to a fresh nonce. The message is the first thing the client sends after the handshake::

    key_id (8) | timestamp, u64 seconds (8) | nonce (16) | tag = HMAC-SHA256(auth_key, ...) (32)

Keys are derived from the 32-byte user secret with HKDF-SHA256 (RFC 5869). ``key_id`` is not
secret from the server but is only ever sent inside TLS. A message is accepted only if its tag
verifies, its timestamp is within :data:`ACCEPT_WINDOW` of the server's clock, and its
(key_id, nonce) pair was not seen inside that window (the replay filter).
"""

from __future__ import annotations

import hmac
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_SIZE = 32
KEY_ID_SIZE = 8
NONCE_SIZE = 16
TAG_SIZE = 32
AUTH_SIZE = KEY_ID_SIZE + 8 + NONCE_SIZE + TAG_SIZE
# Clocks of clients and servers in the wild are off by seconds to a minute; two minutes each
# way accepts them while keeping the replay filter's memory bounded to this window.
ACCEPT_WINDOW = 120.0
# The replay filter forgets entries older than the window; this caps it against floods of
# valid-looking messages (each entry costs ~100 bytes, so at most ~100 MB).
MAX_REPLAY_ENTRIES = 1_000_000

_LABEL = b"veil-auth-v1"
_HEADER = struct.Struct("!8sQ16s")


def _derive(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


@dataclass(frozen=True, slots=True)
class Credential:
    """What both sides derive from a user's secret."""

    key_id: bytes
    auth_key: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> Credential:
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"user secret must be {SECRET_SIZE} bytes")
        return cls(_derive(secret, b"veil key id", KEY_ID_SIZE),
                   _derive(secret, b"veil auth key", 32))


def new_secret() -> bytes:
    return os.urandom(SECRET_SIZE)


def _tag(auth_key: bytes, header: bytes, binding: bytes) -> bytes:
    return hmac.new(auth_key, _LABEL + header + binding, "sha256").digest()


def build_auth(credential: Credential, binding: bytes, now: float,
               nonce: bytes | None = None) -> bytes:
    """The client's authentication message for the TLS connection with ``binding``."""
    header = _HEADER.pack(credential.key_id, int(now), nonce or os.urandom(NONCE_SIZE))
    return header + _tag(credential.auth_key, header, binding)


def peek_key_id(message: bytes) -> bytes:
    return message[:KEY_ID_SIZE]


class ReplayFilter:
    """Remembers accepted (key_id, nonce) pairs for the acceptance window."""

    def __init__(self, window: float = ACCEPT_WINDOW, max_entries: int = MAX_REPLAY_ENTRIES):
        self._window = window
        self._max_entries = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def check_and_add(self, token: bytes, now: float) -> bool:
        """True if ``token`` is new (and remember it); False for a replay or when full."""
        seen = self._seen
        horizon = now - 2 * self._window  # a timestamp may be early or late by the window
        while seen:
            oldest, at = next(iter(seen.items()))
            if at >= horizon:
                break
            del seen[oldest]
        if token in seen or len(seen) >= self._max_entries:
            return False
        seen[token] = now
        return True

    def __len__(self) -> int:
        return len(self._seen)


def verify_auth(message: bytes, credential: Credential, binding: bytes, now: float,
                replay: ReplayFilter, window: float = ACCEPT_WINDOW) -> str | None:
    """Check a client's message against the credential its key id named.

    Returns None when accepted, else a short reason for logs and metrics ("bad_tag",
    "stale", "replay"). Every rejection looks the same to the client: the cover site.
    """
    if len(message) != AUTH_SIZE:
        return "bad_length"
    header, tag = message[: AUTH_SIZE - TAG_SIZE], message[AUTH_SIZE - TAG_SIZE :]
    if not hmac.compare_digest(tag, _tag(credential.auth_key, header, binding)):
        return "bad_tag"
    _key_id, timestamp, nonce = _HEADER.unpack(header)
    if abs(now - timestamp) > window:
        return "stale"
    if not replay.check_and_add(credential.key_id + nonce, now):
        return "replay"
    return None
