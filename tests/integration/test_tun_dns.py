"""TUN mode's resolver (veil.client.tun_dns.SplitResolver) on loopback, with two real upstream
resolvers of the test's own: "domestic" (127.0.0.2) and "tunnel" (127.0.0.3), each recording
the names it was asked, over UDP and TCP."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset

from veil.client.rulefiles import load_rules
from veil.client.tun_dns import SplitResolver

DOMESTIC, TUNNEL, LISTEN = "127.0.0.2", "127.0.0.3", "127.0.0.4"


class FakeResolver(asyncio.DatagramProtocol):
    """Answers every A query with ``address`` (TTL 77) and records the names asked."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        name = query.question[0].name
        self.asked.append(name.to_text(omit_final_dot=True))
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(name, 77, "IN", "A", self.address))
        return response.to_wire()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.answer(data), addr)

    async def serve_tcp(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = self.answer(await reader.readexactly(size))
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
        finally:
            writer.close()


def free_port() -> int:
    """A port free on all three addresses (UDP and TCP), found by trying."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((DOMESTIC, 0))
            port = int(probe.getsockname()[1])
        ok = True
        for host in (DOMESTIC, TUNNEL, LISTEN):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    try:
                        s.bind((host, port))
                    except OSError:
                        ok = False
        if ok:
            return port
    raise RuntimeError("no free port")


Setup = tuple[SplitResolver, FakeResolver, FakeResolver, list[object], int]


@contextlib.asynccontextmanager
async def resolvers(tmp_path: Path) -> AsyncIterator[Setup]:
    rules_file = tmp_path / "rules.txt"
    rules_file.write_text("DOMAIN-SUFFIX,domestic.test,DIRECT\nDOMAIN-SUFFIX,ads.test,BLOCK\n")
    port = free_port()
    loop = asyncio.get_running_loop()
    domestic, tunnel = FakeResolver("198.51.100.7"), FakeResolver("203.0.113.9")
    closers: list[asyncio.BaseTransport | asyncio.Server] = []
    routed: list[object] = []

    async def on_direct(addresses: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                              int]]) -> None:
        routed.append(addresses)

    resolver = SplitResolver(load_rules([str(rules_file)]), DOMESTIC, on_direct, [TUNNEL],
                             upstream_port=port)
    try:
        for fake, host in ((domestic, DOMESTIC), (tunnel, TUNNEL)):
            transport, _ = await loop.create_datagram_endpoint(lambda f=fake: f,  # type: ignore[misc]
                                                               local_addr=(host, port))
            closers.append(transport)
            closers.append(await asyncio.start_server(fake.serve_tcp, host, port))
        await resolver.start(LISTEN, port)
        yield resolver, domestic, tunnel, routed, port
    finally:
        await resolver.close()
        for closer in closers:
            closer.close()
        for closer in closers:
            if isinstance(closer, asyncio.Server):
                await closer.wait_closed()


async def ask_udp(port: int, name: str) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, (LISTEN, port))
        await loop.sock_sendall(s, dns.message.make_query(name, "A").to_wire())
        return dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(s, 65535), 5))


def test_each_name_goes_to_the_resolver_its_rule_names(tmp_path: Path) -> None:
    asyncio.run(each_name_goes_to_the_resolver_its_rule_names(tmp_path))


async def each_name_goes_to_the_resolver_its_rule_names(tmp_path: Path) -> None:
    async with resolvers(tmp_path) as (resolver, domestic, tunnel, routed, port):
        await names_and_resolvers(resolver, domestic, tunnel, routed, port)


async def names_and_resolvers(resolver: SplitResolver, domestic: FakeResolver,
                              tunnel: FakeResolver, routed: list[object], port: int) -> None:
    direct = await ask_udp(port, "www.domestic.test")
    assert direct.answer[0].to_text().endswith("198.51.100.7")
    # The answer's address was handed over for its route before the answer came back.
    assert routed == [[(ipaddress.ip_address("198.51.100.7"), 77)]]
    foreign = await ask_udp(port, "www.example.org")
    assert foreign.answer[0].to_text().endswith("203.0.113.9")
    blocked = await ask_udp(port, "x.ads.test")
    assert blocked.rcode() == dns.rcode.NXDOMAIN and not blocked.answer
    assert domestic.asked == ["www.domestic.test"]
    assert tunnel.asked == ["www.example.org"]
    assert resolver.counts == {"tunnel": 1, "direct": 1, "block": 1, "dropped": 0}


def test_a_query_over_tcp_is_asked_over_tcp(tmp_path: Path) -> None:
    asyncio.run(a_query_over_tcp_is_asked_over_tcp(tmp_path))


async def a_query_over_tcp_is_asked_over_tcp(tmp_path: Path) -> None:
    async with resolvers(tmp_path) as (_resolver, domestic, tunnel, _routed, port):
        await over_tcp(domestic, tunnel, port)


async def over_tcp(domestic: FakeResolver, tunnel: FakeResolver, port: int) -> None:
    reader, writer = await asyncio.open_connection(LISTEN, port)
    try:
        for name in ("a.example.org", "b.example.org"):  # two on one connection
            wire = dns.message.make_query(name, "A").to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
            answer = dns.message.from_wire(await reader.readexactly(size))
            assert answer.answer[0].to_text().endswith("203.0.113.9")
    finally:
        writer.close()
        await writer.wait_closed()
    assert tunnel.asked == ["a.example.org", "b.example.org"] and domestic.asked == []
