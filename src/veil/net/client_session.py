"""The client's tunnel: sessions to the server, opened when the user wants one.

:class:`ClientTunnel` keeps up to ``pool_size`` sessions, authenticates the server by the key
pinned in the access key — never by the web PKI — and opens streams on the least busy
session. Streams open with no round trip: the OPEN frame and the first data leave together.

A connection to "nginx" lives like a browser's: a session with no stream open sends nothing
and is closed by the server at nginx's keepalive_timeout, as nginx closes a browser's; a
session idle nearly that long takes no new stream (veil.protocol.session), and no session is
opened again until the user opens a stream (``wait_ready``, which every inbound
calls first): TCP, TLS, then the authenticator with the OPEN and its data in one write, so
the first byte costs what a browser's request on a new connection costs (3 round trips).
The exceptions, each a user's own demand: the first connection at start (it checks the key
and reports), and a session lost while streams were open (a full-device tunnel's IP stream,
a download): that one is reconnected at once, with backoff, until it is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable

from veil.errors import AuthError
from veil.net.dialer import DatagramHandler, Dialer, UdpFlow
from veil.net.driver import DatagramStreamHandler, SessionDriver, TcpRelay
from veil.protocol.accesskey import AccessKey, pin_of_der
from veil.protocol.address import Address
from veil.protocol.auth import Credential, build_auth
from veil.protocol.frames import (
    COVER_H2_GREETING,
    HEADER_SIZE,
    SERVER_FIRST_PADDING,
    CloseCode,
    FrameType,
    ResetCode,
    StreamKind,
)
from veil.protocol.session import IDLE_CLOSE_REASON, Session, SessionConfig
from veil.transport.browser_tls import open_browser_tls_connection
from veil.transport.tls import TlsHandshakeError, open_tls_connection

log = logging.getLogger("veil.client")

# Reconnect backoff: quick first retries (a blip), capped so a long outage is not hammered.
BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 30.0
# A server that rejected our key may only not know it yet (a user added a moment ago, before
# the server's next look at its store: half a second), so the first retry comes soon; a key
# that stays refused is then tried ever more slowly, at most once a minute.
BACKOFF_REJECTED_INITIAL_S = 1.0
BACKOFF_REJECTED_MAX_S = 60.0
# A TLS handshake slower than this means the path is broken; try again.
HANDSHAKE_TIMEOUT_S = 15.0
# The client's first flight carries a PADDING frame of random length, so the first record is
# not one fixed size (shaping proper is the traffic-shaping policy's job).
FIRST_PADDING_RANGE = (32, 256)
UDP_ANY = Address("0.0.0.0", 0)
# Which TLS client opens sessions: "browser" is veil's own TLS 1.3 client, whose ClientHello is
# Chrome's (transport/tls13/profile.py); "openssl" is Python's ssl, whose ClientHello matches
# no browser (kept for comparison and as a way out if a server cannot talk to the former).
TLS_STACKS = ("browser", "openssl")


def client_ssl_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The server is authenticated by its pinned key after the handshake, not by the web PKI.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def _looks_accepted(head: bytes) -> bool:
    if len(head) < HEADER_SIZE or head[0] != FrameType.PADDING:
        return False
    length = int.from_bytes(head[1:4], "big")
    stream_id = int.from_bytes(head[4:8], "big")
    low, high = SERVER_FIRST_PADDING
    return stream_id == 0 and low <= length <= high


class _ClientDriver(SessionDriver):
    """A session driver that checks the server's first bytes: frames, or a website."""

    def __init__(self, session: Session, **kwargs: object) -> None:
        super().__init__(session, **kwargs)  # type: ignore[arg-type]
        self.accepted: asyncio.Future[bool] = self._loop.create_future()
        self._head = b""  # the server's first bytes, until they tell accepted from refused
        self.streams_at_close = 0  # streams open when the session ended (0: it was idle)

    def data_received(self, data: bytes | memoryview) -> None:
        if self.accepted.done():
            super().data_received(data)
            return
        # The first bytes decide: our session (a PADDING frame of a length in a known
        # range) or a cover site's answer (HTTP/1.1 or HTTP/2: our key was refused). The
        # cover's HTTP/2 greeting may come first if our first bytes reached the server late;
        # it is skipped exactly. Held here until there is enough to tell.
        buffered = self._head + bytes(data)
        greeting = COVER_H2_GREETING
        body = buffered[len(greeting):] if buffered.startswith(greeting) else buffered
        if len(body) < HEADER_SIZE or (len(buffered) < len(greeting)
                                       and greeting.startswith(buffered)):
            self._head = buffered
            return
        self._head = b""
        ok = _looks_accepted(body[:HEADER_SIZE])
        self.accepted.set_result(ok)
        if not ok:
            self.close()
            return
        super().data_received(body)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.accepted.done():
            self.accepted.set_result(False)
        super().connection_lost(exc)

    def _finish(self, why: str) -> None:
        if not self._done:
            self.streams_at_close = len(self.handlers)
        super()._finish(why)


class ClientTunnel(Dialer):
    def __init__(self, key: AccessKey, *, pool_size: int = 1, tls_stack: str = "browser",
                 session_config: SessionConfig | None = None) -> None:
        if tls_stack not in TLS_STACKS:
            raise ValueError(f"tls_stack must be one of {TLS_STACKS}, not {tls_stack!r}")
        self.key = key
        self.tls_stack = tls_stack
        self.credential = Credential.from_secret(key.secret)
        self.pool_size = pool_size
        self.session_config = session_config
        self._drivers: list[SessionDriver] = []
        self._ready = asyncio.Event()
        # Demand for a session: set while someone waits in wait_ready, and from start() or a
        # session lost with streams open until a session is up (_wanted). Without it the
        # slots open nothing.
        self._demand = asyncio.Event()
        self._waiting = 0
        self._wanted = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ssl = client_ssl_context()
        self.last_error: str | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._want()  # the first connection: it checks the key, and says so
        self._tasks = [loop.create_task(self._maintain(i)) for i in range(self.pool_size)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for driver in list(self._drivers):
            driver.close()

    # ------------------------------------------------------------------ connecting
    async def connect_once(self) -> SessionDriver:
        """Open one authenticated session; raise TransportError/AuthError on failure."""
        loop = asyncio.get_running_loop()
        session = Session(client=True, now=loop.time(), config=self.session_config)
        driver = _ClientDriver(session)
        server = self.key.server
        transport: asyncio.Transport
        try:
            if self.tls_stack == "browser":
                transport = await open_browser_tls_connection(
                    server.host, server.port, lambda: driver, server_hostname=self.key.sni,
                    handshake_timeout=HANDSHAKE_TIMEOUT_S)
            else:
                transport = await open_tls_connection(
                    server.host, server.port, self._ssl, lambda: driver,
                    server_hostname=self.key.sni, handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except TlsHandshakeError as exc:
            if isinstance(exc.__cause__, AuthError):
                # The server could not prove it holds its certificate's key: someone is in
                # the middle. Nothing was sent; treat it like a pin mismatch.
                raise AuthError(f"TLS with {server} failed: {exc}",
                                code="server_auth") from exc
            raise ConnectionError(f"TLS with {server} failed: {exc}") from exc
        der = transport.get_extra_info("peer_certificate_der")
        if not der or pin_of_der(der) != self.key.pin:
            # Someone else's certificate: an interception proxy, or the wrong server. Send
            # nothing (the credential must not reach it) and say so.
            transport.abort()
            raise AuthError(f"the server at {server} did not present the pinned key "
                            "(TLS interception or wrong server); refusing to send anything",
                            code="pin_mismatch")
        binding = transport.get_extra_info("tls_unique")
        auth = build_auth(self.credential, binding, time.time())
        low, high = FIRST_PADDING_RANGE
        session.send_padding(random.randint(low, high))
        # The authenticator and the first frames go out in one write: one TLS record.
        transport.write(auth + session.data_to_send())
        return driver

    def _want(self) -> None:
        """A session is wanted until one is up, whoever waits for it."""
        self._wanted = True
        self._demand.set()

    def _demand_met(self) -> None:
        """A session is up, or connecting failed with nobody waiting: open no more until
        there is demand again."""
        self._wanted = False
        if not self._waiting:
            self._demand.clear()

    async def _maintain(self, slot: int) -> None:
        backoff = BACKOFF_INITIAL_S
        rejected_backoff = BACKOFF_REJECTED_INITIAL_S
        while True:
            await self._demand.wait()
            started = time.monotonic()
            try:
                driver = await asyncio.wait_for(self.connect_once(), HANDSHAKE_TIMEOUT_S + 5)
            except AuthError as exc:
                self.last_error = str(exc)
                log.error("%s", exc)
                await asyncio.sleep(BACKOFF_REJECTED_MAX_S)
                continue
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.last_error = f"cannot reach {self.key.server}: {exc or type(exc).__name__}"
                log.warning("%s; retrying in %.1f s", self.last_error, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self._drivers.append(driver)
            self._ready.set()
            assert isinstance(driver, _ClientDriver)
            accepted = await driver.accepted
            if accepted:
                log.info("connected to %s (session %d)", self.key.server, slot)
                rejected_backoff = BACKOFF_REJECTED_INITIAL_S
                self._demand_met()
            why = await driver.closed
            self._drivers.remove(driver)
            if not self._drivers:
                self._ready.clear()
            if not accepted:
                self.last_error = (f"the server at {self.key.server} refused the key (revoked, "
                                   "expired or over its limit, a wrong key, or this clock is off "
                                   f"by minutes); trying again in {rejected_backoff:.0f} s")
                log.error("%s", self.last_error)
                await asyncio.sleep(rejected_backoff)
                rejected_backoff = min(rejected_backoff * 2, BACKOFF_REJECTED_MAX_S)
                continue
            if not driver.streams_at_close:
                # Idle (our idle close, or the server's): a browser opens nothing until its
                # user asks for something, and neither do we.
                log.info("session %d to %s closed while idle (%s); the next stream opens "
                         "a new one", slot, self.key.server, why)
                backoff = BACKOFF_INITIAL_S
                continue
            log.warning("session %d to %s ended with %d stream(s) open (%s); reconnecting",
                        slot, self.key.server, driver.streams_at_close, why)
            self._want()
            if time.monotonic() - started > BACKOFF_MAX_S:
                backoff = BACKOFF_INITIAL_S
            await asyncio.sleep(backoff * random.random())
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    # ------------------------------------------------------------------ Dialer
    async def wait_ready(self, timeout: float) -> bool:
        """A live session, opened now if there is none (this is the user's demand)."""
        if self._pick() is not None:
            return True
        self._waiting += 1
        self._demand.set()
        try:
            async with asyncio.timeout(timeout):
                while self._pick() is None:
                    await self._ready.wait()
                    if self._pick() is None:
                        # A session that is closing still counts as ready: let it go.
                        await asyncio.sleep(0)
        except TimeoutError:
            return False
        finally:
            # Nobody waits any more (served, or gave up): a slot still connecting finishes,
            # a failed one does not try again until someone asks.
            self._waiting -= 1
            if not self._waiting and not self._wanted:
                self._demand.clear()
        return True

    def _pick(self) -> SessionDriver | None:
        now = asyncio.get_running_loop().time()
        live = []
        for driver in self._drivers:
            if driver.session.closed:
                continue
            if not driver.session.reusable(now):
                # Idle so long that the server's close may be on its way: an OPEN could cross
                # it. Close it ourselves; the stream goes on a new session.
                driver.close(CloseCode.NORMAL, IDLE_CLOSE_REASON)
                continue
            live.append(driver)
        if not live:
            return None
        return min(live, key=lambda d: len(d.handlers))

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        driver = self._pick()
        if driver is None:
            local.abort()
            return
        stream_id = driver.session.open_stream(StreamKind.TCP, dest)
        relay = TcpRelay(driver, stream_id, local)
        local.set_protocol(relay)
        driver.attach(stream_id, relay)
        if early_data:
            relay.data_received(early_data)
        else:
            driver.flush()

    def open_udp(self, on_datagram: DatagramHandler, on_close: Callable[[], None]) -> UdpFlow:
        driver = self._pick()
        flow = ClientUdpFlow(driver, on_datagram, on_close)
        return flow


class ClientUdpFlow(DatagramStreamHandler, UdpFlow):
    """A UDP association carried as DATAGRAM frames on one stream."""

    def __init__(self, driver: SessionDriver | None, on_datagram: DatagramHandler,
                 on_close: Callable[[], None]) -> None:
        self.driver = driver
        self._on_datagram = on_datagram
        self._on_close = on_close
        self._closed = False
        if driver is None:
            self.stream_id = 0
            self._closed = True
            asyncio.get_running_loop().call_soon(on_close)
            return
        self.stream_id = driver.session.open_stream(StreamKind.UDP, UDP_ANY)
        driver.attach(self.stream_id, self)
        driver.flush()

    def send(self, dest: Address, payload: bytes) -> None:
        driver = self.driver
        if self._closed or driver is None or driver.writing_paused:
            return  # congested or gone: drop, as UDP does
        try:
            driver.session.send_datagram(self.stream_id, dest, payload)
        except Exception:  # a datagram that cannot be sent is dropped, as UDP does
            return
        driver.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.driver is not None:
            self.driver.cancel(self.stream_id)

    # StreamHandler
    def on_datagram(self, address: Address, payload: bytes) -> None:
        self._on_datagram(address, payload)

    def on_reset(self, code: ResetCode) -> None:
        if not self._closed:
            self._closed = True
            self._on_close()

    def on_data(self, data: bytes) -> None:
        if self.driver is not None:
            self.driver.session.consume(self.stream_id, len(data))

    def on_eof(self) -> None:
        self.on_reset(ResetCode.CANCELLED)

