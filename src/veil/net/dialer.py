"""What the client's inbounds (SOCKS5, HTTP proxy, port forwards) need from a tunnel.

An inbound accepts a local connection, works out where it wants to go, then hands the local
transport to a :class:`Dialer`, which relays it from then on. Inbounds never see frames,
sessions or TLS; the tunnel never sees SOCKS or HTTP. Two implementations exist: the veil
session client (``veil.net.client_session``) and :class:`veil.net.direct.DirectDialer`, which
connects straight out (used for split tunnelling and to test inbounds without a server).
"""

from __future__ import annotations

import abc
import asyncio
import ipaddress
from collections.abc import Callable

from veil.protocol.address import Address

DatagramHandler = Callable[[Address, bytes], None]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UdpFlow(abc.ABC):
    """A UDP association: datagrams to any destination, replies tagged with their source."""

    @abc.abstractmethod
    def send(self, dest: Address, payload: bytes) -> None:
        """Send one datagram. Never blocks; datagrams may be dropped under pressure, as UDP."""

    @abc.abstractmethod
    def close(self) -> None:
        """End the association. Idempotent."""


class EndingUdpFlow(UdpFlow):
    """A :class:`UdpFlow` that can end on its own (a socket error, the server closing).

    ``on_close`` runs once when it does (:meth:`_lost`); after :meth:`close` no callback
    runs. Subclasses free what they hold in :meth:`_release`, which runs once.
    """

    def __init__(self, on_close: Callable[[], None]) -> None:
        self._on_close = on_close
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the flow's sockets, tasks or connection (once, from :meth:`close`)."""

    def _lost(self) -> None:
        if not self._closed:
            self.close()
            self._on_close()


class Dialer(abc.ABC):
    """Opens relayed TCP streams and UDP associations on behalf of local clients."""

    @abc.abstractmethod
    async def wait_ready(self, timeout: float) -> bool:
        """Wait until new streams can be opened; False if that did not happen in ``timeout``."""

    async def wait_ready_for(self, dest: Address, timeout: float) -> bool:
        """Wait until a new TCP stream to ``dest`` can be opened; False if not in ``timeout``.

        A dialer with one way out waits for it (:meth:`wait_ready`, the default). A dialer with
        several (split routing) waits only for the one ``dest`` takes: a direct destination
        must not wait for a tunnel it does not use."""
        return await self.wait_ready(timeout)

    @abc.abstractmethod
    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        """Relay ``local`` to ``dest`` from now on, starting with ``early_data``.

        Takes ownership of ``local``: it sets the transport's protocol to its own relay, so the
        caller must not read from or write to it afterwards. When the remote side cannot be
        reached, ``local`` is closed (aborted if it has unsent data); when the remote side
        finishes, ``local`` gets ``write_eof()``; flow control is applied with
        ``pause_reading``/``resume_reading``. Must be called from the event loop's thread.
        """

    async def resolve(self, name: str, timeout: float) -> tuple[IPAddress, ...] | None:
        """``name``'s addresses as the far end's resolver sees them (split routing asks the
        server, so this host's resolver never sees the name), or None when they cannot be had
        within ``timeout``: the name did not resolve, the far end refused it or cannot
        resolve for us (the default: a Trojan server, an older veil server)."""
        return None

    def why_not_ready(self) -> str | None:
        """Why new streams cannot be opened now (the server is down, refused the key...), for
        the inbounds to tell their clients; None when nothing is known to be wrong."""
        return None

    def refusal(self, dest: Address, network: str = "tcp") -> str | None:
        """Why a new ``network`` (``tcp``/``udp``) stream to ``dest`` is refused by policy (a
        routing rule says block), or None. Inbounds ask before they answer their client, so
        a refusal can be told (SOCKS5 0x02, HTTP 403); the default refuses nothing."""
        return None

    @abc.abstractmethod
    def open_udp(self, on_datagram: DatagramHandler, on_close: Callable[[], None]) -> UdpFlow:
        """Start a UDP association; ``on_datagram(source, payload)`` gets each reply."""
