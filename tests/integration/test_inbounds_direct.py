"""The client inbounds over real loopback sockets, relayed by DirectDialer (no veil server).

The inbounds, the dialer and the little origin servers run on an event loop in a background
thread; the tests are ordinary blocking clients (raw sockets and real ``curl``), so what they
check is exactly what an application would see. Every test runs on the default asyncio loop
and, when installed, on uvloop (the client's production loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tests.support.wait import wait_until
from veil.client.forward import TcpForward, UdpForward
from veil.client.http_proxy import HttpProxyInbound
from veil.client.socks5 import Socks5Inbound
from veil.config import Credentials
from veil.net.direct import DirectDialer
from veil.protocol.address import Address

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
TIMEOUT = 10.0
BIG = 20 * 1024 * 1024

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
    uvloop = None  # type: ignore[assignment]

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


class NotReadyDialer(DirectDialer):
    """A dialer whose tunnel never comes up."""

    async def wait_ready(self, timeout: float) -> bool:
        return False


class Harness:
    """An event loop in a thread, hosting the inbounds and origin servers under test."""

    def __init__(self, kind: str) -> None:
        if kind == "uvloop":
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self._closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.dialer = DirectDialer()
        self.http_requests: list[bytes] = []
        self.received: list[bytes] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        async def shutdown() -> None:
            for closer in reversed(self._closers):
                await closer()
            self.dialer.close()
            await asyncio.sleep(0.05)  # let transports finish closing their sockets

        try:
            self.run(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(TIMEOUT)
            self.loop.run_until_complete(self._cancel_rest())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @staticmethod
    async def _cancel_rest() -> None:
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    # -- things to test ------------------------------------------------------------------------

    def socks5(self, dialer: DirectDialer | None = None, **options: Any) -> int:
        inbound = Socks5Inbound(dialer or self.dialer, Address(LOCALHOST, 0), **options)
        self.run(inbound.start())
        self._closers.append(inbound.close)
        return inbound.address.port

    def http_proxy(self, dialer: DirectDialer | None = None) -> int:
        inbound = HttpProxyInbound(dialer or self.dialer, Address(LOCALHOST, 0))
        self.run(inbound.start())
        self._closers.append(inbound.close)
        return inbound.address.port

    def tcp_forward(self, dest_port: int, dialer: DirectDialer | None = None) -> int:
        forward = TcpForward(
            dialer or self.dialer, Address(LOCALHOST, 0), Address(LOCALHOST, dest_port)
        )
        self.run(forward.start())
        self._closers.append(forward.close)
        return forward.address.port

    def udp_forward(self, dest_port: int, **options: Any) -> UdpForward:
        forward = UdpForward(
            self.dialer, Address(LOCALHOST, 0), Address(LOCALHOST, dest_port), **options
        )
        self.run(forward.start())
        self._closers.append(forward.close)
        return forward

    # -- origin servers ------------------------------------------------------------------------

    def tcp_server(
        self,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
    ) -> int:
        async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(guarded, LOCALHOST, 0)

        server = self.run(start())

        async def close() -> None:
            server.close()

        self._closers.append(close)
        return int(server.sockets[0].getsockname()[1])

    def http_server(self) -> int:
        """GET /hello answers "hello world"; POST /echo answers its body. Heads are recorded."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            self.http_requests.append(head)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            path = head.split(b" ", 2)[1].split(b"?")[0]
            out = b"hello world\n" if path == b"/hello" else body
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(out), out)
            )
            await writer.drain()

        return self.tcp_server(handle)

    def echo_server(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

        return self.tcp_server(handle)

    def udp_echo_server(self, host: str = LOCALHOST) -> int:
        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]

        async def start() -> asyncio.DatagramTransport:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                Echo, local_addr=(host, 0)
            )
            return transport

        transport = self.run(start())

        async def close() -> None:
            transport.close()

        self._closers.append(close)
        return int(transport.get_extra_info("sockname")[1])


@pytest.fixture(params=LOOPS)
def h(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[Harness]:
    harness = Harness(request.param)
    try:
        yield harness
    finally:
        harness.close()
    # A failed task or callback is logged at ERROR by the inbounds, the dialer or asyncio.
    records = caplog.get_records("call") + caplog.get_records("teardown")
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# -- client helpers -------------------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(1 << 20):
        buf += chunk
    return bytes(buf)


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOCALHOST, port), timeout=TIMEOUT)


def socks5_handshake(
    sock: socket.socket, command: int, dest: Address, auth: tuple[bytes, bytes] | None = None
) -> bytes:
    """Run the SOCKS5 handshake; return the reply (VER REP RSV + bound address)."""
    if auth is None:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
    else:
        user, password = auth
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        assert recv_exact(sock, 2) == b"\x01\x00"
    sock.sendall(bytes([5, command, 0]) + dest.encode())
    head = recv_exact(sock, 5)
    rest = {1: 4 + 2 - 1, 4: 16 + 2 - 1, 3: head[4] + 2}[head[3]]
    return head + recv_exact(sock, rest)


def socks5_udp_associate(
    ctl: socket.socket, udp: socket.socket, announce: bool = True
) -> tuple[str, int]:
    """Ask for a UDP association; return the relay's address.

    With ``announce`` the request names ``udp``'s address as the source; without, it sends
    0.0.0.0:0 and the relay learns the source from the first datagram.
    """
    source = Address(LOCALHOST, udp.getsockname()[1]) if announce else Address("0.0.0.0", 0)
    reply = socks5_handshake(ctl, 3, source)
    assert reply[:2] == b"\x05\x00"
    relay, _ = Address.decode(reply, 3)
    return relay.host, relay.port


def socks5_connect(
    port: int, dest: Address, auth: tuple[bytes, bytes] | None = None
) -> socket.socket:
    sock = connect(port)
    reply = socks5_handshake(sock, 1, dest, auth)
    assert reply[:2] == b"\x05\x00", reply
    return sock


def curl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=20,
    )


# -- SOCKS5 ---------------------------------------------------------------------------------------


@needs_curl
def test_curl_socks5_hostname(h: Harness) -> None:
    web = h.http_server()
    proxy = h.socks5()
    # --socks5-hostname sends the name (ATYP 3); the dialer resolves it.
    result = curl("--socks5-hostname", f"{LOCALHOST}:{proxy}", f"http://localhost:{web}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello world\n"


@needs_curl
def test_curl_socks5_with_password(h: Harness) -> None:
    web = h.http_server()
    proxy = h.socks5(credentials=Credentials(b"alice", b"s3cret"))
    ok = curl(
        "-x", f"socks5h://alice:s3cret@{LOCALHOST}:{proxy}", f"http://{LOCALHOST}:{web}/hello"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"hello world\n"

    wrong = curl(
        "-x", f"socks5h://alice:guess@{LOCALHOST}:{proxy}", f"http://{LOCALHOST}:{web}/hello"
    )
    assert wrong.returncode != 0
    assert len(h.http_requests) == 1  # the refused attempt never reached the server


def test_socks5_wrong_password_bytes(h: Harness) -> None:
    proxy = h.socks5(credentials=Credentials(b"alice", b"s3cret"))
    with connect(proxy) as sock:
        sock.sendall(b"\x05\x02\x00\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01\x05alice\x05guess")
        assert recv_all(sock) == b"\x01\x01"  # failure status, then the server closes


def test_socks5_requires_password_when_configured(h: Harness) -> None:
    proxy = h.socks5(credentials=Credentials(b"alice", b"s3cret"))
    with connect(proxy) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_all(sock) == b"\x05\xff"


def test_socks5_bind_not_supported(h: Harness) -> None:
    proxy = h.socks5()
    with connect(proxy) as sock:
        reply = socks5_handshake(sock, 2, Address(LOCALHOST, 80))
        assert reply[:2] == b"\x05\x07"
        assert recv_all(sock) == b""


def test_socks5_bad_version_closes(h: Harness) -> None:
    proxy = h.socks5()
    with connect(proxy) as sock:
        sock.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")  # a SOCKS4 request
        assert recv_all(sock) == b""


def test_socks5_not_ready_is_general_failure(h: Harness) -> None:
    proxy = h.socks5(dialer=NotReadyDialer(), ready_timeout=0.1)
    with connect(proxy) as sock:
        reply = socks5_handshake(sock, 1, Address(LOCALHOST, 9))
        assert reply[:2] == b"\x05\x01"
        assert recv_all(sock) == b""


def test_socks5_pipelined_early_data(h: Harness) -> None:
    echo = h.echo_server()
    proxy = h.socks5()
    with connect(proxy) as sock:
        # Greeting, request and first payload in one write, as optimistic clients do.
        sock.sendall(
            b"\x05\x01\x00" + b"\x05\x01\x00" + Address(LOCALHOST, echo).encode() + b"early"
        )
        assert recv_exact(sock, 2 + 10)[2:4] == b"\x05\x00"
        assert recv_exact(sock, 5) == b"early"


def test_socks5_unreachable_destination_closes(h: Harness) -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind((LOCALHOST, 0))
        dead = probe.getsockname()[1]
    proxy = h.socks5()
    # Success was replied optimistically; the failed connect shows up as the stream ending.
    with (
        socks5_connect(proxy, Address(LOCALHOST, dead)) as sock,
        contextlib.suppress(ConnectionResetError),
    ):
        assert recv_all(sock) == b""


def test_socks5_large_transfer_both_ways(h: Harness) -> None:
    payload = os.urandom(BIG)
    expected = hashlib.sha256(payload).hexdigest().encode()

    async def digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hasher = hashlib.sha256()
        while data := await reader.read(1 << 20):
            hasher.update(data)
        # The client half-closed; answer on the still-open direction.
        writer.write(hasher.hexdigest().encode())
        await writer.drain()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        view = memoryview(payload)
        for offset in range(0, len(payload), 1 << 20):
            writer.write(view[offset : offset + (1 << 20)])
            await writer.drain()

    proxy = h.socks5()
    upload = h.tcp_server(digest)
    download = h.tcp_server(source)

    with socks5_connect(proxy, Address(LOCALHOST, upload)) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == expected

    with socks5_connect(proxy, Address(LOCALHOST, download)) as sock:
        received = recv_all(sock)
        assert len(received) == len(payload)
        assert hashlib.sha256(received).hexdigest().encode() == expected


def test_socks5_udp_associate(h: Harness) -> None:
    echo = h.udp_echo_server()
    proxy = h.socks5()
    with connect(proxy) as ctl, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((LOCALHOST, 0))
        udp.settimeout(TIMEOUT)
        relay = Address(*socks5_udp_associate(ctl, udp))
        assert relay.host == LOCALHOST and relay.port != 0
        target = Address(LOCALHOST, echo)

        # A fragment (FRAG=1) is dropped; the next datagram goes through.
        udp.sendto(b"\x00\x00\x01" + target.encode() + b"fragment", (relay.host, relay.port))
        udp.sendto(b"\x00\x00\x00" + target.encode() + b"ping", (relay.host, relay.port))
        data, source = udp.recvfrom(65535)
        assert source == (relay.host, relay.port)
        origin, offset = Address.decode(data, 3)
        assert data[:3] == b"\x00\x00\x00"
        assert origin == target
        assert data[offset:] == b"echo:ping"

        # Another local socket (a different source port) is not the client: ignored.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind((LOCALHOST, 0))
            other.settimeout(0.3)
            other.sendto(b"\x00\x00\x00" + target.encode() + b"intruder", (relay.host, relay.port))
            with pytest.raises(TimeoutError):
                other.recvfrom(65535)

        # Closing the control connection ends the association.
        ctl.close()
        udp.settimeout(0.2)

        def not_relayed() -> bool:
            udp.sendto(b"\x00\x00\x00" + target.encode() + b"late", (relay.host, relay.port))
            try:
                udp.recvfrom(65535)
            except (TimeoutError, ConnectionRefusedError):
                return True
            return False

        # The receive timeout paces the polls.
        wait_until(not_relayed, TIMEOUT, "the association to stop relaying after the control "
                   "connection closed", poll=0)


def test_socks5_udp_to_a_name(h: Harness) -> None:
    # The name is resolved by the dialer; the reply is tagged with the address it came from.
    resolved = socket.getaddrinfo("localhost", None, socket.AF_UNSPEC, socket.SOCK_DGRAM)[0][4][0]
    if resolved != LOCALHOST:
        pytest.skip(f"localhost resolves to {resolved} first; these tests bind only {LOCALHOST}")
    echo = h.udp_echo_server()
    proxy = h.socks5()
    with connect(proxy) as ctl, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((LOCALHOST, 0))
        udp.settimeout(TIMEOUT)
        relay = socks5_udp_associate(ctl, udp, announce=False)
        udp.sendto(b"\x00\x00\x00" + Address("localhost", echo).encode() + b"by name", relay)
        data, _ = udp.recvfrom(65535)
        origin, offset = Address.decode(data, 3)
        assert origin == Address(LOCALHOST, echo)
        assert data[offset:] == b"echo:by name"


def test_socks5_handshake_timeout(h: Harness) -> None:
    proxy = h.socks5(handshake_timeout=0.2)
    with connect(proxy) as sock:
        sock.sendall(b"\x05\x01")  # half a greeting, then silence
        start = time.monotonic()
        assert recv_all(sock) == b""
        assert time.monotonic() - start < 5


def test_socks5_close_drops_pending_handshakes_and_associations(h: Harness) -> None:
    inbound = Socks5Inbound(h.dialer, Address(LOCALHOST, 0))
    h.run(inbound.start())
    port = inbound.address.port
    with (
        connect(port) as pending,
        connect(port) as ctl,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        pending.sendall(b"\x05\x01\x00")
        assert recv_exact(pending, 2) == b"\x05\x00"
        udp.bind((LOCALHOST, 0))
        socks5_udp_associate(ctl, udp)
        h.run(inbound.close())
        for sock in (pending, ctl):
            with contextlib.suppress(ConnectionResetError):
                assert recv_all(sock) == b""
        with pytest.raises(ConnectionRefusedError):
            connect(port).close()


# -- HTTP proxy -----------------------------------------------------------------------------------


@needs_curl
def test_curl_http_proxy_absolute_uri(h: Harness) -> None:
    web = h.http_server()
    proxy = h.http_proxy()
    result = curl(
        "-x",
        f"http://{LOCALHOST}:{proxy}",
        "-H",
        "Proxy-Authorization: Basic c2VjcmV0",
        f"http://{LOCALHOST}:{web}/hello?x=1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello world\n"
    (head,) = h.http_requests
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /hello?x=1 HTTP/1.1"
    assert f"Host: {LOCALHOST}:{web}".encode() in lines
    assert b"Connection: close" in lines
    assert not any(line.lower().startswith(b"proxy-") for line in lines)


@needs_curl
def test_curl_http_proxy_post_body(h: Harness) -> None:
    web = h.http_server()
    proxy = h.http_proxy()
    body = os.urandom(300_000).hex().encode()
    result = curl(
        "-x",
        f"http://{LOCALHOST}:{proxy}",
        "--data-binary",
        "@-",
        f"http://{LOCALHOST}:{web}/echo",
        stdin=body,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == body


@needs_curl
def test_curl_http_proxy_connect(h: Harness) -> None:
    web = h.http_server()
    proxy = h.http_proxy()
    # -p (--proxytunnel) makes curl use CONNECT even for http:// URLs.
    result = curl("-p", "-x", f"http://{LOCALHOST}:{proxy}", f"http://{LOCALHOST}:{web}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello world\n"
    assert h.http_requests[0].startswith(b"GET /hello HTTP/1.1\r\n")


def test_http_proxy_connect_pipelined(h: Harness) -> None:
    echo = h.echo_server()
    proxy = h.http_proxy()
    with connect(proxy) as sock:
        sock.sendall(
            f"CONNECT {LOCALHOST}:{echo} HTTP/1.1\r\nHost: {LOCALHOST}:{echo}\r\n\r\n".encode()
            + b"early bytes"
        )
        expected = b"HTTP/1.1 200 Connection established\r\n\r\nearly bytes"
        assert recv_exact(sock, len(expected)) == expected


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", b"501"),
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70_000, b"431"),
    ],
)
def test_http_proxy_refusals(h: Harness, request_bytes: bytes, status: bytes) -> None:
    proxy = h.http_proxy()
    with connect(proxy) as sock:
        sock.sendall(request_bytes)
        response = recv_all(sock)
    assert response.startswith(b"HTTP/1.1 " + status + b" ")


def test_http_proxy_not_ready_is_502(h: Harness) -> None:
    proxy = h.http_proxy(dialer=NotReadyDialer())
    with connect(proxy) as sock:
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 502 ")


# -- forwards -------------------------------------------------------------------------------------


def test_tcp_forward_echo(h: Harness) -> None:
    echo = h.echo_server()
    port = h.tcp_forward(echo)
    with connect(port) as sock:
        sock.sendall(b"through the forward")
        assert recv_exact(sock, 19) == b"through the forward"


def test_tcp_forward_half_close_both_ways(h: Harness) -> None:
    got: asyncio.Future[bytes] = h.call(h.loop.create_future)

    async def banner_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()  # the server finishes first ...
        await writer.drain()
        got.set_result(await reader.read())  # ... and still reads what the client sends

    server = h.tcp_server(banner_then_read)
    port = h.tcp_forward(server)
    with connect(port) as sock:
        assert recv_all(sock) == b"banner"  # EOF arrived, the socket is still writable
        sock.sendall(b"after your eof")
        sock.shutdown(socket.SHUT_WR)

        async def result() -> bytes:
            return await got

        assert h.run(result()) == b"after your eof"


def test_tcp_forward_not_ready_closes(h: Harness) -> None:
    port = h.tcp_forward(9, dialer=NotReadyDialer())
    with connect(port) as sock, contextlib.suppress(ConnectionResetError):
        assert recv_all(sock) == b""


def test_udp_forward_per_client_flows(h: Harness) -> None:
    echo = h.udp_echo_server()
    forward = h.udp_forward(echo)
    port = forward.address.port
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
    ):
        for sock in (a, b):
            sock.bind((LOCALHOST, 0))
            sock.settimeout(TIMEOUT)
        a.sendto(b"from a", (LOCALHOST, port))
        b.sendto(b"from b", (LOCALHOST, port))
        assert a.recvfrom(65535)[0] == b"echo:from a"
        assert b.recvfrom(65535)[0] == b"echo:from b"
        a.sendto(b"again", (LOCALHOST, port))
        assert a.recvfrom(65535)[0] == b"echo:again"
        assert h.call(lambda: forward.flow_count) == 2


def test_udp_forward_idle_flows_expire(h: Harness) -> None:
    echo = h.udp_echo_server()
    forward = h.udp_forward(echo, idle_timeout=0.2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCALHOST, 0))
        sock.settimeout(TIMEOUT)
        sock.sendto(b"hi", (LOCALHOST, forward.address.port))
        assert sock.recvfrom(65535)[0] == b"echo:hi"
        assert h.call(lambda: forward.flow_count) == 1
        wait_until(lambda: h.call(lambda: forward.flow_count) == 0, TIMEOUT,
                   lambda: f"the idle flow to expire ({h.call(lambda: forward.flow_count)} left)")
        sock.sendto(b"back", (LOCALHOST, forward.address.port))  # a new flow opens on demand
        assert sock.recvfrom(65535)[0] == b"echo:back"
