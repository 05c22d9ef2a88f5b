"""The veil server: wires state, user store, gate, cover site, sessions and outbound."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import ssl
from dataclasses import dataclass

from veil.net.driver import SessionDriver
from veil.protocol.address import Address
from veil.protocol.events import StreamOpened
from veil.protocol.frames import CloseCode
from veil.protocol.session import Session, SessionConfig
from veil.protocol.shaping import NO_SHAPING
from veil.server.covers import Cover, make_cover
from veil.server.gate import Authenticator, Gate, VeilWayIn
from veil.server.outbound import Outbound
from veil.server.policy import DestinationPolicy
from veil.server.state import ServerState
from veil.server.trojan import TrojanService, TrojanWayIn
from veil.store.base import User

log = logging.getLogger("veil.server")

# The server does not need to ping: clients ping every 15 s when idle. It only needs to notice
# clients that vanished, so its keepalive is slower.
SERVER_SESSION_CONFIG = SessionConfig(keepalive_interval=60.0, keepalive_timeout=30.0)
# The first frame after acceptance is PADDING of a random length in this range, so that the
# server's first record is not of one fixed size.
FIRST_PADDING_RANGE = (64, 512)
# How long shutdown waits for sessions to close after saying CLOSE.
SHUTDOWN_GRACE_S = 2.0
LISTEN_BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class ServerOptions:
    listen: Address
    cover_url: str | None = None
    allow_private: bool = False
    handshake_timeout: float = 60.0
    shaping: bool = True


def server_ssl_context(state: ServerState) -> ssl.SSLContext:
    """TLS settings of a default nginx on Debian: TLS 1.2 and 1.3, HTTP/1.1 by ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("HIGH:!aNULL:!MD5")
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(state.cert_path, state.key_path)
    return context


class VeilServer:
    """One listening port: tunnel for key holders, cover site for everybody else."""

    def __init__(self, state: ServerState, options: ServerOptions,
                 cover: Cover | None = None) -> None:
        self.state = state
        self.options = options
        self.store = state.open_store()
        self.cover = cover or make_cover(options.cover_url)
        policy = DestinationPolicy(options.allow_private)
        self.outbound = Outbound(policy)
        self.trojan = TrojanService(policy)
        own_names = frozenset(n for n in (state.sni,) if n)
        ways_in = (VeilWayIn(Authenticator(self.store), self._start_session),
                   TrojanWayIn(self.store, self.trojan.serve))
        self.gate = Gate(ssl_context=server_ssl_context(state), cover=self.cover,
                         ways_in=ways_in, own_names=own_names,
                         handshake_timeout=options.handshake_timeout)
        self.sessions: dict[SessionDriver, User] = {}
        self._listener: socket.socket | None = None
        self._serve_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> Address:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return Address(host, port)

    async def start(self) -> None:
        listen = self.options.listen
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((listen.host, listen.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._serve_task = asyncio.get_running_loop().create_task(self.gate.serve(sock))
        log.info("listening on %s (cover: %s)", self.address,
                 self.options.cover_url or "built-in site")

    def _start_session(self, transport: asyncio.Transport, user: User, rest: bytes) -> None:
        loop = asyncio.get_running_loop()
        config = SERVER_SESSION_CONFIG
        if not self.options.shaping:
            config = dataclasses.replace(config, shaping=NO_SHAPING)
        session = Session(client=False, now=loop.time(), config=config)
        driver = SessionDriver(session, on_stream_opened=lambda ev: self._open(driver, ev),
                               on_closed=self._session_closed)
        self.sessions[driver] = user
        log.info("session started for user %s", user.name)
        low, high = FIRST_PADDING_RANGE
        session.send_padding(low + int.from_bytes(os.urandom(2), "big") % (high - low))
        transport.set_protocol(driver)
        driver.connection_made(transport)
        if rest:
            driver.data_received(rest)

    def _open(self, driver: SessionDriver, event: StreamOpened) -> None:
        self.outbound.open(driver, event)

    def _session_closed(self, driver: SessionDriver) -> None:
        user = self.sessions.pop(driver, None)
        if user is not None:
            log.info("session ended for user %s", user.name)

    async def stop(self) -> None:
        """Stop accepting, tell sessions to close, wait a little, then cut the rest."""
        if self._serve_task is not None:
            self._serve_task.cancel()
            await asyncio.gather(self._serve_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        self.gate.close()
        drivers = list(self.sessions)
        for driver in drivers:
            driver.close(CloseCode.SHUTDOWN, "server shutting down")
        if drivers:
            await asyncio.wait([d.closed for d in drivers], timeout=SHUTDOWN_GRACE_S)
        self.outbound.close()
        self.trojan.close()
        self.cover.close()
        self.store.close()
        log.info("stopped; %d session(s) closed", len(drivers))
