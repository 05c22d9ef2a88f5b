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
(key_id, nonce) pair was not seen with that timestamp before (the replay filter,
:class:`ReplayFilter`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from array import array
from dataclasses import dataclass, field
from typing import Protocol

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
# The replay filter's bound over all its entries: each is an 8-byte slot in a table kept at
# most half full, so at the bound it holds at most 32 MiB (measured: 16-24 MiB,
# tests/load/test_gate_load.py). Only an authenticator with a valid tag adds an entry, so only
# key holders fill it; and an entry lives only while its timestamp is within the window,
# ~240 s at most: 1,000,000 is ~4,000 handshakes a second, more than this server completes.
MAX_REPLAY_ENTRIES = 1_000_000
# One key's entries: an honest client opens a connection every few seconds at most (a pool,
# reconnects), a key shared by a family a few times that; 4,096 in 2-4 minutes is a key
# holder flooding handshakes, and that key alone is refused until its entries age out. It
# also means that filling the filter takes ~245 keys flooding at once.
MAX_REPLAY_ENTRIES_PER_KEY = 4096

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


# A bucket's table starts this small (8 KiB) and doubles when half full: an idle server's
# filter costs next to nothing.
_FIRST_SLOTS = 1024


@dataclass(slots=True)
class _Bucket:
    """The fingerprints of the authenticators whose timestamps fall in one stretch of time:
    an open-addressing table of 64-bit fingerprints (0 = empty), linear probing."""

    slots: array[int] = field(default_factory=lambda: _empty_slots(_FIRST_SLOTS))
    count: int = 0
    per_key: dict[bytes, int] = field(default_factory=dict)

    def _slot(self, fingerprint: int) -> int:
        """Where ``fingerprint`` is, or the empty slot where it would go."""
        slots = self.slots
        mask = len(slots) - 1
        i = fingerprint & mask
        while (held := slots[i]) != 0 and held != fingerprint:
            i = (i + 1) & mask
        return i

    def __contains__(self, fingerprint: int) -> bool:
        return self.slots[self._slot(fingerprint)] == fingerprint

    def add(self, fingerprint: int, key_id: bytes) -> None:
        """Add a fingerprint that is not there yet, for ``key_id``."""
        self.slots[self._slot(fingerprint)] = fingerprint
        self.count += 1
        self.per_key[key_id] = self.per_key.get(key_id, 0) + 1
        if 2 * self.count > len(self.slots):
            self._grow()

    def _grow(self) -> None:
        old, self.slots = self.slots, _empty_slots(2 * len(self.slots))
        for fingerprint in old:
            if fingerprint:
                self.slots[self._slot(fingerprint)] = fingerprint


def _empty_slots(count: int) -> array[int]:
    return array("Q", (0,)) * count


class ReplayCheck(Protocol):
    """What :func:`verify_auth` needs of a replay filter: :class:`ReplayFilter`, or the one
    worker processes share (``veil.server.shared``)."""

    #: Handshakes accepted without being remembered (the filter was full).
    unrecorded: int

    def check_and_add(self, key_id: bytes, nonce: bytes, timestamp: float,
                      now: float) -> str | None: ...

    def __len__(self) -> int: ...


class ReplayFilter:
    """Remembers accepted authenticators for as long as their timestamp is acceptable.

    An authenticator whose timestamp is more than ``window`` from the clock is refused as
    stale, so one filed under a timestamp that old can never be replayed and is forgotten:
    entries are kept in buckets of ``window`` seconds of *timestamps*, and a bucket goes as
    soon as all its timestamps are stale. Each entry is a 64-bit fingerprint of (key_id,
    nonce) keyed with a secret of this process (nobody can aim a collision; an accidental one
    refuses one handshake in 2**64 / entries).

    Bounds (a key holder flooding handshakes is the only way to add entries):

    * ``max_entries_per_key``: past it, that key's new handshakes are refused
      ("too_many_handshakes") until its entries age out; other keys are not affected.
    * ``max_entries`` over all keys: past it, new handshakes are accepted *without* being
      remembered (counted in :attr:`unrecorded`) rather than refused, so that a flood never
      locks out everyone. The filter is a second line: an authenticator is bound to its TLS
      connection (``tls-unique``), so it fails on any other connection with or without it.
    """

    def __init__(self, window: float = ACCEPT_WINDOW, max_entries: int = MAX_REPLAY_ENTRIES,
                 max_entries_per_key: int = MAX_REPLAY_ENTRIES_PER_KEY) -> None:
        self._window = window
        self._max_entries = max_entries
        self._max_entries_per_key = max_entries_per_key
        self._salt = os.urandom(16)
        self._buckets: dict[int, _Bucket] = {}  # by timestamp // window
        self._entries = 0
        self.unrecorded = 0  # accepted while full, for metrics and tests

    def check_and_add(self, key_id: bytes, nonce: bytes, timestamp: float,
                      now: float) -> str | None:
        """None if the authenticator (``key_id``, ``nonce``, ``timestamp``) is new, and
        remember it; else why not: "replay" or "too_many_handshakes". ``timestamp`` must
        already be within the window of ``now`` (:func:`verify_auth` checks that first)."""
        self._forget_stale(now)
        # A replay carries the same timestamp (the tag covers it): it lands in the same bucket.
        index = int(timestamp // self._window)
        bucket = self._buckets.get(index)
        digest = hashlib.blake2b(key_id + nonce, digest_size=8, key=self._salt).digest()
        fingerprint = int.from_bytes(digest, "big") or 1  # 0 marks an empty slot
        if bucket is not None and fingerprint in bucket:
            return "replay"
        if sum(b.per_key.get(key_id, 0) for b in self._buckets.values()) \
                >= self._max_entries_per_key:
            return "too_many_handshakes"
        if self._entries >= self._max_entries:
            self.unrecorded += 1
            return None
        if bucket is None:
            bucket = self._buckets[index] = _Bucket()
        bucket.add(fingerprint, key_id)
        self._entries += 1
        return None

    def _forget_stale(self, now: float) -> None:
        # Bucket i holds timestamps [i * window, (i + 1) * window): all stale once
        # (i + 1) * window <= now - window. At most three buckets are ever live.
        oldest_live = int((now - self._window) // self._window)
        for index in [i for i in self._buckets if i < oldest_live]:
            self._entries -= self._buckets.pop(index).count

    def __len__(self) -> int:
        return self._entries

    @property
    def table_bytes(self) -> int:
        """Memory held by the fingerprint tables (what grows with the entries)."""
        return sum(len(b.slots) * b.slots.itemsize for b in self._buckets.values())


def verify_auth(message: bytes, credential: Credential, binding: bytes, now: float,
                replay: ReplayCheck, window: float = ACCEPT_WINDOW) -> str | None:
    """Check a client's message against the credential its key id named.

    Returns None when accepted, else a short reason for logs and metrics ("bad_tag",
    "stale", "replay", "too_many_handshakes"). Every rejection looks the same to the
    client: the cover site.
    """
    if len(message) != AUTH_SIZE:
        return "bad_length"
    header, tag = message[: AUTH_SIZE - TAG_SIZE], message[AUTH_SIZE - TAG_SIZE :]
    if not hmac.compare_digest(tag, _tag(credential.auth_key, header, binding)):
        return "bad_tag"
    _key_id, timestamp, nonce = _HEADER.unpack(header)
    if abs(now - timestamp) > window:
        return "stale"
    return replay.check_and_add(credential.key_id, nonce, timestamp, now)
