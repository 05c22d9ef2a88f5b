"""DirectDialer's hooks, as the server's Trojan inbound uses them: a resolver under a policy,
and bytes a TLS carrier delivers before the outbound connection is up."""

from __future__ import annotations

import asyncio
import socket

from tests.support.wait import wait_until_async
from veil.net.direct import DirectDialer
from veil.protocol.address import Address


async def _local_pair() -> tuple[asyncio.Transport, socket.socket]:
    """A transport as an inbound would hand it over, and the application's end of it."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        asyncio.Protocol, ours)
    return transport, theirs


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_the_resolver_decides_where_tcp_goes() -> None:
    async def main() -> None:
        server, port = await _echo_server()
        asked: list[tuple[str, int, socket.SocketKind]] = []

        async def resolver(host: str, port_: int,
                           kind: socket.SocketKind) -> list[tuple[int, str]]:
            asked.append((host, port_, kind))
            if host == "refused.test":
                raise ConnectionRefusedError("policy")
            return [(socket.AF_INET, "127.0.0.1")]

        dialer = DirectDialer(resolver=resolver)
        local, app = await _local_pair()
        dialer.open_tcp(Address("allowed.test", port), local, b"early ")
        # A TLS carrier may deliver more of its batch before the connect is done.
        local.get_protocol().data_received(b"and more")  # type: ignore[attr-defined]
        await asyncio.get_running_loop().sock_sendall(app, b"; then the app")
        app.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(_read_all(app), 5) == b"early and more; then the app"
        app.close()

        refused, app = await _local_pair()
        dialer.open_tcp(Address("refused.test", port), refused, b"x")
        assert await asyncio.wait_for(_read_all(app), 5) == b""  # closed, nothing relayed
        app.close()
        assert asked == [("allowed.test", port, socket.SOCK_STREAM),
                         ("refused.test", port, socket.SOCK_STREAM)]
        dialer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_the_resolver_also_judges_udp_literals_once() -> None:
    async def main() -> None:
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        port = receiver.getsockname()[1]
        asked: list[str] = []

        async def resolver(host: str, port_: int,
                           kind: socket.SocketKind) -> list[tuple[int, str]]:
            asked.append(host)
            if host == "127.0.0.1":
                raise ConnectionRefusedError("policy")
            return [(socket.AF_INET, "127.0.0.1")]

        dialer = DirectDialer(resolver=resolver)
        flow = dialer.open_udp(lambda a, p: None, lambda: None)
        flow.send(Address("127.0.0.1", port), b"refused")
        await wait_until_async(lambda: asked, 5, "the first destination to be resolved")
        for _ in range(2):  # answered from the cache: no more questions
            flow.send(Address("127.0.0.1", port), b"refused")
        flow.send(Address("allowed.test", port), b"allowed")
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(receiver, 100), 5)
        assert data == b"allowed"
        assert asked == ["127.0.0.1", "allowed.test"]  # the refusal is cached
        dialer.close()
        receiver.close()

    asyncio.run(main())
