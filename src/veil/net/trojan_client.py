"""TrojanDialer: the client's inbounds over any Trojan server (``veil connect trojan://...``).

Trojan has no session: every TCP stream is its own TLS connection to the server, whose first
write is the Trojan request followed by the stream's first bytes (so a stream still costs no
extra round trip after the TLS handshake). A UDP association is one more TLS connection that
carries Trojan UDP packets. The relays are :class:`veil.net.direct.DirectDialer`'s, with a
connector that opens the TLS connection to the server.

Server authentication, from the link:

* ``pin``: the SHA-256 of the server certificate's public key must match (as with veil keys);
  checked *before* anything is written, so the password never reaches anyone else;
* ``allowInsecure=1`` without a pin: no check at all (the password goes to whoever answers);
* neither: the web PKI, with the system's CAs (``SSL_CERT_FILE``'s, when set) and the host
  name (``sni`` or the host).

Every connection is veil's browser-shaped TLS 1.3 client (:mod:`veil.transport.browser_tls`,
Chrome's ClientHello), as for veil sessions: a ClientHello from Python's OpenSSL matches no
browser and is what a censor's fingerprint rule looks for. A Trojan server that only speaks
TLS 1.2 cannot be reached (every TLS library a Trojan server is built on offers 1.3).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable

from veil.errors import AuthError, RemoteProtocolError, TransportError
from veil.net.dialer import DatagramHandler, Dialer, EndingUdpFlow, UdpFlow
from veil.net.direct import DirectDialer
from veil.protocol.accesskey import default_sni, pin_of_der
from veil.protocol.address import Address
from veil.protocol.trojan import (
    Command,
    TrojanLink,
    UdpPacketDecoder,
    build_request,
    encode_udp_packet,
    password_hash,
)
from veil.transport.browser_tls import open_browser_tls_connection
from veil.transport.cdn.client import verify_certificate

log = logging.getLogger("veil.client")

# A TLS handshake slower than this means the path is broken (as for veil sessions).
HANDSHAKE_TIMEOUT_S = 15.0
# TCP connect plus handshake; the local application was already told "connected".
CONNECT_TIMEOUT_S = 20.0
# Datagrams held while a UDP association's TLS connection opens; UDP may drop past this.
MAX_QUEUED_DATAGRAMS = 64
# The TLS carrier cannot half-close, so when the application half-closes a stream, the
# server's answer is still read for up to this long (Linux's tcp_fin_timeout, for the same
# reason: a peer that waits for our EOF would otherwise keep the connection forever).
HALF_CLOSE_LINGER_S = 60.0
# The reachability check at start retries with this backoff (doubling, capped).
CHECK_BACKOFF_INITIAL_S = 0.5
CHECK_BACKOFF_MAX_S = 30.0
# A server without the pinned key will not grow it soon: check again slowly.
CHECK_PIN_RETRY_S = 60.0


class PinMismatchError(AuthError, ConnectionError):
    """The server did not present the pinned key; nothing was sent to it.

    Also a ``ConnectionError``: ``DirectDialer`` (which calls ``open_server`` to connect)
    and the UDP association catch a failed connect as an ``OSError``.
    """

    code = "pin_mismatch"


class UntrustedServerError(AuthError, ConnectionError):
    """The server's certificate does not verify for its name by the web PKI (a link with
    neither a pin nor allowInsecure); nothing was sent to it. A ``ConnectionError`` for the
    same reason as :class:`PinMismatchError`."""

    code = "untrusted_certificate"


class _ServerCheck(asyncio.Protocol):
    """Stands in front of the real protocol until the server is authenticated: by its pinned
    key, else by the web PKI for ``host``, unless ``insecure`` (no pin) says not at all."""

    def __init__(self, inner: asyncio.Protocol, link: TrojanLink, host: str) -> None:
        self.inner = inner
        self.link = link
        self.host = host
        self.mismatch = False
        self.untrusted: str | None = None  # why the web PKI refused the certificate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport
        assert isinstance(tls, asyncio.Transport)
        if self.link.pin is not None:
            der = tls.get_extra_info("peer_certificate_der")
            if not der or pin_of_der(der) != self.link.pin:
                self.mismatch = True
                tls.abort()
                return
        elif not self.link.insecure:
            client = tls.get_extra_info("tls_client")
            try:
                verify_certificate(client.peer_certificate_chain_der, self.host,
                                   os.environ.get("SSL_CERT_FILE"), party="the server")
            except TransportError as exc:
                self.untrusted = str(exc)
                tls.abort()
                return
        tls.set_protocol(self.inner)
        self.inner.connection_made(tls)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class TrojanDialer(Dialer):
    """A :class:`Dialer` over a Trojan server; same lifecycle as ``ClientTunnel``."""

    def __init__(self, link: TrojanLink) -> None:
        self.link = link
        self.last_error: str | None = None
        self.digest = password_hash(link.password)
        self._sni = link.sni or default_sni(link.server.host)
        self._relay = DirectDialer(connect_timeout=CONNECT_TIMEOUT_S, connector=self._connect,
                                   linger=HALF_CLOSE_LINGER_S)
        self._ready = asyncio.Event()
        self._flows: set[TrojanUdpFlow] = set()
        self._check: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Check once that the server answers TLS (and has the pinned key); log the result."""
        if self.link.insecure and self.link.pin is None:
            log.warning("the trojan link says allowInsecure and has no pin: the server is not "
                        "authenticated, and the password goes to whoever answers")
        self._check = asyncio.get_running_loop().create_task(self._check_server())

    async def _check_server(self) -> None:
        backoff = CHECK_BACKOFF_INITIAL_S
        while True:
            try:
                transport = await self.open_server(asyncio.Protocol())
            except (PinMismatchError, UntrustedServerError):
                await asyncio.sleep(CHECK_PIN_RETRY_S)  # open_server said why
                continue
            except (OSError, TimeoutError) as exc:
                self.last_error = f"cannot reach {self.link.server}: {exc or type(exc).__name__}"
                log.warning("%s; retrying in %.1f s", self.last_error, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, CHECK_BACKOFF_MAX_S)
                continue
            transport.close()  # nothing sent: to the server this was a TLS handshake
            log.info("connected to %s (trojan: one TLS connection per stream)",
                     self.link.server)
            self._ready.set()
            return

    async def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
            await asyncio.gather(self._check, return_exceptions=True)
        self._relay.close()
        for flow in list(self._flows):
            flow.close()

    async def wait_ready(self, timeout: float) -> bool:
        if self._ready.is_set():
            return True  # no suspension: inbounds hand connections over at once
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ connections
    async def open_server(self, protocol: asyncio.Protocol) -> asyncio.Transport:
        """A TLS connection to the server with ``protocol`` on it, server key checked."""
        server = self.link.server
        gate = _ServerCheck(protocol, self.link, self.link.sni or server.host)
        transport = await open_browser_tls_connection(
            server.host, server.port, lambda: gate, server_hostname=self._sni,
            handshake_timeout=HANDSHAKE_TIMEOUT_S)
        if gate.mismatch:
            self.last_error = (f"the server at {server} did not present the pinned key (TLS "
                               "interception or wrong server); nothing was sent to it")
            log.error("%s", self.last_error)
            raise PinMismatchError(self.last_error)
        if gate.untrusted is not None:
            self.last_error = (f"the server at {server} is not trusted: {gate.untrusted}; "
                               "nothing was sent to it")
            log.error("%s", self.last_error)
            raise UntrustedServerError(self.last_error)
        return transport

    async def _connect(self, dest: Address, protocol: asyncio.Protocol) -> None:
        await self.open_server(protocol)

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        request = build_request(self.digest, Command.CONNECT, dest)
        self._relay.open_tcp(dest, local, request + early_data)

    def open_udp(self, on_datagram: DatagramHandler, on_close: Callable[[], None]) -> UdpFlow:
        flow = TrojanUdpFlow(self, on_datagram, on_close)
        self._flows.add(flow)
        return flow

    def _forget(self, flow: TrojanUdpFlow) -> None:
        self._flows.discard(flow)


class TrojanUdpFlow(EndingUdpFlow, asyncio.Protocol):
    """A UDP association as one Trojan UDP ASSOCIATE connection, opened at the first datagram
    (whose destination the request names, as Trojan clients do)."""

    def __init__(self, dialer: TrojanDialer, on_datagram: DatagramHandler,
                 on_close: Callable[[], None]) -> None:
        super().__init__(on_close)
        self._dialer = dialer
        self._on_datagram = on_datagram
        self._decoder = UdpPacketDecoder()
        self._transport: asyncio.Transport | None = None
        self._queued: list[bytes] = []
        self._request = b""  # the UDP ASSOCIATE request, made at the first datagram
        self._task: asyncio.Task[None] | None = None
        self._paused = False

    def send(self, dest: Address, payload: bytes) -> None:
        if self._closed:
            return
        try:
            packet = encode_udp_packet(dest, payload)
        except ValueError:
            return  # too large for Trojan's length field: dropped, as UDP does
        if self._transport is not None:
            if not self._paused:
                self._transport.write(packet)
            return
        if len(self._queued) < MAX_QUEUED_DATAGRAMS:
            self._queued.append(packet)
        if self._task is None:
            self._request = build_request(self._dialer.digest, Command.UDP_ASSOCIATE, dest)
            self._task = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport = await self._dialer.open_server(self)
        except (OSError, TimeoutError) as exc:
            log.debug("trojan udp association failed: %s", type(exc).__name__)
            self._task = None  # done: close() must not cancel the task it runs in
            self._lost()
            return
        if self._closed:
            transport.close()

    # asyncio.Protocol, on the TLS connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # The request and what is queued go first, in this call: a datagram sent from now on
        # is written straight after them.
        transport.write(self._request + b"".join(self._queued))
        self._queued.clear()
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            packets = self._decoder.feed(data)
        except RemoteProtocolError:
            self._lost()
            return
        for address, payload in packets:
            self._on_datagram(address, payload)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _release(self) -> None:
        self._dialer._forget(self)
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.close()

