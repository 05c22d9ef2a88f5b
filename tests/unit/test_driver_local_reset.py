"""A local application that resets its socket ends its own stream, never the session.

Found by the lifecycle lab (tests/lab/test_lifecycle.py, its "third connection"): Chromium
reset its SOCKS connection while the site's own close was crossing the tunnel; passing the
site's FIN on, ``write_eof`` met the reset socket (shutdown: ENOTCONN), the error escaped the
stream's handler, and the whole session died with every other stream on it, and the client
reconnected with no user demand."""

from __future__ import annotations

import asyncio
import socket
import struct

from tests.unit.test_driver_turns import RecordingTransport
from veil.net.driver import SessionDriver, TcpRelay
from veil.protocol.address import Address
from veil.protocol.frames import StreamKind
from veil.protocol.session import Session, SessionConfig, StreamState
from veil.protocol.shaping import NO_SHAPING

DEST = Address("example.com", 443)
QUIET = SessionConfig(keepalive_interval=None, idle_close=None, shaping=NO_SHAPING)


def reset(sock: socket.socket) -> None:
    """Close with an RST, as an application that closes with unread data does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_fin_for_a_local_socket_its_application_reset_ends_only_that_stream() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = Session(client=True, now=loop.time(), config=QUIET)
        server = Session(client=False, now=loop.time(), config=QUIET)
        driver = SessionDriver(client)
        tunnel = RecordingTransport()
        driver.connection_made(tunnel)
        listener = socket.create_server(("127.0.0.1", 0))
        apps: list[socket.socket] = []
        try:
            relays = []
            for _ in range(2):
                stream_id = client.open_stream(StreamKind.TCP, DEST)
                app = socket.create_connection(listener.getsockname())
                apps.append(app)
                local, _ = listener.accept()
                relay = TcpRelay(driver, stream_id)
                driver.attach(stream_id, relay)
                await loop.connect_accepted_socket(lambda r=relay: r, local)
                relays.append((stream_id, relay))
            driver.flush()
            server.receive_data(bytes(tunnel.written), loop.time())  # the OPENs
            (doomed, _), (survivor, survivor_relay) = relays
            reset(apps[0])
            # The site's FIN for the reset stream, read before the loop has seen the reset.
            server.send_eof(doomed)
            driver.data_received(server.data_to_send())
            assert not driver.session.closed, "one stream's local socket closed the session"
            assert client.stream_state(doomed) is StreamState.CLOSED
            # The other stream still carries data both ways.
            server.send_data(survivor, b"still here")
            driver.data_received(server.data_to_send())
            apps[1].settimeout(5)
            assert apps[1].recv(100) == b"still here"
            assert survivor_relay.transport is not None
            assert not survivor_relay.transport.is_closing()
        finally:
            for app in apps[1:]:
                app.close()
            listener.close()
            for _, relay in relays:
                if relay.transport is not None:
                    relay.transport.abort()
            await asyncio.sleep(0)

    asyncio.run(main())
