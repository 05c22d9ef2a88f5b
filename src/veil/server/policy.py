"""Which destinations the server relays to.

A VPN server that relays to its own loopback or to the private network it sits in hands that
network to every key holder (and to anyone who steals a key). So private, loopback,
link-local, multicast, reserved and unspecified addresses are refused unless the operator
says ``--allow-private``. Names are resolved here, at the server, so clients leak no DNS, and
the check runs on every address a name resolves to (a public name pointing at 127.0.0.1 is
still loopback).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    allow_private: bool = False

    def allows(self, ip: IPAddress) -> bool:
        if self.allow_private:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                    or ip.is_reserved or ip.is_unspecified
                    or (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED))


_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT space, RFC 6598


class ResolveError(Exception):
    pass


class RefusedDestination(Exception):
    pass


async def resolve(host: str, port: int, policy: DestinationPolicy,
                  kind: socket.SocketKind = socket.SOCK_STREAM) -> list[tuple[int, str]]:
    """(family, ip) pairs for ``host`` that the policy allows, in resolver order.

    Raises ResolveError when the name does not resolve and RefusedDestination when every
    address it resolves to is refused.
    """
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if not policy.allows(literal):
            raise RefusedDestination(host)
        return [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=kind)
    except (socket.gaierror, UnicodeError) as exc:
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
