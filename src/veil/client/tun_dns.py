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

UDP only: a client that gets a truncated answer and retries over TCP gets no answer from
here (queries carry EDNS sizes that fit nearly every answer).
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
from veil.client.tun_rules import dns_action

log = logging.getLogger("veil.client")

#: Where the resolver listens: a loopback address of its own (all of 127/8 is local on Linux),
#: so that a resolver the machine already runs on 127.0.0.1:53 or 127.0.0.53:53 is left be.
LISTEN_HOST = "127.0.77.53"
DNS_PORT = 53
#: How long an upstream resolver may take to answer one query; past it the query is dropped
#: and the application's own resolver library retries (glibc: 5 s, then again).
UPSTREAM_TIMEOUT_S = 4.0
#: Queries waiting for an upstream answer at once: each holds a socket and a task; a program
#: flooding the resolver must not open sockets without bound (past it, queries are dropped).
MAX_PENDING_QUERIES = 256
#: The largest DNS message over UDP (RFC 6891 allows an EDNS payload size up to 65535).
MAX_DNS_MESSAGE = 65535

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


async def ask(server: str, wire: bytes, timeout: float = UPSTREAM_TIMEOUT_S) -> bytes:
    """One query to ``server``:53 over UDP from a fresh socket (a random source port per
    query, as stub resolvers do); TimeoutError or OSError when no answer."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Upstream(answer), remote_addr=(server, DNS_PORT),
        family=socket.AF_INET6 if ":" in server else socket.AF_INET)
    try:
        transport.sendto(wire)
        return await asyncio.wait_for(answer, timeout)
    finally:
        transport.close()


class SplitResolver(asyncio.DatagramProtocol):
    """The resolver itself; ``tunnel_servers`` can change when the server's config does."""

    def __init__(self, rules: RuleSet, direct_server: str | None, on_direct: OnDirect,
                 tunnel_servers: list[str] | None = None) -> None:
        self.rules = rules
        self.direct_server = direct_server
        self.tunnel_servers: list[str] = tunnel_servers or []
        self.on_direct = on_direct
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Queries per action, and those dropped (bad, too many at once, upstream silent).
        self.counts: dict[str, int] = {"tunnel": 0, "direct": 0, "block": 0, "dropped": 0}

    async def start(self, host: str = LISTEN_HOST, port: int = DNS_PORT) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self,
                                                           local_addr=(host, port))
        self.transport = transport

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
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
        parsed = query_name(data)
        if parsed is None:
            self.counts["dropped"] += 1
            return
        query, name = parsed
        action = dns_action(self.rules, name)
        self.counts[action.value] += 1
        reply: bytes | None
        if action is Action.BLOCK:
            reply = blocked_answer(query)
        elif action is Action.DIRECT and self.direct_server is not None:
            reply = await self._upstream(self.direct_server, data)
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
            reply = await self._tunnel(data)
        else:
            reply = await self._tunnel(data)
        if reply is None:
            reply = failure_answer(query)
        if self.transport is not None:
            self.transport.sendto(reply, addr)

    async def _tunnel(self, data: bytes) -> bytes | None:
        for server in self.tunnel_servers:
            reply = await self._upstream(server, data)
            if reply is not None:
                return reply
        return None

    async def _upstream(self, server: str, data: bytes) -> bytes | None:
        try:
            return await ask(server, data)
        except (TimeoutError, OSError) as exc:
            log.debug("dns: no answer from %s: %s", server, exc)
            self.counts["dropped"] += 1
            return None
