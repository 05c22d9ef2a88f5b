"""The life cycle every TCP inbound shares: listen, track connections in their handshake,
run their hand-over tasks, and shut all of it down."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from veil.errors import LocalProtocolError
from veil.net.dialer import Dialer
from veil.protocol.address import Address

log = logging.getLogger("veil.client")


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
