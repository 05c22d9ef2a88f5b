"""The server's live view of its users: who may connect, who is connected, what they used.

Every :data:`REFRESH_INTERVAL_S` one task, off the event loop (the store may be a PostgreSQL
across the network), does three things in order:

1. adds the bytes each connection moved since the last tick to the store (``add_usage``), so
   that a kill -9 loses at most one interval of counted usage and a fleet's counters add up;
2. reads the users and this period's usage back into a :class:`UserDirectory`, the in-memory
   snapshot the gate authenticates against (a handshake never waits for the database), and
   logs ``user directory: N users, M refused`` at DEBUG when the users in it changed;
3. closes every live connection whose user may no longer connect: revoked, expired, over the
   limit (usage of the whole fleet plus what this server has not written yet), rotated to a
   new credential, or deleted; and every session an admin asked to end (the store's
   ``session_ends``: a user's sessions, or one session of one server).

Every :data:`HEARTBEAT_INTERVAL_S` the same task also writes this server's heartbeat (what
``heartbeat`` says about it) to the store, for the fleet's view in any server's panel.

So a change made with ``veil user ...`` or the admin panel, on any server of a fleet, reaches
every server within one interval plus one store round trip. Each tick reads the store's change
token before the users and, when it changed (or every few seconds), writes this server's
presence with the token it has loaded (:mod:`veil.manage.presence`): ``veil user add`` waits
for that before it prints a key, so a key is never refused for being newer than a snapshot.
If the store cannot be reached the last snapshot stays in force (fail static) and unwritten
usage is kept for the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import logging
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from veil.config import DEFAULT_MAX_SESSIONS, DEFAULT_MAX_SESSIONS_PER_USER
from veil.errors import StoreError
from veil.manage import presence
from veil.store.base import SessionEnd, Usage, User, UserStore, period_start
from veil.transport.ratelimit import Limiter, Limits, TokenBucket

if TYPE_CHECKING:
    from veil.server.shared import SharedUsers

log = logging.getLogger("veil.server")

#: The issue asks for changes to take effect within one second; half of it leaves room for
#: the store round trip and the close.
REFRESH_INTERVAL_S = 0.5
#: A server writes its heartbeat to the store (the fleet's table, veil.manage.fleet) this often:
#: a fleet panel's figures are at most this old, and a PostgreSQL fleet of 20 servers costs
#: the database 4 small writes a second, not 40.
HEARTBEAT_INTERVAL_S = 5.0
#: Trim the allocator once this many connections and streams came and went (and at most
#: once per interval: a collection of a large heap costs milliseconds of the loop).
TRIM_AFTER_CHURN = 1000
TRIM_MIN_INTERVAL_S = 10.0

#: Of the process's descriptors (RLIMIT_NOFILE), the share tunnels' outbound sockets may
#: never take: the listener, strangers' connections to the cover site (and its upstream),
#: the sessions' own TLS connections, the store and the logs live in it. A quarter of the
#: limit, and at least MIN_DESCRIPTOR_RESERVE: with LimitNOFILE=65536, 16,384 stay free.
DESCRIPTOR_RESERVE_FRACTION = 0.25
#: The reserve on a small limit (1,024: tunnels get 768): enough for a burst of strangers
#: while one user holds every outbound socket tunnels may have.
MIN_DESCRIPTOR_RESERVE = 256
#: Outbound sockets one user may hold over all their sessions and Trojan connections (a
#: session may open 1,024 streams and a user may hold 64 sessions: 65,536, the unit's whole
#: limit). A browser holds a few hundred connections; 16,384 fits a household behind one key
#: and leaves the rest of the budget to the other users.
MAX_OUTBOUND_PER_USER = 16_384
#: Slots a UDP association takes: it may open one socket per address family.
UDP_ASSOCIATION_SLOTS = 2


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return cast(Callable[[int], int], libc.malloc_trim)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to ask
        return None


_malloc_trim = _find_malloc_trim()


class OutboundSlot:
    """Descriptors one outbound stream holds; :meth:`release` gives them back (once)."""

    __slots__ = ("_count", "_owner", "_user")

    def __init__(self, owner: OutboundSlots, user: str, count: int) -> None:
        self._owner, self._user, self._count = owner, user, count

    def release(self) -> None:
        if self._count:
            self._owner._give_back(self._user, self._count)
            self._count = 0


class OutboundSlots:
    """The descriptors tunnels may use for outbound sockets: ``total`` for the server,
    ``per_user`` for each user. A stream that would pass either is refused (the session
    resets it with TOO_MANY_STREAMS), so one user cannot take every descriptor and the
    server always has the reserve left to accept strangers."""

    def __init__(self, total: int, per_user: int = MAX_OUTBOUND_PER_USER) -> None:
        self.total = total
        self.per_user = per_user
        self.in_use = 0
        self._by_user: dict[str, int] = {}
        #: Streams refused at a bound since start (user, server): for the logs and tests.
        self.refused_user = 0
        self.refused_server = 0
        #: Which bound refused the last stream refused: "per-user" or "server".
        self.last_bound = ""

    @classmethod
    def for_this_process(cls) -> OutboundSlots:
        """The budget under this process's RLIMIT_NOFILE, as raised at start: the limit
        minus the reserve (logged, so an operator sees what the limit leaves tunnels)."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        reserve = max(MIN_DESCRIPTOR_RESERVE, int(soft * DESCRIPTOR_RESERVE_FRACTION))
        total = max(soft - reserve, soft // 2)
        log.info("descriptors: limit %d, tunnels' outbound sockets may use %d "
                 "(%d per user), %d kept for strangers and the server", soft, total,
                 min(MAX_OUTBOUND_PER_USER, total), soft - total)
        return cls(total)

    def used_by(self, user: str) -> int:
        return self._by_user.get(user, 0)

    def take(self, user: str, count: int = 1) -> OutboundSlot | None:
        """``count`` descriptors for ``user``, or None at a bound."""
        held = self._by_user.get(user, 0)
        if held + count > self.per_user:
            self.refused_user += 1
            self.last_bound = "per-user"
            return None
        if self.in_use + count > self.total:
            self.refused_server += 1
            self.last_bound = "server"
            return None
        self._by_user[user] = held + count
        self.in_use += count
        return OutboundSlot(self, user, count)

    def _give_back(self, user: str, count: int) -> None:
        self.in_use -= count
        left = self._by_user.get(user, count) - count
        if left > 0:
            self._by_user[user] = left
        else:
            self._by_user.pop(user, None)


@runtime_checkable
class RateLimited(Protocol):
    """A transport that can be held to token buckets (the server's TLS transport)."""

    def set_rate_limits(self, read: Limiter | None, write: Limiter | None) -> None: ...


#: An allowance with no limit behind it (the limit was removed while connections were open).
UNLIMITED = 1 << 62


class Allowance:
    """The bytes one user may still move through this server (both directions, all their
    connections) before the next tick looks at the store again: a :class:`Limiter` that
    pauses the user's connections once it is spent, so a traffic limit is overshot by what
    is in flight then (a read and a write per connection), not by an interval's worth of the
    line's speed. The tick then cuts the user (over the limit) or tops the allowance up (the
    limit was raised, or another server's bytes were fewer than feared)."""

    __slots__ = ("pause", "remaining", "taken")

    def __init__(self, remaining: int, pause: float) -> None:
        self.remaining = remaining
        self.pause = pause  # until the next tick: it decides
        self.taken = 0  # every byte moved, for the tick's reckoning

    def take(self, amount: int) -> float:
        self.taken += amount
        self.remaining -= amount
        return 0.0 if self.remaining > 0 else self.pause


@dataclass(frozen=True, slots=True)
class UserDirectory:
    """An immutable snapshot: lookups for the gate, statuses for enforcement."""

    by_key_id: dict[bytes, User]
    by_trojan_hash: dict[str, User]
    by_name: dict[str, User]
    #: Why each user may not connect now ("revoked", "expired", "over_limit"); absent = may.
    refused: dict[str, str]
    #: Usage counted against each user's limit, as stored (fleet-wide) at snapshot time.
    period_usage: dict[str, int]
    #: The same, up and down apart (subscriptions report both).
    period_parts: dict[str, Usage] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> UserDirectory:
        return cls({}, {}, {}, {}, {})

    def find_by_key_id(self, key_id: bytes) -> User | None:
        return self.by_key_id.get(key_id)

    def find_by_trojan_hash(self, password_hash: str) -> User | None:
        return self.by_trojan_hash.get(password_hash)

    def refusal(self, user: User, device: str | None = None) -> str | None:
        """None if ``user`` (as found by a lookup) may connect, else the reason (the
        directory knows the users, not their connections: ``device`` is Live's to count)."""
        return self.refused.get(user.name)

    def same_users(self, other: UserDirectory) -> bool:
        """Whether ``other`` has the same users, with the same credentials, limits and expiry,
        and refuses the same ones. Usage and last-seen times, which move with traffic, are
        left out."""
        if self.refused != other.refused or self.by_name.keys() != other.by_name.keys():
            return False
        return all(_terms(user) == _terms(other.by_name[name])
                   for name, user in self.by_name.items())


def device_of(transport: asyncio.BaseTransport, way_in: str = "veil") -> str | None:
    """The client's address, as a device limit counts it: None through a CDN, where the
    address is the CDN's edge (shared by its users, and changing under one)."""
    if "cdn" in way_in.split("-"):
        return None
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else None


class LiveConnection:
    """One accepted tunnel connection (a veil session or a Trojan connection)."""

    __slots__ = ("_close", "_counted", "_streams", "_transport", "device", "id", "peer",
                 "started_at", "user", "way_in")

    def __init__(self, conn_id: int, user: User, way_in: str, transport: asyncio.BaseTransport,
                 close: Callable[[str], None], streams: Callable[[], int],
                 started_at: float) -> None:
        self.id = conn_id
        self.user = user  # as authenticated: its key id tells a rotated credential apart
        self.way_in = way_in
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        #: The client's address as --max-devices-per-user counts it (None: not counted).
        self.device = device_of(transport, way_in)
        self.started_at = started_at
        self._transport = transport
        self._close = close
        self._streams = streams
        self._counted = (0, 0)

    def _counts(self) -> tuple[int, int]:
        counts = self._transport.get_extra_info("byte_counts")
        return counts if isinstance(counts, tuple) else self._counted

    @property
    def bytes_up(self) -> int:
        return self._counts()[0]

    @property
    def bytes_down(self) -> int:
        return self._counts()[1]

    @property
    def streams(self) -> int:
        return self._streams()

    @property
    def finished(self) -> bool:
        return self._transport.is_closing()

    def take_delta(self) -> Usage:
        """Bytes moved since the last call."""
        up, down = self._counts()
        last_up, last_down = self._counted
        self._counted = (up, down)
        return Usage(up - last_up, down - last_down)

    def close(self, reason: str) -> None:
        self._close(reason)


class Live:
    """Live connections, the user directory, and the task that keeps both true."""

    def __init__(self, open_store: Callable[[], UserStore], *,
                 trojan_hash: Callable[[bytes], str],
                 interval: float = REFRESH_INTERVAL_S,
                 max_sessions_per_user: int = DEFAULT_MAX_SESSIONS_PER_USER,
                 max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_devices_per_user: int | None = None,
                 user_rate: float | None = None,
                 outbound_slots: OutboundSlots | None = None,
                 clock: Callable[[], float] = time.time, server_id: str = "",
                 ids: Iterator[int] | None = None) -> None:
        #: This server's id in the store's fleet table and in sessions asked to end.
        self.server_id = server_id
        #: Called on the loop for a heartbeat: takes what it needs of the server there and
        #: returns the function the store's thread calls for the JSON (it may read files).
        #: None: no heartbeat.
        self.heartbeat: Callable[[], Callable[[], str]] | None = None
        self.heartbeat_interval = HEARTBEAT_INTERVAL_S
        self._beat_at: float | None = None
        #: Called on the loop with the new directory when the users changed (site-to-site
        #: routes follow edits: veil.server.tun). None: nobody listens.
        self.on_directory: Callable[[UserDirectory], None] | None = None
        #: The sessions admins asked to end, by user (the store's, as of the last tick).
        self.session_ends: dict[str, list[SessionEnd]] = {}
        self.max_sessions_per_user = max_sessions_per_user
        #: ``--max-devices-per-user``: client addresses one user's live connections may come
        #: from at once (None: any number); a new address past it gets the cover site.
        self.max_devices_per_user = max_devices_per_user
        self._devices: dict[str, dict[str, int]] = {}  # user -> address -> live connections
        #: One worker of several (--workers): the sessions and devices of every worker, which
        #: the per-user limits then count (veil.server.shared); None: this process's alone.
        self.shared: SharedUsers | None = None
        #: Outbound descriptors per user and for the server (streams, Trojan, UDP).
        self.outbound_slots = outbound_slots or OutboundSlots.for_this_process()
        self.max_sessions = max_sessions
        #: Bytes per second each user may move in each direction, over all their sessions.
        self.user_rate = user_rate
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._allowances: dict[str, Allowance] = {}  # users with a traffic limit
        self._per_user: dict[str, int] = {}
        self._churn = 0  # connections and streams opened since the last trim
        self._churn_seen = 0  # _churn at the previous tick
        self._trimmed_at = -TRIM_MIN_INTERVAL_S
        self._open_store = open_store
        self._trojan_hash = trojan_hash
        self._trojan_hashes: dict[bytes, str] = {}  # key id -> hash: SHA-224 once per user
        self.interval = interval
        self._clock = clock
        self.directory = UserDirectory.empty()
        self.connections: dict[int, LiveConnection] = {}
        #: Bytes per user counted by this process since it started (for metrics).
        self.user_bytes: dict[str, Usage] = {}
        self._pending: dict[str, Usage] = {}  # counted, not yet in the store
        #: Connection ids; workers of one server draw from disjoint ones (every Nth), so an
        #: id names one connection of the whole server (a session an admin ends, the panel).
        self._ids = ids or itertools.count(1)
        self._store: UserStore | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.refresh_failures = 0
        #: This process in the store's presence settings (veil.manage.presence).
        self._presence_id = presence.new_server_id()
        self._seen_token = -1  # the change token the directory was last loaded with
        self._presence_at = -presence.HEARTBEAT_S  # when this server last said it runs

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        """Load the first snapshot (the gate refuses everybody until then) and start ticking."""
        self._store = await asyncio.to_thread(self._open_store)
        await self.tick()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop ticking and write the last usage (call after connections were closed)."""
        if self._task is not None:
            # Cancel between ticks, never inside one: a cancelled to_thread keeps running, so
            # a usage write cancelled mid-way would still land while its bytes stayed
            # pending, and be written again below (counted twice).
            async with self._lock:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for conn in list(self.connections.values()):
            self._count(conn)
        if self._store is not None:
            async with self._lock:
                try:
                    await self._flush_usage(self._clock())
                except StoreError as exc:
                    log.warning("could not write the last usage: %s", exc)
                # Stopped: no edit should wait for this server (a crash leaves the entry,
                # which goes stale in presence.LIVE_WINDOW_S).
                with contextlib.suppress(StoreError):
                    await asyncio.to_thread(presence.forget_presence, self._store,
                                            self._presence_id)
                await asyncio.to_thread(self._store.close)
            self._store = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.tick()

    # ------------------------------------------------------------------ lookups (the gate's)
    def find_by_key_id(self, key_id: bytes) -> User | None:
        return self.directory.find_by_key_id(key_id)

    def find_by_trojan_hash(self, password_hash: str) -> User | None:
        return self.directory.find_by_trojan_hash(password_hash)

    def refusal(self, user: User, device: str | None = None) -> str | None:
        """Why ``user`` may not connect now (None: they may); ``device`` is the client's
        address (:func:`device_of`), for ``max_devices_per_user``."""
        if (reason := self.directory.refusal(user)) is not None:
            return reason
        if self.shared is not None:  # one worker of several: the whole server's counts
            reason = self.shared.refusal(user.name, device, self.max_sessions_per_user,
                                         self.max_devices_per_user)
            if reason is not None:
                return reason
        elif self._per_user.get(user.name, 0) >= self.max_sessions_per_user:
            return "too_many_sessions"
        elif device is not None and self.max_devices_per_user is not None:
            devices = self._devices.get(user.name, {})
            if device not in devices and len(devices) >= self.max_devices_per_user:
                return "too_many_devices"
        if len(self.connections) >= self.max_sessions:
            return "server_full"
        return None

    # ------------------------------------------------------------------ connections
    def register(self, user: User, way_in: str, transport: asyncio.BaseTransport,
                 close: Callable[[str], None],
                 streams: Callable[[], int] = lambda: 1) -> LiveConnection:
        conn = LiveConnection(next(self._ids), user, way_in, transport, close, streams,
                              self._clock())
        self.connections[conn.id] = conn
        self._churn += 1
        self._per_user[user.name] = self._per_user.get(user.name, 0) + 1
        if conn.device is not None:
            devices = self._devices.setdefault(user.name, {})
            devices[conn.device] = devices.get(conn.device, 0) + 1
        if self.shared is not None:
            self.shared.add(user.name, conn.device)
        if not isinstance(transport, RateLimited):
            return conn
        read: list[Limiter] = []
        write: list[Limiter] = []
        if self.user_rate is not None:
            buckets = self._buckets.get(user.name)
            if buckets is None:
                buckets = self._buckets[user.name] = (TokenBucket(self.user_rate),
                                                      TokenBucket(self.user_rate))
            self._share_rate(user.name, buckets)
            read.append(buckets[0])
            write.append(buckets[1])
        if user.limit_bytes is not None:
            allowance = self._allowances.get(user.name)
            if allowance is None:
                allowance = self._allowances[user.name] = Allowance(
                    self._remaining(user.name), self.interval)
            read.append(allowance)
            write.append(allowance)
        if read:
            transport.set_rate_limits(read[0] if len(read) == 1 else Limits(*read),
                                      write[0] if len(write) == 1 else Limits(*write))
        return conn

    def _share_rate(self, name: str, buckets: tuple[TokenBucket, TokenBucket]) -> None:
        """One worker of several: ``name``'s buckets here get the user's rate times this
        worker's share of the user's sessions, so that all workers together allow the rate
        (a user on one worker gets all of it). Shares are set at each connection here and
        at each tick, so for up to one interval after the user's sessions moved between
        workers the sum may pass the rate (docs/operations.md, "Workers")."""
        if self.shared is None or self.user_rate is None:
            return
        mine, total = self.shared.session_share(name)
        rate = self.user_rate * mine / total if mine and total else self.user_rate
        buckets[0].rate = buckets[1].rate = rate

    def _remaining(self, name: str) -> int:
        """What ``name`` may still move by the directory and this server's unwritten bytes."""
        user = self.directory.by_name.get(name)
        if user is None:
            return 0
        if user.limit_bytes is None:
            return UNLIMITED
        pending = self._pending.get(name)
        used = self.directory.period_usage.get(name, 0) + (pending.total if pending else 0)
        return user.limit_bytes - used

    def unregister(self, conn: LiveConnection) -> None:
        if self.connections.pop(conn.id, None) is not None:
            self._forget(conn)

    def _forget(self, conn: LiveConnection) -> None:
        self._count(conn)
        name = conn.user.name
        if self.shared is not None:
            self.shared.remove(name, conn.device)
        devices = self._devices.get(name)
        if conn.device is not None and devices is not None:
            if devices.get(conn.device, 1) > 1:
                devices[conn.device] -= 1
            else:
                devices.pop(conn.device, None)
                if not devices:
                    del self._devices[name]
        left = self._per_user.get(name, 1) - 1
        if left:
            self._per_user[name] = left
        else:
            self._per_user.pop(name, None)
            self._buckets.pop(name, None)
            self._allowances.pop(name, None)

    def _count(self, conn: LiveConnection) -> None:
        delta = conn.take_delta()
        if delta.total:
            name = conn.user.name
            self._pending[name] = _add(self._pending.get(name), delta)
            self.user_bytes[name] = _add(self.user_bytes.get(name), delta)

    # ------------------------------------------------------------------ the tick
    async def tick(self) -> None:
        """Write usage, reload the directory, cut who may no longer connect."""
        async with self._lock:
            for conn in list(self.connections.values()):
                # Trojan relays take the transport over and say nothing when they end.
                if conn.finished:
                    self.unregister(conn)
                else:
                    self._count(conn)
            # What each allowance had taken when the bytes were counted: what it takes from
            # here on is not in the usage read below.
            marks = {name: a.taken for name, a in self._allowances.items()}
            now = self._clock()
            try:
                await self._flush_usage(now)
                beat = None
                if self.heartbeat is not None and (
                        self._beat_at is None or now - self._beat_at >= self.heartbeat_interval):
                    beat = self.heartbeat()
                token, users, usage, ends = await asyncio.to_thread(self._read, now, beat)
                if beat is not None:
                    self._beat_at = now
            except StoreError as exc:
                self.refresh_failures += 1
                log.warning("user store unavailable, keeping the last snapshot: %s", exc)
                return
            previous, self.directory = self.directory, self._snapshot(users, usage, now)
            for name, allowance in self._allowances.items():
                since = allowance.taken - marks.get(name, allowance.taken)
                allowance.remaining = self._remaining(name) - since
            for name, buckets in self._buckets.items():
                self._share_rate(name, buckets)
            self.session_ends = {}
            for end in ends:
                self.session_ends.setdefault(end.name, []).append(end)
            self._enforce()
            if not previous.same_users(self.directory) and self.on_directory is not None:
                self.on_directory(self.directory)
            if not previous.same_users(self.directory):
                # The one sign that a change made elsewhere (``veil user``, the panel, another
                # server) is in force here, cuts included. Counts only: names are personal
                # data in a log.
                log.debug("user directory: %d users, %d refused",
                          len(self.directory.by_name), len(self.directory.refused))
            await self._say_present(token, now)
            self._release_memory()

    async def _say_present(self, token: int, now: float) -> None:
        """Tell edits waiting in the store that this directory has the change ``token``
        names (and that this server runs); only when it is news, or a heartbeat is due."""
        if token == self._seen_token and now - self._presence_at < presence.HEARTBEAT_S:
            return
        assert self._store is not None
        try:
            await asyncio.to_thread(presence.write_presence, self._store, self._presence_id,
                                    token, now)
        except StoreError as exc:
            log.warning("could not write this server's presence: %s", exc)
            return
        self._seen_token, self._presence_at = token, now

    async def _flush_usage(self, now: float) -> None:
        if not self._pending or self._store is None:
            return
        # The thread writes a copy: connections closing meanwhile add to _pending on the loop.
        batch = dict(self._pending)
        await asyncio.to_thread(self._store.add_usage, batch, now)
        # Only what was written is forgotten; bytes counted meanwhile stay pending.
        for name, written in batch.items():
            left = _sub(self._pending.get(name), written)
            if left is None:
                self._pending.pop(name, None)
            else:
                self._pending[name] = left

    def _read(self, now: float, beat: Callable[[], str] | None = None
              ) -> tuple[int, list[User], dict[str, dict[str, Usage]], list[SessionEnd]]:
        assert self._store is not None
        if beat is not None:
            self._store.beat(self.server_id, now, beat())
        # The token first: every change made before it was written is in what follows.
        token = presence.read_token(self._store)
        users = self._store.list_users()
        usage = {"month": self._store.usage_by_user(period_start("month", now))}
        if any(u.limit_bytes is not None and u.limit_period == "total" for u in users):
            usage["total"] = self._store.usage_by_user(None)
        return token, users, usage, self._store.session_ends()

    def _snapshot(self, users: Iterable[User], usage: dict[str, dict[str, Usage]],
                  now: float) -> UserDirectory:
        directory = build_directory(users, usage, now, self._trojan_hash,
                                    pending=self._pending, trojan_cache=self._trojan_hashes)
        self._trojan_hashes = {u.key_id: h for h, u in directory.by_trojan_hash.items()}
        return directory

    def note_stream_opened(self) -> None:
        """Count a stream (for :meth:`_release_memory`; the session owns the stream)."""
        self._churn += 1

    def _release_memory(self) -> None:
        """Give memory back to the system after a load peak has passed.

        A peak of thousands of streams leaves the C allocator and the cycle collector
        holding freed memory (a server that had 10,000 streams kept ~140 MiB more than
        idle). So once at least TRIM_AFTER_CHURN connections and streams came and went since
        the last time, and under 1% of that number is still open or was opened since the last
        tick, collect cycles and ask glibc to trim: a few milliseconds, at most once per
        TRIM_MIN_INTERVAL_S."""
        load = len(self.connections) + self._streams_now()
        recent, self._churn_seen = self._churn - self._churn_seen, self._churn
        now = time.monotonic()
        # After the peak: little still open, and little opened since the last tick.
        if (self._churn < TRIM_AFTER_CHURN or load * 100 > self._churn
                or recent * 100 > self._churn
                or now - self._trimmed_at < TRIM_MIN_INTERVAL_S):
            return
        self._churn = self._churn_seen = 0
        self._trimmed_at = now
        # Sessions, drivers and relays refer to each other: without allocation pressure the
        # cycle collector may not run for a long time after the load is gone.
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _streams_now(self) -> int:
        return sum(conn.streams for conn in self.connections.values())

    def _enforce(self) -> None:
        directory = self.directory
        for conn in list(self.connections.values()):
            current = directory.find_by_key_id(conn.user.key_id)
            if current is None or current.name != conn.user.name:
                reason = "rotated" if conn.user.name in directory.by_name else "deleted"

            else:
                reason = directory.refusal(current) or ""
            if not reason and any(end.applies(self.server_id, conn.id, conn.started_at)
                                  for end in self.session_ends.get(conn.user.name, ())):
                reason = "ended by an admin"
            if reason:
                log.info("closing a connection of user %s: %s", conn.user.name, reason)
                self.connections.pop(conn.id, None)
                self._forget(conn)
                conn.close(reason)


def build_directory(users: Iterable[User], usage: dict[str, dict[str, Usage]], now: float,
                    trojan_hash: Callable[[bytes], str], *,
                    pending: dict[str, Usage] | None = None,
                    trojan_cache: dict[bytes, str] | None = None) -> UserDirectory:
    """A snapshot of ``users``. ``usage`` maps a limit period ("month", "total") to each
    user's stored usage in it; ``pending`` is usage counted here but not stored yet."""
    by_key_id: dict[bytes, User] = {}
    by_trojan: dict[str, User] = {}
    by_name: dict[str, User] = {}
    refused: dict[str, str] = {}
    period_usage: dict[str, int] = {}
    period_parts: dict[str, Usage] = {}
    cache = trojan_cache or {}
    pending = pending or {}
    for user in users:
        by_key_id[user.key_id] = user
        by_name[user.name] = user
        by_trojan[cache.get(user.key_id) or trojan_hash(user.secret)] = user
        parts = usage.get(user.limit_period, {}).get(user.name, Usage())
        used = parts.total
        period_usage[user.name] = used
        period_parts[user.name] = parts
        unwritten = pending.get(user.name)
        status = user.status(now, used + (unwritten.total if unwritten else 0))
        if status != "active":
            refused[user.name] = status
    return UserDirectory(by_key_id, by_trojan, by_name, refused, period_usage, period_parts)


def _terms(user: User) -> tuple[object, ...]:
    """What a user may do, as :meth:`UserDirectory.same_users` compares it."""
    return (user.key_id, user.created_at, user.revoked_at, user.limit_bytes, user.limit_period,
            user.expires_at, user.sites, user.reach)


def _add(a: Usage | None, b: Usage) -> Usage:
    return b if a is None else Usage(a.up + b.up, a.down + b.down)


def _sub(a: Usage | None, b: Usage) -> Usage | None:
    if a is None:
        return None
    left = Usage(a.up - b.up, a.down - b.down)
    return left if left.total else None
