"""The answer of a RESOLVE stream: the addresses a name has, as the server's resolver saw them.

Sans-IO. The client opens a stream of kind ``StreamKind.RESOLVE`` whose OPEN carries the name
(port 0) and sends FIN at once; the server answers with one message in DATA, then FIN::

    count (1) | count x ( family (1: 4 or 6) | address (4 or 16 bytes) )

in the server resolver's order, at most :data:`MAX_RESOLVED_ADDRESSES`, only addresses the
server's destination policy allows (so no private or loopback address unless the server
allows them for its own connects too). A name that does not resolve, or whose every address
the policy refuses, gets RESET (RESOLVE_FAILED, REFUSED_DESTINATION) instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from veil.errors import RemoteProtocolError

__all__ = ["MAX_ANSWER_BYTES", "MAX_RESOLVED_ADDRESSES", "decode_answer", "encode_answer"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Addresses one answer carries. The client decides by one of them; a few more let it prefer
#: IPv4 (its own network may have no IPv6). A name with hundreds of records must not make an
#: answer of kilobytes.
MAX_RESOLVED_ADDRESSES = 8
#: The longest answer: the count and eight IPv6 entries. A reader holds no more than this.
MAX_ANSWER_BYTES = 1 + MAX_RESOLVED_ADDRESSES * 17


def encode_answer(addresses: Iterable[IPAddress]) -> bytes:
    """The answer for ``addresses`` (the first MAX_RESOLVED_ADDRESSES, duplicates dropped)."""
    chosen: list[IPAddress] = []
    for address in addresses:
        if address not in chosen:
            chosen.append(address)
        if len(chosen) == MAX_RESOLVED_ADDRESSES:
            break
    out = bytearray((len(chosen),))
    for address in chosen:
        out.append(address.version)
        out += address.packed
    return bytes(out)


def decode_answer(data: bytes) -> tuple[IPAddress, ...]:
    """The addresses of a whole answer; RemoteProtocolError if it is not one (at least one
    address, no more than MAX_RESOLVED_ADDRESSES, nothing after the last)."""
    if not data or not 1 <= data[0] <= MAX_RESOLVED_ADDRESSES:
        raise RemoteProtocolError("bad resolve answer count", code="bad_answer")
    out: list[IPAddress] = []
    pos = 1
    for _ in range(data[0]):
        family = data[pos] if pos < len(data) else 0
        size = {4: 4, 6: 16}.get(family)
        if size is None or pos + 1 + size > len(data):
            raise RemoteProtocolError("bad resolve answer entry", code="bad_answer")
        raw = data[pos + 1:pos + 1 + size]
        out.append(ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw))
        pos += 1 + size
    if pos != len(data):
        raise RemoteProtocolError("trailing bytes in resolve answer", code="bad_answer")
    return tuple(out)
