"""A recording relay: what a censor's capture of a connection gives the lab's detectors.

Each connection accepted is relayed to ``upstream`` with ``one_way_s`` of delay each way and
recorded as a lab :class:`~veil.lab.flow.Flow`: every read's time, direction and bytes, each
side's FIN (``Flow.ends``), and how it ended. Times are when the bytes, or the FIN, left the
relay toward their receiver. A FIN is passed on as a FIN (half close), so what either side
sends after the other's FIN (its close_notify, its own FIN) is seen too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from veil.lab.flow import Chunk, Direction, Endpoint, Flow
from veil.protocol.address import Address

#: One read from either side: more than a TLS record, so records are seldom split.
READ_SIZE = 65536
#: How long close() waits for the relaying tasks to end: their last delivery is one delay away.
CLOSE_TIMEOUT_S = 5.0


class RecordingRelay:
    """Relays each connection to ``upstream``, delayed ``one_way_s`` each way, and records it
    as a lab Flow."""

    def __init__(self, upstream: Address, one_way_s: float) -> None:
        self.upstream = upstream
        self.one_way_s = one_way_s
        self.flows: list[Flow] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting and drop every connection still open (their flows stay "open")."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        # Each handler ends by itself once its reads fail and their last delivery is due (not
        # cancelled: Python 3.11.7's start_server callback asks a cancelled task for its
        # exception and logs the CancelledError).
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=CLOSE_TIMEOUT_S)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peer = writer.get_extra_info("peername")
        flow = Flow("tcp", Endpoint(peer[0], peer[1]), Endpoint("127.0.0.1", self.upstream.port),
                    time.monotonic(), saw_handshake=True)
        self.flows.append(flow)
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream.host,
                                                                 self.upstream.port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.append(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer, flow, Direction.CLIENT),
                             self._pipe(up_reader, writer, flow, Direction.SERVER))
        # Both FINs have passed (or a side reset): nothing more can cross.
        writer.close()
        up_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    flow: Flow, direction: Direction) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def deliver(data: bytes) -> None:
            if writer.is_closing():
                pass
            elif data:
                flow.chunks.append(Chunk(direction, time.monotonic(), data))
                writer.write(data)
            else:
                flow.close = "fin"
                flow.ends.setdefault(direction, time.monotonic())
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):  # the receiver is gone (it reset)
                        writer.write_eof()
            if not data and not done.done():
                done.set_result(None)

        while True:
            try:
                data = await reader.read(READ_SIZE)
            except ConnectionError:
                data = b""
            loop.call_later(self.one_way_s, deliver, data)  # one delay for all: order is kept
            if not data:
                break
        await done
