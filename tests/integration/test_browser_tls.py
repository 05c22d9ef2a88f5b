"""veil's own TLS 1.3 client (transport/browser_tls.py) against real servers over loopback:
OpenSSL through Python's ssl, nginx, ``openssl s_server`` (other suites and groups, a
HelloRetryRequest, KeyUpdate), veil's server; and the failures that must end a handshake
cleanly: a forged CertificateVerify, a truncated handshake, a silent server, a wrong pin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.wait import wait_until_async
from tests.unit.tls13_support import MiniServer, ServerConfig, parse_client_hello
from veil.errors import AuthError
from veil.transport.browser_tls import open_browser_tls_connection
from veil.transport.tls import TlsHandshakeError
from veil.transport.tls13 import TlsServerAuthFailure

TIMEOUT = 10.0


class Collector(asyncio.Protocol):
    """An application protocol that keeps what it receives."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(None)

    async def wait_for(self, predicate: Callable[[bytes], bool], timeout: float = TIMEOUT,
                       ) -> None:
        await wait_until_async(lambda: predicate(bytes(self.data)), timeout,
                               lambda: f"the expected bytes; got {bytes(self.data[:200])!r}",
                               poll=0.01)


async def connect(port: int, host: str | None = None,
                  timeout: float = TIMEOUT) -> tuple[asyncio.Transport, Collector]:
    app: list[Collector] = []

    def factory() -> Collector:
        app.append(Collector())
        return app[0]

    transport = await open_browser_tls_connection("127.0.0.1", port, factory,
                                                  server_hostname=host,
                                                  handshake_timeout=timeout)
    return transport, app[0]


# ---------------------------------------------------------------------- OpenSSL (Python ssl)
@contextlib.asynccontextmanager
async def openssl_echo(tmp_path: Path, alpn: list[str]) -> AsyncIterator[tuple[int, list[bytes],
                                                                               bytes]]:
    """An asyncio TLS echo server (OpenSSL); yields its port, the tls-unique of each
    connection as OpenSSL computes it, and its certificate (DER)."""
    cert, key = procs.make_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(alpn)
    bindings: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        bindings.append(sslobj.get_channel_binding("tls-unique"))
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    try:
        yield port, bindings, der
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("alpn,expected", [(["http/1.1"], "http/1.1"),
                                           (["h2", "http/1.1"], "h2")])
def test_openssl_server_tls_unique_certificate_and_echo(tmp_path: Path, alpn: list[str],
                                                       expected: str) -> None:
    async def main() -> None:
        async with openssl_echo(tmp_path, alpn) as (port, bindings, der):
            transport, app = await connect(port, "localhost")
            assert transport.get_extra_info("peer_certificate_der") == der
            assert transport.get_extra_info("alpn_protocol") == expected
            payload = os.urandom(4 * 1024 * 1024)
            transport.write(payload)
            await app.wait_for(lambda got: len(got) >= len(payload))
            assert bytes(app.data) == payload
            # The channel binding veil's authenticator uses: byte-identical to OpenSSL's.
            assert bindings == [transport.get_extra_info("tls_unique")]
            transport.close()

    asyncio.run(main())


# ---------------------------------------------------------------------- nginx
def test_nginx_index_and_a_large_file(nginx: procs.Nginx) -> None:
    async def main() -> None:
        transport, app = await connect(nginx.https_port, "localhost")
        assert transport.get_extra_info("alpn_protocol") == "http/1.1"
        transport.write(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await asyncio.wait_for(app.eof, TIMEOUT)
        head, _, body = bytes(app.data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body == (nginx.root / "big.bin").read_bytes()

    asyncio.run(main())


# ---------------------------------------------------------------------- openssl s_server
OPENSSL = shutil.which("openssl")


@contextlib.contextmanager
def s_server(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:  # type: ignore[misc]
    if OPENSSL is None:
        pytest.skip("openssl is not installed (.ci/run installs it)")
    cert, key = procs.make_cert(tmp_path)
    # s_server takes its port up front (see procs.unused_port); taken meanwhile, it exits
    # and wait_port fails at once.
    port = procs.unused_port()
    proc = subprocess.Popen([OPENSSL, "s_server", "-accept", f"127.0.0.1:{port}", "-cert",
                             str(cert), "-key", str(key), "-tls1_3", "-quiet", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        procs.wait_port(port, proc=proc)
        proc.port = port  # type: ignore[attr-defined]
        yield proc
    finally:
        procs.stop(proc)
        if proc.stdin:
            proc.stdin.close()


@pytest.mark.parametrize("suite,group,retry", [
    ("TLS_AES_128_GCM_SHA256", "X25519", False),
    ("TLS_AES_256_GCM_SHA384", "X25519", False),
    ("TLS_CHACHA20_POLY1305_SHA256", "X25519", False),
    ("TLS_AES_128_GCM_SHA256", "P-256", True),  # not in our key shares: HelloRetryRequest
    ("TLS_AES_256_GCM_SHA384", "P-384", True),
])
def test_s_server_suites_groups_and_retry(tmp_path: Path, suite: str, group: str,
                                          retry: bool) -> None:
    with s_server(tmp_path, "-www", "-ciphersuites", suite, "-groups", group) as proc:
        async def main() -> None:
            transport, app = await connect(proc.port, "localhost")  # type: ignore[attr-defined]
            assert transport.get_extra_info("cipher")[0] == suite
            tls = transport.get_extra_info("tls_client")
            assert tls.group == {"X25519": 0x1D, "P-256": 0x17, "P-384": 0x18}[group]
            transport.write(b"GET / HTTP/1.0\r\n\r\n")
            await asyncio.wait_for(app.eof, TIMEOUT)
            assert bytes(app.data).startswith(b"HTTP/1.0 200 ok")
            assert suite.encode() in app.data  # s_server's page names the cipher

        asyncio.run(main())


def test_s_server_key_update_both_ways(tmp_path: Path) -> None:
    with s_server(tmp_path) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        async def main() -> None:
            transport, app = await connect(proc.port, "localhost")  # type: ignore[attr-defined]
            transport.write(b"first\n")
            loop = asyncio.get_running_loop()
            line = await asyncio.wait_for(loop.run_in_executor(None, stdout.readline), TIMEOUT)
            assert line == b"first\n"
            # "K": a KeyUpdate that asks us to update too; then a line under the new keys.
            stdin.write(b"K\n")
            stdin.flush()
            # Pacing a third-party program's input, not a wait for an event: s_server takes
            # "K" as a command only when it comes alone in one read of its stdin.
            await asyncio.sleep(0.3)
            stdin.write(b"from server\n")
            stdin.flush()
            await app.wait_for(lambda got: b"from server\n" in got)
            transport.write(b"second\n")  # under our updated key
            line = await asyncio.wait_for(loop.run_in_executor(None, stdout.readline), TIMEOUT)
            assert line == b"second\n"
            transport.close()

        asyncio.run(main())


# ---------------------------------------------------------------------- failures
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handle: Handler) -> AsyncIterator[int]:
    """A loopback TCP server whose connections are all closed when the block ends."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await handle(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def mini_server(config: ServerConfig, *, cut: float | None = None,
                      silent_after: bool = False) -> AsyncIterator[int]:
    """MiniServer over TCP. ``cut``: send only that fraction of the first flight, then close
    (or, with ``silent_after``, stay silent)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = MiniServer(config)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                reply = server.receive(data)
                if cut is not None and reply:
                    writer.write(reply[: int(len(reply) * cut)])
                    await writer.drain()
                    if silent_after:
                        await reader.read()  # until the client gives up
                    break
                writer.write(reply)
                await writer.drain()

    async with tcp_server(handle) as port:
        yield port


def test_forged_certificate_verify_fails_cleanly() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    async def main() -> None:
        forged = ServerConfig(signing_key=ec.generate_private_key(ec.SECP256R1()))
        async with mini_server(forged) as port:
            started = time.monotonic()
            with pytest.raises(TlsHandshakeError,
                               match="CertificateVerify does not verify") as info:
                await connect(port, "example.test")
            assert isinstance(info.value.__cause__, TlsServerAuthFailure)
            assert isinstance(info.value.__cause__, AuthError)
            assert time.monotonic() - started < 2

    asyncio.run(main())


def test_truncated_handshake_fails_cleanly() -> None:
    async def main() -> None:
        async with mini_server(ServerConfig(), cut=0.5) as port:
            started = time.monotonic()
            with pytest.raises(TlsHandshakeError, match="truncated handshake"):
                await connect(port, "example.test")
            assert time.monotonic() - started < 2

    asyncio.run(main())


def test_silent_server_times_out() -> None:
    async def main() -> None:
        async with mini_server(ServerConfig(), cut=0.5, silent_after=True) as port:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await connect(port, "example.test", timeout=0.5)
            assert time.monotonic() - started < 2

    asyncio.run(main())


def test_not_tls_at_all_fails_cleanly() -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        async with tcp_server(handle) as port:
            with pytest.raises(TlsHandshakeError):
                await connect(port, "example.test")

    asyncio.run(main())


# ---------------------------------------------------------------------- veil's client
def test_client_tunnel_authenticates_to_veil_server(veil_server: procs.VeilServer) -> None:
    """The authenticator is bound to tls_unique: the server (OpenSSL) accepting it proves that
    ours is byte-identical to OpenSSL's."""
    from veil.net.client_session import ClientTunnel, _ClientDriver
    from veil.protocol.accesskey import AccessKey

    async def main() -> None:
        for stack in ("browser", "openssl"):
            tunnel = ClientTunnel(AccessKey.parse(veil_server.key), tls_stack=stack)
            driver = await tunnel.connect_once()
            assert isinstance(driver, _ClientDriver)
            assert await asyncio.wait_for(driver.accepted, TIMEOUT), stack
            driver.close()

    asyncio.run(main())


def test_client_tunnel_wrong_pin_and_forged_signature(veil_server: procs.VeilServer) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from veil.net.client_session import ClientTunnel
    from veil.protocol.accesskey import AccessKey
    from veil.protocol.address import Address

    good = AccessKey.parse(veil_server.key)

    async def main() -> None:
        for config, code in ((ServerConfig(), "pin_mismatch"),
                             (ServerConfig(signing_key=ec.generate_private_key(ec.SECP256R1())),
                              "server_auth")):
            async with mini_server(config) as port:
                key = AccessKey(Address("127.0.0.1", port), good.secret, good.pin, "localhost")
                with pytest.raises(AuthError) as info:
                    await ClientTunnel(key).connect_once()
                assert info.value.code == code

    asyncio.run(main())


def test_socket_is_closed_after_failure() -> None:
    """No connection is left behind by a failed handshake (the server sees EOF)."""
    async def main() -> None:
        closed = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(65536)
            writer.write(b"\x15\x03\x03\x00\x02\x02\x28")  # handshake_failure
            await writer.drain()
            rest = await reader.read()
            closed.set_result(rest)

        async with tcp_server(handle) as port:
            with pytest.raises(TlsHandshakeError, match="handshake_failure"):
                await connect(port, "example.test")
            assert await asyncio.wait_for(closed, TIMEOUT) == b""

    asyncio.run(main())


def test_ip_literal_gets_no_sni() -> None:
    async def main() -> None:
        got = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(await reader.read(65536))

        async with tcp_server(handle) as port:
            with pytest.raises(TlsHandshakeError):
                await connect(port, "127.0.0.1")
        hello, _ = parse_client_hello(await got)
        assert hello.server_name is None

    asyncio.run(main())

