"""Striping meets asyncio: the sessions of one client's pool, grouped (veil.protocol.stripe).

A :class:`StripeGroup` holds the drivers of one pool group at one end (the client's sessions
whose server gave the same group token; the server's sessions of one user and pool id). It
routes a CHUNK that one session carried to the session whose stream it belongs to, picks the
session a piece of a striped stream goes on (:meth:`StripeGroup.carrier`: the least queued,
so a connection in loss recovery is skipped), and resets every striped stream of the group
when one of its sessions goes, since chunks in flight on it are lost with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from veil.protocol.events import ChunkReceived
from veil.protocol.frames import GROUP_TOKEN_SIZE
from veil.protocol.stripe import MAX_POOL_MEMBERS

if TYPE_CHECKING:
    from veil.net.driver import SessionDriver, TcpRelay

log = logging.getLogger("veil.net")

#: Linux's ioctl for the bytes a TCP socket holds not yet sent (SIOCOUTQNSD): what a
#: connection still has to push, kernel side, before a new piece would leave on it.
_SIOCOUTQNSD = 0x894B
_INT = struct.Struct("i")
#: Unsent bytes a group member's socket takes before its writes wait in the transport
#: (TCP_NOTSENT_LOWAT, Linux). A piece written to a socket is committed to that connection and
#: waits out its loss recovery, holding up the whole stream behind it at the receiver; kept in
#: the transport instead, the choice of connection stays open until the socket can send. The
#: kernel otherwise takes up to its send buffer (megabytes, autotuned) of unsent bytes per
#: connection. 256 KiB is ~35 ms at 60 Mbit/s: time enough for a loaded event loop to refill
#: it. The option is the socket's own: nothing of it shows on the wire.
MEMBER_NOTSENT_LOWAT = 256 * 1024
#: How much less another member must have queued than the stream's home for a piece to go
#: there (bytes; the transport's default high-water mark): a piece moves when its home is
#: backed up (loss recovery, or one stream outrunning one connection), not back and forth
#: between connections that keep up alike.
SWITCH_MARGIN = 64 * 1024


try:
    import fcntl  # not on Windows: there the transport's buffer alone is counted
except ImportError:
    fcntl = None  # type: ignore[assignment]


def kernel_unsent(sock: socket.socket | None) -> int:
    """Bytes the kernel holds unsent for ``sock`` (0 where that cannot be asked)."""
    if sock is None or fcntl is None or not sys.platform.startswith("linux"):
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    value: int = _INT.unpack(raw)[0]
    return value


class StripeGroup:
    """The sessions of one pool group at this end, by member number."""

    def __init__(self, token: bytes | None = None,
                 on_empty: Callable[[StripeGroup], None] | None = None,
                 find: Callable[[int], SessionDriver | None] | None = None) -> None:
        """``find``: a member's driver by number, for members not in the group yet: the
        client's session whose JOIN answer is still on its way (the server grouped it, and may
        stripe its streams over the others, before that answer arrives here)."""
        self.token = token if token is not None else os.urandom(GROUP_TOKEN_SIZE)
        self.members: dict[int, SessionDriver] = {}
        self._on_empty = on_empty
        self._find = find
        #: Pieces each member carried for another's stream, and bytes: a look at whether
        #: striping spreads (logged when a member leaves).
        self.carried: dict[int, int] = {}
        #: Striped relays that stopped reading because every member was congested; resumed
        #: when one drains.
        self.waiting: set[TcpRelay] = set()

    def add(self, driver: SessionDriver) -> bool:
        """Add ``driver`` (whose session has its member number); False when the group is
        full (the session then carries its own streams only)."""
        member = driver.session.member
        assert member is not None
        old = self.members.get(member)
        if old is None and len(self.members) >= MAX_POOL_MEMBERS:
            return False
        if old is not None and old is not driver:
            # The number again: the client reconnected that slot before this end saw the old
            # connection go. The old one is gone for the client; so are its chunks.
            self.remove(old)
        self.members[member] = driver
        driver.group = self
        sock = socket_of(driver.transport)
        if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT,
                                MEMBER_NOTSENT_LOWAT)
        return True

    def remove(self, driver: SessionDriver) -> None:
        """``driver`` left (its session ended): chunks in flight on it are lost, so every
        striped stream of the group is reset (veil.protocol.stripe: nothing is resent)."""
        member = driver.session.member
        if member is None or self.members.get(member) is not driver:
            return
        del self.members[member]
        driver.group = None
        if self.carried:
            log.debug("pool group: member %d left; bytes carried for other members' streams: %s",
                      member, dict(sorted(self.carried.items())))
        for other in list(self.members.values()):
            other.reset_striped()
        if not self.members and self._on_empty is not None:
            self._on_empty(self)

    def route(self, event: ChunkReceived, now: float) -> None:
        """A CHUNK one member carried for another's stream."""
        home = self.members.get(event.member)
        if home is None and self._find is not None:
            home = self._find(event.member)
        if home is None:
            return  # its session is gone, and its streams with it
        home.receive_chunk(event, now)

    def carriers(self, home: SessionDriver, sizes: list[int]) -> list[SessionDriver]:
        """The session for each of a read's pieces (of ``sizes`` bytes), chosen in turn as
        :meth:`carrier` would with each piece queued where it went: the members' queues are
        asked once per read, not per piece, and each session is written once."""
        home_queued = 1 << 62 if home.writing_paused else home.queued()
        others: dict[SessionDriver, int] = {}
        for driver in self.members.values():
            if driver is home or driver.writing_paused or driver.session.closed:
                continue
            others[driver] = driver.queued()
        chosen: list[SessionDriver] = []
        for size in sizes:
            best, best_queued = home, home_queued
            threshold = home_queued - SWITCH_MARGIN
            for driver, queued in others.items():
                if driver.striping:
                    continue
                if queued <= threshold and queued < best_queued:
                    best, best_queued = driver, queued
            chosen.append(best)
            if best is home:
                home_queued += size
            else:
                others[best] += size
        return chosen

    def carrier(self, home: SessionDriver) -> SessionDriver:
        """The session a piece of ``home``'s striped stream goes on now: the one with the
        least unsent (in its transport and its socket) if that is SWITCH_MARGIN less than
        the home's, else the home; never one whose transport is over its high-water mark,
        or gone. A member with bulk streams of its own (``striping``) takes no other's
        pieces: several bulk streams over a pool stay on their own connections as on
        separate ones, and one connection's loss stalls only its own streams (taking pieces
        while its socket had room measured 129-144 against 167-172 Mbit/s for 4 streams
        down at 150 ms / 1%, parity without); connections without bulk of their own are
        shared by the streams that have more than their home can carry."""
        return self.carriers(home, [0])[0]

    def drained(self) -> None:
        """A member went below its low-water mark: the relays waiting may read again."""
        waiting, self.waiting = self.waiting, set()
        for relay in waiting:
            relay.resume_source()


class PoolRegistry:
    """The server's groups, by (user, pool id). One group per pool and process: a server with
    several worker processes may see a pool's sessions land in different ones, and each then
    groups those it has (the client stripes only within one group token)."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, bytes], StripeGroup] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def join(self, user: str, pool_id: bytes, driver: SessionDriver) -> bytes | None:
        """Group ``driver`` (its session has the member number from JOIN); the group's token,
        None when it is full."""
        key = (user, pool_id)
        group = self._groups.get(key)
        if group is None:
            group = StripeGroup(on_empty=lambda g: self._forget(key, g))
            self._groups[key] = group
        if not group.add(driver):
            return None
        return group.token

    def _forget(self, key: tuple[str, bytes], group: StripeGroup) -> None:
        if self._groups.get(key) is group:
            del self._groups[key]


def socket_of(transport: object) -> socket.socket | None:
    """The socket under a transport, if it has one (a CDN's carrier has none of ours)."""
    get = getattr(transport, "get_extra_info", None)
    if get is None:
        return None
    with contextlib.suppress(Exception):
        sock = get("socket")
        if sock is not None and hasattr(sock, "fileno"):
            return sock  # type: ignore[no-any-return]
    return None

