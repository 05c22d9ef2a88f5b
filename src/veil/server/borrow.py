"""A borrowed identity (``veil serve --borrow HOST[:PORT]``, experimental): the server shows
a real site's TLS to everyone but its clients.

Every connection is passed to the target from its first byte (:meth:`Borrowed.route`), and
every one whose first record is not a fresh, valid veil ClientHello is relayed from there on,
so a prober gets the target's certificate, TLS stack, timeouts and behaviour. A veil client is
known from its ClientHello alone (``protocol/borrow.py``: a mark in legacy_session_id, bound
to its key share, checked against the users and the replay filter); for it the server

1. reads the target's answer to that very ClientHello (the last thing the target got) to the
   end of its first flight, then closes that connection: the client's handshake waits for the
   target as a relayed one does;
2. answers the client itself in the target's shape (``transport/tls13/server.py``): the
   target's ServerHello with its own random and key share, its own flight padded into the
   target's record sizes, and, after the client's Finished, padded records where the target
   sends its tickets and HTTP/2 SETTINGS (learned once, :meth:`Borrowed.learn`, on a
   connection of the server's own with veil's Chrome-shaped hello);
3. hands the connection to the veil way in (its post-handshake authenticator, as ever).

A target answer that cannot be mirrored (a HelloRetryRequest, a group this server cannot
answer) is passed on and the connection relayed: the client fails its handshake and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import x25519

from veil.protocol.address import Address
from veil.protocol.auth import ACCEPT_WINDOW
from veil.protocol.borrow import unmask
from veil.server import clienthello
from veil.store.base import User
from veil.transport.tls13 import CHROME, HandshakeComplete, TlsClient
from veil.transport.tls13.errors import (
    TlsAlertReceived,
    TlsProtocolViolation,
    TlsServerAuthFailure,
)
from veil.transport.tls13.server import MirrorShape, ShapeError, TlsServer, parse_client_hello
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
# One read of a relayed connection, either way.
RELAY_READ = 64 * 1024
# What is peeked of a client before its first record is judged: one whole record at most.
PEEK_LIMIT = clienthello.MAX_RECORD + RECORD_HEADER


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


def _peer_address(sock: socket.socket) -> str | None:
    try:
        return str(sock.getpeername()[0])
    except OSError:  # gone already: nobody to count
        return None


class Borrowed:
    """The borrowed identity: recognises veil's hellos and learns the target's shape."""

    def __init__(self, target: Address, server_name: str, static_key: x25519.X25519PrivateKey,
                 clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.server_name = server_name
        self.static_key = static_key
        self.profile: TargetProfile | None = None
        self._clock = clock
        self._relays: set[asyncio.Task[None]] = set()  # strangers' connections, relayed

    # ------------------------------------------------------------------ recognition
    def recognise(self, record: bytes, authenticator: Authenticator,
                  device: str | None = None) -> Recognised | None:
        """The user and PSK of a ClientHello record that is a fresh veil hello, else None
        (the gate's authenticator: its users, credential cache and replay filter; ``device``
        the client's address, for the device limit)."""
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
        if user is None or authenticator.users.refusal(user, device) is not None:
            return None
        psk = claim.verify(authenticator.credential(user))
        if psk is None:
            return None
        now = self._clock()
        if abs(now - claim.timestamp) > ACCEPT_WINDOW:
            return None
        reason = authenticator.replay.check_and_add(claim.key_id, claim.nonce, claim.timestamp,
                                                    now)
        if reason is not None:  # a replay (or a key flooding handshakes): the target answers
            log.debug("borrowed identity: a veil hello refused (%s), relayed to the site",
                      reason)
            return None
        return Recognised(user, psk, message)

    # ------------------------------------------------------------------ routing
    async def route(self, sock: socket.socket, authenticator: Authenticator,
                    answer: Callable[[socket.socket, TlsServer], Awaitable[None]],
                    timeout: float) -> str:
        """Route one accepted connection; return what became of it ("veil", "relayed",
        "target_down").

        The target hears from the first moment: a connection to it is opened at once and
        every byte the client sends is passed on as it comes, so silence, a partial hello or
        garbage meets the target's own timeouts and answers. Only the first record is looked
        at on the way: a fresh veil ClientHello (:meth:`recognise`) is the last thing the
        target gets; its answer to it is read to the end of its first flight and mirrored
        (``answer``: the gate runs ``transport/tls13/server.py`` on the socket, whose hello
        is consumed); anything else is relayed both ways from there on."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(TARGET_WAIT_S):
                reader, writer = await asyncio.open_connection(self.target.host,
                                                               self.target.port)
        except (OSError, TimeoutError) as exc:
            log.warning("borrowed identity: %s cannot be reached (%s): connection closed",
                        self.target, exc)
            sock.close()
            return "target_down"
        forwarded = 0
        record = b""
        target_read: asyncio.Task[bytes] = loop.create_task(reader.read(RELAY_READ))
        try:
            try:
                async with asyncio.timeout(timeout):
                    # Until the target speaks first (its timeout, an alert) or a first record
                    # is in.
                    while not target_read.done():
                        # Peeked bytes stay readable: wake for more of them (or a FIN) only.
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, forwarded + 1)
                        readable = loop.create_task(_wait_readable(sock))
                        await asyncio.wait({readable, target_read},
                                           return_when=asyncio.FIRST_COMPLETED)
                        readable.cancel()
                        if target_read.done():
                            break
                        seen = _peek_all(sock)
                        if len(seen) <= forwarded:  # the client's FIN (or reset)
                            writer.write_eof()
                            break
                        writer.write(seen[forwarded:])
                        forwarded = len(seen)
                        total = clienthello.record_length(seen)
                        if len(seen) >= clienthello.RECORD_HEADER and total is None:
                            break  # not a TLS handshake record: the target's business
                        if total is not None and forwarded >= total:
                            record = seen[:total] if forwarded == total else b""
                            break
            except TimeoutError:
                pass  # the gate's own limit: whatever the target makes of it, relayed
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            if record and not target_read.done():
                recognised = self.recognise(record, authenticator, _peer_address(sock))
                if recognised is not None:
                    # A pending read gives up nothing when cancelled: the target's answer
                    # stays in the reader for _answer_veil.
                    target_read.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await target_read
                    if await self._answer_veil(sock, record, recognised, reader, writer,
                                               answer):
                        return "veil"
                    return "relayed"
        except BaseException:
            target_read.cancel()
            writer.transport.abort()
            sock.close()
            raise
        # A stranger: what the target got stays got; the rest is relayed as it comes.
        _consume(sock, forwarded)
        self._relay(_splice(sock, reader, writer, target_read, b""))
        return "relayed"

    def _relay(self, splice: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(splice)
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _answer_veil(self, sock: socket.socket, record: bytes, recognised: Recognised,
                           reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           answer: Callable[[socket.socket, TlsServer], Awaitable[None]],
                           ) -> bool:
        """Read the target's answer to the veil hello it was sent and answer in its shape;
        False if it cannot be mirrored (then the connection is relayed as it stands)."""
        raw = bytearray()
        try:
            profile = self.profile or await self.learn()
            async with asyncio.timeout(TARGET_WAIT_S):
                shape = await _read_flight(reader, raw, profile)
            tls = TlsServer(recognised.hello, shape, recognised.psk)
        except (ShapeError, OSError, TimeoutError) as exc:
            log.warning("borrowed identity: cannot answer in %s's shape (%s); relayed",
                        self.target, exc)
            _consume(sock, len(record))
            self._relay(_splice(sock, reader, writer, None, bytes(raw)))
            return False
        writer.close()  # as a client that gave up: no Finished
        _consume(sock, len(record))
        await answer(sock, tls)
        return True

    def close(self) -> None:
        """The server is stopping: cut the relays."""
        for task in list(self._relays):
            task.cancel()

    # ------------------------------------------------------------------ the target
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


async def _read_flight(reader: asyncio.StreamReader, raw: bytearray,
                       profile: TargetProfile) -> MirrorShape:
    """The target's ServerHello, change_cipher_spec and encrypted first flight (as many
    records as it sent when learnt); every byte read is kept in ``raw``."""
    server_hello = b""
    ccs = False
    flight: list[int] = []
    try:
        while len(flight) < profile.flight_records:
            ctype, record = await _read_record(reader)
            raw += record
            if len(raw) > MAX_FLIGHT_BYTES:
                raise ShapeError("the target's first flight is too long")
            length = len(record) - RECORD_HEADER
            if ctype == 22 and not server_hello:
                server_hello = record[RECORD_HEADER:]
            elif ctype == 20 and not flight:
                ccs = True
            elif ctype == 23 and server_hello:
                flight.append(length)
            else:
                raise ShapeError(f"the target answered with a record of type {ctype}")
    except asyncio.IncompleteReadError as exc:
        raw += exc.partial
        raise ShapeError("the target closed during its first flight") from exc
    return MirrorShape(server_hello, ccs, tuple(flight),
                       _draw.choice(profile.post_handshake), profile.alpn)


async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _peek_all(sock: socket.socket) -> bytes:
    """What the client sent so far, left in the socket (at most a whole first record)."""
    try:
        return sock.recv(PEEK_LIMIT, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return b""


def _consume(sock: socket.socket, count: int) -> None:
    """Take ``count`` bytes that were peeked (and passed on) out of the socket."""
    while count > 0:
        try:
            data = sock.recv(count)
        except (BlockingIOError, InterruptedError, OSError):
            return
        if not data:
            return
        count -= len(data)


async def _splice(sock: socket.socket, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter, target_read: asyncio.Task[bytes] | None,
                  from_target: bytes) -> None:
    """Relay the client's socket and the target's connection both ways until both ends
    closed; a reset on one side resets the other. ``target_read``: a read of the target
    already under way; ``from_target``: bytes of the target's not yet passed on."""
    try:
        c_reader, c_writer = await asyncio.open_connection(sock=sock)
    except OSError:
        sock.close()
        writer.transport.abort()
        return
    try:
        if target_read is not None:
            first = await target_read
            if not first:
                from_target += first
                c_writer.write(from_target)
                if c_writer.can_write_eof():
                    c_writer.write_eof()
                from_target = b""
            else:
                from_target += first
        if from_target:
            c_writer.write(from_target)
        await asyncio.gather(_pipe(c_reader, writer), _pipe(reader, c_writer))
    finally:
        c_writer.close()
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One direction, with the writer's backpressure; a FIN passes as a FIN, a reset as a
    reset."""
    try:
        while data := await reader.read(RELAY_READ):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionResetError:
        writer.transport.abort()
    except OSError:
        writer.transport.abort()
