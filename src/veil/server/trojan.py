"""Trojan on the public port: the way in for the apps people already have.

The gate hands this module the first decrypted bytes of every TLS connection that was not a
veil client (:class:`TrojanWayIn`). A complete Trojan request whose password hash names an
active user is served; everything else - a wrong or revoked password, a malformed request,
any other bytes - is rejected, and the gate gives the connection to the cover site with every
byte already read, as for any other stranger.

Serving (:class:`TrojanService`):

* CONNECT: the destination goes through the server's destination policy and resolver (as
  veil streams do), then the TLS connection and the outbound TCP connection are glued back to
  back by :class:`veil.net.direct.DirectDialer`'s relay, with backpressure both ways. The
  bytes after the request are the first bytes sent out.
* UDP ASSOCIATE: the rest of the connection is a stream of Trojan UDP packets; each goes out
  through one UDP flow under the same policy, and replies come back framed the same way.

What is not handled: a request whose first record ends before the request does *and* before
the password hash is complete (one or two records of a few bytes each). Clients write the
request, usually with the first payload, in one TLS record; the gate waits for the rest only
once a known password's hash has arrived (see ``gate.Wait``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from veil.errors import RemoteProtocolError
from veil.net.dialer import UdpFlow
from veil.net.direct import DirectDialer
from veil.protocol.address import Address
from veil.protocol.trojan import (
    MAX_UDP_PAYLOAD,
    Command,
    Incomplete,
    NotTrojan,
    TrojanRequest,
    UdpPacketDecoder,
    encode_udp_packet,
    parse_request,
)
from veil.server.gate import Accept, Reject, UserLookup, Verdict, Wait, WayIn
from veil.server.live import UDP_ASSOCIATION_SLOTS, OutboundSlot, OutboundSlots
from veil.server.outbound import CONNECT_TIMEOUT_S, BoundLog, IdleTimeout, policy_resolver
from veil.server.policy import DestinationPolicy
from veil.store.base import User

log = logging.getLogger("veil.server")

ServeTrojan = Callable[[asyncio.Transport, User, TrojanRequest, bytes], None]


class TrojanWayIn(WayIn):
    """Accepts a complete Trojan request from an active user; rejects anything else."""

    name = "trojan"

    def __init__(self, users: UserLookup, serve: ServeTrojan) -> None:
        self.users = users
        self.serve = serve

    def check(self, data: bytes, transport: asyncio.Transport) -> Verdict:
        parsed = parse_request(data)
        if isinstance(parsed, NotTrojan):
            if parsed.password_hash is None:
                return Reject(None)  # not Trojan-shaped: whatever veil said stands
            return Reject(f"trojan_{parsed.reason}")
        if parsed.password_hash is None:
            return Reject(None)  # too short to name anyone
        user = self.users.find_by_trojan_hash(parsed.password_hash)
        if user is None:
            return Reject("trojan_unknown_password")
        if (refusal := self.users.refusal(user)) is not None:
            return Reject(f"trojan_{refusal}")
        if isinstance(parsed, Incomplete):
            return Wait()
        request = parsed
        rest = data[request.size :]
        return Accept(user, lambda t: self.serve(t, user, request, rest))


class TrojanService:
    """Serves accepted Trojan connections: TCP relays and UDP associations."""

    def __init__(self, policy: DestinationPolicy, slots: OutboundSlots) -> None:
        self.dialer = DirectDialer(connect_timeout=CONNECT_TIMEOUT_S, happy_eyeballs_delay=None,
                                   resolver=policy_resolver(policy, "trojan"))
        self.slots = slots
        self._associations: set[TrojanUdpAssociation] = set()
        self._bound_log = BoundLog()
        self.connections = 0

    def serve(self, transport: asyncio.Transport, user: User, request: TrojanRequest,
              rest: bytes) -> None:
        self.connections += 1
        log.debug("trojan %s for user %s", request.command.name, user.name)
        connect = request.command is Command.CONNECT
        slot = self.slots.take(user.name, 1 if connect else UDP_ASSOCIATION_SLOTS)
        if slot is None:
            # Trojan has no error reply: a connection whose connect failed is closed, as here.
            self._bound_log.refused("trojan", user.name, self.slots)
            transport.close()
            return
        if connect:
            self.dialer.open_tcp(request.destination, transport, rest, on_closed=slot.release)
        else:
            association = TrojanUdpAssociation(transport, self.dialer, self._associations, slot)
            self._associations.add(association)
            transport.set_protocol(association)
            if rest:
                association.data_received(rest)

    def close(self) -> None:
        """Abort every relay and association (the server is shutting down)."""
        self.dialer.close()
        for association in list(self._associations):
            association.close()


class TrojanUdpAssociation(asyncio.Protocol):
    """One UDP ASSOCIATE connection: Trojan UDP packets on TLS <-> one UDP flow.

    Replies are dropped while the TLS connection's write buffer is over its high-water mark
    (UDP may drop; buffering would not be bounded). The association ends when the client
    closes, on a malformed packet, or after UDP_IDLE_TIMEOUT_S without a datagram either way.
    """

    def __init__(self, transport: asyncio.Transport, dialer: DirectDialer,
                 registry: set[TrojanUdpAssociation], slot: OutboundSlot) -> None:
        self.transport = transport
        self._slot = slot
        self._registry = registry
        self._decoder = UdpPacketDecoder()
        self._flow: UdpFlow = dialer.open_udp(self._reply, self.close)
        self._paused = False
        self._closed = False
        self._idle = IdleTimeout(self.close)

    def data_received(self, data: bytes) -> None:
        self._idle.touch()
        try:
            packets = self._decoder.feed(data)
        except RemoteProtocolError:
            self.close()
            return
        for address, payload in packets:
            self._flow.send(address, payload)

    def _reply(self, source: Address, payload: bytes) -> None:
        if self._closed or self._paused or len(payload) > MAX_UDP_PAYLOAD:
            return
        self._idle.touch()
        host = source.host
        if host.startswith("::ffff:"):  # an IPv4 peer seen through a dual-stack socket
            source = Address(host[7:], source.port)
        self.transport.write(encode_udp_packet(source, payload))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def _finish(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        self._idle.cancel()
        self._flow.close()
        self._slot.release()
        self._registry.discard(self)
        return True

    def close(self) -> None:
        if self._finish():
            self.transport.close()
