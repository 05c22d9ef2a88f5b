"""How a session answers its peer's close: as nginx and Chromium answer one, with a FIN and no
close_notify of its own, once the peer's close has arrived; and within PEER_CLOSE_GRACE_S when
a peer says CLOSE and then keeps the connection open.

A real TLS server (transport/tls.py) runs a server-side SessionDriver on loopback; the peer is
a plain Python TLS client in a thread, which tells a close_notify (a clean end: recv returns
b"") from a bare FIN (a ragged end: SSLEOFError).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_carrier_backpressure import client_context, server_context
from veil.net import driver as driver_module
from veil.net.driver import SessionDriver
from veil.protocol.frames import CloseCode, FrameType, frame
from veil.protocol.session import Session, SessionConfig

#: The grace under test, shortened: long against loopback, short for the suite.
GRACE_S = 0.5
#: Any single wait.
TIMEOUT_S = 10.0
CLOSE = frame(FrameType.CLOSE, 0, bytes((CloseCode.NORMAL,)) + b"inactive")
QUIET = SessionConfig(keepalive_interval=None, idle_close=None)


def peer_closes(port: int, then_close: bool, result: dict[str, object]) -> None:
    """Say CLOSE; then close (close_notify, FIN) or stay; note how the server ended."""
    context = client_context()
    # Debian's Python sets OpenSSL's IGNORE_UNEXPECTED_EOF, which reports a bare FIN as a
    # clean close_notify: the difference under test would vanish.
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw, \
            context.wrap_socket(raw, suppress_ragged_eofs=False) as tls:
        tls.sendall(CLOSE)
        started = time.monotonic()
        try:
            if then_close:
                tls.unwrap()  # our close_notify, then the server's awaited
                result["end"] = "close_notify"
            else:
                result["end"] = "close_notify" if not tls.recv(4096) else "data"
        except ConnectionResetError:
            result["end"] = "rst"
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, OSError):
            result["end"] = "fin"  # no close_notify before the FIN
        result["after_s"] = time.monotonic() - started


async def serve_one(port_ready: asyncio.Future[int], tmp: Path) -> SessionDriver:
    from veil.transport.tls import start_tls_server

    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port_ready.set_result(listener.getsockname()[1])
    sock, _ = await loop.sock_accept(listener)
    listener.close()
    driver = SessionDriver(Session(client=False, now=loop.time(), config=QUIET))
    await start_tls_server(sock, server_context(tmp), lambda: driver, TIMEOUT_S)
    await asyncio.wait_for(driver.closed, TIMEOUT_S)
    return driver


def run(tmp: Path, then_close: bool) -> dict[str, object]:
    result: dict[str, object] = {}

    async def main() -> None:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(serve_one(ready, tmp))
        port = await ready
        peer = threading.Thread(target=peer_closes, args=(port, then_close, result))
        peer.start()
        await server
        await asyncio.to_thread(peer.join, TIMEOUT_S)

    asyncio.run(main())
    return result


def test_a_peer_that_closes_gets_a_fin_without_close_notify(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver_module, "PEER_CLOSE_GRACE_S", GRACE_S)
    result = run(tmp_path, then_close=True)
    assert result["end"] == "fin"
    assert isinstance(result["after_s"], float) and result["after_s"] < GRACE_S


def test_a_peer_that_says_close_and_stays_is_closed_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver_module, "PEER_CLOSE_GRACE_S", GRACE_S)
    result = run(tmp_path, then_close=False)
    assert result["end"] == "fin"
    assert isinstance(result["after_s"], float)
    assert GRACE_S * 0.9 <= result["after_s"] < TIMEOUT_S / 2
