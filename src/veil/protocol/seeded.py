"""Per-install choices drawn from a seed kept in the server's state.

The cover site (:mod:`veil.cover.generate`) and the certificate pattern
(:mod:`veil.manage.state`) are drawn from the same seed, so that no two installs look alike
and each looks the same after every restart and upgrade. It lives here, below both layers,
because it is pure: bytes in, choices out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["SEED_BYTES", "Draw", "SiteSeed"]

#: 256 bits: installs must not share a seed by chance.
SEED_BYTES = 32

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SiteSeed:
    """What a site is generated from: random bytes and the install's creation time (file
    dates lie before it, fixed for the life of the install)."""

    seed: bytes
    created: int

    @classmethod
    def new(cls, now: float) -> SiteSeed:
        """A fresh seed for an install created at ``now`` (Unix time)."""
        return cls(os.urandom(SEED_BYTES), int(now))


class Draw:
    """Deterministic choices from a seed: HMAC-SHA256(seed, label || counter) blocks."""

    def __init__(self, seed: bytes, label: str) -> None:
        self._key = seed
        self._label = label.encode()
        self._counter = 0

    def below(self, n: int) -> int:
        """An integer in [0, n); 64 bits per draw make the modulo bias negligible for the
        small ``n`` used here."""
        if n <= 0:
            raise ValueError("below() needs a positive bound")
        self._counter += 1
        block = hmac.new(self._key, self._label + struct.pack(">Q", self._counter),
                         hashlib.sha256).digest()
        return int.from_bytes(block[:8], "big") % n

    def between(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        return lo + self.below(hi - lo + 1)

    def chance(self, percent: int) -> bool:
        return self.below(100) < percent

    def choice(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        pool = list(items)
        return [pool.pop(self.below(len(pool))) for _ in range(min(k, len(pool)))]


