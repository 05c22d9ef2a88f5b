"""Port forwarding inbounds: a local TCP or UDP port that always goes to one destination.

``--forward [LHOST:]LPORT:RHOST:RPORT[/udp]`` specs are parsed into a
:class:`~veil.config.ForwardSpec` by :func:`veil.config.parse_forward_spec`.

* :class:`TcpForward` hands every accepted connection to ``Dialer.open_tcp(dest, ...)``.
* :class:`UdpForward` gives every distinct local client address its own ``Dialer.open_udp``
  flow to the fixed destination, so replies find their way back to the right client; flows
  idle for :data:`UDP_IDLE_TIMEOUT` are closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, cast

from veil.client.listener import TcpInbound
from veil.config import ForwardSpec
from veil.errors import LocalProtocolError, VeilError
from veil.net.dialer import Dialer, UdpFlow
from veil.protocol.address import Address

__all__ = [
    "MAX_EARLY_DATA",
    "MAX_UDP_FLOWS",
    "READY_TIMEOUT",
    "UDP_IDLE_TIMEOUT",
    "TcpForward",
    "UdpForward",
    "start_forward",
]

log = logging.getLogger(__name__)

#: How long an accepted TCP connection waits for the tunnel before it is closed.
READY_TIMEOUT = 15.0

#: A UDP flow with no datagram in either direction for this long is closed. 60 s outlives
#: typical DNS/QUIC/game keepalive gaps (15-30 s) and matches common NAT UDP timeouts.
UDP_IDLE_TIMEOUT = 60.0

#: Concurrent UDP flows per forward (one per local client address). Each holds a tunnel
#: association; a local process spraying source ports must not grow this without bound, so
#: past it the least recently used flow is closed.
MAX_UDP_FLOWS = 1024

#: Bytes an accepted TCP connection may deliver before it is handed over. Reading is paused on
#: accept so normally none arrive; this bounds the buffer if a transport delivers one read
#: anyway (256 KiB in asyncio and uvloop).
MAX_EARLY_DATA = 512 * 1024


async def start_forward(dialer: Dialer, spec: ForwardSpec) -> TcpForward | UdpForward:
    """Build the forward ``spec`` describes (default options), start it, and log
    ``TCP forward to DEST on HOST:PORT`` (or ``UDP``) with the address it bound."""
    forward: TcpForward | UdpForward
    if spec.udp:
        forward = UdpForward(dialer, spec.listen, spec.dest)
    else:
        forward = TcpForward(dialer, spec.listen, spec.dest)
    await forward.start()
    # The address bound, not the one asked for: with LPORT 0 the system picks the port, and
    # this line is how the user (or a test) learns it.
    log.info("%s forward to %s on %s", "UDP" if spec.udp else "TCP", spec.dest, forward.address)
    return forward


# -- TCP ------------------------------------------------------------------------------------------


class TcpForward(TcpInbound):
    """Listens on ``listen`` and relays every accepted connection to ``dest``.

    Each connection waits (paused) for ``dialer.wait_ready_for(dest)``; if it is not ready in
    ``ready_timeout`` it is closed, else it is handed to ``dialer.open_tcp``. ``close()`` stops
    accepting and aborts connections not yet handed over.
    """

    name = "TCP forward"

    def __init__(
        self,
        dialer: Dialer,
        listen: Address,
        dest: Address,
        *,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        super().__init__(dialer, listen)
        self.dest = dest
        self.ready_timeout = ready_timeout

    def _make_protocol(self) -> asyncio.Protocol:
        return _TcpForwardProtocol(self)

class _TcpForwardProtocol(asyncio.Protocol):
    """One accepted connection until it is handed to the dialer."""

    def __init__(self, forward: TcpForward) -> None:
        self._forward = forward
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.pause_reading()
        self._forward._live.add(self)
        self._task = self._forward._spawn(self._handover(), self.abort)

    def data_received(self, data: bytes) -> None:
        # uvloop may deliver what was already read even though reading is paused.
        self._early += data
        if len(self._early) > MAX_EARLY_DATA:
            self.abort()

    def eof_received(self) -> bool:
        # A client may send its data and FIN before the tunnel is ready (`printf x | nc`).
        # Keep the connection: once reading resumes after the hand-over, the transport
        # reports the EOF again, to the relay (uvloop reports it even while paused).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._forward._live.discard(self)
        if self._task is not None:
            self._task.cancel()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _handover(self) -> None:
        forward = self._forward
        transport = cast(asyncio.Transport, self._transport)
        try:
            ready = await forward.dialer.wait_ready_for(forward.dest, forward.ready_timeout)
        except VeilError as exc:
            log.debug("tcp forward: dialer not ready: %s", exc.code)
            ready = False
        if transport.is_closing():
            return
        if not ready:
            transport.close()
            return
        forward._live.discard(self)
        self._task = None
        transport.resume_reading()  # hand over in the normal state; the dialer may pause it
        forward.dialer.open_tcp(forward.dest, transport, bytes(self._early))


# -- UDP ------------------------------------------------------------------------------------------


class _UdpClient:
    """One local client address and its tunnel flow."""

    __slots__ = ("flow", "last_seen")

    def __init__(self, now: float) -> None:
        self.flow: UdpFlow | None = None
        self.last_seen = now

    def close(self) -> None:
        if self.flow is not None:
            self.flow.close()
            self.flow = None


class UdpForward:
    """Listens on UDP ``listen`` and relays each local client's datagrams to ``dest``.

    Every distinct client address gets its own ``dialer.open_udp`` flow, closed after
    ``idle_timeout`` seconds without traffic in either direction; at ``max_flows`` the least
    recently used flow is closed to make room. Replies are dropped (as UDP may) while the
    local socket's send buffer is full.
    """

    def __init__(
        self,
        dialer: Dialer,
        listen: Address,
        dest: Address,
        *,
        idle_timeout: float = UDP_IDLE_TIMEOUT,
        max_flows: int = MAX_UDP_FLOWS,
    ) -> None:
        self.dialer = dialer
        self.listen = listen
        self.dest = dest
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        # Least recently active first, so expiry and eviction look only at the front.
        self._clients: OrderedDict[tuple[str, int], _UdpClient] = OrderedDict()
        self._transport: asyncio.DatagramTransport | None = None
        self._writable = True
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind the local UDP socket. Raises OSError if the address cannot be bound."""
        self._loop = asyncio.get_running_loop()
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _UdpForwardProtocol(self), local_addr=(self.listen.host, self.listen.port)
        )
        self._transport = transport

    @property
    def address(self) -> Address:
        """The address actually bound."""
        if self._transport is None:
            raise LocalProtocolError("UDP forward is not started", code="state")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return Address(host, port)

    @property
    def flow_count(self) -> int:
        """Local clients with a live flow (for metrics and tests)."""
        return len(self._clients)

    async def close(self) -> None:
        """Close every flow and the local socket. Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._clients:
            _, client = self._clients.popitem(last=False)
            client.close()
        if self._transport is not None:
            self._transport.close()

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        client = self._clients.get(addr)
        if client is None:
            client = self._open(addr, loop.time())
            if client is None:
                return
        else:
            client.last_seen = loop.time()
            self._clients.move_to_end(addr)
        cast(UdpFlow, client.flow).send(self.dest, data)

    def _open(self, addr: tuple[str, int], now: float) -> _UdpClient | None:
        if len(self._clients) >= self.max_flows:
            _, evicted = self._clients.popitem(last=False)
            evicted.close()
        client = _UdpClient(now)
        try:
            client.flow = self.dialer.open_udp(
                lambda _source, payload: self._on_reply(addr, client, payload),
                lambda: self._on_flow_closed(addr, client),
            )
        except VeilError as exc:
            log.debug("udp forward: cannot open flow: %s", exc.code)
            return None
        self._clients[addr] = client
        if self._timer is None:
            self._arm(now)
        return client

    def _on_reply(self, addr: tuple[str, int], client: _UdpClient, payload: bytes) -> None:
        # Identity check: a flow closed by expiry or eviction must not feed a newer client
        # that happens to reuse the same address.
        if self._clients.get(addr) is not client or self._transport is None:
            return
        client.last_seen = cast(asyncio.AbstractEventLoop, self._loop).time()
        self._clients.move_to_end(addr)
        if self._writable:
            self._transport.sendto(payload, addr)

    def _on_flow_closed(self, addr: tuple[str, int], client: _UdpClient) -> None:
        if self._clients.get(addr) is client:
            del self._clients[addr]

    def _arm(self, now: float) -> None:
        """Arm the one expiry timer for the least recently active flow, if any."""
        if not self._clients:
            return
        oldest = next(iter(self._clients.values()))
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        self._timer = loop.call_at(max(now, oldest.last_seen + self.idle_timeout), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = cast(asyncio.AbstractEventLoop, self._loop).time()
        while self._clients:
            addr, client = next(iter(self._clients.items()))
            if client.last_seen + self.idle_timeout > now:
                break
            del self._clients[addr]
            client.close()
        self._arm(now)


class _UdpForwardProtocol(asyncio.DatagramProtocol):
    def __init__(self, forward: UdpForward) -> None:
        self._forward = forward

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._forward._on_datagram(data, (addr[0], addr[1]))

    def pause_writing(self) -> None:
        self._forward._writable = False

    def resume_writing(self) -> None:
        self._forward._writable = True

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from local clients that went away: nothing to do
