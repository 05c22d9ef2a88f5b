"""A stream opened just after the session's connection was lost goes on a new session.

The connection's loss ends the session driver at once, but the slot that removes it from the
tunnel's list hears of it a loop turn later; a stream opened between the two was put on the
ended driver and waited for an answer that could not come (the client's request hung until
its own timeout). Found by the failover test: a censor's reset and the next request arrive
together.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.support.blocker import Blocker
from tests.support.socks_echo import echo as echo_handler
from veil.client.forward import TcpForward
from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.net.client_session import ClientTunnel
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.server.service import VeilServer

LOOPBACK = "127.0.0.1"
#: The request's budget; the tunnel reconnects in ~0.1-0.4 s (its first backoff step).
REQUEST_TIMEOUT_S = 5.0
#: What the request may take: a reconnect, not a hang.
WITHIN_S = 2.0


async def _request(forward: TcpForward) -> bool:
    writer = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(LOOPBACK, forward.address.port)
            writer.write(b"hello")
            return await reader.readexactly(5) == b"hello"
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()


def test_a_stream_right_after_a_reset_does_not_hang(tmp_path: Path) -> None:
    async def main() -> list[tuple[bool, float]]:
        any_port = Address(LOOPBACK, 0)
        state = init_state(tmp_path / "state", listen=Address(LOOPBACK, 443))[0]
        server = VeilServer(state, ServerOptions(listen=any_port, allow_private=True))
        user = server.users.add("alice")
        await server.start()
        echo = await asyncio.start_server(echo_handler, LOOPBACK, 0)
        blocker = Blocker(server.address)
        await blocker.start()
        key = AccessKey(blocker.address, user.secret, state.pin, None, "alice")
        tunnel = ClientTunnel(key)
        forward = TcpForward(tunnel, any_port, Address(LOOPBACK, echo.sockets[0].getsockname()[1]))
        await forward.start()
        tunnel.start()
        results = []
        try:
            assert await _request(forward)
            for _ in range(3):
                blocker.set_mode("reset")  # resets the live session's connection now
                blocker.set_mode("pass")   # and lets the reconnection through
                started = time.monotonic()
                ok = await _request(forward)
                results.append((ok, time.monotonic() - started))
        finally:
            await forward.close()
            await tunnel.close()
            await blocker.close()
            echo.close()
            await server.stop()
        return results

    results = asyncio.run(main())
    assert all(ok and took < WITHIN_S for ok, took in results), results
