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

Through a CDN (:class:`TrojanOrNoise`): with ``--trojan``, a carrier on a CDN way's secret
path (``veil.transport.cdn``) whose first bytes are a Trojan request - what an app's
trojan-ws sends as its first WebSocket message - is served here too, as
:class:`CarrierTrojan`; any other first bytes go to veil's Noise channel, as they do without
``--trojan``. The CDN ends TLS, so it reads the password hash and every byte relayed: the
apps' design, and why veil's own clients use Noise there (docs/operations.md).

What is not handled: a request whose first record ends before the request does *and* before
the password hash is complete (one or two records of a few bytes each). Clients write the
request, usually with the first payload, in one TLS record; the gate waits for the rest only
once a known password's hash has arrived (see ``gate.Wait``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from veil.errors import RemoteProtocolError
from veil.net.dialer import UdpFlow
from veil.net.direct import DirectDialer
from veil.protocol.address import Address
from veil.protocol.bittorrent import StreamSniffer, datagram_is_bittorrent
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
from veil.server.gate import MAX_WAIT_BYTES, Accept, Reject, UserLookup, Verdict, Wait, WayIn
from veil.server.live import UDP_ASSOCIATION_SLOTS, OutboundSlot, OutboundSlots, device_of
from veil.server.outbound import CONNECT_TIMEOUT_S, BoundLog, IdleTimeout, policy_resolver
from veil.server.policy import DestinationPolicy
from veil.store.base import User
from veil.transport.ratelimit import Limiter

log = logging.getLogger("veil.server")

ServeTrojan = Callable[[asyncio.Transport, User, TrojanRequest, bytes], None]


class TrojanWayIn(WayIn):
    """Accepts a complete Trojan request from an active user; rejects anything else."""

    name = "trojan"

    def __init__(self, users: UserLookup, serve: ServeTrojan, *,
                 through_cdn: bool = False) -> None:
        self.users = users
        self.serve = serve
        # Through a CDN the peer is the CDN's edge: no device limit can count it.
        self._counts_devices = not through_cdn

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
        device = device_of(transport) if self._counts_devices else None
        if (refusal := self.users.refusal(user, device)) is not None:
            return Reject(f"trojan_{refusal}")
        if isinstance(parsed, Incomplete):
            return Wait()
        request = parsed
        rest = data[request.size :]
        return Accept(user, lambda t: self.serve(t, user, request, rest))


class TrojanService:
    """Serves accepted Trojan connections: TCP relays and UDP associations."""

    def __init__(self, policy: DestinationPolicy, slots: OutboundSlots, *,
                 block_bittorrent: bool = False) -> None:
        self.block_bittorrent = block_bittorrent
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
            refuse = None
            if self.block_bittorrent:
                sniffer = StreamSniffer()
                if sniffer.feed(rest):
                    _refused_bittorrent("trojan")
                    slot.release()
                    transport.abort()
                    return
                refuse = _bittorrent_refuser(sniffer)
            self.dialer.open_tcp(request.destination, transport, rest, on_closed=slot.release,
                                 refuse=refuse)
        else:
            association = TrojanUdpAssociation(transport, self.dialer, self._associations, slot,
                                               block_bittorrent=self.block_bittorrent)
            self._associations.add(association)
            transport.set_protocol(association)
            if rest:
                association.data_received(rest)

    def close(self) -> None:
        """Abort every relay and association (the server is shutting down)."""
        self.dialer.close()
        for association in list(self._associations):
            association.close()


def _refused_bittorrent(way_in: str) -> None:
    log.info("%s: refused BitTorrent (--block-bittorrent)", way_in)


def _bittorrent_refuser(sniffer: StreamSniffer) -> Callable[[bytes], bool]:
    def refuse(data: bytes) -> bool:
        if sniffer.done:
            return False
        if sniffer.feed(data):
            _refused_bittorrent("trojan")
            return True
        return False

    return refuse


class TrojanUdpAssociation(asyncio.Protocol):
    """One UDP ASSOCIATE connection: Trojan UDP packets on TLS <-> one UDP flow.

    Replies are dropped while the TLS connection's write buffer is over its high-water mark
    (UDP may drop; buffering would not be bounded). The association ends when the client
    closes, on a malformed packet, or after UDP_IDLE_TIMEOUT_S without a datagram either way.
    """

    def __init__(self, transport: asyncio.Transport, dialer: DirectDialer,
                 registry: set[TrojanUdpAssociation], slot: OutboundSlot, *,
                 block_bittorrent: bool = False) -> None:
        self.transport = transport
        self._block_bittorrent = block_bittorrent
        self._said_bittorrent = False
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
            if self._block_bittorrent and datagram_is_bittorrent(payload):
                if not self._said_bittorrent:  # once per association: DHT is a stream of them
                    self._said_bittorrent = True
                    _refused_bittorrent("trojan udp")
                continue
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


# ------------------------------------------------------------------ through a CDN
class TrojanOrNoise(asyncio.Protocol):
    """A CDN carrier's first protocol when the Trojan way in is on: tells an app's trojan-ws
    from veil's client by the first bytes.

    A Trojan request begins with 56 lowercase hex characters and CRLF; veil's Noise channel
    begins with a 2-byte frame length whose first byte is 0 (its first message is 112 bytes;
    an ASCII hex digit there would take one over 12 KB). So the first byte decides, and at most
    the 58 bytes of a hash and its CRLF are read before the request is judged as on the TLS
    port (:class:`TrojanWayIn`: the same users, refusals and limits). A request it accepts
    gets the carrier (:class:`CarrierTrojan`); anything else - not Trojan-shaped, a wrong or
    revoked password, a request cut short past MAX_WAIT_BYTES - goes with every byte read to
    the Noise channel that ``noise`` makes, exactly as on a server without ``--trojan``: a
    holder of the secret path learns nothing from a wrong password.
    """

    def __init__(self, way_in: TrojanWayIn, noise: Callable[[], asyncio.Protocol]) -> None:
        self._way_in = way_in
        self._noise_factory = noise
        self._stream: asyncio.Transport | None = None
        self._first = bytearray()  # bounded by MAX_WAIT_BYTES (see data_received)
        self._noise: asyncio.Protocol | None = None
        self._trojan: CarrierTrojan | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._stream = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._trojan is not None:
            self._trojan.received(data)
            return
        if self._noise is not None:
            self._noise.data_received(data)
            return
        self._first += data
        parsed = parse_request(self._first)
        if isinstance(parsed, Incomplete) and parsed.password_hash is None:
            return  # hex so far, under the hash and its CRLF (58 bytes): read on
        stream = self._stream
        assert stream is not None
        verdict = self._way_in.check(bytes(self._first), stream)
        if isinstance(verdict, Wait) and len(self._first) <= MAX_WAIT_BYTES:
            return  # a known password's request, not whole yet
        if isinstance(verdict, Accept):
            self._first = bytearray()
            self._trojan = CarrierTrojan(stream)
            verdict.take_over(self._trojan)
            return
        if isinstance(verdict, Reject) and verdict.reason is not None:
            log.info("CDN way in: Trojan request refused (%s)", verdict.reason)
        first, self._first = bytes(self._first), bytearray()
        self._noise = self._noise_factory()
        self._noise.connection_made(stream)
        self._noise.data_received(first)

    def eof_received(self) -> bool | None:
        if self._trojan is not None:
            return self._trojan.app.eof_received()
        if self._noise is not None:
            return self._noise.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._trojan is not None:
            self._trojan.app.connection_lost(exc)
        elif self._noise is not None:
            self._noise.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._trojan is not None:
            self._trojan.congested(True)
        elif self._noise is not None:
            self._noise.pause_writing()

    def resume_writing(self) -> None:
        if self._trojan is not None:
            self._trojan.congested(False)
        elif self._noise is not None:
            self._noise.resume_writing()


class CarrierTrojan(asyncio.Transport):
    """A CDN carrier as an accepted Trojan connection's transport.

    What :class:`TrojanService` relays on, as it relays on a TLS connection: writes, closes
    and flow control go to the carrier; the protocol the relay sets is kept here (the
    carrier's own protocol stays :class:`TrojanOrNoise`, which hands the bytes on), and the
    application bytes are counted both ways (``byte_counts``, the user's usage) and held to
    the user's rate limits (``set_rate_limits``), as the TLS port's connections are.
    """

    def __init__(self, stream: asyncio.Transport) -> None:
        super().__init__()
        self._stream = stream
        self._app: asyncio.Protocol | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self._read_limit: Limiter | None = None
        self._write_limit: Limiter | None = None
        self._reading_held = False  # by the relay (its peer is congested)
        self._read_throttled = False  # by the user's rate limit
        self._congested = False  # the carrier's own write buffer is full
        self._write_throttled = False

    @property
    def app(self) -> asyncio.Protocol:
        """The relay's protocol; until the service sets one, a sink (it sets one at once)."""
        return self._app if self._app is not None else _SINK

    # ------------------------------------------------------------------ from the carrier
    def received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self._read_limit is not None and (wait := self._read_limit.take(len(data))) > 0:
            self._throttle_read(wait)
        self.app.data_received(data)

    def congested(self, full: bool) -> None:
        was_paused = self._congested or self._write_throttled
        self._congested = full
        self._tell_app(was_paused)

    # ------------------------------------------------------------------ rate limits
    def set_rate_limits(self, read: Limiter | None, write: Limiter | None) -> None:
        """Hold this connection to these buckets (the user's, shared with their others)."""
        self._read_limit, self._write_limit = read, write

    def _throttle_read(self, wait: float) -> None:
        if not self._read_throttled:
            self._read_throttled = True
            self._apply_reading()
            asyncio.get_running_loop().call_later(wait, self._end_read_throttle)

    def _end_read_throttle(self) -> None:
        # Bytes that were already on their way while paused count too: wait off that debt.
        if self._read_limit is not None and (wait := self._read_limit.take(0)) > 0:
            asyncio.get_running_loop().call_later(wait, self._end_read_throttle)
            return
        self._read_throttled = False
        self._apply_reading()

    def _end_write_throttle(self) -> None:
        if self._write_limit is not None and (wait := self._write_limit.take(0)) > 0:
            asyncio.get_running_loop().call_later(wait, self._end_write_throttle)
            return
        self._write_throttled = False
        self._tell_app(True)

    def _apply_reading(self) -> None:
        if self._stream.is_closing():
            return
        if self._reading_held or self._read_throttled:
            self._stream.pause_reading()
        else:
            self._stream.resume_reading()

    def _tell_app(self, was_paused: bool) -> None:
        paused = self._congested or self._write_throttled
        if paused and not was_paused:
            self.app.pause_writing()
        elif was_paused and not paused:
            self.app.resume_writing()

    # ------------------------------------------------------------------ asyncio.Transport
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._stream.is_closing():
            return
        self.bytes_sent += len(data)
        self._stream.write(data)
        if self._write_limit is not None and (wait := self._write_limit.take(len(data))) > 0 \
                and not self._write_throttled:
            was_paused = self._congested
            self._write_throttled = True
            self._tell_app(was_paused)
            asyncio.get_running_loop().call_later(wait, self._end_write_throttle)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # the carrier cannot half-close (nor can Trojan over TLS)

    def write_eof(self) -> None:
        raise NotImplementedError("the carrier cannot half-close")

    def is_closing(self) -> bool:
        return self._stream.is_closing()

    def close(self) -> None:
        self._stream.close()

    def abort(self) -> None:
        self._stream.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.app

    def is_reading(self) -> bool:
        return not (self._reading_held or self._read_throttled)

    def pause_reading(self) -> None:
        self._reading_held = True
        self._apply_reading()

    def resume_reading(self) -> None:
        self._reading_held = False
        self._apply_reading()

    def get_write_buffer_size(self) -> int:
        return self._stream.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._stream.get_write_buffer_limits()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "byte_counts":
            return (self.bytes_received, self.bytes_sent)
        return self._stream.get_extra_info(name, default)


_SINK = asyncio.Protocol()
