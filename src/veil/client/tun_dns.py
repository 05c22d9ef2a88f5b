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

A name whose labels hold bytes no host name has (a ``.`` inside a label, spaces, non-ASCII
bytes: :func:`veil.client.tun_rules.dns_action`) is resolved through the tunnel whatever the
rules say: as text it would read like another name (``a\\.example.cn``, whose labels are
``a.example`` and ``cn``, like a name under ``example.cn``). A request other than a standard
query (NOTIFY, UPDATE, ...) gets NOTIMP and is sent nowhere. An upstream answer counts only
if it answers the very query sent (its ID and its question): anything else (a late answer,
an off-path spoofer's guess) is dropped, and the real answer is waited for until
UPSTREAM_TIMEOUT_S.

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
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype

from veil.client.rules import Action, RuleSet
from veil.client.tun_rules import RESOLVER_HOST, dns_action
from veil.protocol.address import Address

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
#: Addresses one DIRECT answer may route around the tunnel: a name has a handful (CDNs give
#: 2-8); the domestic resolver is the censor's, and each address it names leaves outside the
#: tunnel for the answer's lifetime, so it gets no more than this (measured: ~4,000 records
#: in one TCP answer held the event loop for 7.8 s).
MAX_DIRECT_ADDRESSES_PER_ANSWER = 16
OnDirect = Callable[[list[tuple[IP, int]]], Awaitable[None]]


def _request(wire: bytes) -> dns.message.Message | None:
    """``wire`` parsed, None if it does not parse or is a response (QR set)."""
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return None
    return None if message.flags & dns.flags.QR else message


def query_name(wire: bytes) -> tuple[dns.message.Message, str] | None:
    """The parsed query and its question's name (text, no trailing dot; dnspython's escapes
    for bytes no host name has, such as ``\\.`` for a dot inside a label), None if it is not
    a standard query (opcode QUERY) with one question."""
    message = _request(wire)
    if (message is None or message.opcode() != dns.opcode.QUERY
            or len(message.question) != 1):
        return None
    return message, message.question[0].name.to_text(omit_final_dot=True)


def not_implemented(wire: bytes) -> bytes | None:
    """NOTIMP for a request of another opcode than QUERY (NOTIFY, UPDATE, ...): a stub
    resolver has no business forwarding those anywhere. None for anything else."""
    message = _request(wire)
    if message is None or message.opcode() == dns.opcode.QUERY:
        return None
    try:
        response = dns.message.make_response(message)
        response.set_rcode(dns.rcode.NOTIMP)
        return response.to_wire()
    except (dns.exception.DNSException, ValueError):
        return None


def answers(query: dns.message.Message, wire: bytes) -> bool:
    """Whether ``wire`` is an answer to ``query``: a response, with its ID and opcode, and
    its one question (name case-insensitively, type, class). Stricter than dnspython's
    ``is_response``, which takes an error with no question at all."""
    try:
        reply = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return False
    return bool(reply.flags & dns.flags.QR and reply.id == query.id
                and reply.opcode() == query.opcode()
                and len(reply.question) == len(query.question) == 1
                and reply.question[0] == query.question[0])


def blocked_answer(query: dns.message.Message) -> bytes:
    """NXDOMAIN for a blocked name: applications fail at once, nothing is sent."""
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire()


def failure_answer(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()


def answer_addresses(wire: bytes, qname: str | None = None) -> list[tuple[IP, int]]:
    """The A/AAAA addresses an answer gives for ``qname`` (following its CNAME chain: the
    addresses the application will connect to), with their TTLs; records for other names are
    ignored (an answer may carry any, and each address named here leaves outside the tunnel),
    and so are addresses no host is reached at (loopback, unspecified, multicast,
    link-local, reserved). At most MAX_DIRECT_ADDRESSES_PER_ANSWER."""
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return []
    owners: set[dns.name.Name] | None = None
    if qname is not None:
        try:
            owner = dns.name.from_text(qname)
        except (dns.exception.DNSException, ValueError):
            return []
        owners = {owner}
        for _ in range(len(message.answer)):  # a chain is never longer than the answer
            targets = {rdata.target for rrset in message.answer
                       if rrset.rdtype == dns.rdatatype.CNAME and rrset.name in owners
                       for rdata in rrset} - owners
            if not targets:
                break
            owners |= targets
    found: list[tuple[IP, int]] = []
    for rrset in message.answer:
        if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            continue
        if owners is not None and rrset.name not in owners:
            continue
        for rdata in rrset:
            address = ipaddress.ip_address(rdata.address)
            if (address.is_loopback or address.is_unspecified or address.is_multicast
                    or address.is_link_local or address.is_reserved):
                continue
            found.append((address, int(rrset.ttl)))
            if len(found) >= MAX_DIRECT_ADDRESSES_PER_ANSWER:
                return found
    return found


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, answer: asyncio.Future[bytes], query: dns.message.Message) -> None:
        self.answer = answer
        self.query = query

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The socket is connected, so only the resolver's address and port get here; that
        # still leaves a late answer to another query, or a spoofer who guessed the port.
        if not self.answer.done() and answers(self.query, data):
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


def _marked_socket(server: str, kind: socket.SocketKind, mark: int | None) -> socket.socket:
    """A socket for an upstream query; with ``mark``, SO_MARK set, so that the kill switch
    lets exactly this resolver's queries reach the domestic resolver (not any process's)."""
    sock = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, kind)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _parsed(wire: bytes) -> dns.message.Message:
    try:
        return dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError) as exc:
        raise ValueError("not a DNS message") from exc


async def ask(server: str, wire: bytes, timeout: float = UPSTREAM_TIMEOUT_S,
              port: int = DNS_PORT, mark: int | None = None) -> bytes:
    """One query to ``server``:53 over UDP from a fresh socket (a random source port per
    query, as stub resolvers do); the first datagram that :func:`answers` it, TimeoutError
    when none came in ``timeout``, OSError when the network refused."""
    query = _parsed(wire)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()
    sock = _marked_socket(server, socket.SOCK_DGRAM, mark)
    try:
        sock.connect((server, port))
    except OSError:
        sock.close()
        raise
    transport, _ = await loop.create_datagram_endpoint(lambda: _Upstream(answer, query),
                                                      sock=sock)
    try:
        transport.sendto(wire)
        return await asyncio.wait_for(answer, timeout)
    finally:
        transport.close()


async def ask_tcp(server: str, wire: bytes, timeout: float = UPSTREAM_TIMEOUT_S,
                  port: int = DNS_PORT, mark: int | None = None) -> bytes:
    """One query to ``server``:53 over TCP (RFC 7766: a two-byte length, then the message);
    messages that do not :func:`answers` it are skipped until ``timeout``."""
    query = _parsed(wire)

    async def exchange() -> bytes:
        sock = _marked_socket(server, socket.SOCK_STREAM, mark)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (server, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = await reader.readexactly(size)
                if answers(query, reply):
                    return reply
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
        #: Addresses a DIRECT answer may never route around the tunnel (the ways in, the
        #: tunnel's resolvers): set by the TUN client.
        self.never_direct: set[str] = set()
        #: SO_MARK of every upstream query (the kill switch's DIRECT_RESOLVER_MARK): only
        #: marked queries reach ``direct_server``, and no port BLOCK rule refuses a marked
        #: query to the tunnel's resolvers; None where nothing filters by it (loopback tests).
        self.direct_mark: int | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Queries per action, those dropped (bad, too many at once, upstream silent), and
        #: requests of other opcodes (answered NOTIMP).
        self.counts: dict[str, int] = {"tunnel": 0, "direct": 0, "block": 0, "dropped": 0,
                                       "notimp": 0}

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
            refusal = not_implemented(data)
            self.counts["dropped" if refusal is None else "notimp"] += 1
            return refusal
        query, name = parsed
        action = dns_action(self.rules, name)
        self.counts[action.value] += 1
        reply: bytes | None
        if action is Action.BLOCK:
            reply = blocked_answer(query)
        elif action is Action.DIRECT and self.direct_server is not None:
            reply = await self._upstream(self.direct_server, data, tcp)
            if reply is not None:
                # Never around the tunnel: what the rules block, or send through it by
                # address (the server's ways, the tunnel's resolvers are not direct either).
                addresses = [(address, ttl) for address, ttl in answer_addresses(reply, name)
                             if self.rules.decide(Address(str(address), 0), count=False).action
                             is not Action.BLOCK and str(address) not in self.never_direct]
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
        # Every query carries the mark: the kill switch lets marked queries out to the
        # domestic resolver (and only those), and exempts them from port BLOCK rules
        # (NETWORK,UDP,BLOCK must not cut this resolver off from the tunnel's).
        mark = self.direct_mark
        try:
            port = self.upstream_port
            return await (ask_tcp(server, data, port=port, mark=mark) if tcp else
                          ask(server, data, port=port, mark=mark))
        except (TimeoutError, OSError) as exc:
            log.debug("dns: no answer from %s: %s", server, exc)
            self.counts["dropped"] += 1
            return None
