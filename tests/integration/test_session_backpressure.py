"""The session driver stops reading its peer while the session's unsent output is over its
bound: a client that opens streams it may not open (each refused with a RESET) and never reads
the RESETs makes the server hold at most its bound, and then waits in its own send.

The driver's bound (net/driver.py SESSION_UNSENT_SLACK) sits below the TLS carrier's
(tests/integration/test_carrier_backpressure.py): this checks that the session's acts first.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from tests.integration.test_carrier_backpressure import (
    PUSH,
    STALL_S,
    TIMEOUT,
    Peer,
    client_context,
    server_context,
    small_buffers,
    unread,
)
from veil.net.driver import SESSION_UNSENT_SLACK, SessionDriver
from veil.protocol.address import Address
from veil.protocol.frames import FrameType, StreamKind, frame
from veil.protocol.session import Session, SessionConfig
from veil.transport.tls import start_tls_server

# A server that takes no streams at all: every OPEN is answered with a RESET.
REFUSE_ALL = SessionConfig(max_streams=0, keepalive_interval=None)
OPEN_BODY = bytes((StreamKind.TCP,)) + Address("192.0.2.1", 80).encode()
# What one received batch (256 KiB of OPENs) is answered with, beyond the bound.
BATCH_ANSWERS = 256 * 1024


def push_opens(tls: ssl.SSLSocket) -> int:
    """Send OPENs for ever new streams until PUSH bytes or a stall; never read."""
    tls.settimeout(STALL_S)
    sent, stream_id, pending = 0, 1, memoryview(b"")
    try:
        while sent < PUSH:
            if not pending:
                chunk = bytearray()
                while len(chunk) < 64 * 1024:
                    chunk += frame(FrameType.OPEN, stream_id, OPEN_BODY)
                    stream_id += 2
                pending = memoryview(bytes(chunk))
            n = tls.send(pending)
            sent += n
            pending = pending[n:]
    except (TimeoutError, ssl.SSLWantWriteError, OSError):
        pass
    return sent


def test_the_driver_stops_reading_while_the_session_owes_too_much(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def push(peer: Peer) -> None:
            raw = socket.socket()
            small_buffers(raw)
            raw.connect(("127.0.0.1", port))
            with client_context().wrap_socket(raw) as tls:
                peer.sent = push_opens(tls)
                peer.release.wait(TIMEOUT)

        peer = Peer(push)
        sock, _ = await loop.sock_accept(listener)
        listener.close()
        small_buffers(sock)
        driver = SessionDriver(Session(client=False, now=loop.time(), config=REFUSE_ALL))
        transport = await start_tls_server(sock, server_context(tmp_path), lambda: driver,
                                           TIMEOUT)
        high = transport.get_write_buffer_limits()[1]
        peak = 0
        while peer.sent is None:
            peak = max(peak, transport.get_write_buffer_size())
            await asyncio.sleep(0.01)
        waiting = unread(transport)
        sent = await peer.finish()
        transport.abort()
        print(f"\nOPENs refused and never read: the peer pushed {sent >> 10} KiB before its "
              f"send stalled; the session's unsent output peaked at {peak >> 10} KiB (bound "
              f"{high >> 10} + {SESSION_UNSENT_SLACK >> 10} KiB), {waiting >> 10} KiB unread")
        assert sent < PUSH
        assert peak < high + SESSION_UNSENT_SLACK + BATCH_ANSWERS
        assert waiting > 0

    asyncio.run(main())
