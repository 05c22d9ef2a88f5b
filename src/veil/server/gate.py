"""The gate: decides, for every connection to the one public port, tunnel or cover site.

Order of decisions, each one made the way nginx would make it so that a prober learns nothing:

1. Before TLS, peek (without consuming) at the first byte, as nginx does. ``0x16`` (a TLS
   handshake) or a byte >= 0x80 (SSLv2-style hello) goes on to TLS; anything else is plain
   text sent to an HTTPS port and goes to the cover (:meth:`Cover.serve_plain`). Silence is
   closed after the cover's header timeout.
2. With an ``https://`` cover, a ClientHello naming another server (SNI) is forwarded raw
   to the cover, so the prober sees that site's real certificate.
3. TLS handshake with the server's certificate (OpenSSL, as nginx uses).
4. The first decrypted bytes go to each *way in* in turn (:class:`WayIn`: veil's
   authenticator, :mod:`veil.protocol.auth`; then a Trojan request, ``server/trojan.py``).
   The first that accepts takes the connection over. Anything else - short, random, HTTP, a
   wrong, revoked, stale or replayed key, a wrong Trojan password - goes to the cover with
   every byte already read, so from its first byte the cover answers exactly as it would.

With a borrowed identity (``veil serve --borrow``, ``server/borrow.py``) none of this
applies: every connection is passed to the borrowed site from its first byte and relayed,
except one whose first record is a fresh veil ClientHello, which is answered in the site's
shape and then judged by the veil way in.

A way in may also ask to wait for more bytes (:class:`Wait`), but only once the bytes it has
prove a credential (a Trojan request split across TLS records after a known password's hash):
a prober without a credential never makes the gate wait where the cover would have answered.
"""

from __future__ import annotations

import abc
import asyncio
import fcntl
import logging
import socket
import ssl
import sys
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from veil.cover.backends import Cover
from veil.protocol.auth import (
    AUTH_SIZE,
    Credential,
    ReplayCheck,
    ReplayFilter,
    peek_key_id,
    verify_auth,
)
from veil.server import clienthello
from veil.server.borrow import Borrowed
from veil.server.live import device_of
from veil.store.base import User
from veil.transport.browser_tls import accept_mirrored_tls
from veil.transport.tcp import SERVER_KEEPALIVE, set_keepalive
from veil.transport.tls import start_tls_server
from veil.transport.tls13.server import TlsServer

log = logging.getLogger("veil.server")

# The ALPN protocol of an ACME TLS-ALPN-01 validation (RFC 8737 6.2); a CA offers it alone.
ACME_TLS_1 = b"acme-tls/1"
# nginx waits client_header_timeout (60 s) for the first byte and for the handshake; so do we.
DEFAULT_HANDSHAKE_TIMEOUT_S = 60.0
# Credentials derived from secrets are cached so that an authentication costs one HMAC, not
# an HKDF; bounded because key ids come from the network.
CREDENTIAL_CACHE_SIZE = 4096


# A full replay filter (protocol/auth.py) is logged on its first unrecorded handshake and
# then every this many: a flood must show in the log without flooding it.
REPLAY_FULL_LOG_EVERY = 10_000


# Connections the gate handles at once before they are a tunnel or the cover's (accepted, in
# the first-byte wait or the TLS handshake, or through it and waiting for the first record).
# nginx's equivalent is worker_connections; past it nginx drops new connections, and so does
# the gate, so that a flood of half-open or silent connections costs memory and descriptors up
# to this bound and no further (~20 KiB each once through the handshake: docs/operations.md).
DEFAULT_MAX_PENDING = 8192

# A cover that speaks first (nginx sends its HTTP/2 SETTINGS right after the handshake, before
# it reads anything: within a fraction of a millisecond of its handshake flight) does so at
# the end of the loop turn that finished the handshake if the client sent nothing with its
# Finished - unless a way in's clients may still be about to speak and would not understand
# the greeting (WayIn.greeting_grace). Trojan clients negotiate h2 when offered (veil's own
# exports offer it, as browsers do) and send their request 0.5-2 ms after their Finished
# (measured: trojan, sing-box, veil's Trojan client): the gate waits this long for them, a
# gap between two server packets that a prober can measure (nginx: ~0.02 ms). veil's own
# clients skip the greeting (docs/protocol.md), so a gate without Trojan greets at once: that
# is why the Trojan way in is opt-in (`veil serve --trojan`, docs/operations.md).
GREETING_GRACE_S = 0.01
# Bytes wait in the socket right behind the Finished but no whole record came yet: the
# client's first record is arriving; the greeting waits this much for it.
FIRST_RECORD_WAIT_S = 0.001

# With a borrowed identity, how long the gate looks at a connection's first bytes (passing them
# on to the borrowed site as they come) before it only relays: longer than any site waits for
# a ClientHello (nginx: 60 s), so the site's own timeout is what a silent prober meets.
BORROWED_LOOKAHEAD_S = 180.0

# A way in may hold a connection back for more bytes only up to this much (a Trojan request
# is at most 320 bytes); past it, the cover gets the connection.
MAX_WAIT_BYTES = 4096


@dataclass(slots=True)
class GateStats:
    """Counts by outcome; exported as metrics by the service."""

    tunnels: int = 0  # accepted connections, every way in
    cover_plain: int = 0
    cover_foreign_sni: int = 0
    cover_borrowed: int = 0  # with --borrow: connections relayed to the borrowed site
    acme_validations: int = 0  # TLS-ALPN-01 handshakes answered with a challenge certificate
    tls_failed: int = 0
    silent: int = 0
    dropped: int = 0  # over max_pending
    rejected: dict[str, int] | None = None
    accepted: dict[str, int] = field(default_factory=dict)  # by way in

    def accept(self, way_in: str) -> None:
        self.tunnels += 1
        self.accepted[way_in] = self.accepted.get(way_in, 0) + 1

    def reject(self, reason: str) -> None:
        if self.rejected is None:
            self.rejected = {}
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


# ------------------------------------------------------------------ ways in
@dataclass(frozen=True, slots=True)
class Accept:
    """The connection is this way in's: ``take_over(transport)`` makes it so."""

    user: User
    take_over: Callable[[asyncio.Transport], None]


@dataclass(frozen=True, slots=True)
class Reject:
    """Not this way in's. ``reason`` (for stats) is None when the bytes are not even shaped
    like its protocol, so that the reason of a way in that recognised them is kept."""

    reason: str | None


@dataclass(frozen=True, slots=True)
class Wait:
    """A credential is proven but the request is incomplete: read on (see module docstring)."""


Verdict = Accept | Reject | Wait


class WayIn(abc.ABC):
    """One protocol the public port speaks to holders of a credential."""

    name: str
    #: How long after the handshake this way in's clients may take to send their first
    #: bytes, during which a cover that speaks first must hold its greeting (they would take
    #: it for the tunnel's first bytes). 0: its clients skip the greeting.
    greeting_grace: float = GREETING_GRACE_S

    @abc.abstractmethod
    def check(self, data: bytes, transport: asyncio.Transport) -> Verdict:
        """Judge the first application bytes of a TLS connection (all of them so far).

        Must not write to or close ``transport``: a rejected connection goes to the cover.
        """


class UserLookup(Protocol):
    """Who holds a credential and whether they may connect now (``server/live.py``'s
    in-memory snapshot of the store: a handshake never waits for the database)."""

    def find_by_key_id(self, key_id: bytes) -> User | None: ...

    def find_by_trojan_hash(self, password_hash: str) -> User | None: ...

    def refusal(self, user: User, device: str | None = None) -> str | None:
        """None if the user may connect from ``device`` (the client's address; None: not
        known), else why not ("revoked", "over_limit", "too_many_devices", ...)."""


class Authenticator:
    """Checks authentication messages against the users, with a replay filter."""

    def __init__(self, users: UserLookup, clock: Callable[[], float] = time.time,
                 replay: ReplayCheck | None = None) -> None:
        self.users = users
        #: This process's filter, or one the workers share (veil.server.shared).
        self.replay: ReplayCheck = replay if replay is not None else ReplayFilter()
        self._clock = clock
        self._credentials: dict[bytes, Credential] = {}

    def credential(self, user: User) -> Credential:
        """The user's derived credential, from the cache when it is there."""
        credential = self._credentials.get(user.key_id)
        if credential is None:
            credential = Credential.from_secret(user.secret)
            if len(self._credentials) >= CREDENTIAL_CACHE_SIZE:
                self._credentials.clear()
            self._credentials[user.key_id] = credential
        return credential

    def check(self, message: bytes, binding: bytes,
              device: str | None = None) -> tuple[User | None, str]:
        """(user, "ok") when accepted, else (None, reason); ``device``: the client's address
        where the device limit counts it."""
        key_id = peek_key_id(message)
        user = self.users.find_by_key_id(key_id)
        if user is None:
            return None, "unknown_key"
        if (refusal := self.users.refusal(user, device)) is not None:
            return None, refusal
        credential = self.credential(user)
        unrecorded = self.replay.unrecorded
        reason = verify_auth(message, credential, binding, self._clock(), self.replay)
        if self.replay.unrecorded > unrecorded and unrecorded % REPLAY_FULL_LOG_EVERY == 0:
            log.warning("the replay filter is full (%d entries): key holders are flooding "
                        "handshakes; accepting without remembering (%d so far)",
                        len(self.replay), self.replay.unrecorded)
        return (user, "ok") if reason is None else (None, reason)


OnAuthenticated = Callable[[asyncio.Transport, User, bytes], None]


class VeilWayIn(WayIn):
    """veil's own clients: a 64-byte authenticator, then session frames."""

    name = "veil"
    greeting_grace = 0.0  # the client skips the cover's HTTP/2 greeting (frames.py)

    def __init__(self, authenticator: Authenticator, on_authenticated: OnAuthenticated) -> None:
        self.authenticator = authenticator
        self.on_authenticated = on_authenticated

    def check(self, data: bytes, transport: asyncio.Transport) -> Verdict:
        if len(data) < AUTH_SIZE:
            return Reject("short")
        binding = transport.get_extra_info("tls_unique")
        if not binding:
            return Reject("no_binding")
        user, reason = self.authenticator.check(data[:AUTH_SIZE], binding,
                                                device_of(transport))
        if user is None:
            return Reject(reason)
        rest = data[AUTH_SIZE:]
        return Accept(user, lambda t: self.on_authenticated(t, user, rest))


class Gate:
    """Accepts connections on a listening socket and routes each one."""

    def __init__(self, *, ssl_context: ssl.SSLContext, cover: Cover,
                 ways_in: Sequence[WayIn],
                 own_names: frozenset[str] = frozenset(),
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 borrow: Borrowed | None = None) -> None:
        self.ssl_context = ssl_context
        #: A borrowed identity (``server/borrow.py``): every connection goes to the borrowed
        #: site from its first byte, and stays there unless it starts with a fresh veil
        #: ClientHello (then the decisions below are not made).
        self.borrow = borrow
        #: TLS-ALPN-01 challenges being validated (RFC 8737): the name an ACME order is for
        #: -> the context with its challenge certificate, for a ClientHello naming it and
        #: offering only ``acme-tls/1``; empty (no ClientHello read) the rest of the time.
        self.acme_challenges: dict[str, ssl.SSLContext] = {}
        self.max_pending = max_pending
        self.cover = cover
        self.ways_in = tuple(ways_in)
        self.own_names = own_names
        self.handshake_timeout = handshake_timeout
        self.greeting_grace = max((w.greeting_grace for w in self.ways_in), default=0.0)
        self.stats = GateStats()
        self._tasks: set[asyncio.Task[None]] = set()  # accepted, not through TLS yet
        # Through TLS, first record not judged yet (a borrowed handshake's too).
        self._awaiting: set[_AwaitAuth | _BorrowedFirstRecord] = set()

    @property
    def pending(self) -> int:
        """Connections the gate holds, counted against ``max_pending``. A connection whose
        handshake has just ended may count twice for an instant (its task ends on the next
        turn of the loop): the bound errs towards dropping, never past it."""
        return len(self._tasks) + len(self._awaiting)

    async def serve(self, listener: socket.socket) -> None:
        """Accept until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _peer = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if self.pending >= self.max_pending:
                self.stats.dropped += 1
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_keepalive(sock, SERVER_KEEPALIVE)
            task = loop.create_task(self._handle(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.borrow is not None:
            self.borrow.close()
        for waiting in list(self._awaiting):
            waiting.abort()

    async def _handle(self, sock: socket.socket) -> None:
        try:
            await self._route(sock)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception:  # a bug in routing must cost one connection, never the server
            log.exception("connection routing failed")
            sock.close()

    async def _route(self, sock: socket.socket) -> None:
        started_at = asyncio.get_running_loop().time()
        if self.borrow is not None:
            await self._route_borrowed(sock, started_at)
            return
        first = await _peek(sock, 1, self.handshake_timeout)
        if not first:
            self.stats.silent += 1
            sock.close()
            return
        if first[0] != clienthello.HANDSHAKE and first[0] < 0x80:
            self.stats.cover_plain += 1
            await self.cover.serve_plain(sock, started_at)
            return
        if self.acme_challenges:  # only while an ACME order waits for its validation
            record = await _peek_client_hello(sock, self.handshake_timeout)
            challenge = self.acme_challenges.get(clienthello.server_name(record) or "")
            if challenge is not None and clienthello.alpn_protocols(record) == (ACME_TLS_1,):
                self.stats.acme_validations += 1
                try:
                    await start_tls_server(sock, challenge, _ChallengeAnswered,
                                           self.handshake_timeout)
                except (OSError, TimeoutError, ConnectionError):
                    self.stats.tls_failed += 1
                return
        if self.cover.forwards_foreign_tls and self.own_names:
            name = await _peek_sni(sock, self.handshake_timeout)
            if name is not None and name not in self.own_names:
                self.stats.cover_foreign_sni += 1
                await self.cover.serve_raw(sock)
                return
        remaining = started_at + self.handshake_timeout - asyncio.get_running_loop().time()
        try:
            await start_tls_server(sock, self.ssl_context, lambda: _AwaitAuth(self, started_at),
                                   max(remaining, 0.001))
        except (OSError, TimeoutError, ConnectionError):
            # OpenSSL has already answered the client the way it answers anyone; as nginx.
            self.stats.tls_failed += 1

    async def _route_borrowed(self, sock: socket.socket, started_at: float) -> None:
        """A borrowed identity's routing (``server/borrow.py``): the borrowed site hears the
        connection from its first byte; a fresh veil ClientHello is answered here, in the
        site's shape, and its first record goes to the veil way in."""
        borrow = self.borrow
        veil = next((w for w in self.ways_in if isinstance(w, VeilWayIn)), None)
        assert borrow is not None and veil is not None

        async def answer(client: socket.socket, tls: TlsServer) -> None:
            remaining = started_at + self.handshake_timeout - asyncio.get_running_loop().time()
            try:
                await accept_mirrored_tls(client, tls,
                                          lambda: _BorrowedFirstRecord(self, veil),
                                          max(remaining, 0.001))
            except (OSError, TimeoutError, ConnectionError):
                self.stats.tls_failed += 1

        outcome = await borrow.route(sock, veil.authenticator, answer, BORROWED_LOOKAHEAD_S)
        if outcome == "relayed":
            self.stats.cover_borrowed += 1
        elif outcome == "target_down":
            self.stats.tls_failed += 1


class _BorrowedFirstRecord(asyncio.Protocol):
    """A borrowed handshake's connection until its authenticator is in: the client proved its
    key in the hello, so anything but its authenticator is a broken client, and is closed."""

    def __init__(self, gate: Gate, veil: VeilWayIn) -> None:
        self.gate = gate
        self.veil = veil
        self.transport: asyncio.Transport | None = None
        self._received = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Counted with the gate's other pending connections, and closed if silent as long as
        # a stranger would be.
        self.gate._awaiting.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            self.gate.cover.header_timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self._received += data
        if len(self._received) < AUTH_SIZE:
            return
        self._leave_gate()
        verdict = self.veil.check(self._received, transport)
        if isinstance(verdict, Accept):
            self.gate.stats.accept(self.veil.name)
            verdict.take_over(transport)
            return
        self.gate.stats.reject(verdict.reason if isinstance(verdict, Reject) and verdict.reason
                               else "unrecognised")
        transport.close()

    def _leave_gate(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.gate._awaiting.discard(self)

    def abort(self) -> None:
        """Silent too long, or the server is stopping (the gate's close())."""
        self._leave_gate()
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_gate()


class _AwaitAuth(asyncio.Protocol):
    """A TLS connection whose first application bytes are not in (or not judged) yet."""

    def __init__(self, gate: Gate, started_at: float) -> None:
        self.gate = gate
        self.started_at = started_at
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._greeting_timer: asyncio.Handle | None = None
        self._greeted = False
        self._same_read = False
        self._received_any = False
        self._received = b""  # held only while a way in waits for the rest of a request
        gate._awaiting.add(self)  # until a way in or the cover has it (_leave_gate)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        # Silence is the cover's business: at its header timeout (counted from the accept, as
        # nginx counts it) it gets the connection and closes it its own way.
        self._timer = loop.call_at(self.started_at + self.gate.cover.header_timeout,
                                   self._silent)
        if self.gate.cover.greeting(transport):
            # nginx reads right after the handshake and writes its greeting together with its
            # answer to whatever the client had already sent (even part of a request); only if
            # nothing was there does the greeting go alone. So: did anything come with, or
            # right behind, the Finished? Bytes in the same read arrive synchronously, before
            # _end_same_read; bytes waiting in the socket count too.
            self._same_read = True
            self._greeting_timer = loop.call_soon(self._end_same_read)

    def _end_same_read(self) -> None:
        self._greeting_timer = None
        transport = self.transport
        if self._received_any or transport is None:
            return
        self._same_read = _readable_bytes(transport) > 0
        wait = max(self.gate.greeting_grace, FIRST_RECORD_WAIT_S if self._same_read else 0.0)
        if wait:
            self._greeting_timer = asyncio.get_running_loop().call_later(wait, self._greet)
        else:
            self._greet()

    def _greet_late(self) -> None:
        """The client spoke after the handshake's read: nginx had written its greeting in a
        record of its own by then."""
        if self._greeting_timer is not None and not self._same_read and not self._greeted:
            assert self.transport is not None
            self.transport.write(self.gate.cover.greeting(self.transport))
            self._greeted = True

    def _greet(self) -> None:
        self._greeting_timer = None
        if self.transport is not None and not self._received:
            self.transport.write(self.gate.cover.greeting(self.transport))
            self._greeted = True

    def _silent(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.gate.stats.silent += 1
            self._leave_gate()
            self.gate.cover.serve_tls(self.transport, self._received, self.started_at,
                                      greeted=self._greeted)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        gate = self.gate
        self._received_any = True
        if self._received:
            data = self._received + data
        reason = "unrecognised"
        wait = False
        for way_in in gate.ways_in:
            verdict = way_in.check(data, transport)
            if isinstance(verdict, Accept) and self._greeted and way_in.greeting_grace:
                # The greeting went before this request came (past the grace: a request
                # retransmitted on a lossy link, a client on a loaded machine), and this way
                # in's clients cannot skip it: a tunnel now would hand the app those bytes as
                # its first data. The cover answers, as nginx answers a preface that is not
                # HTTP/2's, and the app connects again.
                reason, wait = f"{way_in.name}_after_greeting", False
                break
            if isinstance(verdict, Accept):
                self._leave_gate()
                gate.stats.accept(way_in.name)
                verdict.take_over(transport)
                return
            if isinstance(verdict, Wait):
                wait = True
            elif verdict.reason is not None:
                reason = verdict.reason
        if wait and len(data) < MAX_WAIT_BYTES:
            self._received = data  # the header timer still runs, as for any request
            return
        self._greet_late()
        self._leave_gate()
        gate.stats.reject(reason)
        gate.cover.serve_tls(transport, data, self.started_at, greeted=self._greeted)

    def _leave_gate(self) -> None:
        """The connection is judged, handed on or gone: no more timers, no longer counted."""
        for timer in (self._timer, self._greeting_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._greeting_timer = None
        self.gate._awaiting.discard(self)

    def abort(self) -> None:
        """The server is stopping: cut the connection (the gate's close())."""
        self._leave_gate()
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # the client closed before saying anything: close, as a web server does

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_gate()


def _readable_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the kernel for the TCP socket under ``transport`` (0 if unknown)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(answer, sys.byteorder, signed=True)


async def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), on_readable)
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(sock.fileno())
    return True


async def _peek(sock: socket.socket, size: int, timeout: float) -> bytes:
    """Up to ``size`` bytes from the socket without consuming them; b"" on EOF or timeout."""
    if size > 1:
        # Wake only once ``size`` bytes are there (or the peer closed): no busy re-peeking.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
    try:
        if not await _wait_readable(sock, timeout):
            return b""
        try:
            return sock.recv(size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return b""
    finally:
        if size > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


async def _peek_client_hello(sock: socket.socket, timeout: float) -> bytes:
    """The first TLS record, left in the socket; empty if it is not a whole handshake record."""
    head = await _peek(sock, clienthello.RECORD_HEADER, timeout)
    total = clienthello.record_length(head)
    if total is None:
        return b""
    record = await _peek(sock, total, timeout)
    return record if len(record) == total else b""


async def _peek_sni(sock: socket.socket, timeout: float) -> str | None:
    record = await _peek_client_hello(sock, timeout)
    return clienthello.server_name(record) if record else None


class _ChallengeAnswered(asyncio.Protocol):
    """A TLS-ALPN-01 validation's connection: the handshake was the answer, and the CA sends
    nothing after it (RFC 8737 3), so it is closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
