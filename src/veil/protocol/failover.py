"""Which way in to use: a sans-IO state machine fed with what happened on each way.

The caller (veil.net.client_session) reports each attempt's outcome with the time; the
machine answers with :class:`Switched` when the way in use changes, and tells the caller
which blocked, better way to probe next and when (:meth:`WayChooser.next_probe`). It never
reads a clock, and its jitter comes from the ``rng`` it is given.

The rules:

- Ways are in key order; the first is preferred. The way in use is the best one not blocked.
- A way is *blocked* after :attr:`FailoverConfig.block_after` classified failures in a row
  with no success between (two by default), or at once for a failure that cannot be a blip
  (someone else's certificate on the path). Why two and not one: a single refused, reset or
  timed-out attempt happens on working paths too (a server restart, a Wi-Fi handover, a lost
  SYN and its retry), and switching on each would flap; a censor's block (RST injection on
  every connection, a blackhole) fails every attempt, so the second, a backoff step later,
  confirms it at the cost of one retry: a fraction of a second for a reset, one handshake
  timeout for a blackhole. A slow, lossy path that works succeeds now and then, and each
  success clears the count: it is never blocked.
- Every blocked way better than the one in use is probed with jittered exponential backoff
  (``probe_initial`` doubling to ``probe_max``, each wait times a factor from ``jitter``, so
  clients blocked together do not probe together); a probe that succeeds unblocks the way and,
  being better, makes it the way in use again.
- A way blocked again soon after a probe gave it back (within ``relapse_window``) did not come
  back: a throttle that freezes each connection after N bytes lets every handshake, so every
  probe, through, and only the user's next download finds the freeze again. Its probe wait
  then goes on from where it was, times ``relapse_factor``, up to ``relapse_max``, so such a
  way is given back ever more rarely instead of every few seconds.
- When every way is blocked (the network is down, or all are), the way in use rotates through
  them on each further failure, so every one keeps being tried; the first that works is used.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field


class Failure(enum.Enum):
    """What went wrong with one attempt or session on a way in (the value: for people)."""

    REFUSED = "connection refused"
    UNREACHABLE = "no route to it"
    RESET = "reset during the TLS handshake"
    CUT = "TLS handshake cut"
    TIMEOUT = "no TLS answer in time (blackholed?)"
    FOREIGN = "someone else's certificate (interception?)"
    SILENT = "the session stopped answering"


#: Failures that cannot be a blip: one is enough to block the way. A session that stopped
#: answering has already been asked twice over (a PING, then its timeout, after the user's
#: request went unanswered): a second attempt would cost a handshake timeout more, and a false
#: switch costs only the way back (the better way is probed within seconds).
CONCLUSIVE = frozenset({Failure.FOREIGN, Failure.SILENT})


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    #: Failures in a row that block a way (see the module's docstring for why two).
    block_after: int = 2
    #: First wait before probing a blocked way (seconds): soon enough that a block that
    #: lifts at once (a censor's mistake, a firewall reload) costs little.
    probe_initial: float = 5.0
    #: Longest wait between probes: a block that lasts hours costs one connection a minute.
    probe_max: float = 60.0
    #: Each probe wait is multiplied by a factor drawn from this range.
    jitter: tuple[float, float] = (0.5, 1.5)
    #: A way blocked again within this long (seconds) of a probe giving it back relapsed: its
    #: probe's success proved nothing (a throttle that freezes after N bytes passes every
    #: handshake). Five minutes: a freeze shows up within the user's next downloads, while a
    #: block that lifted and came back later is a new block, probed from probe_initial again.
    relapse_window: float = 300.0
    #: On a relapse the probe wait is multiplied by this: each return costs the user a frozen
    #: download (~10-20 s until it is found), so returns must get rare fast: 5 s, then
    #: 20 s, 80 s, 320 s (each times the jitter).
    relapse_factor: float = 4.0
    #: The longest wait before probing a way that keeps relapsing (seconds): a throttled way
    #: costs one frozen download per ten minutes at most, and a throttle that was lifted is
    #: found within ten minutes.
    relapse_max: float = 600.0

    def __post_init__(self) -> None:
        if self.block_after < 1:
            raise ValueError("block_after must be at least 1")
        if not 0 < self.probe_initial <= self.probe_max <= self.relapse_max:
            raise ValueError("need 0 < probe_initial <= probe_max <= relapse_max")
        if self.relapse_factor < 1 or self.relapse_window < 0:
            raise ValueError("need relapse_factor >= 1 and relapse_window >= 0")


@dataclass(frozen=True, slots=True)
class Switched:
    """The way in use changed from ``old`` to ``new`` (indices into the ways)."""

    old: int
    new: int
    #: Why ``old`` was left; None when ``new`` is a better way that works again.
    failure: Failure | None


@dataclass(slots=True)
class _Way:
    failures: int = 0
    last_failure: Failure | None = None
    blocked: bool = False
    probe_wait: float = 0.0
    probe_at: float = 0.0
    #: When a probe's success last gave it back after a block (None: never).
    returned_at: float | None = None


@dataclass(slots=True)
class WayChooser:
    """Chooses among ``count`` ways in (indices 0..count-1, 0 preferred)."""

    count: int
    config: FailoverConfig = field(default_factory=FailoverConfig)
    rng: random.Random = field(default_factory=random.Random)
    current: int = 0
    _ways: list[_Way] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("need at least one way in")
        self._ways = [_Way() for _ in range(self.count)]

    def blocked(self, way: int) -> bool:
        return self._ways[way].blocked

    def last_failure(self, way: int) -> Failure | None:
        return self._ways[way].last_failure

    def failed(self, way: int, failure: Failure, now: float) -> Switched | None:
        """An attempt (or a live session) on ``way`` failed this way at ``now``."""
        state = self._ways[way]
        state.failures += 1
        state.last_failure = failure
        config = self.config
        if state.blocked:
            # A probe (or a straggler) failed: wait longer before the next probe (never
            # shorter than a relapse made it).
            state.probe_wait = max(state.probe_wait,
                                   min(state.probe_wait * 2, config.probe_max))
            state.probe_at = now + self._jittered(state.probe_wait)
        elif state.failures >= config.block_after or failure in CONCLUSIVE:
            state.blocked = True
            if state.returned_at is not None and now - state.returned_at <= config.relapse_window:
                state.probe_wait = min(state.probe_wait * config.relapse_factor,
                                       config.relapse_max)
            else:
                state.probe_wait = config.probe_initial
            state.probe_at = now + self._jittered(state.probe_wait)
        if way != self.current or not state.blocked:
            return None
        old = self.current
        self.current = self._best_unblocked()
        if self.current == old and self.count > 1:
            # Everything is blocked: keep trying each in turn.
            self.current = (old + 1) % self.count
        return Switched(old, self.current, failure) if self.current != old else None

    def succeeded(self, way: int, now: float) -> Switched | None:
        """An attempt on ``way`` reached our server (the pin matched, the session began)."""
        state = self._ways[way]
        state.failures = 0
        if state.blocked:
            state.returned_at = now  # its probe wait is kept, in case it relapses
        state.blocked = False
        if way < self.current or self._ways[self.current].blocked:
            old, self.current = self.current, way
            return Switched(old, way, None) if way != old else None
        return None

    def next_probe(self) -> tuple[int, float] | None:
        """``(way, when)``: the next blocked way better than the one in use to try, or None
        when there is none (the preferred way is in use, or nothing better is blocked)."""
        due = [(state.probe_at, index) for index, state in enumerate(self._ways[:self.current])
               if state.blocked]
        if not due:
            return None
        when, index = min(due)
        return index, when

    def _best_unblocked(self) -> int:
        for index, state in enumerate(self._ways):
            if not state.blocked:
                return index
        return self.current

    def _jittered(self, wait: float) -> float:
        low, high = self.config.jitter
        return wait * self.rng.uniform(low, high)
