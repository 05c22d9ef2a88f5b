"""A token bucket: the rate limiter a carrier consults for every batch it moves.

One bucket can be shared by many connections (all of one user's), so the limit holds for the
user, not per connection. ``take`` never blocks: it says how long the caller should stop
moving bytes, and the caller pauses its reading for that long (backpressure does the rest)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Limiter(Protocol):
    """What a carrier consults for every batch it moves (a :class:`TokenBucket`, or a user's
    traffic allowance on the server): ``take(n)`` accounts for ``n`` bytes just moved and
    says how many seconds to stop moving more (0: go on). Never blocks."""

    def take(self, amount: int) -> float: ...


class Limits:
    """Several limiters as one: the longest pause any of them asks for."""

    def __init__(self, *limiters: Limiter) -> None:
        self.limiters = limiters

    def take(self, amount: int) -> float:
        return max(limiter.take(amount) for limiter in self.limiters)


class TokenBucket:
    def __init__(self, rate: float, *, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate  # bytes per second
        # A quarter second of traffic by default: smooth enough for TCP, and one big TLS
        # batch (256 KiB) at even modest rates.
        self.burst = burst if burst is not None else max(rate / 4, 256 * 1024)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def take(self, amount: int) -> float:
        """Account for ``amount`` bytes just moved; seconds to pause before moving more."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - amount
        self._last = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
