"""The life cycle every TCP inbound shares: listen, track connections in their handshake,
run their hand-over tasks, and shut all of it down; and, for inbounds whose clients speak a
handshake first (SOCKS5, HTTP proxy), the connection's side of it: the handshake deadline, the
wait for the dialer and the hand-over."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar, cast

from veil.errors import LocalProtocolError, VeilError
from veil.net.dialer import Dialer
from veil.protocol.address import Address

log = logging.getLogger("veil.client")

#: Once the dialer knows why it cannot open streams (the server down or unreachable, the key
#: refused: Dialer.why_not_ready), a request waits this much longer for its next attempt
#: (the first reconnect comes within a second) instead of the whole ready_timeout, then
#: fails with that reason: an app that hangs 15 s tells its user nothing.
FAIL_FAST_S = 1.0


class Abortable(Protocol):
    def abort(self) -> None: ...


class TcpInbound(abc.ABC):
    """A listener whose connections are handed to a :class:`Dialer` once their handshake ends.

    Subclasses say what protocol serves an accepted connection (:meth:`_make_protocol`); the
    protocols register themselves in ``_live`` while the inbound owns them and run their
    hand-over with :meth:`_spawn`. Connections handed to the dialer belong to the dialer.
    """

    #: How the inbound is named in messages ("SOCKS5 inbound", ...).
    name = "inbound"

    def __init__(self, dialer: Dialer, listen: Address) -> None:
        self.dialer = dialer
        self.listen = listen
        self._server: asyncio.Server | None = None
        self._live: set[Abortable] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @abc.abstractmethod
    def _make_protocol(self) -> asyncio.Protocol:
        """The protocol for one accepted connection."""

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError if the address cannot be bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_protocol, self.listen.host,
                                                self.listen.port)

    @property
    def address(self) -> Address:
        """The address actually bound (the first socket, if the host had several)."""
        if self._server is None or not self._server.sockets:
            raise LocalProtocolError(f"{self.name} is not started", code="state")
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    async def close(self) -> None:
        """Stop accepting, abort connections the inbound still owns, wait for their tasks."""
        if self._server is not None:
            self._server.close()
        count = len(self._live)
        for proto in list(self._live):
            proto.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await asyncio.sleep(0)  # let the aborted transports run connection_lost
        if count:
            log.debug("%s: aborted %d connections at shutdown", self.name, count)

    def _spawn(self, coro: Coroutine[Any, Any, None],
               abort: Callable[[], None]) -> asyncio.Task[None]:
        """Run a connection's task; if it fails unexpectedly, ``abort`` its connection."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._reap(done, abort))
        return task

    def _reap(self, task: asyncio.Task[None], abort: Callable[[], None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            abort()  # a dialer bug must not leave a paused socket open forever
            log.error("%s connection task failed", self.name, exc_info=exc)


class HandshakeInbound(TcpInbound):
    """A :class:`TcpInbound` whose clients speak a handshake before saying where to go.

    Each connection has ``handshake_timeout`` from connecting to finishing its handshake, then
    waits up to ``ready_timeout`` for the dialer; its protocol is a :class:`HandshakeConnection`.
    """

    def __init__(self, dialer: Dialer, listen: Address, *, ready_timeout: float,
                 handshake_timeout: float) -> None:
        super().__init__(dialer, listen)
        self.ready_timeout = ready_timeout
        self.handshake_timeout = handshake_timeout


InboundT = TypeVar("InboundT", bound=HandshakeInbound)


class HandshakeConnection(asyncio.Protocol, Generic[InboundT]):
    """One accepted connection of a :class:`HandshakeInbound` until it is handed over or refused.

    From ``connection_made`` the inbound owns it (``close()`` aborts it) and its handshake
    deadline runs; a subclass parses the handshake, calls :meth:`_start_handover` with its
    hand-over coroutine once the destination is known, and in that coroutine awaits
    :meth:`_wait_ready` and ends with :meth:`_hand_over`.
    """

    #: How debug messages name the inbound ("socks5", "http proxy"), in the subclass's logger.
    log_name = "inbound"
    _log = log

    def __init__(self, inbound: InboundT) -> None:
        self._inbound = inbound
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._inbound._live.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._inbound.handshake_timeout, self.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._inbound._live.discard(self)
        if self._task is not None:
            self._task.cancel()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_handover(self, transport: asyncio.Transport,
                        coro: Coroutine[Any, Any, None]) -> None:
        """The handshake is done: stop its deadline and run ``coro`` (the wait and hand-over).

        Further bytes are held in the kernel while we wait for the tunnel; what already
        arrived stays in the parser as early data.
        """
        transport.pause_reading()
        self._cancel_timer()
        self._task = self._inbound._spawn(coro, self.abort)

    async def _wait_ready(self, dest: Address | None = None) -> bool:
        """Whether the dialer became ready within the inbound's ``ready_timeout``: for a
        stream to ``dest``, or (None) for anything (a UDP association)."""
        dialer = self._inbound.dialer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._inbound.ready_timeout
        try:
            while True:
                # In slices: once the dialer knows why it cannot serve (the server is down,
                # refused the key), one more slice for its next attempt, then fail, saying why.
                failing = dialer.why_not_ready() is not None
                started = loop.time()
                wait = min(FAIL_FAST_S, deadline - started)
                if dest is None:
                    ready = await dialer.wait_ready(wait)
                else:
                    ready = await dialer.wait_ready_for(dest, wait)
                now = loop.time()
                # A "no" long before the slice ran out is the dialer's last word (e.g. a
                # blocked destination): asking again would only spin. (Half: timers may fire
                # a clock tick early.)
                if ready or failing or now >= deadline or now - started < wait / 2:
                    break
        except VeilError as exc:
            self._log.debug("%s: dialer not ready: %s", self.log_name, exc.code)
            return False
        if not ready:
            # Why, without the destination (never logged): the tunnel's own reason.
            self._log.info("%s: a request failed: %s", self.log_name, self.why_not_ready())
        return ready

    def why_not_ready(self) -> str:
        """Why the last wait failed, as the client can be told."""
        return (self._inbound.dialer.why_not_ready()
                or f"no connection to the server within {self._inbound.ready_timeout:g} s")

    def _hand_over(self, transport: asyncio.Transport, dest: Address, early: bytes) -> None:
        """Give ``transport`` to the dialer: from here on it belongs to the dialer."""
        self._inbound._live.discard(self)
        self._task = None
        # Hand over in the normal (reading) state; the dialer pauses it if it needs to. No data
        # can be delivered in between: both calls run in this loop turn.
        transport.resume_reading()
        self._inbound.dialer.open_tcp(dest, transport, early)
