"""The server's idle close, at the client: quiet streams wait for their application, streams
that had just sent fail at once.

A server that holds its destinations' idle closes (FEATURE_HOLDS_IDLE_CLOSES) closes the
session as idle with streams open: each destination had closed it while idle. The client
leaves such a stream's application its connection until it next writes (closing it at once
would be news no site's close brings). But a stream that sent anything (its OPEN, a request)
while that CLOSE was on its way crossed it: the server had heard nothing from the client for
its whole idle close, so those bytes are lost. Left open, that application waited for an
answer that could not come (a hang until its own timeout); it must fail at once (a browser
retries a request that met a reset on a reused connection).

A real client SessionDriver, with each stream relayed to a real socket (the application's
end); the server is a sans-IO Session whose bytes the test hands to the driver.
"""

from __future__ import annotations

import asyncio
import socket

from tests.unit.test_driver_turns import RecordingTransport
from veil.net.driver import SessionDriver, TcpRelay
from veil.protocol.address import Address
from veil.protocol.frames import FEATURE_HOLDS_IDLE_CLOSES, FEATURE_RESOLVE, CloseCode, StreamKind
from veil.protocol.session import IDLE_CLOSE_REASON, Session, SessionConfig
from veil.protocol.shaping import NO_SHAPING

DEST = Address("example.com", 443)
#: The client's reuse limit here (70 s shipped): a stream that sent nothing for this long
#: before the server's idle close was quiet, not crossing it.
REUSE_S = 0.3
CONFIG = SessionConfig(keepalive_interval=None, idle_close=None, shaping=NO_SHAPING,
                       reuse_limit=REUSE_S)
#: How long an application's socket is watched for news it must not get.
QUIET_WATCH_S = 0.2
#: How long one that must get news may wait for it.
NEWS_TIMEOUT_S = 5.0


def closed(app: socket.socket, timeout: float) -> bool:
    """Whether the application's end saw its connection end (FIN or reset) within timeout."""
    app.settimeout(timeout)
    try:
        return app.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def run_close(features: int) -> tuple[bool, bool, bool]:
    """A quiet stream and one that just sent, then the server's idle close: whether each
    application's connection ended at once, and whether the quiet one ended when it wrote."""

    async def main() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        client = Session(client=True, now=loop.time(), config=CONFIG)
        server = Session(client=False, now=loop.time(), config=CONFIG)
        driver = SessionDriver(client)
        tunnel = RecordingTransport()
        driver.connection_made(tunnel)
        listener = socket.create_server(("127.0.0.1", 0))
        apps: list[socket.socket] = []
        relays: list[TcpRelay] = []
        try:
            server.announce_features(features, 64)
            driver.data_received(server.data_to_send())
            for _ in range(2):
                stream_id = client.open_stream(StreamKind.TCP, DEST)
                app = socket.create_connection(listener.getsockname())
                apps.append(app)
                local, _ = listener.accept()
                relay = TcpRelay(driver, stream_id)
                driver.attach(stream_id, relay)
                relays.append(relay)
                await loop.connect_accepted_socket(lambda r=relay: r, local)
                if len(relays) == 1:
                    await asyncio.sleep(REUSE_S + 0.1)  # the first stream goes quiet
            quiet_app, crossing_app = apps
            crossing_app.sendall(b"GET / HTTP/1.1\r\n\r\n")  # sent as the close comes
            for _ in range(500):
                if b"GET" in tunnel.written:  # read and sent on
                    break
                await asyncio.sleep(0.01)
            server.close(CloseCode.NORMAL, IDLE_CLOSE_REASON)
            driver.data_received(server.data_to_send())
            await asyncio.sleep(0.05)
            quiet_ended = closed(quiet_app, QUIET_WATCH_S)
            crossing_ended = closed(crossing_app, NEWS_TIMEOUT_S)
            ended_on_write = quiet_ended
            if not quiet_ended:
                quiet_app.sendall(b"GET / HTTP/1.1\r\n\r\n")  # its next request
                await asyncio.sleep(0.05)
                ended_on_write = closed(quiet_app, NEWS_TIMEOUT_S)
            return quiet_ended, crossing_ended, ended_on_write
        finally:
            for app in apps:
                app.close()
            listener.close()
            for relay in relays:
                if relay.transport is not None:
                    relay.transport.abort()
            await asyncio.sleep(0)

    return asyncio.run(main())


def test_a_server_holding_closes_ends_crossing_streams_at_once_and_quiet_ones_on_use() -> None:
    quiet_ended, crossing_ended, ended_on_write = run_close(
        FEATURE_RESOLVE | FEATURE_HOLDS_IDLE_CLOSES)
    assert crossing_ended, "a request that crossed the idle close was left waiting"
    assert not quiet_ended, "a quiet stream's application was told of a close it had not seen"
    assert ended_on_write, "the quiet stream's next request was left waiting"


def test_a_server_that_holds_no_closes_ends_every_stream_at_once() -> None:
    """Its idle close comes with no stream open at it: streams open here crossed it."""
    quiet_ended, crossing_ended, _ = run_close(FEATURE_RESOLVE)
    assert quiet_ended and crossing_ended
