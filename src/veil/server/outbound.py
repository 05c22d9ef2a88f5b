"""The server's outbound side: turns streams that clients open into real connections."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from veil.net.driver import DatagramStreamHandler, SessionDriver, TcpRelay
from veil.protocol.address import Address
from veil.protocol.events import StreamOpened
from veil.protocol.frames import ResetCode, StreamKind
from veil.server.policy import DestinationPolicy, RefusedDestination, ResolveError, resolve

log = logging.getLogger("veil.server")

# A destination that has not answered in 10 s will not; the client's application has its own
# timeouts, and a pending connect holds a stream slot.
CONNECT_TIMEOUT_S = 10.0
# UDP has no close: an association with no datagram either way for this long is ended (DNS
# and QUIC flows are far shorter; NAT boxes use 30-180 s).
UDP_IDLE_TIMEOUT_S = 120.0


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


class Outbound:
    """Opens TCP connections and UDP sockets for one server, under a destination policy."""

    def __init__(self, policy: DestinationPolicy) -> None:
        self.policy = policy
        self._tasks: set[asyncio.Task[None]] = set()

    def open(self, driver: SessionDriver, event: StreamOpened) -> None:
        if event.kind is StreamKind.TCP:
            relay = TcpRelay(driver, event.stream_id)
            driver.attach(event.stream_id, relay)
            task = asyncio.get_running_loop().create_task(
                self._connect(driver, relay, event.destination))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            driver.attach(event.stream_id, UdpRelay(driver, event.stream_id, self.policy))

    async def _connect(self, driver: SessionDriver, relay: TcpRelay, dest: Address) -> None:
        code = ResetCode.CONNECT_FAILED
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
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if relay.stream_id not in driver.handlers:
                    transport.abort()
                return
        except RefusedDestination:
            code = ResetCode.REFUSED_DESTINATION
            # Which destination stays out of the log: it is the user's browsing history.
            log.info("stream %d: refused destination (private or loopback address)",
                     relay.stream_id)
        except ResolveError:
            code = ResetCode.RESOLVE_FAILED
        except (OSError, TimeoutError):
            pass
        if relay.stream_id in driver.handlers:
            driver.cancel(relay.stream_id, code)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class UdpRelay(DatagramStreamHandler):
    """One UDP association: datagrams to any allowed destination, replies tagged by source."""

    def __init__(self, driver: SessionDriver, stream_id: int, policy: DestinationPolicy) -> None:
        self.driver = driver
        self.stream_id = stream_id
        self.policy = policy
        self._loop = asyncio.get_running_loop()
        self._sockets: dict[int, asyncio.DatagramTransport] = {}
        self._opening: set[int] = set()  # families whose socket is being created
        self._queued: dict[int, list[tuple[bytes, tuple[str, int]]]] = {}
        self._resolved: dict[str, tuple[int, str]] = {}
        self._closed = False
        self._idle = IdleTimeout(self.close)
        self._tasks: set[asyncio.Task[None]] = set()

    # --- session side
    def on_datagram(self, address: Address, payload: bytes) -> None:
        self._idle.touch()
        cached = self._resolved.get(address.host)
        if cached is not None:
            self._send(cached[0], payload, (cached[1], address.port))
            return
        task = self._loop.create_task(self._resolve_and_send(address, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve_and_send(self, address: Address, payload: bytes) -> None:
        try:
            family, ip = (await resolve(address.host, address.port, self.policy,
                                        socket.SOCK_DGRAM))[0]
        except (RefusedDestination, ResolveError):
            return  # a refused datagram is dropped, as a firewall would
        if len(self._resolved) < 1024:
            self._resolved[address.host] = (family, ip)
        self._send(family, payload, (ip, address.port))

    def _send(self, family: int, payload: bytes, addr: tuple[str, int]) -> None:
        if self._closed:
            return
        sock = self._sockets.get(family)
        if sock is not None:
            sock.sendto(payload, addr)
            return
        queue = self._queued.setdefault(family, [])
        if len(queue) < 64:  # datagrams waiting for the socket to open; UDP may drop
            queue.append((payload, addr))
        if family not in self._opening:
            self._opening.add(family)
            task = self._loop.create_task(self._open_socket(family))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open_socket(self, family: int) -> None:
        try:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _UdpSocket(self), family=family)
        except OSError:
            self._queued.pop(family, None)
            self._opening.discard(family)
            return
        self._opening.discard(family)
        if self._closed:
            transport.close()
            return
        self._sockets[family] = transport
        for payload, addr in self._queued.pop(family, []):
            transport.sendto(payload, addr)

    def reply(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._closed:
            return
        self._idle.touch()
        host = addr[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        try:
            self.driver.session.send_datagram(self.stream_id, Address(host, addr[1]), data)
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
        for sock in self._sockets.values():
            sock.close()
        for task in self._tasks:
            task.cancel()
        if notify:
            self.driver.cancel(self.stream_id)
        else:
            self.driver.detach(self.stream_id)


class _UdpSocket(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay.reply(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for one destination must not end the whole association
