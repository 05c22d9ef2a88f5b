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

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import pytest

from veil.client.rulefiles import load_rules
from veil.client.tun_dns import SplitResolver, ask, ask_tcp

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
    assert resolver.counts == {"tunnel": 1, "direct": 1, "block": 1, "dropped": 0, "notimp": 0}


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


async def ask_wire(port: int, wire: bytes) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, (LISTEN, port))
        await loop.sock_sendall(s, wire)
        return dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(s, 65535), 5))


def test_a_name_with_a_dot_inside_a_label_never_goes_direct(tmp_path: Path) -> None:
    """``a\\.domestic.test`` (labels ``a.domestic`` and ``test``) is not under domestic.test,
    though its text ends like it; nor is a name with bytes no host name has ever decided by
    a domain rule: both go to the tunnel's resolver, none to the domestic one."""
    asyncio.run(odd_labels(tmp_path))


async def odd_labels(tmp_path: Path) -> None:
    async with resolvers(tmp_path) as (_resolver, domestic, tunnel, routed, port):
        odd = [dns.name.Name([b"a.domestic", b"test", b""]),
               dns.name.Name([b"www\xff", b"domestic", b"test", b""]),
               dns.name.Name([b"w w", b"domestic", b"test", b""])]
        for name in odd:
            reply = await ask_wire(port, dns.message.make_query(name, "A").to_wire())
            assert reply.answer[0].to_text().endswith("203.0.113.9")
        assert domestic.asked == [] and routed == []
        assert tunnel.asked == [name.to_text(omit_final_dot=True) for name in odd]
        # A name with only host-name bytes under the suffix still goes direct.
        await ask_udp(port, "_sip._udp.www-1.domestic.test")
        assert domestic.asked == ["_sip._udp.www-1.domestic.test"]


def test_notify_and_update_are_answered_notimp_and_sent_nowhere(tmp_path: Path) -> None:
    asyncio.run(other_opcodes(tmp_path))


async def other_opcodes(tmp_path: Path) -> None:
    async with resolvers(tmp_path) as (resolver, domestic, tunnel, _routed, port):
        notify = dns.message.make_query("www.example.org", "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        update = dns.update.UpdateMessage("domestic.test")
        update.add("www", 60, "A", "192.0.2.1")
        for request in (notify, update):
            reply = await ask_wire(port, request.to_wire())
            assert reply.rcode() == dns.rcode.NOTIMP and reply.id == request.id
            assert reply.opcode() == request.opcode()
        assert domestic.asked == [] and tunnel.asked == []
        assert resolver.counts["notimp"] == 2


class Spoofer(asyncio.DatagramProtocol):
    """An upstream that answers each query with what must not count first (another ID, another
    question, a query instead of a response), then the true answer (198.51.100.99): over UDP
    all four datagrams at once, over TCP all four messages on the connection."""

    def __init__(self, true_answer: bool = True) -> None:
        self.true_answer = true_answer
        self.transport: asyncio.DatagramTransport | None = None

    def replies(self, wire: bytes) -> list[bytes]:
        query = dns.message.from_wire(wire)

        def answer(name: dns.name.Name, address: str) -> dns.message.Message:
            response = dns.message.make_response(query)
            response.question = [dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.A)]
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", address))
            return response

        name = query.question[0].name
        other_id = answer(name, "192.0.2.66")
        other_id.id = (query.id + 1) % 65536
        other_question = answer(dns.name.from_text("other.example.org"), "192.0.2.67")
        not_a_response = answer(name, "192.0.2.68")
        not_a_response.flags &= ~dns.flags.QR
        bad = [other_id.to_wire(), other_question.to_wire(), not_a_response.to_wire()]
        return bad + ([answer(name, "198.51.100.99").to_wire()] if self.true_answer else [])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for reply in self.replies(data):
            self.transport.sendto(reply, addr)

    async def serve_tcp(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            for reply in self.replies(await reader.readexactly(size)):
                writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
            await reader.read()  # until the asker closes
        finally:
            writer.close()


def test_upstream_answers_that_are_not_to_the_query_are_dropped() -> None:
    asyncio.run(spoofed_answers())


async def spoofed_answers() -> None:
    port = free_port()
    loop = asyncio.get_running_loop()
    closers: list[asyncio.BaseTransport | asyncio.Server] = []
    try:
        for host, spoofer in ((TUNNEL, Spoofer()), (DOMESTIC, Spoofer(true_answer=False))):
            transport, _ = await loop.create_datagram_endpoint(
                lambda s=spoofer: s, local_addr=(host, port))  # type: ignore[misc]
            closers.append(transport)
            closers.append(await asyncio.start_server(spoofer.serve_tcp, host, port))
        wire = dns.message.make_query("www.example.org", "A").to_wire()
        for asker in (ask, ask_tcp):
            reply = dns.message.from_wire(await asker(TUNNEL, wire, port=port))
            assert reply.answer[0].to_text().endswith("198.51.100.99"), asker
            # Nothing but answers that are not to the query: none is taken, the wait runs
            # out (the resolver then answers SERVFAIL; the application retries).
            with pytest.raises(TimeoutError):
                await asker(DOMESTIC, wire, timeout=0.5, port=port)
    finally:
        for closer in closers:
            closer.close()
        for closer in closers:
            if isinstance(closer, asyncio.Server):
                await closer.wait_closed()
