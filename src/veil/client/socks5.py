"""The client's SOCKS5 inbound (RFC 1928, with RFC 1929 username/password).

Two layers:

* :class:`Socks5Connection` is sans-IO: bytes in, events out, reply bytes pulled out. It knows
  the greeting, the optional username/password sub-negotiation and the request (CONNECT and
  UDP ASSOCIATE; BIND is answered "command not supported"). Anything outside the state table
  is an error that carries the reply to send (if any) and means "close".
* :class:`Socks5Inbound` is a thin asyncio listener (``asyncio.Protocol``, no streams) that
  feeds the parser and, once it has a destination, waits for the :class:`Dialer` to be ready
  for it (``wait_ready_for``: a split-routing dialer does not wait for the tunnel for a direct
  destination), replies success optimistically and hands the transport over with
  ``Dialer.open_tcp``.

UDP ASSOCIATE binds a UDP socket on the address the client reached us on, accepts datagrams
only from the client's IP (and one source port, learnt from the request or the first
datagram), strips and adds the RFC 1928 section 7 header, and relays through
``Dialer.open_udp``. The association ends when the TCP control connection closes.

Destinations and credentials are never logged: in a censorship-resistance tool the list of
sites a user visits is exactly what must not end up on disk.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, cast

from veil.client.listener import HandshakeConnection, HandshakeInbound
from veil.config import Credentials
from veil.errors import AuthError, LocalProtocolError, RemoteProtocolError, VeilError
from veil.net.dialer import Dialer, UdpFlow
from veil.protocol.address import ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, Address, NeedMoreData

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_TRAILING_DATA",
    "MAX_UDP_ASSOCIATIONS",
    "READY_TIMEOUT",
    "UNSPECIFIED_BIND",
    "ConnectRequest",
    "Event",
    "Reply",
    "Socks5Connection",
    "Socks5Inbound",
    "State",
    "UdpAssociateRequest",
    "decode_udp_datagram",
    "encode_udp_datagram",
]

log = logging.getLogger(__name__)

SOCKS_VERSION = 5
AUTH_VERSION = 1  # RFC 1929 sub-negotiation version

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3

#: Bytes the parser keeps after the request while the caller decides (waits for the tunnel).
#: A client may pipeline its first payload (a TLS ClientHello, an HTTP request) behind the
#: request; the listener pauses reading as soon as the request is parsed, so at most one socket
#: read (256 KiB in asyncio and uvloop) lands here. More than that is a misbehaving client.
MAX_TRAILING_DATA = 512 * 1024

#: A client has this long from connecting to finishing its request. Without it, idle sockets
#: that never speak would hold a slot and a file descriptor forever.
HANDSHAKE_TIMEOUT = 30.0

#: How long a request waits for the tunnel to come up before being refused (general failure).
#: Long enough for a reconnect over a slow, lossy link; short enough that apps fail visibly.
READY_TIMEOUT = 15.0

#: UDP associations one listener serves at once. Each holds a bound UDP socket and a tunnel
#: association; a local process opening control connections in a loop must not exhaust file
#: descriptors.
MAX_UDP_ASSOCIATIONS = 256

#: The bound address in replies where the real one does not matter (CONNECT: RFC 1928 lets the
#: server choose, and clients ignore it).
UNSPECIFIED_BIND = Address("0.0.0.0", 0)


class Reply(enum.IntEnum):
    """REP codes of the request reply (RFC 1928, section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class State(enum.Enum):
    """Where a :class:`Socks5Connection` is in the handshake."""

    GREETING = "greeting"  # waiting for VER NMETHODS METHODS
    AUTH = "auth"  # waiting for the RFC 1929 username/password request
    REQUEST = "request"  # waiting for VER CMD RSV ATYP DST.ADDR DST.PORT
    WAIT_REPLY = "wait_reply"  # request delivered; the caller must send_reply()
    ESTABLISHED = "established"  # success sent; the caller owns the connection now
    CLOSED = "closed"  # failed; send data_to_send() (may be empty), then close


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """The client asked for a TCP stream (CMD 1)."""

    dest: Address
    """Where to connect; a domain name is passed on unresolved."""


@dataclass(frozen=True, slots=True)
class UdpAssociateRequest:
    """The client asked for a UDP relay (CMD 3)."""

    client: Address
    """Where the client says it will send datagrams from; often 0.0.0.0:0 (not known yet)."""


Event = ConnectRequest | UdpAssociateRequest


def _digest(value: bytes) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the secret's length.
    return hashlib.sha256(value).digest()


def _plausible_host(host: str) -> bool:
    """False for names no resolver should see: control characters, spaces, separators."""
    return host.isprintable() and not any(c.isspace() or c in "/\\@" for c in host)


def _encode_reply(reply: Reply, bind: Address) -> bytes:
    return bytes((SOCKS_VERSION, reply, 0)) + bind.encode()


_FAILURE_REPLY = {code: _encode_reply(code, UNSPECIFIED_BIND) for code in Reply}


class Socks5Connection:
    """The server side of one SOCKS5 handshake, sans-IO.

    Feed received bytes to :meth:`receive_data`; it returns at most one event
    (:class:`ConnectRequest` or :class:`UdpAssociateRequest`) per handshake. Send whatever
    :meth:`data_to_send` returns after every call. Answer the request with :meth:`send_reply`.
    Bytes that arrive after the request are kept in :attr:`trailing_data` (early data for the
    stream), up to :data:`MAX_TRAILING_DATA`.

    Protocol violations raise :class:`~veil.errors.RemoteProtocolError` (or
    :class:`~veil.errors.AuthError` for wrong credentials) after queueing the reply the client
    should see, if there is one; the state is then ``CLOSED`` and the caller must send
    ``data_to_send()`` and close. Misuse by the caller raises ``LocalProtocolError``.
    """

    def __init__(self, credentials: Credentials | None = None) -> None:
        self._state = State.GREETING
        self._buffer = bytearray()
        self._out = bytearray()
        if credentials is None:
            self._expected: tuple[bytes, bytes] | None = None
        else:
            self._expected = (_digest(credentials.username), _digest(credentials.password))

    @property
    def state(self) -> State:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the request (only meaningful once the request is parsed)."""
        if self._state not in (State.WAIT_REPLY, State.ESTABLISHED):
            return b""
        return bytes(self._buffer)

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now (and forget)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Consume ``data``; return the events it completed (at most one per connection)."""
        if self._state is State.CLOSED:
            raise LocalProtocolError("SOCKS5 connection already failed", code="closed")
        self._buffer += data
        events: list[Event] = []
        while True:
            handler = self._HANDLERS.get(self._state)
            if handler is None:
                break
            try:
                event = handler(self)
            except NeedMoreData:
                break
            if event is not None:
                events.append(event)
        if len(self._buffer) > MAX_TRAILING_DATA:
            # Before the request this cannot happen (every message is < 520 bytes and complete
            # ones are consumed); after it, the client is pushing far more than a first flight.
            self._fail(b"", RemoteProtocolError("too much data before reply", code="overflow"))
        return events

    def send_reply(self, reply: Reply, bind: Address = UNSPECIFIED_BIND) -> None:
        """Queue the reply to the request. Success moves to ESTABLISHED, failure to CLOSED."""
        if self._state is not State.WAIT_REPLY:
            raise LocalProtocolError(f"cannot reply in state {self._state.value}", code="state")
        self._out += _encode_reply(reply, bind)
        self._state = State.ESTABLISHED if reply is Reply.SUCCEEDED else State.CLOSED

    # -- handlers: consume one message from the buffer or raise NeedMoreData ---------------------

    def _fail(self, reply: bytes, exc: VeilError) -> NoReturn:
        self._state = State.CLOSED
        self._buffer.clear()
        self._out += reply
        raise exc

    def _on_greeting(self) -> Event | None:
        buf = self._buffer
        if buf and buf[0] != SOCKS_VERSION:
            self._fail(b"", RemoteProtocolError("not a SOCKS5 greeting", code="bad_version"))
        if len(buf) < 2:
            raise NeedMoreData
        end = 2 + buf[1]
        if len(buf) < end:
            raise NeedMoreData
        methods = buf[2:end]
        del buf[:end]
        wanted = METHOD_NO_AUTH if self._expected is None else METHOD_USERPASS
        if wanted not in methods:
            self._fail(
                bytes((SOCKS_VERSION, METHOD_NONE_ACCEPTABLE)),
                RemoteProtocolError("no acceptable auth method", code="no_acceptable_method"),
            )
        self._out += bytes((SOCKS_VERSION, wanted))
        self._state = State.REQUEST if self._expected is None else State.AUTH
        return None

    def _on_auth(self) -> Event | None:
        buf = self._buffer
        if buf and buf[0] != AUTH_VERSION:
            self._fail(b"", RemoteProtocolError("bad auth version", code="bad_version"))
        if len(buf) < 2:
            raise NeedMoreData
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            raise NeedMoreData
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            raise NeedMoreData
        username = _digest(bytes(buf[2 : 2 + ulen]))
        password = _digest(bytes(buf[3 + ulen : end]))
        del buf[:end]
        expected = cast(tuple[bytes, bytes], self._expected)
        # Both comparisons always run, so timing does not tell which one failed.
        ok = hmac.compare_digest(username, expected[0]) & hmac.compare_digest(password, expected[1])
        if not ok:
            self._fail(
                bytes((AUTH_VERSION, 0x01)),
                AuthError("wrong SOCKS5 username or password", code="bad_credentials"),
            )
        self._out += bytes((AUTH_VERSION, 0x00))
        self._state = State.REQUEST
        return None

    def _on_request(self) -> Event | None:
        buf = self._buffer
        if buf and buf[0] != SOCKS_VERSION:
            self._fail(b"", RemoteProtocolError("not a SOCKS5 request", code="bad_version"))
        if len(buf) < 4:
            raise NeedMoreData
        # RSV (buf[2]) is ignored: it has no meaning, and being strict here gains nothing.
        if buf[3] not in (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6):
            self._fail(
                _FAILURE_REPLY[Reply.ADDRESS_TYPE_NOT_SUPPORTED],
                RemoteProtocolError(f"unknown address type {buf[3]}", code="bad_address"),
            )
        try:
            dest, end = Address.decode(buf, 3)
            # The tunnel re-encodes the name in its OPEN frame: one that cannot be (an empty
            # label, a label over 63 bytes) is refused here, not in the dialer's task.
            dest.encode()
        except (RemoteProtocolError, ValueError, UnicodeError):
            self._fail(
                _FAILURE_REPLY[Reply.GENERAL_FAILURE],
                RemoteProtocolError("undecodable address", code="bad_address"),
            )
        command = buf[1]
        del buf[:end]
        if dest.ip is None and not _plausible_host(dest.host):
            self._fail(
                _FAILURE_REPLY[Reply.GENERAL_FAILURE],
                RemoteProtocolError("implausible domain name", code="bad_address"),
            )
        self._state = State.WAIT_REPLY
        if command == CMD_CONNECT:
            return ConnectRequest(dest)
        if command == CMD_UDP_ASSOCIATE:
            return UdpAssociateRequest(dest)
        name = "BIND" if command == CMD_BIND else f"command {command}"
        self._fail(
            _FAILURE_REPLY[Reply.COMMAND_NOT_SUPPORTED],
            RemoteProtocolError(f"{name} not supported", code="command_not_supported"),
        )

    # The state table: states not listed here parse nothing (see receive_data).
    _HANDLERS: ClassVar[dict[State, Callable[[Socks5Connection], Event | None]]] = {
        State.GREETING: _on_greeting,
        State.AUTH: _on_auth,
        State.REQUEST: _on_request,
    }


# -- UDP datagram header (RFC 1928, section 7): RSV(2) FRAG(1) ATYP ADDR PORT DATA ----------------


def decode_udp_datagram(data: bytes) -> tuple[Address, bytes]:
    """Split a client datagram into destination and payload.

    Raises RemoteProtocolError for anything that must be dropped: truncated or undecodable
    headers, non-zero RSV, and fragments (FRAG != 0; reassembly is optional in RFC 1928 and no
    mainstream client fragments).
    """
    if len(data) < 4:
        raise RemoteProtocolError("truncated SOCKS5 UDP header", code="bad_udp_header")
    if data[0] or data[1]:
        raise RemoteProtocolError("non-zero RSV in SOCKS5 UDP header", code="bad_udp_header")
    if data[2]:
        raise RemoteProtocolError("fragmented SOCKS5 datagram", code="fragmented")
    try:
        dest, end = Address.decode(data, 3)
        dest.encode()  # the tunnel re-encodes it (see Socks5Connection._on_request)
    except NeedMoreData as exc:
        raise RemoteProtocolError("truncated SOCKS5 UDP header", code="bad_udp_header") from exc
    except (ValueError, UnicodeError) as exc:
        raise RemoteProtocolError("bad address in SOCKS5 UDP header", code="bad_address") from exc
    return dest, data[end:]


def encode_udp_datagram(source: Address, payload: bytes) -> bytes:
    """Prefix a reply with the header that tells the client where it came from."""
    return b"\x00\x00\x00" + source.encode() + payload


# -- asyncio listener -----------------------------------------------------------------------------


class Socks5Inbound(HandshakeInbound):
    """A SOCKS5 listener that hands each accepted stream to a :class:`Dialer`.

    ``start()`` binds ``listen`` (port 0 picks a free port; see :attr:`address`). Connections
    still in their handshake and UDP associations belong to the inbound and are closed by
    ``close()``; streams handed to the dialer belong to the dialer from then on.

    With ``credentials`` set, clients must use username/password (method 0x02); a wrong pair
    gets status 0x01 and the connection is closed. Without, only "no authentication" (0x00) is
    offered.
    """

    name = "SOCKS5 inbound"

    def __init__(
        self,
        dialer: Dialer,
        listen: Address,
        *,
        credentials: Credentials | None = None,
        ready_timeout: float = READY_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_udp_associations: int = MAX_UDP_ASSOCIATIONS,
    ) -> None:
        super().__init__(dialer, listen, ready_timeout=ready_timeout,
                         handshake_timeout=handshake_timeout)
        self.credentials = credentials
        self.max_udp_associations = max_udp_associations
        self._udp_count = 0

    def _make_protocol(self) -> asyncio.Protocol:
        return _Socks5Protocol(self)

class _Socks5Protocol(HandshakeConnection[Socks5Inbound]):
    """One accepted connection until its handshake ends (handover, failure or UDP close)."""

    log_name = "socks5"
    _log = log

    def __init__(self, inbound: Socks5Inbound) -> None:
        super().__init__(inbound)
        self._conn = Socks5Connection(inbound.credentials)
        self._udp: _UdpRelay | None = None

    def data_received(self, data: bytes) -> None:
        if self._udp is not None:
            return  # the control connection carries nothing once the association is up
        transport = cast(asyncio.Transport, self._transport)
        try:
            events = self._conn.receive_data(data)
        except VeilError as exc:
            log.debug("socks5 handshake failed: %s", exc.code)
            transport.write(self._conn.data_to_send())
            transport.close()
            return
        if out := self._conn.data_to_send():
            transport.write(out)
        for event in events:
            if isinstance(event, ConnectRequest):
                self._start_handover(transport, self._connect(event.dest))
            else:
                self._start_handover(transport, self._associate(event.client))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._udp is not None:
            self._udp.close()
            self._udp = None
            self._inbound._udp_count -= 1

    def _refuse(self, transport: asyncio.Transport, reply: Reply) -> None:
        self._conn.send_reply(reply)
        transport.write(self._conn.data_to_send())
        transport.close()

    async def _connect(self, dest: Address) -> None:
        transport = cast(asyncio.Transport, self._transport)
        refusal = self._inbound.dialer.refusal(dest, "tcp")
        if refusal is not None:
            log.debug("socks5: %s", refusal)
            self._refuse(transport, Reply.NOT_ALLOWED)
            return
        ready = await self._wait_ready(dest)
        if transport.is_closing():
            return
        if not ready:
            # A tunnel known to be down (the reason is in the log): "network unreachable",
            # which apps report as such; no answer in time: "general failure".
            known = self._inbound.dialer.why_not_ready() is not None
            self._refuse(transport, Reply.NETWORK_UNREACHABLE if known
                         else Reply.GENERAL_FAILURE)
            return
        self._conn.send_reply(Reply.SUCCEEDED)
        transport.write(self._conn.data_to_send())
        self._hand_over(transport, dest, self._conn.trailing_data)

    async def _associate(self, hint: Address) -> None:
        inbound = self._inbound
        transport = cast(asyncio.Transport, self._transport)
        ready = await self._wait_ready()
        if transport.is_closing():
            return
        if not ready or inbound._udp_count >= inbound.max_udp_associations:
            self._refuse(transport, Reply.GENERAL_FAILURE)
            return
        local_ip = cast(str, transport.get_extra_info("sockname")[0])
        client_ip = cast(str, transport.get_extra_info("peername")[0])
        relay = _UdpRelay(client_ip, _client_port(hint, client_ip), on_end=transport.close)
        # Counted from here (connection_lost gives it back), so concurrent requests cannot
        # overshoot the limit while this one is binding.
        self._udp = relay
        inbound._udp_count += 1
        loop = asyncio.get_running_loop()
        try:
            udp_transport, _ = await loop.create_datagram_endpoint(
                lambda: relay, local_addr=(local_ip, 0)
            )
        except OSError as exc:
            log.debug("socks5: cannot bind UDP relay: %s", type(exc).__name__)
            self._refuse(transport, Reply.GENERAL_FAILURE)
            return
        if transport.is_closing():
            relay.close()
            return
        try:
            relay.flow = inbound.dialer.open_udp(relay.on_reply, relay.on_flow_closed)
        except VeilError as exc:
            log.debug("socks5: cannot open UDP flow: %s", exc.code)
            self._refuse(transport, Reply.GENERAL_FAILURE)
            return
        host, port = udp_transport.get_extra_info("sockname")[:2]
        self._task = None
        self._conn.send_reply(Reply.SUCCEEDED, Address(_unmapped(host), port))
        transport.write(self._conn.data_to_send())
        transport.resume_reading()  # to notice the control connection closing


def _client_port(hint: Address, client_ip: str) -> int:
    """The client's UDP source port if the request pins it down, else 0 (learn it later).

    The request's DST.ADDR/DST.PORT is where the client will send from. Its port counts when
    the address is unspecified or matches the TCP peer; otherwise it is ignored.
    """
    ip = hint.ip
    if ip is None or not (ip.is_unspecified or hint.host == client_ip):
        return 0
    return hint.port


def _unmapped(host: str) -> str:
    """Report an IPv4-mapped IPv6 address as plain IPv4, which every client understands."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return host


class _UdpRelay(asyncio.DatagramProtocol):
    """The UDP side of one association: client datagrams in, tunnel replies out.

    Only datagrams from the client's IP are accepted, and from one source port (given in the
    request, or the first one seen). Replies are dropped while the socket's send buffer is
    over its high-water mark (``pause_writing``), because datagram transports would buffer
    without limit.
    """

    def __init__(self, client_ip: str, client_port: int, on_end: Callable[[], None]) -> None:
        self._client_ip = client_ip
        self._client: tuple[str, int] | None = (client_ip, client_port) if client_port else None
        self._on_end = on_end
        self._writable = True
        self.transport: asyncio.DatagramTransport | None = None
        self.flow: UdpFlow | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if addr[0] != self._client_ip or self.flow is None:
            return
        client = self._client
        if client is None:
            self._client = (addr[0], addr[1])
        elif addr[1] != client[1]:
            return
        try:
            dest, payload = decode_udp_datagram(data)
        except VeilError:
            return
        self.flow.send(dest, payload)

    def on_reply(self, source: Address, payload: bytes) -> None:
        transport = self.transport
        if self._client is None or not self._writable or transport is None:
            return
        try:
            packet = encode_udp_datagram(source, payload)
        except ValueError:
            return
        transport.sendto(packet, self._client)

    def on_flow_closed(self) -> None:
        self._on_end()

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors and oversize replies: UDP may drop, the association goes on

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._on_end()

    def close(self) -> None:
        if self.flow is not None:
            self.flow.close()
            self.flow = None
        if self.transport is not None:
            self.transport.close()
