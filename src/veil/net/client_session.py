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

Several ways in: a key may name more than one (``AccessKey.ways``: its HOST:PORT, then each
``via``). Each failure to reach one is classified (:func:`classify_failure`: refused, reset
during the handshake, cut, no answer in time, someone else's certificate, a session that
stopped answering) and given to a :class:`~veil.protocol.failover.WayChooser`, which blocks a
way after two failures in a row and names the next; sessions then open on it at once (a
session lost with streams open reconnects there, new streams wait for it), while
:meth:`ClientTunnel._probe` retries the better way in the background with jittered backoff, only
while the tunnel is in use (an idle client sends nothing, as before), and moves back when it
works. Sessions on the way left keep their streams until they end, and take no new ones
(a stream as long-lived as a full-device tunnel's moves itself: :meth:`ClientTunnel.moved_from`).
With ``pinned`` (``--tun``), each way's host is dialled at the address resolved at start,
which is what the kill switch lets through.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping

from veil.errors import AuthError, RemoteProtocolError, TransportError, VeilError
from veil.net.dialer import DatagramHandler, Dialer, IPAddress, UdpFlow
from veil.net.driver import DatagramStreamHandler, SessionDriver, TcpRelay, reset_reason
from veil.net.noise_channel import KEY_REFUSED, NoiseClientChannel
from veil.net.stripe import StripeGroup
from veil.protocol.accesskey import AccessKey, pin_of_der
from veil.protocol.address import Address
from veil.protocol.auth import Credential, build_auth
from veil.protocol.borrow import HelloSeal
from veil.protocol.endpoint import CDN_VARIANTS, Endpoint
from veil.protocol.events import JoinAnswered, SessionClosed
from veil.protocol.failover import FailoverConfig, Failure, Switched, WayChooser
from veil.protocol.frames import (
    COVER_H2_GREETING,
    FEATURE_RESOLVE,
    FEATURE_STRIPE,
    HEADER_SIZE,
    POOL_ID_SIZE,
    SERVER_FIRST_PADDING,
    CloseCode,
    FrameType,
    ResetCode,
    StreamKind,
)
from veil.protocol.report import BlockLog, way_label
from veil.protocol.resolve import MAX_ANSWER_BYTES, decode_answer
from veil.protocol.session import IDLE_CLOSE_REASON, Session, SessionConfig
from veil.transport.browser_tls import open_browser_tls_connection
from veil.transport.cdn.client import open_carrier
from veil.transport.tls import TlsHandshakeError, open_tls_connection
from veil.transport.tls13.errors import TlsProtocolViolation
from veil.transport.tls13.wire import AlertDescription

log = logging.getLogger("veil.client")

# Reconnect backoff: quick first retries (a blip), capped so a long outage is not hammered.
BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 30.0
# A server that rejected our key may only not know it yet (a user added a moment ago, before
# the server's next look at its store: half a second), so the first retry comes soon; a key
# that stays refused is then tried ever more slowly, at most once a minute.
BACKOFF_REJECTED_INITIAL_S = 1.0
BACKOFF_REJECTED_MAX_S = 60.0
# While the tunnel is idle the prober looks this often whether it is in use again (a look
# costs nothing; a probe would be traffic nobody asked for).
PROBE_IDLE_POLL_S = 1.0
# A TLS handshake slower than this means the path is broken; try again.
HANDSHAKE_TIMEOUT_S = 15.0
# The same with another way in to go to: TCP and TLS to a working server take 2 round trips
# (~0.3 s at 150 ms RTT), 1.3 s with a lost SYN, ~3.5 s with two (a 1 s then 2 s SYN
# retransmit) or a lost SYN and a lost ClientHello; a blackhole never answers. Five seconds
# lets every working path through (and it takes two such timeouts in a row to block a way),
# while a blackholed way is left within ~10 s instead of 30.
WAY_HANDSHAKE_TIMEOUT_S = 5.0
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
        # Set when the path failed rather than the server: the connection was lost before the
        # server's first bytes (a reset or FIN after the handshake), or the session stopped
        # answering pings.
        self.path_failure: Failure | None = None
        self.way = 0  # which of the tunnel's ways in it runs on

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
            # Cut before the server said anything: the path, not a refusal (a refused key
            # gets the cover site's answer, read above). Bytes held undecided are an answer
            # (the cover's HTTP/2 greeting, then its close): a refusal.
            if not self._head:
                self.path_failure = (Failure.RESET if isinstance(exc, ConnectionResetError)
                                     else Failure.CUT)
            self.accepted.set_result(False)
        super().connection_lost(exc)

    def _on_timer(self, now: float) -> None:
        events = self.session.handle_timer(now)
        if any(type(event) is SessionClosed and event.code is CloseCode.KEEPALIVE_TIMEOUT
               for event in events):
            self.path_failure = Failure.SILENT
        self._dispatch(events)
        self.flush()

    def _finish(self, why: str) -> None:
        if not self._done and not self.closed_as_idle_by_peer:
            # The server's idle close with streams open here: each destination had closed
            # while idle, the close held by the server (net.driver.TcpRelay): nothing to
            # reconnect for.
            self.streams_at_close = len(self.handlers)
        super()._finish(why)


def classify_failure(exc: BaseException) -> Failure:
    """What a failed attempt to reach a way in says about the path."""
    if isinstance(exc, AuthError):
        return Failure.FOREIGN
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and len(chain) < 8:  # a cause chain is short; never loop
        chain.append(link)
        link = link.__cause__
    for link in chain:
        if isinstance(link, ConnectionResetError):
            return Failure.RESET
        if isinstance(link, ConnectionRefusedError):
            return Failure.REFUSED
        if isinstance(link, TimeoutError):
            return Failure.TIMEOUT
        if isinstance(link, OSError) and link.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return Failure.UNREACHABLE
    return Failure.CUT


def usable_way(key: AccessKey, way: Endpoint) -> bool:
    """Whether this client can use ``way``: a scheme it speaks, and a way through a CDN only
    with the server's Noise key (nk=), without which nothing could tell veil's server from the
    CDN's."""
    return way.known and (key.noise_key is not None or not way.through_cdn)


def _way_name(index: int, way: Endpoint) -> str:
    return f"direct path {way}" if index == 0 else f"way in {way}"


#: How often the client says at INFO why the server cut its applications' connections, per
#: reason: a browser whose page pulls fifty blocked trackers gets one line, not fifty.
RESET_REPEAT_S = 10.0


class ResetSayer:
    """Tells the user why the server reset a stream (a refused destination, a name it could
    not resolve, a destination that did not answer): an INFO line, never the destination,
    once per reason per :data:`RESET_REPEAT_S`; the repeats in between at DEBUG, and
    counted in the next INFO line."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._said: dict[ResetCode, float] = {}
        self._unsaid: dict[ResetCode, int] = {}

    def say(self, stream_id: int, code: ResetCode) -> None:
        now = self._clock()
        said = self._said.get(code)
        if said is not None and now - said < RESET_REPEAT_S:
            self._unsaid[code] = self._unsaid.get(code, 0) + 1
            log.debug("stream %d reset by the server: %s", stream_id, reset_reason(code))
            return
        self._said[code] = now
        more = self._unsaid.pop(code, 0)
        log.info("a request failed: the server answered %s%s", reset_reason(code),
                 f" (and {more} more since the last such line)" if more else "")


class ClientTunnel(Dialer):
    def __init__(self, key: AccessKey, *, pool_size: int = 1, tls_stack: str = "browser",
                 session_config: SessionConfig | None = None,
                 failover: FailoverConfig | None = None,
                 handshake_timeout: float | None = None,
                 pinned: Mapping[str, str] | None = None, stripe: bool = False) -> None:
        """``pinned``: each way's host name -> the IP address to dial for it, whatever DNS says
        (a full-device tunnel's kill switch lets exactly those through); a way whose host it
        lacks is not used. None: resolve names when dialling. ``stripe``: spread bulk
        streams over the pool's sessions (veil.protocol.stripe), with a server that can."""
        if tls_stack not in TLS_STACKS:
            raise ValueError(f"tls_stack must be one of {TLS_STACKS}, not {tls_stack!r}")
        self.key = key
        self.pinned = pinned
        # The ways this client can use, in the key's order; the others are named at start.
        usable = [usable_way(key, way) for way in key.ways()]
        self.ways = tuple(way for way, ok in zip(key.ways(), usable, strict=True)
                          if ok and (pinned is None or (
                              way.address is not None and way.address.host in pinned)))
        self.skipped_ways = tuple(way for way, ok in zip(key.ways(), usable, strict=True)
                                  if not ok)
        self.chooser = WayChooser(len(self.ways), failover or FailoverConfig())
        # Blocks to report to the server through another way (_report_blocks).
        self.block_log = BlockLog([(key.ways().index(way), way_label(way)) for way in self.ways])
        self.handshake_timeout = handshake_timeout or (
            WAY_HANDSHAKE_TIMEOUT_S if len(self.ways) > 1 else HANDSHAKE_TIMEOUT_S)
        # Resolved (and replaced) whenever the way in use changes: wakes the slots whose
        # session is on the way left, and the prober.
        self._way_changed: asyncio.Future[None] | None = None
        self.tls_stack = tls_stack
        self.credential = Credential.from_secret(key.secret)
        self.pool_size = pool_size
        self._reset_sayer = ResetSayer()
        self.session_config = session_config
        self.stripe = stripe and pool_size > 1
        # This client's pool (veil.protocol.stripe): its id, the next member number, and
        # the groups the server formed, by token.
        self.pool_id = os.urandom(POOL_ID_SIZE)
        self._members = itertools.count()
        self.stripe_groups: dict[bytes, StripeGroup] = {}
        # Every session that sent JOIN, by member number, until it ends: a CHUNK may name
        # one whose answer has not arrived yet (StripeGroup's find).
        self._joined: dict[int, SessionDriver] = {}
        self._drivers: list[SessionDriver] = []
        # Resolved (and replaced) whenever a session is added or forgotten: wakes wait_ready,
        # which otherwise has nothing to do but wait (no polling).
        self._sessions_changed: asyncio.Future[None] | None = None
        # Resolved (and replaced) when a stream is wanted and every live session takes no
        # new one (Session.reusable: quiet streams, while the server may hold closes): wakes
        # the slots holding those sessions to open a new one beside them.
        self._outgrown: asyncio.Future[None] | None = None
        # Demand for a session: set while someone waits in wait_ready, and from start() or a
        # session lost with streams open until a session is up (_wanted). Without it the
        # slots open nothing.
        self._demand = asyncio.Event()
        self._waiting = 0
        self._wanted = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ssl = client_ssl_context()
        self.last_error: str | None = None
        # last_error while the last attempt failed; None once a session is accepted.
        self._failing: str | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for way in self.skipped_ways:
            log.warning("this veil cannot use the way in %s (a newer veil can); skipped", way)
        self._want()  # the first connection: it checks the key, and says so
        self._tasks = [loop.create_task(self._maintain(i)) for i in range(self.pool_size)]
        if len(self.ways) > 1:
            self._tasks.append(loop.create_task(self._probe()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for driver in list(self._drivers):
            driver.close()

    # ------------------------------------------------------------------ connecting
    async def connect_once(self, way: int | None = None) -> _ClientDriver:
        """Open one authenticated session on ``way`` (default: the way in use); raise
        TransportError/AuthError on failure."""
        loop = asyncio.get_running_loop()
        session = Session(client=True, now=loop.time(), config=self.session_config)
        driver = _ClientDriver(session)
        driver.way = self.chooser.current if way is None else way
        if self.ways[driver.way].through_cdn:
            return await self._connect_through_cdn(self.ways[driver.way], driver)
        server = self.ways[driver.way].address
        assert server is not None  # every usable way has one
        host = self._dial_host(server)
        transport: asyncio.Transport
        try:
            if self.tls_stack == "browser" or self.key.borrowed:
                # A borrowed identity's server knows us by a sealed hello, which only veil's
                # own TLS stack writes (veil.protocol.borrow).
                sealer = (HelloSeal(self.credential, self.key.noise_key, time.time)
                          if self.key.borrowed and self.key.noise_key is not None else None)
                transport = await open_browser_tls_connection(
                    host, server.port, lambda: driver, server_hostname=self.key.sni,
                    handshake_timeout=self.handshake_timeout, sealer=sealer)
            else:
                transport = await open_tls_connection(
                    host, server.port, self._ssl, lambda: driver,
                    server_hostname=self.key.sni, handshake_timeout=self.handshake_timeout)
        except TlsHandshakeError as exc:
            cause = exc.__cause__
            if (self.key.borrowed and isinstance(cause, TlsProtocolViolation)
                    and cause.alert == AlertDescription.BAD_RECORD_MAC):
                # The first encrypted record was not under the sealed hello's keys: the
                # server relayed us to the site it borrows, as it does every hello it does
                # not accept. A refusal, not a blocked way.
                raise AuthError(f"the server at {server} answered as {self.key.sni}: it "
                                "refused the key (revoked, expired or over its limit, a wrong "
                                "key, or this clock is off by minutes), or it is not veil's",
                                code=KEY_REFUSED) from exc
            if isinstance(exc.__cause__, AuthError):
                # The server could not prove it holds its certificate's key: someone is in
                # the middle. Nothing was sent; treat it like a pin mismatch.
                raise AuthError(f"TLS with {server} failed: {exc}",
                                code="server_auth") from exc
            raise ConnectionError(f"TLS with {server} failed: {exc}") from exc
        der = transport.get_extra_info("peer_certificate_der")
        # A borrowed identity's server has no certificate to show: it proved the sealed
        # hello's secret (only the server with nk's private key derives its handshake keys).
        if not self.key.borrowed and (not der or pin_of_der(der) != self.key.pin):
            # Someone else's certificate: an interception proxy, or the wrong server. Send
            # nothing (the credential must not reach it) and say so.
            transport.abort()
            raise AuthError(f"the server at {server} did not present the pinned key "
                            "(TLS interception or wrong server); refusing to send anything",
                            code="pin_mismatch")
        if session.closed:
            # Its idle close came during a handshake slower than it (only with an idle close
            # shorter than the path's round trips): nothing can be sent on it.
            transport.abort()
            raise ConnectionError(f"the handshake with {server} outlasted the session's "
                                  "idle close")
        binding = transport.get_extra_info("tls_unique")
        auth = build_auth(self.credential, binding, time.time())
        low, high = FIRST_PADDING_RANGE
        session.send_padding(random.randint(low, high))
        # The authenticator and the first frames go out in one write: one TLS record.
        transport.write(auth + session.data_to_send())
        return driver

    async def _connect_through_cdn(self, way: Endpoint, driver: _ClientDriver) -> _ClientDriver:
        """A session through a CDN way in: the carrier to the CDN (whose certificate the web
        PKI vouches for, or SSL_CERT_FILE's CAs), Noise NK inside to the key's server key
        (which is what authenticates veil's server here), the authenticator in Noise's first
        message, bound to this handshake; then the session as on the TLS port."""
        noise_key = self.key.noise_key
        assert noise_key is not None  # ways through a CDN are usable only with one
        credential = self.credential
        channel = NoiseClientChannel(
            noise_key, lambda binding: build_auth(credential, binding, time.time()))
        url = "https://" + way.url.partition("://")[2]
        try:
            address = way.address
            assert address is not None  # every usable way has one
            # The CDN's name still goes into SNI and Host; only where to dial is pinned.
            connect_to = (None if self.pinned is None
                          else (self._dial_host(address), address.port))
            carrier = await open_carrier(url, lambda: channel, variant=CDN_VARIANTS[way.scheme],
                                         connect_to=connect_to, timeout=self.handshake_timeout)
        except TransportError as exc:
            raise ConnectionError(f"{way}: {exc}") from exc
        try:
            sealed = await asyncio.wait_for(channel.ready, self.handshake_timeout)
        except TransportError as exc:
            carrier.abort()
            raise ConnectionError(str(exc)) from exc
        except BaseException:
            carrier.abort()
            raise
        session = driver.session
        sealed.set_protocol(driver)
        driver.connection_made(sealed)
        sealed.release()
        low, high = FIRST_PADDING_RANGE
        session.send_padding(random.randint(low, high))
        sealed.write(session.data_to_send())
        return driver

    def _join_pool(self, driver: _ClientDriver) -> None:
        """Say which pool ``driver``'s session belongs to, if this client stripes and its
        server can group sessions; it joins the group the server names in its answer."""
        if (not self.stripe or not driver.session.peer_features & FEATURE_STRIPE
                or self.ways[driver.way].through_cdn or driver.session.closed):
            return
        member = next(self._members) % 256

        def grouped(event: JoinAnswered) -> None:
            group = self.stripe_groups.get(event.token)
            if group is None:
                group = StripeGroup(event.token, on_empty=self._group_empty,
                                    find=self._joined.get)
                self.stripe_groups[event.token] = group
            group.add(driver)

        def ended(_closed: object) -> None:
            if self._joined.get(member) is driver:
                del self._joined[member]

        driver.on_join_answered = grouped
        driver.session.send_join(self.pool_id, member)
        self._joined[member] = driver
        driver.closed.add_done_callback(ended)
        driver.flush()

    def _group_empty(self, group: StripeGroup) -> None:
        if self.stripe_groups.get(group.token) is group:
            del self.stripe_groups[group.token]

    def _dial_host(self, address: Address) -> str:
        """Where to connect for a way at ``address``: its pinned IP, else its host."""
        return address.host if self.pinned is None else self.pinned[address.host]

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

    # ------------------------------------------------------------------ ways in
    def _note(self, switched: Switched | None) -> bool:
        """Log a change of the way in use in one line, and wake whoever waits for one."""
        if switched is None:
            return False
        old, new = self.ways[switched.old], self.ways[switched.new]
        if switched.failure is None:
            log.warning("%s works again; using it instead of %s",
                        _way_name(switched.new, new), old)
        elif self.chooser.blocked(switched.new):
            log.warning("every way in failed (%s: %s); trying %s", _way_name(switched.old, old),
                        switched.failure.value, new)
        else:
            log.warning("%s blocked (%s); using %s", _way_name(switched.old, old),
                        switched.failure.value, new)
        if self._way_changed is not None and not self._way_changed.done():
            self._way_changed.set_result(None)
        self._way_changed = None
        return True

    def _changed(self) -> asyncio.Future[None]:
        if self._way_changed is None:
            self._way_changed = asyncio.get_running_loop().create_future()
        return self._way_changed

    def _failed(self, way: int, failure: Failure) -> bool:
        """Tell the chooser; True when the way in use changed to one not known to be blocked
        (try it at once). With every way blocked the chooser rotates through them on each
        failure: trying each at once would spin (two refused ways fail in microseconds, for
        ever), so the caller backs off between them as it does with one way."""
        now = asyncio.get_running_loop().time()
        switched = self.chooser.failed(way, failure, now)
        self.block_log.failed(way, failure, now, blocked=self.chooser.blocked(way))
        changed = self._note(switched)
        return changed and not self.chooser.blocked(self.chooser.current)

    def _succeeded(self, way: int) -> None:
        self.block_log.succeeded(way)
        self._note(self.chooser.succeeded(way, asyncio.get_running_loop().time()))

    def _report_blocks(self, driver: _ClientDriver) -> None:
        """Tell the server, on a session that came up, which other ways were blocked
        (veil.protocol.report): once per way per block episode."""
        report = self.block_log.take(driver.way, asyncio.get_running_loop().time())
        if report is not None and not driver.session.closed:
            driver.session.send_report(report)
            driver.flush()

    def _forget(self, driver: SessionDriver) -> None:
        if driver in self._drivers:
            self._drivers.remove(driver)
            self._note_sessions_changed()

    def _note_sessions_changed(self) -> None:
        changed, self._sessions_changed = self._sessions_changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def _next_sessions_change(self) -> asyncio.Future[None]:
        if self._sessions_changed is None:
            self._sessions_changed = asyncio.get_running_loop().create_future()
        return self._sessions_changed

    def _outgrow(self) -> None:
        """A stream is wanted and no live session takes it: the slots whose sessions are
        live but take no new stream open another beside them."""
        outgrown, self._outgrown = self._outgrown, None
        if outgrown is not None and not outgrown.done():
            outgrown.set_result(None)

    def _next_outgrown(self) -> asyncio.Future[None]:
        if self._outgrown is None:
            self._outgrown = asyncio.get_running_loop().create_future()
        return self._outgrown

    def _forgotten(self, driver: SessionDriver, _closed: asyncio.Future[str]) -> None:
        self._forget(driver)

    async def _probe(self) -> None:
        """Retry the better, blocked ways when the chooser says, while the tunnel is in use."""
        loop = asyncio.get_running_loop()
        while True:
            planned = self.chooser.next_probe()
            if planned is None:
                await self._changed()
                continue
            way, when = planned
            if when > loop.time():
                await asyncio.wait([self._changed()], timeout=when - loop.time())
                continue
            if not any(not driver.session.closed for driver in self._drivers):
                # Idle: a probe now would be traffic the user did not ask for.
                await asyncio.sleep(PROBE_IDLE_POLL_S)
                continue
            try:
                driver = await asyncio.wait_for(self.connect_once(way), self.handshake_timeout)
            except (AuthError, OSError, TimeoutError, ConnectionError) as exc:
                log.info("%s still fails: %s", _way_name(way, self.ways[way]),
                         exc or type(exc).__name__)
                self._failed(way, classify_failure(exc))
                continue
            try:
                accepted = await asyncio.wait_for(asyncio.shield(driver.accepted),
                                                  self.handshake_timeout)
            except TimeoutError:
                accepted = False
            finally:
                driver.close()
            if accepted:
                self._succeeded(way)
            else:
                log.info("%s still fails: no session", _way_name(way, self.ways[way]))
                self._failed(way, driver.path_failure or Failure.CUT)

    async def _maintain(self, slot: int) -> None:
        backoff = BACKOFF_INITIAL_S
        rejected_backoff = BACKOFF_REJECTED_INITIAL_S
        # TCP and TLS within the handshake timeout; with one way in only, a slow connect is
        # waited for a little longer (there is nothing else to try).
        budget = self.handshake_timeout + (0.0 if len(self.ways) > 1 else 5.0)
        while True:
            await self._demand.wait()
            started = time.monotonic()
            way = self.chooser.current
            server = self.ways[way]
            try:
                driver = await asyncio.wait_for(self.connect_once(way), budget)
            except AuthError as exc:
                self.last_error = self._failing = str(exc)
                log.error("%s", exc)
                if exc.code == KEY_REFUSED:  # the server itself said no: not a blocked way
                    await asyncio.sleep(rejected_backoff)
                    rejected_backoff = min(rejected_backoff * 2, BACKOFF_REJECTED_MAX_S)
                    continue
                if self._failed(way, Failure.FOREIGN):
                    continue
                await asyncio.sleep(BACKOFF_REJECTED_MAX_S)
                continue
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.last_error = f"cannot reach {server}: {exc or type(exc).__name__}"
                self._failing = self.last_error
                if self._failed(way, classify_failure(exc)):
                    backoff = BACKOFF_INITIAL_S
                    continue
                log.warning("%s; retrying in %.1f s", self.last_error, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self._drivers.append(driver)
            driver.closed.add_done_callback(functools.partial(self._forgotten, driver))
            self._note_sessions_changed()
            accepted = await driver.accepted
            if accepted:
                self._failing = None
                # After a failure _pick took no unaccepted session: wake who waits for one.
                self._note_sessions_changed()
                log.info("connected to %s (session %d)", server, slot)
                rejected_backoff = BACKOFF_REJECTED_INITIAL_S
                backoff = BACKOFF_INITIAL_S
                self._succeeded(way)
                self._report_blocks(driver)
                self._join_pool(driver)
                self._demand_met()
                while (not driver.closed.done() and driver.way == self.chooser.current
                       and not self._outgrown_by_demand(driver)):
                    await asyncio.wait([driver.closed, self._changed(), self._next_outgrown()],
                                       return_when=asyncio.FIRST_COMPLETED)
                if not driver.closed.done():
                    # The way in use changed under a live session, or a stream is wanted that
                    # it takes no more (quiet streams, Session.reusable): it keeps its streams
                    # until they end or the server closes it (_pick gives it no new ones and
                    # closes it once idle), and this slot opens a session for the new ones.
                    if not driver.handlers:
                        driver.close(CloseCode.NORMAL, IDLE_CLOSE_REASON)
                    continue
            why = await driver.closed
            self._forget(driver)
            if not accepted and driver.path_failure is not None:
                self.last_error = f"cannot reach {server}: {driver.path_failure.value}"
                self._failing = self.last_error
                if self._failed(way, driver.path_failure):
                    continue
                log.warning("%s; retrying in %.1f s", self.last_error, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if not accepted:
                self.last_error = (f"the server at {server} refused the key (revoked, "
                                   "expired or over its limit, a wrong key, or this clock is off "
                                   f"by minutes); trying again in {rejected_backoff:.0f} s")
                self._failing = self.last_error
                log.error("%s", self.last_error)
                await asyncio.sleep(rejected_backoff)
                rejected_backoff = min(rejected_backoff * 2, BACKOFF_REJECTED_MAX_S)
                continue
            if not driver.streams_at_close:
                # Idle (our idle close, or the server's): a browser opens nothing until its
                # user asks for something, and neither do we.
                log.info("session %d to %s closed while idle (%s); the next stream opens "
                         "a new one", slot, server, why)
                backoff = BACKOFF_INITIAL_S
                continue
            log.warning("session %d to %s ended with %d stream(s) open (%s); reconnecting",
                        slot, server, driver.streams_at_close, why)
            self._want()
            if driver.path_failure is Failure.SILENT and self._failed(way, Failure.SILENT):
                continue
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
                    # Sessions that take no new stream but live on (quiet streams) leave
                    # their slots waiting: have them open another. Then wait for a session to
                    # come or go (a closing one goes once its connection does).
                    self._outgrow()
                    # Not awaited itself: the future is shared, and the timeout's cancel must
                    # not cancel it for the other waiters.
                    await asyncio.wait([self._next_sessions_change()])
        except TimeoutError:
            return False
        finally:
            # Nobody waits any more (served, or gave up): a slot still connecting finishes,
            # a failed one does not try again until someone asks.
            self._waiting -= 1
            if not self._waiting and not self._wanted:
                self._demand.clear()
        return True

    def _outgrown_by_demand(self, driver: SessionDriver) -> bool:
        """Whether someone waits for a stream that ``driver`` (live) takes no more."""
        return (self._waiting > 0
                and not driver.session.reusable(asyncio.get_running_loop().time()))

    def why_not_ready(self) -> str | None:
        return self._failing if self._pick() is None else None

    def _pick(self) -> SessionDriver | None:
        now = asyncio.get_running_loop().time()
        live = []
        current = self.chooser.current
        for driver in list(self._drivers):
            if driver.session.closed or driver.closed.done():
                # Ended (its connection lost), though the slot may not have heard yet: a
                # stream opened on it would wait for an answer that cannot come.
                continue
            if getattr(driver, "way", current) != current:
                # On a way in no longer used: no new streams; closed once its streams end.
                if not driver.handlers:
                    driver.close(CloseCode.NORMAL, IDLE_CLOSE_REASON)
                continue
            if not driver.session.reusable(now):
                # Idle so long that the server's close may be on its way: an OPEN could cross
                # it. The stream goes on a new session; an idle one we close ourselves (with
                # streams open, quiet ones, it is left to them and to the server).
                if not driver.handlers:
                    driver.close(CloseCode.NORMAL, IDLE_CLOSE_REASON)
                continue
            if (self._failing is not None and isinstance(driver, _ClientDriver)
                    and not (driver.accepted.done() and not driver.accepted.cancelled()
                             and driver.accepted.result())):
                # After a refusal or a failure, a session is used once accepted: a stream
                # handed to one the server refuses again would be told "connected", then cut.
                continue
            live.append(driver)
        if not live:
            return None
        return min(live, key=lambda d: len(d.handlers))

    async def moved_from(self, driver: SessionDriver) -> None:
        """Return once the way in use is another than ``driver``'s and a session on it is up.
        A stream that lives as long as the tunnel (a full-device tunnel's IP stream) moves
        then: streams stay on the session they opened on, so it would never leave a way."""
        way = getattr(driver, "way", self.chooser.current)
        while True:
            while self.chooser.current == way:
                # Shielded: the future is shared (the prober and the slots wait on it too), and
                # cancelling this wait must not cancel theirs.
                await asyncio.shield(self._changed())
            # Up to a handshake's budget at a time: the way in use may change again meanwhile.
            if await self.wait_ready(self.handshake_timeout) and self.chooser.current != way:
                return

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        driver = self._pick()
        if driver is None:
            local.abort()
            return
        stream_id = driver.session.open_stream(StreamKind.TCP, dest)
        relay = TcpRelay(driver, stream_id, local)
        relay.report_reset = self._reset_sayer.say
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

    async def resolve(self, name: str, timeout: float) -> tuple[IPAddress, ...] | None:
        """Ask the server's resolver (a RESOLVE stream, veil.protocol.resolve), on a session
        whose server announced FEATURE_RESOLVE; None from an older server, on a refusal, a
        failure, or after ``timeout`` (which includes waiting for a session)."""
        try:
            async with asyncio.timeout(timeout):
                if not await self.wait_ready(timeout):
                    return None
                driver = self._pick()
                # A session is picked as soon as it is connected; what its server can do is
                # known once its first bytes were judged: the announcing PADDING is the
                # first frame, parsed in the same call (a server writes it alone, in one
                # record). Should it come in pieces, the name is tunnelled: never wrong.
                if isinstance(driver, _ClientDriver) and not await asyncio.shield(
                        driver.accepted):
                    return None
                if driver is None or not driver.session.peer_features & FEATURE_RESOLVE:
                    return None
                request = _ResolveRequest(driver, Address(name, 0))
                try:
                    return await asyncio.shield(request.answer)
                finally:
                    request.close()
        except (TimeoutError, VeilError, ValueError):
            return None  # ValueError: a name Address cannot encode (over 255 bytes, bad IDNA)


class _ResolveRequest(DatagramStreamHandler):
    """The client's end of one RESOLVE stream: OPEN and FIN leave together; ``answer`` gets
    the addresses at the server's FIN, or None at a RESET or a malformed answer."""

    def __init__(self, driver: SessionDriver, name: Address) -> None:
        self.driver = driver
        self.answer: asyncio.Future[tuple[IPAddress, ...] | None] = (
            asyncio.get_running_loop().create_future())
        self._data = bytearray()
        self.stream_id = driver.session.open_stream(StreamKind.RESOLVE, name)
        driver.attach(self.stream_id, self)
        driver.session.send_eof(self.stream_id)
        driver.flush()

    def close(self) -> None:
        """Done with the stream: reset it if the server has not finished it (a timeout)."""
        if not self.answer.done():
            self.answer.set_result(None)
            self.driver.cancel(self.stream_id)

    def on_data(self, data: bytes) -> None:
        self.driver.session.consume(self.stream_id, len(data))
        if len(self._data) + len(data) > MAX_ANSWER_BYTES:
            self._finish(None)
            self.driver.cancel(self.stream_id, ResetCode.PROTOCOL_ERROR)
            return
        self._data += data

    def on_eof(self) -> None:
        self.driver.detach(self.stream_id)
        try:
            self._finish(decode_answer(bytes(self._data)))
        except RemoteProtocolError:
            self._finish(None)

    def on_reset(self, code: ResetCode) -> None:
        self._finish(None)

    def on_datagram(self, address: Address, payload: bytes) -> None:
        pass

    def _finish(self, result: tuple[IPAddress, ...] | None) -> None:
        if not self.answer.done():
            self.answer.set_result(result)


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

