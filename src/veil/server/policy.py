"""Which destinations the server relays to.

A VPN server that relays to its own loopback or to the private network it sits in hands that
network to every key holder (and to anyone who steals a key). So the address ranges below —
private, loopback, link-local, multicast, reserved, documentation, cloud host endpoints — and
the server's own addresses are refused unless the operator says ``--allow-private``. TCP
ports the operator lists (``--refuse-ports``, SMTP's 25 by default) are refused whatever the
address, before any lookup. Names are
resolved here, at the server, so clients leak no DNS, and the check runs on every address a
name resolves to (a public name pointing at 127.0.0.1 is still loopback).

The ranges are a table here, not Python's ``is_private`` and friends: those change between
Python releases (3.11.2 and 3.11.7 disagree about 192.0.0.0/24 and 2002::/16), and the same
table feeds ``--tun``'s nftables rules (server/tun.py), so streams and packets are refused
alike. IPv6 addresses that carry an IPv4 address (IPv4-mapped, 6to4, NAT64) are refused when
the IPv4 address inside is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from veil.errors import TransportError

try:  # Linux: netlink lists the interfaces' addresses
    from pyroute2 import IPRoute  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - other platforms
    IPRoute = None

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Give up on a name after this long. glibc's own retries (resolv.conf: 5 s x 2 attempts) can
#: hold a lookup for ~10 s; a client's application has timed out by then too.
RESOLVE_TIMEOUT_S = 10.0
#: Threads that run getaddrinfo() for the whole server. A pool of its own, not the loop's
#: default executor: the user store's to_thread calls must not queue behind a flood of
#: lookups. A resolver answers in milliseconds, so 16 carry hundreds of names a second.
RESOLVER_THREADS = 16
#: Lookups the server holds at once, running or queued, counted until their thread is free
#: (a timed-out lookup still occupies one). Past it a name fails at once (a stream is reset
#: with RESOLVE_FAILED, a datagram is dropped) instead of queueing without limit: one user
#: spraying unique names cannot make everybody's lookups wait for minutes.
MAX_PENDING_RESOLUTIONS = 256
# Listing the interfaces' addresses over netlink takes milliseconds; a stuck query must not
# stop the server from starting (it then refuses its listen and public addresses only).
LOCAL_ADDRESSES_TIMEOUT_S = 5.0

# IANA's special-purpose registries (RFC 6890 and updates): the ranges that are not globally
# reachable, plus host endpoints clouds place outside them. The documentation ranges
# (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) are not here: nothing is
# routed to them, so there is nothing behind them to protect, and the network-namespace tests
# use them as their public-looking Internet.
REFUSED_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # private (RFC 1918)
    "100.64.0.0/10",  # shared address space, carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local; cloud metadata lives at 169.254.169.254
    "192.0.0.0/24",  # IETF protocol assignments
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the limited broadcast address
    "168.63.129.16/32",  # Azure's host endpoint (wireserver, DNS, health probes)
)
REFUSED_V6 = (
    "::/96",  # unspecified, loopback, and the deprecated IPv4-compatible addresses
    "::ffff:0:0/96",  # IPv4-mapped: never on the wire; streams check the IPv4 inside
    "100::/64",  # discard-only
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): a private network's translator
    "2001::/23",  # IETF protocol assignments (Teredo's 2001::/32 among them)
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated, still routed by some)
    "ff00::/8",  # multicast
)
# IPv6 prefixes that embed an IPv4 address, and where: (prefix, bit offset of the IPv4).
_EMBEDDING = (("2002::/16", 16), ("64:ff9b::/96", 96))  # 6to4 (RFC 3056), NAT64 (RFC 6052)

_V4 = tuple(ipaddress.IPv4Network(n) for n in REFUSED_V4)


def _embedded_v6(network: ipaddress.IPv4Network) -> list[ipaddress.IPv6Network]:
    """The IPv6 networks that carry ``network`` inside a 6to4 or NAT64 prefix."""
    out = []
    for prefix, offset in _EMBEDDING:
        base = ipaddress.IPv6Network(prefix)
        shift = 128 - offset - 32
        address = int(base.network_address) | (int(network.network_address) << shift)
        out.append(ipaddress.IPv6Network((address, offset + network.prefixlen)))
    return out


# Every refused IPv6 range, the embedded IPv4 ones included: what nftables is given.
REFUSED_V6_ALL = (*REFUSED_V6, *(str(n) for v4 in _V4 for n in _embedded_v6(v4)))
_V6 = tuple(ipaddress.IPv6Network(n) for n in REFUSED_V6_ALL)


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    for prefix, offset in _EMBEDDING:
        network = ipaddress.IPv6Network(prefix)
        if ip in network:
            return ipaddress.IPv4Address((int(ip) >> (128 - offset - 32)) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """``allow_private`` lets every address through (tests, and operators who mean it);
    otherwise the ranges above and ``own_addresses`` (the server's own) are refused.
    ``refused_tcp_ports`` are refused on every address (``--allow-private`` included)."""

    allow_private: bool = False
    own_addresses: frozenset[IPAddress] = frozenset()
    refused_tcp_ports: frozenset[int] = frozenset()

    @classmethod
    def for_server(cls, allow_private: bool, own: Iterable[str],
                   refused_tcp_ports: Iterable[int] = ()) -> DestinationPolicy:
        """A policy refusing ``own`` too: the addresses the server listens on and is reached
        at (those that are IP literals) and its interfaces' addresses."""
        addresses = set()
        for text in own:
            try:
                addresses.add(ipaddress.ip_address(text.split("%", maxsplit=1)[0]))
            except ValueError:
                continue  # a name: its addresses are not the server's to know
        return cls(allow_private, frozenset(addresses), frozenset(refused_tcp_ports))

    def allows(self, ip: IPAddress) -> bool:
        if self.allow_private:
            return True
        if ip in self.own_addresses:
            return False
        if isinstance(ip, ipaddress.IPv6Address):
            inner = _embedded_v4(ip)
            if inner is not None:
                return inner not in self.own_addresses and not any(inner in n for n in _V4)
            return not any(ip in n for n in _V6)
        return not any(ip in n for n in _V4)


def local_addresses() -> list[str]:
    """This host's interface addresses (Linux, by netlink), or none where they cannot be
    listed: the server refuses them as destinations, as it refuses its listen address.

    pyroute2's synchronous IPRoute runs an event loop of its own, which cannot start inside a
    running one: the query runs in a thread of its own, whoever calls.
    """
    if IPRoute is None:
        return []

    def query() -> list[str]:
        # pyroute2 logs every netlink message at DEBUG, with names in them: -vv is for veil's
        # own messages, and logs must not say where users went.
        logging.getLogger("pyroute2").setLevel(logging.WARNING)
        with IPRoute() as ipr:
            return [str(msg.get_attr("IFA_ADDRESS")) for msg in ipr.get_addr()
                    if msg.get_attr("IFA_ADDRESS")]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            return pool.submit(query).result(timeout=LOCAL_ADDRESSES_TIMEOUT_S)
        except (OSError, concurrent.futures.TimeoutError):
            return []


class RefusedPort(TransportError):
    """The policy refuses the destination's TCP port (``--refuse-ports``); the message is
    the port."""

    code = "port_refused"


class ResolveError(TransportError):
    """The destination's name did not resolve; the message is the name."""

    code = "resolve_failed"


class RefusedDestination(TransportError):
    """The policy refuses every address the destination has; the message is the name."""

    code = "destination_refused"


async def resolve(host: str, port: int, policy: DestinationPolicy,
                  kind: socket.SocketKind = socket.SOCK_STREAM) -> list[tuple[int, str]]:
    """(family, ip) pairs for ``host`` that the policy allows, in resolver order.

    Raises RefusedPort for a refused TCP port (no lookup made), ResolveError when the name
    does not resolve and RefusedDestination when every address it resolves to is refused.
    """
    if kind == socket.SOCK_STREAM and port in policy.refused_tcp_ports:
        raise RefusedPort(str(port))
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if not policy.allows(literal):
            raise RefusedDestination(host)
        return [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
    try:
        infos = await _RESOLVER.getaddrinfo(host, port, kind)
    except (OSError, UnicodeError, TimeoutError) as exc:
        raise ResolveError(host) from exc
    result: list[tuple[int, str]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        addr = str(sockaddr[0])
        ip = ipaddress.ip_address(addr.split("%", maxsplit=1)[0])
        if policy.allows(ip) and (family, addr) not in result:
            result.append((family, addr))
    if not result:
        raise RefusedDestination(host)
    return result


class ResolverBusy(OSError):
    """MAX_PENDING_RESOLUTIONS lookups are already running or queued."""


class BoundedResolver:
    """getaddrinfo() on a pool of its own, with a timeout and a cap on pending lookups."""

    def __init__(self, threads: int = RESOLVER_THREADS,
                 max_pending: int = MAX_PENDING_RESOLUTIONS,
                 timeout: float = RESOLVE_TIMEOUT_S) -> None:
        self.threads = threads
        self.max_pending = max_pending
        self.timeout = timeout
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # pending is decremented from the worker threads
        self.pending = 0
        #: Lookups refused at the cap and lookups that timed out, since start.
        self.refused = 0
        self.timed_out = 0

    async def getaddrinfo(self, host: str, port: int,
                          kind: socket.SocketKind) -> list[tuple[Any, ...]]:
        with self._lock:
            if self.pending >= self.max_pending:
                self.refused += 1
                raise ResolverBusy("resolver busy")
            self.pending += 1
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="veil-resolve")
        try:
            future = self._pool.submit(socket.getaddrinfo, host, port, 0, kind)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        try:
            async with asyncio.timeout(self.timeout):
                infos = await asyncio.wrap_future(future)
        except TimeoutError:
            self.timed_out += 1
            future.cancel()  # frees the slot now if it never left the queue
            raise
        return list(infos)

    def _done(self, _future: object) -> None:
        with self._lock:
            self.pending -= 1


#: The server's one resolver (streams, UDP associations and Trojan share its bounds).
_RESOLVER = BoundedResolver()


def server_resolver() -> BoundedResolver:
    """The server's one resolver, for its counters (ServerStatus.bounds)."""
    return _RESOLVER
