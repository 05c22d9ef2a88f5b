"""What worker processes (``veil serve --workers N``) share through memory: the replay filter.

One process's replay filter (:class:`veil.protocol.auth.ReplayFilter`) stops an authenticator
replayed to that process. With several workers behind one port a replay may reach another
worker, so the workers keep the fingerprints in one table in shared memory instead: a memfd
the parent makes and every worker maps, under a POSIX record lock (``lockf``, one per
process, so the workers exclude each other). Each handshake costs the lock, a keyed BLAKE2b
and a few probes (measured in tests/unit/test_shared_replay.py: microseconds), and nothing
else touches it: established sessions never do.

The table: :data:`GENERATIONS` regions, one per stretch of ``window`` seconds of
authenticator timestamps (as the single-process filter's buckets): a replay carries the same
timestamp, so it lands in the same region. A region holds fingerprints in open addressing
(0 = empty); when a timestamp of a newer stretch needs a region whose stretch is stale, the
region is emptied (its pages given back with MADV_REMOVE) and reused. At most three stretches
are ever live (timestamps within ``window`` of the clock either way).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from veil.protocol.auth import ACCEPT_WINDOW, MAX_REPLAY_ENTRIES_PER_KEY

#: Regions of timestamps: three stretches of the window are live at once (see above).
GENERATIONS = 3
#: Fingerprint slots per region: 2**21 slots of 8 bytes is 16 MiB, held only as pages are
#: touched. A region takes at most half of them (1,048,576 handshakes in one window, ~4,000
#: a second: more than a 2-core server completes), so probes stay short; past that a
#: handshake is accepted without being remembered (counted), as the single-process filter
#: does when full.
REGION_SLOTS = 1 << 21
MAX_REGION_ENTRIES = REGION_SLOTS // 2
#: The file's header: a 16-byte salt for the fingerprints (drawn by the parent, so every
#: worker computes the same ones), then per region its stretch number + 1 (0: unused) and count.
_SALT = 16
_REGION_HEADER = struct.Struct("=QQ")
_HEADER_SIZE = 4096  # one page, so the regions start page-aligned for MADV_REMOVE
_REGION_BYTES = REGION_SLOTS * 8


def create_replay_table() -> int:
    """A new, zeroed shared table with a fresh salt: the descriptor the parent passes on."""
    fd = os.memfd_create("veil-replay", os.MFD_CLOEXEC)
    os.ftruncate(fd, _HEADER_SIZE + GENERATIONS * _REGION_BYTES)
    os.pwrite(fd, os.urandom(_SALT), 0)
    return fd


class SharedReplayFilter:
    """:class:`veil.protocol.auth.ReplayFilter`'s interface over the shared table at ``fd``.

    The bound per key (``max_entries_per_key``) is counted by each worker for its own
    handshakes: across N workers a key flooding handshakes is cut at N times it at most."""

    def __init__(self, fd: int, window: float = ACCEPT_WINDOW,
                 max_entries_per_key: int = MAX_REPLAY_ENTRIES_PER_KEY) -> None:
        self._fd = fd
        self._window = window
        self._max_entries_per_key = max_entries_per_key
        self._map = mmap.mmap(fd, _HEADER_SIZE + GENERATIONS * _REGION_BYTES)
        self._salt = bytes(self._map[:_SALT])
        self._slots = memoryview(self._map)[_HEADER_SIZE:].cast("Q")
        # This worker's handshakes per (stretch, key), for the per-key bound.
        self._per_key: dict[int, dict[bytes, int]] = {}
        self.unrecorded = 0  # accepted while a region was full, for metrics and tests

    def close(self) -> None:
        self._slots.release()
        self._map.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def check_and_add(self, key_id: bytes, nonce: bytes, timestamp: float,
                      now: float) -> str | None:
        """As :meth:`veil.protocol.auth.ReplayFilter.check_and_add`, across the workers."""
        stretch = int(timestamp // self._window)
        oldest_live = int((now - self._window) // self._window)
        for old in [s for s in self._per_key if s < oldest_live]:
            del self._per_key[old]
        digest = hashlib.blake2b(key_id + nonce, digest_size=8, key=self._salt).digest()
        fingerprint = int.from_bytes(digest, "little") or 1  # 0 marks an empty slot
        per_key = self._per_key.setdefault(stretch, {})
        with self._locked():
            region = self._region(stretch, oldest_live)
            if region is None:
                return "stale"
            slots, base, mask = self._slots, region * REGION_SLOTS, REGION_SLOTS - 1
            i = fingerprint & mask
            while (held := slots[base + i]) != 0:
                if held == fingerprint:
                    return "replay"
                i = (i + 1) & mask
            if sum(counts.get(key_id, 0) for counts in self._per_key.values()) \
                    >= self._max_entries_per_key:
                return "too_many_handshakes"
            offset = _SALT + region * _REGION_HEADER.size
            number, count = _REGION_HEADER.unpack_from(self._map, offset)
            if count >= MAX_REGION_ENTRIES:
                self.unrecorded += 1
                return None
            slots[base + i] = fingerprint
            _REGION_HEADER.pack_into(self._map, offset, number, count + 1)
        per_key[key_id] = per_key.get(key_id, 0) + 1
        return None

    def _region(self, stretch: int, oldest_live: int) -> int | None:
        """The region holding ``stretch`` (emptied first if it held a stale one), None if a
        live stretch holds it (a timestamp outside the window: verify_auth refuses those
        first). Locked."""
        region = stretch % GENERATIONS
        offset = _SALT + region * _REGION_HEADER.size
        number, _count = _REGION_HEADER.unpack_from(self._map, offset)
        if number != stretch + 1:
            if number and number - 1 >= oldest_live:
                return None
            start = _HEADER_SIZE + region * _REGION_BYTES
            self._map.madvise(mmap.MADV_REMOVE, start, _REGION_BYTES)
            _REGION_HEADER.pack_into(self._map, offset, stretch + 1, 0)
        return region

    def __len__(self) -> int:
        return sum(_REGION_HEADER.unpack_from(self._map, _SALT + r * _REGION_HEADER.size)[1]
                   for r in range(GENERATIONS))


@dataclass(frozen=True)
class WorkerRole:
    """What makes a server one worker of several (``veil serve --workers N``): given by the
    parent (veil.server.workers), which made every one of these."""

    #: This worker's number, 0 to ``count`` - 1, and how many there are.
    index: int
    count: int
    #: The listening sockets, in ``--listen`` order: this worker's own of each SO_REUSEPORT
    #: group the parent bound (the parent keeps them, so a restarted worker takes over the
    #: connections that queued meanwhile).
    listeners: tuple[socket.socket, ...]
    #: The shared replay table (:func:`create_replay_table`).
    replay_fd: int
    #: The TLS session-ticket keys every worker uses (veil.manage.libssl.set_ticket_keys).
    ticket_keys: bytes
