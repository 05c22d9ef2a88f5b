"""What worker processes (``veil serve --workers N``) share through memory: the replay filter,
and each user's sessions and devices (:class:`SharedUsers`).

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
import logging
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


class _SharedTable:
    """A table in a shared file every worker maps (``_map``), changed under one lock on the
    file: lockf is released by the kernel when a holder dies, so a killed worker never leaves
    the others waiting."""

    _fd: int
    _map: mmap.mmap

    def close(self) -> None:
        self._map.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)


class SharedReplayFilter(_SharedTable):
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
        super().close()

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


#: Users the shared session/device table holds rows for at once (a row stays with its user
#: while the server runs): past it, a new user's sessions and devices are counted by each
#: worker alone (logged once), so the limits hold per worker for them.
MAX_SHARED_USERS = 1 << 16
#: Rows a lookup probes before it takes the table for full: a nearly full table must not make
#: every handshake walk all of it (at 90% full a miss probes ~50 rows on average).
MAX_ROW_PROBES = 512
#: The table's size bound, whatever --workers and --max-devices-per-user say: its rows shrink
#: in number to fit (pages are held only as rows are touched).
MAX_USERS_TABLE_BYTES = 64 << 20


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


class SharedUsers(_SharedTable):
    """Each user's sessions and client addresses (devices) over all the workers, so that
    ``--max-sessions-per-user`` and ``--max-devices-per-user`` hold for the whole server.

    A row per user (open addressing by a hash of the name; rows are never freed while the
    server runs, a user's row is reused for their next connections): the user's hash, the
    user's sessions per worker, then ``devices`` slots of (address hash, connections per
    worker). Counts are per worker so that a dead worker's column can be zeroed (its
    connections died with it) and nothing else: by the parent when it sees the worker exit,
    and by the worker started in its place. Checking is one
    row read under the lock; a check and the count that follows it are two steps, so two
    new devices reaching two workers within the same few microseconds may both get in."""

    def __init__(self, fd: int, index: int) -> None:
        self._fd = fd
        self._index = index
        header = os.pread(fd, 24, 0)
        self._workers, self._devices, self._rows = struct.unpack("=QQQ", header)
        self._row_words = 1 + self._workers + self._devices * (1 + self._workers)
        self._map = mmap.mmap(fd, _HEADER_SIZE + self._rows * self._row_words * 8)
        self._words = memoryview(self._map)[_HEADER_SIZE:].cast("Q")
        self._full_logged = False
        with self._locked():
            self._zero_column()

    @staticmethod
    def create(workers: int, devices: int) -> int:
        """A new table for ``workers`` and ``devices`` slots per user: its descriptor."""
        row_bytes = 8 * (1 + workers + devices * (1 + workers))
        rows = max(1, min(MAX_SHARED_USERS, MAX_USERS_TABLE_BYTES // row_bytes))
        fd = os.memfd_create("veil-users", os.MFD_CLOEXEC)
        os.ftruncate(fd, _HEADER_SIZE + rows * row_bytes)
        os.pwrite(fd, struct.pack("=QQQ", workers, devices, rows), 0)
        return fd

    def close(self) -> None:
        self._words.release()
        super().close()

    def _zero_column(self) -> None:
        """This worker's counts to 0: a new worker in a dead one's place holds nothing."""
        words, width = self._words, self._row_words
        for row in range(self._rows):
            base = row * width
            if not words[base]:
                continue
            words[base + 1 + self._index] = 0
            for slot in range(self._devices):
                words[base + 1 + self._workers + slot * (1 + self._workers) + 1
                      + self._index] = 0

    def _row(self, user: str, create: bool) -> int | None:
        """The word offset of ``user``'s row; None if absent (or the table is full)."""
        key, words, width = _hash64(user), self._words, self._row_words
        start = key % self._rows
        for step in range(min(self._rows, MAX_ROW_PROBES)):
            base = ((start + step) % self._rows) * width
            held = words[base]
            if held == key:
                return int(base)
            if held == 0:
                if not create:
                    return None
                words[base] = key
                return int(base)
        if not self._full_logged:
            self._full_logged = True
            logging.getLogger("veil.server").warning(
                "the workers' user table is full (%d users): limits of further users hold "
                "per worker", self._rows)
        return None

    def _total(self, offset: int) -> int:
        return sum(self._words[offset:offset + self._workers])

    def sessions(self, user: str) -> int:
        """``user``'s sessions on all the workers."""
        with self._locked():
            row = self._row(user, create=False)
            return 0 if row is None else self._total(row + 1)

    def session_share(self, user: str) -> tuple[int, int]:
        """(``user``'s sessions on this worker, on all the workers)."""
        with self._locked():
            row = self._row(user, create=False)
            if row is None:
                return 0, 0
            return self._words[row + 1 + self._index], self._total(row + 1)

    def devices(self, user: str) -> set[int]:
        """Hashes of the addresses ``user`` is connected from, on all the workers."""
        with self._locked():
            row = self._row(user, create=False)
            return set() if row is None else set(self._live_devices(row))

    def _live_devices(self, row: int) -> dict[int, int]:
        """Device hash -> slot offset, for the devices with a connection."""
        found = {}
        for slot in range(self._devices):
            offset = row + 1 + self._workers + slot * (1 + self._workers)
            if self._words[offset] and self._total(offset + 1):
                found[self._words[offset]] = offset
        return found

    def add(self, user: str, device: str | None) -> None:
        """A connection of ``user`` from ``device`` (None: not counted as a device) began here."""
        with self._locked():
            row = self._row(user, create=True)
            if row is None:
                return
            self._words[row + 1 + self._index] += 1
            if device is None:
                return
            key = _hash64(device)
            live = self._live_devices(row)
            offset = live.get(key)
            if offset is None:  # a slot no device holds now (a full row: not counted)
                for slot in range(self._devices):
                    candidate = row + 1 + self._workers + slot * (1 + self._workers)
                    if candidate not in live.values():
                        offset = candidate
                        for w in range(self._workers):
                            self._words[offset + 1 + w] = 0
                        self._words[offset] = key
                        break
            if offset is not None:
                self._words[offset + 1 + self._index] += 1

    def remove(self, user: str, device: str | None) -> None:
        """A connection :meth:`add` counted ended."""
        with self._locked():
            row = self._row(user, create=False)
            if row is None:
                return
            column = row + 1 + self._index
            self._words[column] = max(0, self._words[column] - 1)
            if device is None:
                return
            offset = self._live_devices(row).get(_hash64(device))
            if offset is not None:
                held = offset + 1 + self._index
                self._words[held] = max(0, self._words[held] - 1)

    def refusal(self, user: str, device: str | None, max_sessions: int,
                max_devices: int | None) -> str | None:
        """As Live.refusal's per-user part, for the whole server."""
        with self._locked():
            row = self._row(user, create=False)
            if row is None:
                return None
            if self._total(row + 1) >= max_sessions:
                return "too_many_sessions"
            if device is not None and max_devices is not None:
                live = self._live_devices(row)
                if _hash64(device) not in live and len(live) >= max_devices:
                    return "too_many_devices"
        return None


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
    #: The users' sessions and devices over all workers (:meth:`SharedUsers.create`).
    users_fd: int
