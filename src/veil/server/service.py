"""The veil server: wires state, user store, gate, cover site, sessions and outbound."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import x25519

from veil.config import ServerOptions
from veil.cover.backends import BuiltinCover, Cover, make_cover
from veil.errors import ConfigError
from veil.manage.fleet import Facts, HostSampler, heartbeat_info, server_id
from veil.manage.libssl import set_ticket_keys
from veil.manage.state import ServerState, load_state, record_start, server_ssl_context
from veil.manage.users import TUN_POOLS_SETTING, UserManager
from veil.net.driver import SessionDriver
from veil.net.noise_channel import NoiseServerChannel, SealedTransport
from veil.net.stripe import PoolRegistry
from veil.protocol.address import Address
from veil.protocol.auth import AUTH_SIZE
from veil.protocol.endpoint import tls_endpoint
from veil.protocol.events import JoinRequested, StreamOpened
from veil.protocol.frames import (
    SERVER_FIRST_PADDING,
    CloseCode,
    ResetCode,
    StreamKind,
)
from veil.protocol.report import decode_report, way_label
from veil.protocol.session import Session, SessionConfig
from veil.protocol.shaping import NO_SHAPING
from veil.protocol.trojan import TrojanRequest, password_hash_for_secret
from veil.server.acme import CertificateRenewer, acme_directory_for
from veil.server.alerts import Alerts, Webhook
from veil.server.blocks import ALERT_COOLDOWN_S, BlockAlert, BlockTracker, run_alert_command
from veil.server.borrow import Borrowed
from veil.server.gate import Authenticator, Gate, VeilWayIn, WayIn
from veil.server.live import Live, LiveConnection, UserDirectory
from veil.server.outbound import Outbound, session_features
from veil.server.policy import DestinationPolicy, local_addresses, server_resolver
from veil.server.shared import SharedReplayFilter, SharedUsers, WorkerRole
from veil.server.status import BoundCounts, ConnectionStatus, GateCounts, ServerStatus
from veil.server.subscription import SubscriptionResponder
from veil.server.trojan import TrojanOrNoise, TrojanService, TrojanWayIn
from veil.store.base import User
from veil.transport.cdn.server import CarrierServer
from veil.transport.tls13.server import ShapeError

if TYPE_CHECKING:
    from veil.server.tun import TunServer

log = logging.getLogger("veil.server")

# What the start-up line tells the operator of a server without a DNS name to do.
_NO_NAME_REMEDY = ("give it a DNS name (--public NAME[:PORT]: a CA certificate over ACME; then "
                   "hand out the keys again), or borrow a real site's identity (--borrow "
                   "HOST, experimental; docs/operations.md)")

# The server never pings, as nginx never does: a client pings with its own writes after a
# silence (veil.protocol.session), and a client that vanished is found by TCP keepalive
# (veil.transport.tcp.SERVER_KEEPALIVE). A session with no stream open is closed after
# ServerOptions.idle_close (nginx's keepalive_timeout), as nginx closes an idle keepalive
# connection; veil's clients leave that close to the server, as browsers leave it to nginx
# (veil.protocol.session.DEFAULT_REUSE_LIMIT).
SERVER_SESSION_CONFIG = SessionConfig(keepalive_interval=None)
# Through a CDN the server pings a session with streams open after ~45 s of silence (34-56 s):
# CDNs cut a request that carries nothing for ~100 s (Cloudflare's limit; nginx's
# proxy_read_timeout), which would end an idle SSH login; a WebSocket or a streaming response
# with a heartbeat is what web apps behind CDNs look like anyway.
CDN_IDLE_PING_S = 45.0
#: How the CDN carriers' sessions and Trojan connections are named in metrics and logs.
CDN_WAY_IN = "cdn"
TROJAN_CDN_WAY_IN = "trojan-cdn"
# The first frame after acceptance is PADDING of a random length in this range, so that the
# server's first record is not of one fixed size.
# How long shutdown waits for sessions to close after saying CLOSE.
SHUTDOWN_GRACE_S = 2.0
LISTEN_BACKLOG = 1024




def _listening_socket(listen: Address) -> socket.socket:
    """A listening TCP socket on ``listen``; an OSError naming the address if it cannot be."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, str(listen)) from exc
    return sock


class VeilServer:
    """One listening port: tunnel for key holders, cover site for everybody else."""

    def __init__(self, state: ServerState, options: ServerOptions,
                 cover: Cover | None = None, worker: WorkerRole | None = None) -> None:
        self.state = state
        self.options = options
        #: One worker of several (``--workers N``): its sockets, shared replay table and
        #: ticket keys come from the parent (veil.server.workers); None: the only process.
        self.worker = worker
        self.started_at = time.time()
        # User management for in-process callers (tests, embedding); the admin panel and the
        # live view each open their own store and use it from a worker thread.
        self.store = state.open_store()
        self.users = UserManager(state, self.store)
        self.live = Live(state.open_store, trojan_hash=password_hash_for_secret,
                         max_sessions_per_user=options.max_sessions_per_user,
                         max_devices_per_user=options.max_devices_per_user,
                         max_sessions=options.max_sessions, user_rate=options.user_rate,
                         ids=itertools.count(worker.index + 1, worker.count)
                         if worker is not None else None)
        self.host = HostSampler()  # the heartbeat's own: rates are between two heartbeats
        self.alerts: Alerts | None = None
        if options.alert_webhook is not None:
            self.alerts = Alerts(Webhook(options.alert_webhook), lambda: self.state,
                                 lambda: self.live.directory, lambda: self.live.server_id)
        self._alerts_task: asyncio.Task[None] | None = None
        # The CDN ways in: their secret paths on the built-in site's HTTP/1.1, each carrier
        # a Noise channel to a session (veil.net.noise_channel).
        self.carriers: CarrierServer | None = None
        cdn_paths = [way.path for way in options.via if way.through_cdn]
        if cdn_paths:
            if options.cover_url is not None:
                raise ConfigError("--via https:// or wss:// needs the built-in cover site: a "
                                  "--cover URL relays the CDN's requests without reading "
                                  "them, so no secret path could be served")
            noise_private = state.noise_private
            assert noise_private is not None  # load_state makes one
            def noise() -> asyncio.Protocol:
                return NoiseServerChannel(noise_private, self._cdn_request)
            factory = noise
            if options.trojan:  # the apps' trojan-ws on the same paths (server/trojan.py)
                cdn_trojan = TrojanWayIn(self.live, self._serve_trojan_cdn, through_cdn=True)

                def factory() -> asyncio.Protocol:
                    return TrojanOrNoise(cdn_trojan, noise)
            self.carriers = CarrierServer(cdn_paths, factory)
        # A borrowed identity's cover is the borrowed site itself, relayed byte for byte.
        cover_url = options.cover_url or (f"https://{options.borrow}" if options.borrow
                                          else None)
        self.cover = cover or make_cover(cover_url, state.site_seed, self.carriers)
        # The users' subscriptions, on the built-in site of every way in (a URL cover relays
        # bytes it does not read: it has none).
        self.subscriptions: SubscriptionResponder | None = None
        if isinstance(self.cover, BuiltinCover):
            self.subscriptions = SubscriptionResponder(lambda: self.state, self.live,
                                                       routing=options.routing != "none")
            self.cover.site.responder = self.subscriptions
        policy = DestinationPolicy.for_server(
            options.allow_private,
            [options.listen.host, *(a.host for a in options.also_listen), state.public.host,
             *local_addresses()], options.refused_tcp_ports)
        self.outbound = Outbound(policy, self.live.outbound_slots,
                                 block_bittorrent=options.block_bittorrent)
        self.trojan = TrojanService(policy, self.live.outbound_slots,
                                    block_bittorrent=options.block_bittorrent)
        own_names = frozenset(n for n in (state.sni,) if n)
        self._replay = SharedReplayFilter(worker.replay_fd) if worker is not None else None
        if worker is not None:
            self.live.shared = SharedUsers(worker.users_fd, worker.index)
        self._authenticator = Authenticator(self.live, replay=self._replay)
        ways_in: list[WayIn] = [VeilWayIn(self._authenticator, self._start_session)]
        if options.trojan:
            ways_in.append(TrojanWayIn(self.live, self._serve_trojan))
        self.gate = Gate(ssl_context=self._ssl_context(state),
                         cover=self.cover,
                         ways_in=ways_in, own_names=own_names,
                         handshake_timeout=options.handshake_timeout,
                         borrow=self._borrowed(state, options))
        self.sessions: dict[SessionDriver, LiveConnection] = {}
        # Each client pool's sessions, grouped for striping (veil.net.stripe).
        self.pools = PoolRegistry()
        self._flood_closes = 0  # sessions closed for a flood of frames that do nothing
        # Blocks the clients report, per way in (veil.server.blocks), and --on-block's runs.
        self.blocks = BlockTracker(self._way_labels())
        self._alert_tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []
        self._serve_tasks: list[asyncio.Task[None]] = []
        self.tun: TunServer | None = None
        # The CA certificate for a DNS name (veil.server.acme), None: not asked for.
        directory_url = acme_directory_for(options, state)
        self.acme: CertificateRenewer | None = None
        if directory_url is not None and options.borrow is None:  # a borrowed site shows its own
            self.acme = CertificateRenewer(directory_url, options, lambda: self.state,
                                           self.gate.acme_challenges, self.reload)
        self._acme_task: asyncio.Task[None] | None = None

    def _ssl_context(self, state: ServerState) -> ssl.SSLContext:
        """The tunnel port's TLS context; a worker's with the ticket keys all workers share."""
        context = server_ssl_context(state, self.cover.alpn_protocols)
        if self.worker is not None:
            set_ticket_keys(context, self.worker.ticket_keys)
        return context

    @property
    def address(self) -> Address:
        """The first ``--listen`` address, as bound (the port the system picked for 0)."""
        return self.addresses[0]

    @property
    def addresses(self) -> tuple[Address, ...]:
        """Every address listened on, in ``--listen`` order."""
        assert self._listeners
        return tuple(Address(*sock.getsockname()[:2]) for sock in self._listeners)

    @staticmethod
    def _borrowed(state: ServerState, options: ServerOptions) -> Borrowed | None:
        if options.borrow is None:
            return None
        assert state.noise_private is not None  # load_state makes one
        return Borrowed(options.borrow, options.borrow.host,
                        x25519.X25519PrivateKey.from_private_bytes(state.noise_private))

    async def start(self) -> None:
        await self.live.start()
        if self.gate.borrow is not None:
            try:  # learnt again on the first veil client if the site is down now
                await self.gate.borrow.learn()
            except (OSError, TimeoutError, ShapeError) as exc:
                log.warning("borrowed identity: cannot reach %s yet: %s",
                            self.gate.borrow.target, exc)
        if self.options.tun:
            from veil.server.tun import TunServer, TunServerOptions  # Linux only  # noqa: PLC0415

            self.tun = TunServer(TunServerOptions.parse(
                self.options.pool, self.options.pool6, allow_private=self.options.allow_private,
                refused_tcp_ports=self.options.refused_tcp_ports))
            await self.tun.start()
            self.tun.set_users(self.live.directory.by_name.values())
            self.live.on_directory = self._tun_users
        try:
            if self.worker is not None:
                self._listeners = list(self.worker.listeners)
            else:
                for listen in (self.options.listen, *self.options.also_listen):
                    self._listeners.append(_listening_socket(listen))
        except OSError:
            for sock in self._listeners:
                sock.close()
            self._listeners = []
            raise
        # Named by the address bound (a --listen port 0 is a port now), the server joins the
        # fleet's table now, before it says it listens: a panel asked at once lists it.
        self.live.server_id = server_id(str(self.address))
        if self.worker is None:  # a worker's parent beats for the whole server
            self.live.heartbeat = self._heartbeat
        await self.live.tick()
        if self.tun is not None:
            # Sites overlapping this pool are refused by `veil user add --site` from now on.
            pools = " ".join(str(p) for p in (self.tun.options.pool, self.tun.options.pool6)
                             if p is not None)
            await asyncio.to_thread(self.store.set_setting,
                                    TUN_POOLS_SETTING + self.live.server_id, pools)
        loop = asyncio.get_running_loop()
        self._serve_tasks = [loop.create_task(self.gate.serve(sock)) for sock in self._listeners]
        try:  # before "listening on": whoever waits for that line may export links at once
            if self.worker is None or self.worker.index == 0:  # one writer of config.json
                await asyncio.to_thread(record_start, self.state.directory,
                                        trojan=self.options.trojan, via=self.options.via,
                                        routing=self.options.routing)
        except ConfigError as exc:
            log.error("%s: `veil user show` may say the wrong thing", exc)
        self.state = self.users.state = dataclasses.replace(
            self.state, trojan=self.options.trojan, via=self.options.via,
            routing=self.options.routing)
        self.blocks.set_ways(self._way_labels())
        log.info("listening on %s (cover: %s)", ", ".join(map(str, self.addresses)),
                 f"borrowed identity of {self.options.borrow} (experimental)"
                 if self.options.borrow else self.options.cover_url or "built-in site")
        level, plan = self._certificate_plan()
        log.log(level, "certificate: %s", plan)
        if self.acme is not None:
            self._acme_task = loop.create_task(self.acme.run())
        if self.alerts is not None:
            self._alerts_task = loop.create_task(self.alerts.run())
        if self.state.via:
            log.info("keys name these ways in after %s: %s", self.state.public,
                     ", ".join(map(str, self.state.via)))  # no secret paths in logs
        if self.options.trojan:
            if "h2" in self.cover.alpn_protocols:
                log.info("Trojan way in on: a stranger's h2 connection that says nothing gets "
                         "the cover's SETTINGS %.0f ms after the handshake, not at once as "
                         "from nginx (~0.02 ms), a gap a prober can measure; without "
                         "--trojan there is none (docs/operations.md, \"The Trojan way in\")",
                         self.gate.greeting_grace * 1000)
            else:
                log.info("Trojan way in on (the cover offers no h2, so strangers see no "
                         "difference; docs/operations.md, \"The Trojan way in\")")

    def _certificate_plan(self) -> tuple[int, str]:
        """(log level, one line): what certificate strangers see and why, and, when it is not
        the most unremarkable there is, what a censor sees and what to do (issue #18)."""
        state = self.state
        if self.options.borrow is not None:
            return logging.INFO, (f"none of its own: {self.options.borrow}'s, relayed to "
                                  f"everyone but veil's clients (--borrow, experimental)")
        if state.cert_source == "operator":
            return logging.INFO, f"the operator's ({state.cert_path}, --cert)"
        if self.acme is not None:
            return logging.INFO, (
                f"a CA's for {state.sni}, over ACME from {self.acme.directory_url} (validated "
                f"on this port with TLS-ALPN-01, renewed with a third of its life left), as a "
                f"public website has; presenting the {state.cert_source} one until it comes")
        if state.sni is None:  # the public address is an IP literal (state.default_sni)
            return logging.WARNING, (
                f"self-signed, and keys name this server by its IP address "
                f"{state.public.host}: a censor sees a self-signed certificate and TLS "
                f"ClientHellos with no server name (SNI; nDPI flags \"Missing SNI\"), which "
                f"public websites rarely show. To look unremarkable: {_NO_NAME_REMEDY}")
        if self.options.self_signed:
            return logging.INFO, (
                f"self-signed for {state.sni}, as asked (--self-signed): a censor who fetches "
                f"it sees a certificate no public website shows; without --self-signed it "
                f"comes from a CA over ACME")
        return logging.WARNING, (
            f"self-signed for {state.sni}: no public CA issues for that name, so a censor who "
            f"fetches it sees a certificate no public website shows; --acme-directory names "
            f"a CA that does, or use a public DNS name")

    def _cdn_request(self, auth: bytes, binding: bytes) -> Callable[[SealedTransport], None] | str:
        """A Noise handshake through a CDN way in: its authenticator, bound to the client's
        ephemeral key, decides as on the TLS port (the same users, replay filter and
        refusals); a refusal is answered inside Noise, which only the key's holder reads."""
        if len(auth) != AUTH_SIZE:
            return "malformed"
        user, reason = self._authenticator.check(auth, binding)
        if user is None:
            log.info("CDN way in: key refused (%s)", reason)
            return reason

        def start(sealed: SealedTransport) -> None:
            self.gate.stats.accept(CDN_WAY_IN)
            self._start_session(sealed, user, b"", way_in=CDN_WAY_IN, idle_ping=CDN_IDLE_PING_S)
            sealed.release()
        return start

    def _way_in_names(self) -> tuple[str, ...]:
        """The ways in as metrics name them: the TLS port's, then the CDN carriers'."""
        names = [w.name for w in self.gate.ways_in]
        if self.carriers is not None:
            names.append(CDN_WAY_IN)
            if self.options.trojan:
                names.append(TROJAN_CDN_WAY_IN)
        return tuple(names)

    def _way_labels(self) -> list[str]:
        """The ways in keys name, as block reports name them (no secret paths)."""
        return [way_label(way) for way in (tls_endpoint(self.state.public), *self.options.via)]

    def _report(self, user: User, payload: bytes) -> None:
        """A block report from one of ``user``'s sessions."""
        try:
            entries = decode_report(payload)
        except ValueError as exc:
            log.debug("ignored a malformed block report from user %s: %s", user.name, exc)
            return
        if entries is None:
            return  # a newer version: padding to us
        log.debug("user %s reports blocked: %s", user.name,
                  ", ".join(f"{e.endpoint or e.way} ({e.kind})" for e in entries))
        self._alert(self.blocks.reported(user.name, entries, time.time()))

    def _alert(self, alerts: list[BlockAlert]) -> None:
        for alert in alerts:
            hook = self.options.on_block
            log.warning("%s%s", alert.describe(),
                        f"; running {hook[0]}" if hook else " (no --on-block command)")
            if self.alerts is not None:
                self.alerts.blocked(alert, ALERT_COOLDOWN_S)
            if hook:
                task = asyncio.get_running_loop().create_task(run_alert_command(hook, alert))
                self._alert_tasks.add(task)
                task.add_done_callback(self._alert_tasks.discard)

    def _start_session(self, transport: asyncio.Transport, user: User, rest: bytes,
                       way_in: str = "veil", idle_ping: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        idle = self.options.idle_close
        config = dataclasses.replace(SERVER_SESSION_CONFIG, idle_close=(idle, idle),
                                     idle_ping=idle_ping)
        if not self.options.shaping:
            config = dataclasses.replace(config, shaping=NO_SHAPING)
        session = Session(client=False, now=loop.time(), config=config)
        driver = SessionDriver(session, on_stream_opened=lambda ev: self._open(driver, ev),
                               on_closed=self._session_closed,
                               on_report=lambda payload: self._report(user, payload))
        self._alert(self.blocks.active(user.name, time.time()))
        self.sessions[driver] = self.live.register(
            user, way_in, transport,
            close=lambda reason: driver.close(CloseCode.REVOKED, reason),
            streams=lambda: len(driver.handlers))
        log.info("session started for user %s", user.name)
        low, high = SERVER_FIRST_PADDING
        session.announce_features(session_features(),
                                  low + int.from_bytes(os.urandom(2), "big") % (high - low))
        driver.on_join = functools.partial(self._join, driver, user.name)
        transport.set_protocol(driver)
        driver.connection_made(transport)
        if rest:
            driver.data_received(rest)

    def _join(self, driver: SessionDriver, user: str, event: JoinRequested) -> None:
        """The client's JOIN: group this session with the user's others of that pool
        (veil.protocol.stripe), in this process; a full group leaves it out, unanswered."""
        token = self.pools.join(user, event.pool_id, driver)
        if token is not None:
            driver.session.answer_join(token)
            driver.flush()

    def _open(self, driver: SessionDriver, event: StreamOpened) -> None:
        self.live.note_stream_opened()
        conn = self.sessions.get(driver)
        if event.kind is StreamKind.IP:
            if self.tun is None or conn is None:
                driver.session.reset(event.stream_id, ResetCode.REFUSED_DESTINATION)
                driver.flush()
            else:
                self.tun.open(driver, event, conn.user.name)
            return
        if event.kind is StreamKind.RESOLVE:
            self.outbound.resolve(driver, event)
            return
        self.outbound.open(driver, event, conn.user.name if conn is not None else "")

    def _tun_users(self, directory: UserDirectory) -> None:
        if self.tun is not None:
            self.tun.set_users(directory.by_name.values())

    def _session_closed(self, driver: SessionDriver) -> None:
        conn = self.sessions.pop(driver, None)
        if driver.session.flood is not None:
            self._flood_closes += 1
            log.warning("closed a session of user %s: %s", conn.user.name if conn else "?",
                        driver.session.flood)
        if conn is not None:
            self.live.unregister(conn)
            log.info("session ended for user %s", conn.user.name)
            self._alert(self.blocks.active(conn.user.name, time.time()))

    def _serve_trojan(self, transport: asyncio.Transport, user: User, request: TrojanRequest,
                      rest: bytes, way_in: str = "trojan") -> None:
        self.live.register(user, way_in, transport, close=lambda _reason: transport.close())
        self.trojan.serve(transport, user, request, rest)

    def _serve_trojan_cdn(self, transport: asyncio.Transport, user: User,
                          request: TrojanRequest, rest: bytes) -> None:
        self.gate.stats.accept(TROJAN_CDN_WAY_IN)
        self._serve_trojan(transport, user, request, rest, way_in=TROJAN_CDN_WAY_IN)

    async def reload(self) -> None:
        """Re-read the certificate (new handshakes use it; renews a self-signed one that is
        due) and the users, without touching live sessions (SIGHUP)."""
        state = await asyncio.to_thread(load_state, self.state.directory, self.state.db)
        if state.pin != self.state.pin:
            log.warning("the certificate has a new key: access keys pin the old one and stop "
                        "working; hand out new keys with `veil user show`")
        # The same ALPN as at start: a reload must not turn h2 off (a prober would see the
        # server change what it offers once a day).
        self.gate.ssl_context = self._ssl_context(state)
        self.state = self.users.state = state
        self.blocks.set_ways(self._way_labels())
        await self.live.tick()
        log.info("reloaded the certificate and %d user(s)", len(self.live.directory.by_name))

    async def stop(self) -> None:
        """Stop accepting, tell sessions to close, wait a little, then cut the rest."""
        for background in (self._acme_task, self._alerts_task):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        if self.acme is not None:  # after the task: an order it abandons is no failure
            await self.acme.stop()
        for task in self._serve_tasks:
            task.cancel()
        await asyncio.gather(*self._serve_tasks, return_exceptions=True)
        if self.worker is None:  # a worker's belong to the parent, which keeps them open
            for sock in self._listeners:
                sock.close()
        self.gate.close()
        drivers = list(self.sessions)
        for driver in drivers:
            driver.close(CloseCode.SHUTDOWN, "server shutting down")
        if drivers:
            await asyncio.wait([d.closed for d in drivers], timeout=SHUTDOWN_GRACE_S)
        self.outbound.close()
        for task in list(self._alert_tasks):
            task.cancel()
        await asyncio.gather(*self._alert_tasks, return_exceptions=True)
        if self.tun is not None:
            await self.tun.stop()
        self.trojan.close()
        if self.carriers is not None:
            self.carriers.close()
        self.cover.close()
        await self.live.stop()
        if self._replay is not None:
            self._replay.close()
        if self.live.shared is not None:
            self.live.shared.close()
        self.store.close()
        log.info("stopped; %d session(s) closed", len(drivers))

    def _heartbeat(self) -> Callable[[], str]:
        live = self.live
        facts = Facts(str(self.address), str(self.state.public), self.started_at,
                      len(live.connections), sum(u.up for u in live.user_bytes.values()),
                      sum(u.down for u in live.user_bytes.values()), self.state.cert_path)
        host = self.host
        return lambda: heartbeat_info(facts, host.sample())

    def status(self) -> ServerStatus:
        """What the admin panel and ``/metrics`` see of this server
        (:class:`veil.server.status.StatusSource`): a snapshot, no I/O."""
        live, stats = self.live, self.gate.stats
        listen = self.address if self._listeners else self.options.listen
        users: dict[str, int] = {}
        for name in live.directory.by_name:
            status = live.directory.refused.get(name, "active")
            users[status] = users.get(status, 0) + 1
        connections = tuple(
            ConnectionStatus(id=c.id, user=c.user.name, way_in=c.way_in, peer=c.peer,
                             started_at=c.started_at, bytes_up=c.bytes_up,
                             bytes_down=c.bytes_down, streams=c.streams)
            for c in sorted(live.connections.values(), key=lambda c: c.id))
        return ServerStatus(
            state=self.state, started_at=self.started_at, listen=str(listen),
            server_id=self.live.server_id,
            cover_url=self.options.cover_url, tun=self.options.tun,
            ways_in=self._way_in_names(), connections=connections,
            user_bytes=dict(live.user_bytes), users=users,
            store_refresh_failures=live.refresh_failures,
            gate=GateCounts(accepted=dict(stats.accepted), cover_plain=stats.cover_plain,
                            cover_foreign_sni=stats.cover_foreign_sni, silent=stats.silent,
                            rejected=dict(stats.rejected or {}), tls_failed=stats.tls_failed),
            bounds=self._bound_counts(), blocked_ways=self.blocks.snapshot(time.time()))

    def _bound_counts(self) -> BoundCounts:
        slots, resolver = self.live.outbound_slots, server_resolver()
        udp = {way_in: {"send_buffer_full": dropped.paused, "queue_full": dropped.queue_full,
                        "resolving": dropped.resolving}
               for way_in, dropped in (("veil", self.outbound.udp_dropped),
                                       ("trojan", self.trojan.dialer.dropped))}
        return BoundCounts(
            pending_dropped=self.gate.stats.dropped,
            replay_unrecorded=self._authenticator.replay.unrecorded,
            outbound_refused_user=slots.refused_user, outbound_refused_server=slots.refused_server,
            resolver_refused=resolver.refused, resolver_timed_out=resolver.timed_out,
            sessions_flooding=self._flood_closes, udp_dropped=udp,
            tun_dropped=self.tun.dropped if self.tun is not None else 0,
            tun_spoofed=self.tun.spoofed if self.tun is not None else 0,
            tun_filtered=self.tun.filtered if self.tun is not None else 0)
