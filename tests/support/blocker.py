"""A censor in front of one way in, on loopback: a TCP relay whose behaviour a test switches.

Modes (:meth:`Blocker.set_mode`), applied to new connections and to those already relayed:

- ``pass``: relay both ways;
- ``slow``: relay with ``SLOW_ONE_WAY_S`` of delay each way (150 ms RTT), and one read in
  ``SLOW_STALL_ONE_IN`` held ``SLOW_STALL_S`` longer: what 1% packet loss costs a TCP flow
  (a retransmission timeout; TCP hides loss as delay, and on loopback there is no loss to
  make);
- ``reset``: the first bytes from the client (its ClientHello) are read, then the connection
  is reset (RST, as the GFW injects); flows already relayed are reset at once;
- ``blackhole``: accepted, read, never answered; flows already relayed stop passing anything;
- ``cut``: the ClientHello goes to the server and the first ``CUT_AFTER`` bytes of its answer
  come back, then both sides get a FIN (a handshake cut short); flows already relayed are
  closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct

from veil.protocol.address import Address

MODES = ("pass", "slow", "reset", "blackhole", "cut")
#: One read from either side: more than a TLS record.
READ_SIZE = 65536
#: 150 ms RTT: a long intercontinental path.
SLOW_ONE_WAY_S = 0.075
#: One read in this many is held back as a lost segment's retransmission would hold it.
SLOW_STALL_ONE_IN = 100
#: What a retransmission costs at 150 ms RTT (Linux's RTO: RTT plus 200 ms, rounded up).
SLOW_STALL_S = 0.4
#: Bytes of the server's answer that pass in ``cut`` mode: part of its first flight.
CUT_AFTER = 100
#: Spacing between two deliveries of one direction, so that their timers run in order.
ORDER_STEP_S = 1e-6
#: How long close() waits for the relaying tasks (each ends once its sockets are closed).
CLOSE_TIMEOUT_S = 5.0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as an injected reset ends a flow."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Blocker:
    def __init__(self, upstream: Address, seed: int = 1) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.accepted = 0  # connections accepted, in any mode
        self.relayed = 0  # connections relayed to the server in pass or slow mode
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._flows: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if mode in ("reset", "cut"):
            flows, self._flows = self._flows, []
            for client, server in flows:
                if mode == "reset":
                    _reset(client)
                    if server is not None:
                        _reset(server)
                else:
                    client.close()
                    if server is not None:
                        server.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client, server in self._flows:
            client.transport.abort()
            if server is not None:
                server.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=CLOSE_TIMEOUT_S)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self.accepted += 1
        try:
            await self._serve(reader, writer)
        finally:
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        if mode == "blackhole":
            while await reader.read(READ_SIZE):
                pass
            return
        try:
            hello = await reader.read(READ_SIZE)
        except ConnectionError:
            return
        if mode == "reset" or not hello:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream.host,
                                                                 self.upstream.port)
        except OSError:
            return
        try:
            if mode == "slow":
                await asyncio.sleep(SLOW_ONE_WAY_S)  # the ClientHello crosses the path too
            up_writer.write(hello)
            if mode == "cut":
                answer = await up_reader.read(CUT_AFTER)
                writer.write(answer[:CUT_AFTER])
                await writer.drain()
                writer.close()
                return
            self.relayed += 1
            flow = (writer, up_writer)
            self._flows.append(flow)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            with contextlib.suppress(ValueError):
                self._flows.remove(flow)
        except ConnectionError:
            pass
        finally:
            up_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        last_due = 0.0
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except ConnectionError:
                data = b""
            if self.mode == "blackhole":
                if not data:
                    return
                continue  # swallowed
            delay = 0.0
            if self.mode == "slow":
                delay = SLOW_ONE_WAY_S
                if self._rng.randrange(SLOW_STALL_ONE_IN) == 0:
                    delay += SLOW_STALL_S
            # Order is kept: nothing leaves before what came earlier (strictly later: the
            # loop's timers of one instant may run in any order).
            due = max(loop.time() + delay, last_due + ORDER_STEP_S)
            last_due = due
            loop.call_at(due, self._deliver, writer, data)
            if not data:
                await asyncio.sleep(max(0.0, due - loop.time()))  # until the FIN has left
                return

    @staticmethod
    def _deliver(writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.is_closing():
            return
        if data:
            writer.write(data)
        elif writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()
