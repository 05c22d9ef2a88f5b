"""An asyncio server on its own event loop in a thread, for tests that drive it with blocking
sockets (probes, scanners) from the test's thread."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable


class ThreadedServer:
    """``create_server(protocol_factory, "127.0.0.1", 0, ssl=context)`` on a loop of its own;
    ``port`` is the one the system picked. :meth:`close` stops the server and the loop."""

    def __init__(self, protocol_factory: Callable[[], asyncio.BaseProtocol],
                 context: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(protocol_factory, "127.0.0.1", 0, ssl=context),
            self.loop).result(10)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
