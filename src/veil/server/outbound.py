"""The server's outbound side: turns streams that clients open into real connections."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable

from veil.errors import VeilError
from veil.net.dialer import UdpFlow
from veil.net.direct import DirectDialer, DroppedDatagrams, Resolver
from veil.net.driver import DatagramStreamHandler, SessionDriver, TcpRelay
from veil.protocol.address import Address
from veil.protocol.bittorrent import StreamSniffer, datagram_is_bittorrent
from veil.protocol.events import StreamOpened
from veil.protocol.frames import (
    FEATURE_HOLDS_IDLE_CLOSES,
    FEATURE_RESOLVE,
    FEATURE_STRIPE,
    ResetCode,
    StreamKind,
)
from veil.protocol.resolve import encode_answer
from veil.server.live import UDP_ASSOCIATION_SLOTS, OutboundSlot, OutboundSlots
from veil.server.policy import (
    DestinationPolicy,
    RefusedDestination,
    RefusedPort,
    ResolveError,
    resolve,
)

log = logging.getLogger("veil.server")

# A destination that has not answered in 10 s will not; the client's application has its own
# timeouts, and a pending connect holds a stream slot.
CONNECT_TIMEOUT_S = 10.0
# UDP has no close: an association with no datagram either way for this long is ended (DNS
# and QUIC flows are far shorter; NAT boxes use 30-180 s).
UDP_IDLE_TIMEOUT_S = 120.0
# Streams refused at a descriptor bound are logged at most this often: one user at the bound
# refuses thousands a second, and the log must not become the next thing to fill up.
BOUND_LOG_INTERVAL_S = 60.0


class IdleTimeout:
    """Calls ``on_idle`` once :meth:`touch` has not been called for ``timeout`` seconds.

    For UDP associations, which have no close of their own. ``touch`` is one clock read (it
    runs on every datagram); the one loop timer is re-armed only when it fires early.
    """

    def __init__(self, on_idle: Callable[[], None], timeout: float = UDP_IDLE_TIMEOUT_S) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_idle = on_idle
        self._timeout = timeout
        self._handle = self._loop.call_later(timeout, self._expire)
        self._last_activity = self._loop.time()

    def touch(self) -> None:
        self._last_activity = self._loop.time()

    def cancel(self) -> None:
        self._handle.cancel()

    def _expire(self) -> None:
        idle_for = self._loop.time() - self._last_activity
        if idle_for >= self._timeout:
            self._on_idle()
        else:
            self._handle = self._loop.call_later(self._timeout - idle_for, self._expire)


def policy_resolver(policy: DestinationPolicy, way_in: str) -> Resolver:
    """The server's resolver under its destination policy, as DirectDialer's hook wants it."""

    async def resolve_allowed(host: str, port: int,
                              kind: socket.SocketKind) -> list[tuple[int, str]]:
        try:
            return await resolve(host, port, policy, kind)
        except RefusedPort as exc:
            # The port is the operator's list, not the user's history: it may be said.
            log.info("%s: refused TCP port %s (--refuse-ports)", way_in, exc)
            raise ConnectionRefusedError("destination port refused by policy") from exc
        except RefusedDestination as exc:
            # Which destination stays out of the log: it is the user's browsing history.
            log.info("%s: refused destination (private or loopback address)", way_in)
            raise ConnectionRefusedError("destination refused by policy") from exc
        except ResolveError as exc:
            raise OSError("name did not resolve") from exc

    return resolve_allowed


class BoundLog:
    """Says that a descriptor bound refused a stream, at most once per BOUND_LOG_INTERVAL_S."""

    def __init__(self) -> None:
        self._said_at = -BOUND_LOG_INTERVAL_S

    def refused(self, way_in: str, user: str, slots: OutboundSlots) -> None:
        now = time.monotonic()
        if now - self._said_at < BOUND_LOG_INTERVAL_S:
            return
        self._said_at = now
        log.warning("%s: refused a stream of user %s at the %s descriptor bound "
                    "(%d in use of %d; %d per user)", way_in, user, slots.last_bound,
                    slots.in_use, slots.total, slots.per_user)


class Outbound:
    """Opens TCP connections and UDP sockets for one server, under a destination policy and
    the outbound descriptor bounds (``slots``)."""

    def __init__(self, policy: DestinationPolicy, slots: OutboundSlots, *,
                 block_bittorrent: bool = False) -> None:
        self.policy = policy
        self.slots = slots
        #: ``--block-bittorrent``: streams and datagrams that are BitTorrent are refused
        #: (veil.protocol.bittorrent).
        self.block_bittorrent = block_bittorrent
        self._tasks: set[asyncio.Task[None]] = set()
        self._udp = DirectDialer(resolver=policy_resolver(policy, "udp"))
        self._bound_log = BoundLog()

    @property
    def udp_dropped(self) -> DroppedDatagrams:
        """What the UDP associations of veil sessions dropped, by why (for metrics)."""
        return self._udp.dropped

    def open(self, driver: SessionDriver, event: StreamOpened, user: str) -> None:
        tcp = event.kind is StreamKind.TCP
        slot = self.slots.take(user, 1 if tcp else UDP_ASSOCIATION_SLOTS)
        if slot is None:
            # The stream alone is refused: the session and everybody else carry on.
            self._bound_log.refused("stream", user, self.slots)
            driver.session.reset(event.stream_id, ResetCode.TOO_MANY_STREAMS)
            driver.flush()
            return
        if tcp:
            relay = _CountedTcpRelay(driver, event.stream_id, slot,
                                     StreamSniffer() if self.block_bittorrent else None)
            driver.attach(event.stream_id, relay)
            task = asyncio.get_running_loop().create_task(
                self._connect(driver, relay, event.destination, slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            driver.attach(event.stream_id, UdpRelay(driver, event.stream_id, self._udp, slot,
                                                    block_bittorrent=self.block_bittorrent))

    def resolve(self, driver: SessionDriver, event: StreamOpened) -> None:
        """Answer a RESOLVE stream: the name's addresses the policy allows, then FIN
        (veil.protocol.resolve). It holds no descriptor, so no outbound slot: the session's
        stream limit and the resolver's own bound on pending lookups are its limits."""
        handler = _ResolveStream(driver, event.stream_id)
        driver.attach(event.stream_id, handler)
        task = asyncio.get_running_loop().create_task(
            self._answer(driver, handler, event.destination.host))
        handler.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, driver: SessionDriver, handler: _ResolveStream, host: str) -> None:
        stream_id = handler.stream_id
        try:
            addresses = await resolve(host, 0, self.policy)
        except RefusedDestination:
            # Which name stays out of the log: it is the user's browsing history.
            log.info("stream %d: refused to resolve (private or loopback addresses only)",
                     stream_id)
            code = ResetCode.REFUSED_DESTINATION
        except ResolveError:
            code = ResetCode.RESOLVE_FAILED
        else:
            if driver.handlers.get(stream_id) is not handler:
                return  # the client gave up while we were resolving
            driver.detach(stream_id)
            answer = encode_answer(ipaddress.ip_address(ip.split("%", maxsplit=1)[0])
                                   for _family, ip in addresses)
            try:
                driver.session.send_data(stream_id, answer)
                driver.session.send_eof(stream_id)
            except VeilError:  # the session ended meanwhile
                return
            driver.flush()
            return
        if driver.handlers.get(stream_id) is handler:
            driver.cancel(stream_id, code)

    async def _connect(self, driver: SessionDriver, relay: TcpRelay, dest: Address,
                       slot: OutboundSlot) -> None:
        code = ResetCode.CONNECT_FAILED
        connected = False  # from then on the relay's connection_lost gives the slot back
        try:
            addresses = await resolve(dest.host, dest.port, self.policy)
            loop = asyncio.get_running_loop()
            for index, (_family, ip) in enumerate(addresses):
                if relay.stream_id not in driver.handlers:
                    return  # the client gave up while we were resolving or connecting
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        transport, _ = await loop.create_connection(lambda: relay, ip, dest.port)
                except (OSError, TimeoutError) as exc:
                    code = ResetCode.TIMEOUT if isinstance(exc, TimeoutError) else (
                        ResetCode.UNREACHABLE)
                    if index == len(addresses) - 1:
                        raise
                    continue
                connected = True
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if relay.stream_id not in driver.handlers:
                    transport.abort()
                return
        except RefusedPort as exc:
            code = ResetCode.REFUSED_DESTINATION
            # The port is the operator's list, not the user's history: it may be said.
            log.info("stream %d: refused TCP port %s (--refuse-ports)", relay.stream_id, exc)
        except RefusedDestination:
            code = ResetCode.REFUSED_DESTINATION
            # Which destination stays out of the log: it is the user's browsing history.
            log.info("stream %d: refused destination (private or loopback address)",
                     relay.stream_id)
        except ResolveError:
            code = ResetCode.RESOLVE_FAILED
        except (OSError, TimeoutError):
            pass
        finally:
            if not connected:
                slot.release()
        if relay.stream_id in driver.handlers:
            driver.cancel(relay.stream_id, code)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._udp.close()


class _ResolveStream(DatagramStreamHandler):
    """The server's end of a RESOLVE stream while its lookup runs: the client sends nothing
    but FIN; a RESET from it cancels the lookup's wait."""

    def __init__(self, driver: SessionDriver, stream_id: int) -> None:
        self.driver = driver
        self.stream_id = stream_id
        self.task: asyncio.Task[None] | None = None

    def on_data(self, data: bytes) -> None:
        self.driver.session.consume(self.stream_id, len(data))  # nothing is defined: ignored

    def on_eof(self) -> None:
        pass

    def on_reset(self, code: ResetCode) -> None:
        if self.task is not None:
            self.task.cancel()

    def on_datagram(self, address: Address, payload: bytes) -> None:
        pass


#: Whether the server holds a destination's idle close (see _CountedTcpRelay); it says so to
#: its clients (FEATURE_HOLDS_IDLE_CLOSES).
HOLD_IDLE_CLOSES = True


def session_features() -> int:
    """The FEATURE_* bits a session of this server announces (Session.announce_features)."""
    return (FEATURE_RESOLVE | FEATURE_STRIPE
            | (FEATURE_HOLDS_IDLE_CLOSES if HOLD_IDLE_CLOSES else 0))


class _CountedTcpRelay(TcpRelay):
    """A TcpRelay whose outbound socket holds a descriptor slot until it is closed."""

    def __init__(self, driver: SessionDriver, stream_id: int, slot: OutboundSlot,
                 sniffer: StreamSniffer | None = None) -> None:
        # A destination's own idle close waits for the client's next bytes: sent when it
        # happens, it would be a moment the server opens (veil.protocol.idleclose).
        super().__init__(driver, stream_id, hold_idle_close=HOLD_IDLE_CLOSES)
        self._slot = slot
        self._sniffer = sniffer  # --block-bittorrent, until the stream's beginning is known

    def on_data(self, data: bytes) -> None:
        sniffer = self._sniffer
        # Before the outbound connection is made, data waits in the relay and comes back
        # here once it is: it is looked at then, once.
        if sniffer is not None and self.transport is not None:
            if sniffer.feed(data):
                self._sniffer = None
                log.info("stream %d: refused BitTorrent (--block-bittorrent)", self.stream_id)
                self._abort()  # the client's stream is reset, the outbound socket aborted
                return
            if sniffer.done:
                self._sniffer = None
        super().on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._slot.release()
        super().connection_lost(exc)


class UdpRelay(DatagramStreamHandler):
    """One UDP association: datagrams to any allowed destination, replies tagged by source.

    The sockets, name cache and every bound on them (names resolving at once, datagrams
    waiting, datagrams dropped while a socket's send buffer is full) are the direct
    dialer's UDP flow's, shared with Trojan's UDP (``veil.net.direct``)."""

    def __init__(self, driver: SessionDriver, stream_id: int, dialer: DirectDialer,
                 slot: OutboundSlot, *, block_bittorrent: bool = False) -> None:
        self.driver = driver
        self._block_bittorrent = block_bittorrent
        self._said_bittorrent = False
        self.stream_id = stream_id
        self._slot = slot
        self._closed = False
        self._idle = IdleTimeout(self.close)
        self._flow: UdpFlow = dialer.open_udp(self.reply, self.close)

    # --- session side
    def on_datagram(self, address: Address, payload: bytes) -> None:
        self._idle.touch()
        if self._block_bittorrent and datagram_is_bittorrent(payload):
            if not self._said_bittorrent:  # once per association: DHT is a stream of them
                self._said_bittorrent = True
                log.info("stream %d: refused BitTorrent datagrams (--block-bittorrent)",
                         self.stream_id)
            return
        self._flow.send(address, payload)

    def reply(self, source: Address, data: bytes) -> None:
        if self._closed:
            return
        self._idle.touch()
        if source.host.startswith("::ffff:"):  # an IPv4 peer seen through a dual-stack socket
            source = Address(source.host[7:], source.port)
        try:
            self.driver.session.send_datagram(self.stream_id, source, data)
        except Exception:  # the stream is gone or the datagram too large: drop it, as UDP does
            return
        self.driver.flush()

    def on_data(self, data: bytes) -> None:
        self.driver.session.consume(self.stream_id, len(data))

    def on_eof(self) -> None:
        self.close()

    def on_reset(self, code: ResetCode) -> None:
        self.close(notify=False)

    def close(self, notify: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._idle.cancel()
        self._flow.close()
        self._slot.release()
        if notify:
            self.driver.cancel(self.stream_id)
        else:
            self.driver.detach(self.stream_id)
