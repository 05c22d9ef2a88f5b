"""TUN mode's own DNS resolver, with split routing (``veil connect --tun --rules``).

resolv.conf names this resolver (:data:`LISTEN_HOST`, on loopback, which the kill switch lets
through) instead of the server's resolvers. It answers real addresses (no fake IPs): per query
the name is decided by the rules' domain rules (:func:`veil.client.tun_rules.dns_action`):

* TUNNEL (no rule, or a tunnel rule): the query, unchanged, goes to the server's resolver,
  whose address is routed into the tunnel, exactly as without ``--rules``. The original
  (domestic) resolver never sees the name.
* DIRECT: the query goes to the original resolver (the first ``nameserver`` of resolv.conf
  before veil rewrote it), outside the tunnel; every A/AAAA address in its answer is given a
  host route via the original gateway and a kill-switch entry (``on_direct``) *before* the
  answer is handed back, so the first connection already goes direct.
* BLOCK: NXDOMAIN, nothing is sent anywhere.

It listens on UDP and TCP (a client that got a truncated answer retries over TCP); a query
that came over TCP is asked upstream over TCP too, so its answer is whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from veil.client.rules import Action, RuleSet
from veil.client.tun_rules import RESOLVER_HOST, dns_action

log = logging.getLogger("veil.client")

LISTEN_HOST = RESOLVER_HOST
DNS_PORT = 53
#: How long an upstream resolver may take to answer one query; past it the query is dropped
#: and the application's own resolver library retries (glibc: 5 s, then again).
UPSTREAM_TIMEOUT_S = 4.0
#: Queries waiting for an upstream answer at once: each holds a socket and a task; a program
#: flooding the resolver must not open sockets without bound (past it, queries are dropped).
MAX_PENDING_QUERIES = 256
#: TCP connections to the resolver at once: a client uses one per truncated answer, briefly;
#: past it a new connection is closed at once.
MAX_TCP_CLIENTS = 64
#: How long a TCP connection to the resolver may stay silent before it is closed (RFC 7766
#: 6.2.3 suggests a few seconds for idle connections of stub resolvers).
TCP_IDLE_S = 10.0

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
OnDirect = Callable[[list[tuple[IP, int]]], Awaitable[None]]


def query_name(wire: bytes) -> tuple[dns.message.Message, str] | None:
    """The parsed query and its question's name (text, no trailing dot), None if it is not a
    query with one question."""
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return None
    if message.flags & dns.flags.QR or len(message.question) != 1:
        return None
    return message, message.question[0].name.to_text(omit_final_dot=True)


def blocked_answer(query: dns.message.Message) -> bytes:
    """NXDOMAIN for a blocked name: applications fail at once, nothing is sent."""
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire()


def failure_answer(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()


def answer_addresses(wire: bytes) -> list[tuple[IP, int]]:
    """Every A/AAAA address in an answer with its TTL (CNAME chains included: the addresses
    are what the application will connect to)."""
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return []
    found: list[tuple[IP, int]] = []
    for rrset in message.answer:
        if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            continue
        for rdata in rrset:
            found.append((ipaddress.ip_address(rdata.address), int(rrset.ttl)))
    return found


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, answer: asyncio.Future[bytes]) -> None:
        self.answer = answer

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def ask(server: str, wire: bytes, timeout: float = UPSTREAM_TIMEOUT_S,
              port: int = DNS_PORT) -> bytes:
    """One query to ``server``:53 over UDP from a fresh socket (a random source port per
    query, as stub resolvers do); TimeoutError or OSError when no answer."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Upstream(answer), remote_addr=(server, port),
        family=socket.AF_INET6 if ":" in server else socket.AF_INET)
    try:
        transport.sendto(wire)
        return await asyncio.wait_for(answer, timeout)
    finally:
        transport.close()


async def ask_tcp(server: str, wire: bytes, timeout: float = UPSTREAM_TIMEOUT_S,
                  port: int = DNS_PORT) -> bytes:
    """One query to ``server``:53 over TCP (RFC 7766: a two-byte length, then the message)."""
    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(server, port)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.IncompleteReadError as exc:
        raise OSError("the resolver closed the connection") from exc


class SplitResolver(asyncio.DatagramProtocol):
    """The resolver itself; ``tunnel_servers`` can change when the server's config does.
    ``upstream_port``: where the upstream resolvers listen (53; tests use others)."""

    def __init__(self, rules: RuleSet, direct_server: str | None, on_direct: OnDirect,
                 tunnel_servers: list[str] | None = None,
                 upstream_port: int = DNS_PORT) -> None:
        self.upstream_port = upstream_port
        self.rules = rules
        self.direct_server = direct_server
        self.tunnel_servers: list[str] = tunnel_servers or []
        self.on_direct = on_direct
        self.transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Queries per action, and those dropped (bad, too many at once, upstream silent).
        self.counts: dict[str, int] = {"tunnel": 0, "direct": 0, "block": 0, "dropped": 0}

    async def start(self, host: str = LISTEN_HOST, port: int = DNS_PORT) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self,
                                                           local_addr=(host, port))
        self.transport = transport
        self._tcp = await asyncio.start_server(self._serve_tcp, host, port)

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(self._tasks) >= MAX_PENDING_QUERIES:
            self.counts["dropped"] += 1
            return
        task = asyncio.ensure_future(self._answer(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, data: bytes, addr: Any) -> None:
        reply = await self.resolve(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self._tcp_clients += 1
        task = asyncio.current_task()
        try:
            if self._tcp_clients > MAX_TCP_CLIENTS or task is None:
                return
            self._tasks.add(task)
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                    data = await asyncio.wait_for(
                        reader.readexactly(int.from_bytes(head, "big")), TCP_IDLE_S)
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    return
                reply = await self.resolve(data, tcp=True)
                if reply is None:
                    return
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        finally:
            self._tcp_clients -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def resolve(self, data: bytes, *, tcp: bool = False) -> bytes | None:
        """The answer to one query (None: not a query, nothing to answer)."""
        parsed = query_name(data)
        if parsed is None:
            self.counts["dropped"] += 1
            return None
        query, name = parsed
        action = dns_action(self.rules, name)
        self.counts[action.value] += 1
        reply: bytes | None
        if action is Action.BLOCK:
            reply = blocked_answer(query)
        elif action is Action.DIRECT and self.direct_server is not None:
            reply = await self._upstream(self.direct_server, data, tcp)
            if reply is not None:
                addresses = answer_addresses(reply)
                if addresses:
                    try:
                        await self.on_direct(addresses)
                    except Exception as exc:  # a route that failed: answer anyway, logged
                        log.warning("dns: cannot route %s direct: %s", name, exc)
        elif action is Action.DIRECT:
            # No domestic resolver was known (resolv.conf named none, or only loopback):
            # the name is resolved through the tunnel rather than not at all.
            reply = await self._tunnel(data, tcp)
        else:
            reply = await self._tunnel(data, tcp)
        return failure_answer(query) if reply is None else reply

    async def _tunnel(self, data: bytes, tcp: bool) -> bytes | None:
        for server in self.tunnel_servers:
            reply = await self._upstream(server, data, tcp)
            if reply is not None:
                return reply
        return None

    async def _upstream(self, server: str, data: bytes, tcp: bool) -> bytes | None:
        try:
            port = self.upstream_port
            return await (ask_tcp(server, data, port=port) if tcp else
                          ask(server, data, port=port))
        except (TimeoutError, OSError) as exc:
            log.debug("dns: no answer from %s: %s", server, exc)
            self.counts["dropped"] += 1
            return None
