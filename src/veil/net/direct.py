"""A :class:`~veil.net.dialer.Dialer` that connects straight to the destination.

It is the outbound for split tunnelling (destinations that must not go through the tunnel)
and the way to run the client inbounds without a veil server in tests. It has no protocol of
its own: TCP is a pair of relay protocols glued back to back, UDP is one unconnected socket per
address family.

TCP relay contract (the same one the tunnel dialer keeps, see ``Dialer.open_tcp``):

* the local transport is paused until the remote connection is up, then ``early_data`` goes
  first and reading resumes;
* backpressure: when one side's write buffer passes its high-water mark, reading on the other
  side pauses until it drains (``pause_writing``/``resume_writing``);
* half-close: an EOF on one side becomes ``write_eof()`` on the other; once both directions
  have ended both transports are closed after flushing;
* a clean close on one side closes the other after flushing; a connection error (reset,
  broken pipe) aborts the other side so the error is visible to the peer.

The hot path (``_Half.data_received``) is one ``write`` with no logging or bookkeeping.

Two hooks let other parts reuse these relays: a ``resolver`` decides where names (and IP
literals) may go — the server's Trojan inbound passes its destination policy here — and a
``connector`` replaces the TCP connect itself (the Trojan client connects to its server).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from veil.net.dialer import DatagramHandler, Dialer, EndingUdpFlow, UdpFlow
from veil.protocol.address import Address

__all__ = [
    "CONNECT_TIMEOUT",
    "DNS_CACHE_SECONDS",
    "HAPPY_EYEBALLS_DELAY",
    "MAX_DNS_CACHE_ENTRIES",
    "MAX_QUEUED_DATAGRAMS",
    "MAX_RESOLVING_PER_FLOW",
    "RESOLVE_TIMEOUT",
    "Connector",
    "DirectDialer",
    "DroppedDatagrams",
    "Resolver",
]

log = logging.getLogger(__name__)

#: Give up on a TCP connect after this long. The local client was already told "connected"
#: (inbounds reply optimistically), so a long hang only ties up its socket; 10 s covers slow
#: links and a few SYN retransmits without keeping dead connections around.
CONNECT_TIMEOUT = 10.0

#: RFC 8305 connection-attempt delay for names with several addresses (v6 and v4).
HAPPY_EYEBALLS_DELAY = 0.25

#: Give up resolving a UDP destination name after this long; its queued datagrams are dropped.
RESOLVE_TIMEOUT = 10.0

#: How long a UDP flow reuses a resolved name. getaddrinfo() does not expose the DNS TTL, and
#: re-resolving per datagram would put a DNS query in front of every packet (DNS, QUIC, games).
DNS_CACHE_SECONDS = 60.0

#: Names one UDP flow keeps resolved. A client spraying datagrams at random names must not grow
#: the cache without bound; the oldest entry is evicted first.
MAX_DNS_CACHE_ENTRIES = 256

#: Datagrams one UDP flow holds while its socket opens or a name resolves. UDP may drop, so
#: past this we drop instead of buffering; 64 covers a burst such as a QUIC handshake.
MAX_QUEUED_DATAGRAMS = 64

#: Names one UDP flow resolves at once. Each lookup is a task and a resolver slot; a client
#: spraying datagrams at unique names would otherwise start one per datagram. DNS, QUIC and
#: games talk to a handful of names; datagrams to a new name past this are dropped.
MAX_RESOLVING_PER_FLOW = 8


#: ``resolver(host, port, kind)``: the (family, ip) pairs a destination may be reached at, in
#: the order to try them; raises OSError when the name does not resolve or is not allowed.
Resolver = Callable[[str, int, socket.SocketKind], Awaitable[list[tuple[int, str]]]]

#: ``connector(dest, protocol)``: connect ``protocol`` (the relay's remote half) for ``dest``;
#: raises OSError (or TimeoutError) on failure. Runs under the dialer's connect timeout.
Connector = Callable[[Address, asyncio.Protocol], Awaitable[None]]


class _Half(asyncio.Protocol):
    """One side of a relayed TCP connection; forwards what it reads to ``peer``."""

    __slots__ = ("_connect_task", "_eof", "_linger", "_linger_timer", "_relays", "peer",
                 "transport")

    def __init__(self, relays: set[_Half], linger: float | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half = self  # replaced right after construction by _link()
        self._eof = False
        self._relays = relays
        self._connect_task: asyncio.Task[None] | None = None
        self._linger = linger
        self._linger_timer: asyncio.TimerHandle | None = None

    # -- hot path ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        peer = self.peer.transport
        if peer is None:
            # The local side reads only once the remote is connected, but a TLS carrier may
            # still deliver the rest of a batch it decrypted before we paused it.
            cast(_RemoteHalf, self.peer).early_data += data
            return
        peer.write(data)

    # -- flow control --------------------------------------------------------------------------

    def pause_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None:
            peer.resume_reading()

    # -- end of stream -------------------------------------------------------------------------

    def eof_received(self) -> bool:
        self._eof = True
        peer = self.peer.transport
        if peer is None:
            # EOF before the remote side is connected (an inbound passed it on with the early
            # data): the remote side sends it once connected.
            return True
        if not self.peer._eof and not peer.can_write_eof() and self._linger is not None:
            # The peer cannot half-close (TLS here): stop sending but keep receiving what it
            # still has to say, until it closes or for at most ``linger`` seconds.
            self._linger_timer = asyncio.get_running_loop().call_later(self._linger, peer.close)
            return True
        if self.peer._eof or not peer.can_write_eof():
            # Both directions are finished (or the peer cannot half-close): close both after
            # flushing. Returning False makes this transport close itself.
            peer.close()
            return False
        try:
            peer.write_eof()
        except OSError:
            # The peer's socket was reset and the loop has not seen it yet (ENOTCONN): both
            # directions are over.
            peer.abort()
            return False
        return True  # keep this transport open: the other direction is still flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self._relays.discard(self)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        peer = self.peer.transport
        if peer is None:
            # The local side went away while the remote connect was still in progress.
            if self._connect_task is not None:
                self._connect_task.cancel()
            return
        if exc is None:
            peer.close()
        else:
            peer.abort()


class _InspectedHalf(_Half):
    """A local side whose bytes ``refuse`` sees before they pass (``--block-bittorrent`` on
    Trojan connections): when it answers True, both sides are aborted."""

    __slots__ = ("_refuse",)

    def __init__(self, relays: set[_Half], linger: float | None,
                 refuse: Callable[[bytes], bool]) -> None:
        super().__init__(relays, linger)
        self._refuse = refuse

    def data_received(self, data: bytes) -> None:
        if self._refuse(data):
            for half in (self, self.peer):
                if half.transport is not None:
                    half.transport.abort()
            return
        super().data_received(data)


class _RemoteHalf(_Half):
    """The outbound side: on connect it sends the early data and lets the local side read.

    ``on_closed`` runs once, when its socket is gone (or was never made)."""

    __slots__ = ("_on_closed", "early_data")

    def __init__(self, relays: set[_Half], early_data: bytes,
                 linger: float | None = None,
                 on_closed: Callable[[], None] | None = None) -> None:
        super().__init__(relays, linger)
        self.early_data = bytearray(early_data)
        self._on_closed = on_closed

    def closed(self) -> None:
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed()
        super().connection_lost(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        local = cast(asyncio.Transport, self.peer.transport)
        if local.is_closing():
            self.transport.close()
            return
        self._relays.add(self)
        if self.early_data:
            self.transport.write(self.early_data)
            self.early_data = bytearray()
        local.resume_reading()
        if self.peer._eof:
            # The local side ended before we were connected: finish its direction now.
            self.peer._eof = False
            if not self.peer.eof_received():
                local.close()


def _link(a: _Half, b: _Half) -> None:
    a.peer = b
    b.peer = a


def _spawn(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coro`` as a task held in ``tasks`` until done; an unexpected failure is logged."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(lambda t: _reap(tasks, t))
    return task


def _reap(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    tasks.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("direct dialer task failed", exc_info=exc)


class DirectDialer(Dialer):
    """Connects to destinations directly from this host, with no tunnel.

    ``wait_ready`` is always true. ``close()`` aborts every relay and UDP flow this dialer
    started; relays otherwise end on their own when their connections do. With
    ``ssl_context``, outbound TCP connections speak TLS (the server uses this to relay to an
    ``https://`` cover site). With ``resolver``, every TCP and UDP destination is resolved
    (and allowed) by it and its addresses are tried in turn; with ``connector``, that does the
    TCP connect instead (see the module docstring). With ``linger``, an EOF towards a side
    that cannot half-close (TLS) does not close it: reading from it goes on until it closes or
    for at most ``linger`` seconds (otherwise both sides are closed at once).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        happy_eyeballs_delay: float | None = HAPPY_EYEBALLS_DELAY,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        linger: float | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._resolver = resolver
        self._connector = connector
        self._linger = linger
        self._happy_eyeballs_delay = happy_eyeballs_delay
        self._tls_options: dict[str, Any] = {}
        if ssl_context is not None:
            self._tls_options = {"ssl": ssl_context, "server_hostname": server_hostname or ""}
        self._relays: set[_Half] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flows: set[_DirectUdpFlow] = set()
        #: UDP datagrams this dialer's flows dropped, by why.
        self.dropped = DroppedDatagrams()

    async def wait_ready(self, timeout: float) -> bool:
        return True

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"",
                 on_closed: Callable[[], None] | None = None,
                 refuse: Callable[[bytes], bool] | None = None) -> None:
        """See :meth:`Dialer.open_tcp`; ``on_closed`` runs once the outbound socket is gone
        or failed to open (the server gives back its descriptor slot); ``refuse`` sees the
        local side's later bytes before they pass and ends the relay when it says so (the
        caller checks ``early_data`` itself)."""
        local.pause_reading()
        local_half = (_Half(self._relays, self._linger) if refuse is None
                      else _InspectedHalf(self._relays, self._linger, refuse))
        remote_half = _RemoteHalf(self._relays, early_data, self._linger, on_closed)
        _link(local_half, remote_half)
        local_half.transport = local
        local.set_protocol(local_half)
        self._relays.add(local_half)
        local_half._connect_task = _spawn(self._tasks, self._connect(dest, local, remote_half))

    async def _open_remote(self, dest: Address, remote: _RemoteHalf) -> None:
        if self._connector is not None:
            await self._connector(dest, remote)
            return
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = dict(self._tls_options)
        if self._resolver is not None:
            addresses = await self._resolver(dest.host, dest.port, socket.SOCK_STREAM)
            for index, (_family, ip) in enumerate(addresses):
                try:
                    await loop.create_connection(lambda: remote, ip, dest.port, **options)
                except OSError:
                    if index == len(addresses) - 1:
                        raise
                    continue
                return
            raise OSError("no address to connect to")
        if dest.ip is None and isinstance(loop, asyncio.BaseEventLoop):
            # uvloop has no happy_eyeballs_delay (it tries the addresses one after another).
            options["happy_eyeballs_delay"] = self._happy_eyeballs_delay
        await loop.create_connection(lambda: remote, dest.host, dest.port, **options)

    async def _connect(self, dest: Address, local: asyncio.Transport, remote: _RemoteHalf) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._open_remote(dest, remote)
        except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
            # Unreachable, refused, unresolvable or timed out: the contract is to close the
            # local side, aborting if the client has not received everything we queued.
            # Destinations stay out of logs: they are the user's browsing history.
            log.debug("direct connect failed: %s", type(exc).__name__)
            if local.get_write_buffer_size():
                local.abort()
            else:
                local.close()
        except BaseException:
            local.abort()  # cancelled (shutdown, client gone) or a bug: never leave it hanging
            raise
        finally:
            if remote.transport is None:
                remote.closed()  # never connected: no connection_lost will say so

    def open_udp(self, on_datagram: DatagramHandler, on_close: Callable[[], None]) -> UdpFlow:
        flow = _DirectUdpFlow(asyncio.get_running_loop(), on_datagram, on_close, self._flows,
                              self._resolver, self.dropped)
        self._flows.add(flow)
        return flow

    def close(self) -> None:
        """Abort every relay and UDP flow and cancel pending connects. Idempotent."""
        for task in list(self._tasks):
            task.cancel()
        for half in list(self._relays):
            if half.transport is not None:
                half.transport.abort()
        for flow in list(self._flows):
            flow.close()


_SockAddr = tuple[str, int]


class DroppedDatagrams:
    """Datagrams UDP flows dropped instead of holding, by why (counters only go up)."""

    __slots__ = ("paused", "queue_full", "resolving")

    def __init__(self) -> None:
        #: The socket's send buffer was over its high-water mark (the kernel's is full).
        self.paused = 0
        #: MAX_QUEUED_DATAGRAMS were already waiting for a socket or a name.
        self.queue_full = 0
        #: A new name while MAX_RESOLVING_PER_FLOW names were resolving.
        self.resolving = 0
# The address family a DNS cache entry has when the resolver refused the destination.
_REFUSED = -1


class _UdpSocket(asyncio.DatagramProtocol):
    """One unconnected UDP socket of a flow; replies go to the flow's handler.

    ``writable`` turns false while the transport's user-space send buffer is above its
    high-water mark (the kernel buffer is full): we drop datagrams then, as a router would,
    because asyncio datagram transports would otherwise buffer without limit.
    """

    def __init__(self, flow: _DirectUdpFlow) -> None:
        self._flow = flow
        self.transport: asyncio.DatagramTransport | None = None
        self.writable = True

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._flow._on_datagram(Address(addr[0], addr[1]), data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable, ...) are normal UDP weather, not the end of the flow.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._flow._lost()


class _DirectUdpFlow(EndingUdpFlow):
    """A UDP association sent straight from this host.

    Opens one socket per address family on first use. Names are resolved (and cached) per
    flow. ``on_close`` is called once if the flow ends for a reason other than ``close()``
    (a socket error); after ``close()`` no callback runs.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_datagram: DatagramHandler,
        on_close: Callable[[], None],
        registry: set[_DirectUdpFlow],
        resolver: Resolver | None = None,
        dropped: DroppedDatagrams | None = None,
    ) -> None:
        super().__init__(on_close)
        self._dropped = dropped or DroppedDatagrams()
        self._loop = loop
        self._resolver = resolver
        self._on_datagram = on_datagram
        self._registry = registry
        self._sockets: dict[int, _UdpSocket] = {}
        # Datagrams waiting for a socket (per family) or for a name to resolve; the total is
        # bounded by MAX_QUEUED_DATAGRAMS.
        self._opening: dict[int, list[tuple[_SockAddr, bytes]]] = {}
        self._resolving: dict[str, list[tuple[int, bytes]]] = {}
        self._queued = 0
        self._dns: dict[str, tuple[str, int, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, dest: Address, payload: bytes) -> None:
        if self._closed:
            return
        ip = dest.ip
        if ip is not None and self._resolver is None:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            self._send_ip(family, (dest.host, dest.port), payload)
            return
        # With a resolver, IP literals go through it (and this cache) too: it may refuse them.
        cached = self._dns.get(dest.host)
        if cached is not None and cached[2] > self._loop.time():
            if cached[1] != _REFUSED:
                self._send_ip(cached[1], (cached[0], dest.port), payload)
            return
        waiting = self._resolving.get(dest.host)
        if waiting is None:
            if len(self._resolving) >= MAX_RESOLVING_PER_FLOW:
                self._dropped.resolving += 1
                return
            waiting = self._resolving[dest.host] = []
            _spawn(self._tasks, self._resolve(dest.host))
        if self._queued < MAX_QUEUED_DATAGRAMS:
            waiting.append((dest.port, payload))
            self._queued += 1
        else:
            self._dropped.queue_full += 1

    def _send_ip(self, family: int, addr: _SockAddr, payload: bytes) -> None:
        sock = self._sockets.get(family)
        if sock is not None and sock.transport is not None:
            if sock.writable:
                sock.transport.sendto(payload, addr)
            else:
                self._dropped.paused += 1
            return
        waiting = self._opening.get(family)
        if waiting is None:
            waiting = self._opening[family] = []
            _spawn(self._tasks, self._open(family))
        if self._queued < MAX_QUEUED_DATAGRAMS:
            waiting.append((addr, payload))
            self._queued += 1
        else:
            self._dropped.queue_full += 1

    async def _open(self, family: int) -> None:
        try:
            transport, protocol = await self._loop.create_datagram_endpoint(
                lambda: _UdpSocket(self), family=family
            )
        except OSError as exc:
            log.debug("direct udp socket failed: %s", type(exc).__name__)
            self._dequeued(self._opening.pop(family, []))
            return
        if self._closed:
            transport.close()
            return
        self._sockets[family] = protocol
        waiting = self._opening.pop(family, [])
        self._dequeued(waiting)
        for addr, payload in waiting:
            self._send_ip(family, addr, payload)

    async def _lookup(self, host: str) -> tuple[int, str] | None:
        if self._resolver is not None:
            addresses = await self._resolver(host, 0, socket.SOCK_DGRAM)
            return addresses[0] if addresses else None
        infos = await self._loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        if not infos:
            return None
        family, _, _, _, sockaddr = infos[0]
        return family, cast(str, sockaddr[0])

    async def _resolve(self, host: str) -> None:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                found = await self._lookup(host)
        except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
            log.debug("direct udp resolve failed: %s", type(exc).__name__)
            self._dequeued(self._resolving.pop(host, []))
            if self._resolver is not None:
                # Refused or unresolvable: remember it, or every datagram would start a lookup.
                self._remember(host, "", _REFUSED)
            return
        waiting = self._resolving.pop(host, [])
        self._dequeued(waiting)
        if found is None or self._closed:
            return
        family, ip = found
        self._remember(host, ip, family)
        for port, payload in waiting:
            self._send_ip(family, (ip, port), payload)

    def _remember(self, host: str, ip: str, family: int) -> None:
        if len(self._dns) >= MAX_DNS_CACHE_ENTRIES:
            del self._dns[next(iter(self._dns))]
        self._dns[host] = (ip, family, self._loop.time() + DNS_CACHE_SECONDS)

    def _dequeued(self, items: list[tuple[int, bytes]] | list[tuple[_SockAddr, bytes]]) -> None:
        self._queued -= len(items)

    def _release(self) -> None:
        self._registry.discard(self)
        for task in list(self._tasks):
            task.cancel()
        for sock in self._sockets.values():
            if sock.transport is not None:
                sock.transport.close()
        self._sockets.clear()
        self._opening.clear()
        self._resolving.clear()
        self._queued = 0
