"""A TLS carrier stops reading its socket when its unsent output grows past its bound, whatever
the protocol above it does: a peer that writes without reading, to a protocol that answers
every read and ignores pause_writing, fills the carrier's socket receive queue (SIOCINQ) and
then its own send, instead of the carrier's memory.

Every carrier: the server's (transport/tls.py), and both client stacks (the same OpenSSL
carrier as a client, and transport/browser_tls.py). The peer is a blocking Python ssl socket in
a thread, on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import ssl
import termios
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import procs
from veil.transport.browser_tls import open_browser_tls_connection
from veil.transport.carrier import UNSENT_READ_SLACK
from veil.transport.tls import open_tls_connection, start_tls_server

# What the peer tries to push without reading: far above every buffer on the way.
PUSH = 24 << 20
# The peer gives up when a send makes no progress for this long: the carrier stopped reading.
STALL_S = 1.0
# Small socket buffers on both ends, so what the kernel holds does not hide the carrier's.
SOCKET_BUFFER = 64 * 1024
TIMEOUT = 10.0


class Answerer(asyncio.Protocol):
    """Answers every read with as many bytes and never heeds pause_writing: the worst
    protocol a carrier can carry."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def push_without_reading(tls: ssl.SSLSocket) -> int:
    """Send PUSH bytes, never reading; return how many the carrier's side took."""
    tls.settimeout(STALL_S)
    chunk = memoryview(bytes(64 * 1024))
    sent = 0
    with contextlib.suppress(TimeoutError, ssl.SSLWantWriteError, OSError):
        while sent < PUSH:
            sent += tls.send(chunk)
    return sent


def server_context(tmp_path: Path) -> ssl.SSLContext:
    cert, key = procs.make_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def small_buffers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)


def unread(transport: asyncio.Transport) -> int:
    """Bytes waiting in the carrier's socket receive queue (SIOCINQ)."""
    sock = transport.get_extra_info("socket")
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), "little")


async def as_server(tmp_path: Path) -> tuple[asyncio.Transport, Peer]:
    """The carrier is veil's server; the peer a client that pushes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def push(peer: Peer) -> None:
        raw = socket.socket()
        small_buffers(raw)
        raw.connect(("127.0.0.1", port))
        with client_context().wrap_socket(raw) as tls:
            peer.sent = push_without_reading(tls)
            peer.release.wait(TIMEOUT)

    peer = Peer(push)
    loop = asyncio.get_running_loop()
    sock, _ = await loop.sock_accept(listener)
    listener.close()
    small_buffers(sock)
    transport = await start_tls_server(sock, server_context(tmp_path), Answerer, TIMEOUT)
    return transport, peer


async def as_client(tmp_path: Path, stack: str) -> tuple[asyncio.Transport, Peer]:
    """The carrier is one of veil's clients; the peer a server that pushes."""
    listener = socket.create_server(("127.0.0.1", 0))
    small_buffers(listener)  # inherited by the accepted socket
    port = listener.getsockname()[1]
    context = server_context(tmp_path)

    def push(peer: Peer) -> None:
        raw, _ = listener.accept()
        listener.close()
        with context.wrap_socket(raw, server_side=True) as tls:
            peer.sent = push_without_reading(tls)
            peer.release.wait(TIMEOUT)

    peer = Peer(push)
    transport: asyncio.Transport
    if stack == "openssl":
        transport = await open_tls_connection("127.0.0.1", port, client_context(), Answerer,
                                              server_hostname=None, handshake_timeout=TIMEOUT)
    else:
        transport = await open_browser_tls_connection("127.0.0.1", port, Answerer,
                                                      server_hostname="localhost",
                                                      handshake_timeout=TIMEOUT)
    small_buffers(transport.get_extra_info("socket"))
    return transport, peer


class Peer:
    """The pushing peer's thread: ``sent`` is None until its send stalls."""

    def __init__(self, run: Callable[[Peer], None]) -> None:
        self.sent: int | None = None
        self.release = threading.Event()  # the peer holds its connection open until set
        self._thread = threading.Thread(target=run, args=(self,))
        self._thread.start()

    async def finish(self) -> int:
        self.release.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, TIMEOUT)
        assert self.sent is not None
        return self.sent


@pytest.mark.parametrize("side", ["server", "client-openssl", "client-browser"])
def test_a_carrier_stops_reading_while_its_unsent_output_is_over_its_bound(
        side: str, tmp_path: Path) -> None:
    async def main() -> None:
        if side == "server":
            transport, peer = await as_server(tmp_path)
        else:
            transport, peer = await as_client(tmp_path, side.removeprefix("client-"))
        high = transport.get_write_buffer_limits()[1]
        peak = 0
        while peer.sent is None:  # the peer pushes until it stalls
            peak = max(peak, transport.get_write_buffer_size())
            await asyncio.sleep(0.01)
        waiting = unread(transport)
        unsent = transport.get_write_buffer_size()
        sent = await peer.finish()
        transport.abort()
        print(f"\n{side}: the peer pushed {sent >> 10} KiB before its send stalled; the "
              f"carrier's unsent output peaked at {peak >> 10} KiB (bound {high >> 10} + "
              f"{UNSENT_READ_SLACK >> 10} KiB), {waiting >> 10} KiB left unread in its socket")
        assert sent < PUSH  # the peer's send blocked: nobody reads it any more
        # Over the bound by at most what one read answers (a 256 KiB read and its records).
        assert max(peak, unsent) < high + UNSENT_READ_SLACK + 512 * 1024
        assert waiting > 0  # the bytes wait in the kernel, not in the carrier

    asyncio.run(main())
