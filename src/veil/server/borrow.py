"""A borrowed identity (``veil serve --borrow HOST[:PORT]``, experimental): the server shows
a real site's TLS to everyone but its clients.

Every TLS connection that is not a fresh, valid veil ClientHello is relayed to the target
untouched (the cover is a :class:`~veil.cover.backends.UrlCover` for ``https://HOST:PORT``),
so a prober gets the target's certificate, TLS stack and behaviour. A veil client is known
from its ClientHello alone (``protocol/borrow.py``: a mark in legacy_session_id, bound to its
key share, checked against the users and the replay filter); for it the server

1. sends that very ClientHello to the target and reads the target's answer to the end of its
   first flight (:meth:`Borrowed.mirror`), then drops that connection: the client's handshake
   waits one round trip to the target, as a relayed one does;
2. answers the client itself in the target's shape (``transport/tls13/server.py``): the
   target's ServerHello with its own random and key share, its own flight padded into the
   target's record sizes, and, after the client's Finished, padded records where the target
   sends its tickets and HTTP/2 SETTINGS (learned once, :meth:`Borrowed.learn`, on a
   connection of the server's own with veil's Chrome-shaped hello);
3. hands the connection to the veil way in (its post-handshake authenticator, as ever).

A target answer that cannot be mirrored (a HelloRetryRequest, a group this server cannot
answer) is relayed like a stranger's: the client fails its handshake and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import x25519

from veil.protocol.address import Address
from veil.protocol.auth import ACCEPT_WINDOW
from veil.protocol.borrow import unmask
from veil.store.base import User
from veil.transport.tls13 import CHROME, HandshakeComplete, TlsClient
from veil.transport.tls13.errors import (
    TlsAlertReceived,
    TlsProtocolViolation,
    TlsServerAuthFailure,
)
from veil.transport.tls13.server import MirrorShape, ShapeError, parse_client_hello
from veil.transport.tls13.wire import DecodeError, NamedGroup

if TYPE_CHECKING:  # the gate imports this module
    from veil.server.gate import Authenticator

log = logging.getLogger("veil.server")

# How long the target may take to accept a connection and answer a ClientHello: a target far
# slower than this cannot stand in for a site the server pretends to be.
TARGET_WAIT_S = 10.0
# The target's first flight (ServerHello, certificates, signature) is a few KiB; more than
# this before its Finished is not a TLS server's answer.
MAX_FLIGHT_BYTES = 64 * 1024
# After the handshake, what the target sends unprompted comes at once (tickets, an HTTP/2
# server's SETTINGS); once it has been quiet this long, the rest waits for a request.
LEARN_QUIET_S = 1.0
# Records the target may send unprompted after the client's Finished before the learning
# connection stops counting (OpenSSL: 2 tickets; nginx's h2: one SETTINGS record).
MAX_POST_RECORDS = 16
# Learning connections made at once: enough to see a size that varies between connections
# (nginx's two tickets: 282 or 298 bytes each), few enough to cost the target nothing.
LEARN_SAMPLES = 4
# Which sample a borrowed handshake mirrors: not predictable from outside.
_draw = random.SystemRandom()
RECORD_HEADER = 5


@dataclass(frozen=True, slots=True)
class TargetProfile:
    """What the target does that a single forwarded ClientHello does not show."""

    flight_records: int
    """Encrypted records of its first flight, to a Chrome-shaped hello."""
    post_handshake: tuple[tuple[int, ...], ...]
    """Body lengths of the records it sends unprompted after the client's Finished, one
    sample per learning connection."""
    alpn: bytes | None
    """What it selects when offered h2 and http/1.1."""


@dataclass(frozen=True, slots=True)
class Recognised:
    """A fresh, valid veil ClientHello."""

    user: User
    psk: bytes
    hello: bytes  # the ClientHello handshake message


class Borrowed:
    """The borrowed identity: recognises veil's hellos and learns the target's shape."""

    def __init__(self, target: Address, server_name: str, static_key: x25519.X25519PrivateKey,
                 clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.server_name = server_name
        self.static_key = static_key
        self.profile: TargetProfile | None = None
        self._clock = clock

    # ------------------------------------------------------------------ recognition
    def recognise(self, record: bytes, authenticator: Authenticator) -> Recognised | None:
        """The user and PSK of a ClientHello record that is a fresh veil hello, else None
        (the gate's authenticator: its users, credential cache and replay filter)."""
        if len(record) < RECORD_HEADER + 4:
            return None
        message = record[RECORD_HEADER:]
        try:
            hello = parse_client_hello(message)
        except DecodeError:
            return None
        share = hello.key_shares.get(NamedGroup.X25519)
        if share is None:
            return None
        claim = unmask(self.static_key, hello.random, hello.session_id, share)
        if claim is None:
            return None
        user = authenticator.users.find_by_key_id(claim.key_id)
        if user is None or authenticator.users.refusal(user) is not None:
            return None
        psk = claim.verify(authenticator.credential(user))
        if psk is None:
            return None
        now = self._clock()
        if abs(now - claim.timestamp) > ACCEPT_WINDOW:
            return None
        if authenticator.replay.check_and_add(claim.key_id, claim.nonce, claim.timestamp,
                                              now) is not None:
            return None  # a replay (or a key flooding handshakes): the target answers it
        return Recognised(user, psk, message)

    # ------------------------------------------------------------------ the target
    async def mirror(self, record: bytes) -> MirrorShape:
        """The target's answer to this ClientHello record, up to its first flight's end."""
        profile = self.profile or await self.learn()
        async with asyncio.timeout(TARGET_WAIT_S):
            reader, writer = await asyncio.open_connection(self.target.host, self.target.port)
            try:
                writer.write(record)
                server_hello = b""
                ccs = False
                flight: list[int] = []
                received = 0
                while len(flight) < profile.flight_records:
                    head = await reader.readexactly(RECORD_HEADER)
                    ctype, _version, length = struct.unpack("!BHH", head)
                    body = await reader.readexactly(length)
                    received += RECORD_HEADER + length
                    if received > MAX_FLIGHT_BYTES:
                        raise ShapeError("the target's first flight is too long")
                    if ctype == 22 and not server_hello:
                        server_hello = body
                    elif ctype == 20 and not flight:
                        ccs = True
                    elif ctype == 23 and server_hello:
                        flight.append(length)
                    else:
                        raise ShapeError(f"the target answered with a record of type {ctype}")
            except asyncio.IncompleteReadError as exc:
                raise ShapeError("the target closed during its first flight") from exc
            finally:
                writer.close()  # as a client that gave up: no Finished
        return MirrorShape(server_hello, ccs, tuple(flight),
                           _draw.choice(profile.post_handshake), profile.alpn)

    async def learn(self) -> TargetProfile:
        """Complete :data:`LEARN_SAMPLES` Chrome-shaped handshakes with the target at once and
        note its shape: what it sends after the client's Finished may vary between
        connections (nginx's tickets are 282 or 298 bytes), so each borrowed handshake draws
        one of the samples rather than always the same sizes."""
        samples = await asyncio.gather(*(self._learn_once() for _ in range(LEARN_SAMPLES)))
        flights = {flight for flight, _post, _alpn in samples}
        if len(flights) != 1:
            raise ShapeError(f"the target's first flight varies: {sorted(flights)} records")
        alpn = samples[0][2]
        self.profile = TargetProfile(flights.pop(), tuple(post for _f, post, _a in samples),
                                     alpn)
        log.info("borrowed identity: %s answers with %d flight records, then %s", self.target,
                 self.profile.flight_records, sorted(set(self.profile.post_handshake)))
        return self.profile

    async def _learn_once(self) -> tuple[int, tuple[int, ...], bytes | None]:
        tls = TlsClient(self.server_name, spec=CHROME)
        async with asyncio.timeout(TARGET_WAIT_S + LEARN_QUIET_S * 2):
            reader, writer = await asyncio.open_connection(self.target.host, self.target.port)
            try:
                tls.connect()
                writer.write(tls.data_to_send())
                flight = 0
                done = False
                while not done:
                    ctype, record = await _read_record(reader)
                    if ctype == 23:
                        flight += 1
                    try:
                        tls.receive_data(record)
                    except (TlsAlertReceived, TlsProtocolViolation,
                            TlsServerAuthFailure) as exc:
                        raise ShapeError(f"the target's handshake failed: {exc}") from exc
                    while (event := tls.next_event()) is not None:
                        done = done or isinstance(event, HandshakeComplete)
                writer.write(tls.data_to_send())
                post: list[int] = []
                with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
                    while len(post) < MAX_POST_RECORDS:
                        async with asyncio.timeout(LEARN_QUIET_S):
                            _ctype, record = await _read_record(reader)
                        post.append(len(record) - RECORD_HEADER)
                tls.close()
                writer.write(tls.data_to_send())
            finally:
                writer.close()
        return flight, tuple(post), tls.alpn.encode() if tls.alpn else None


async def _read_record(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(RECORD_HEADER)
    (length,) = struct.unpack_from("!H", head, 3)
    return head[0], head + await reader.readexactly(length)
