"""A sans-IO TLS 1.3 server that answers in another server's shape: a borrowed identity's.

A server with a borrowed identity (docs/protocol.md, "Borrowed identity") relays strangers to
a real site, the *target*, and completes the handshake itself only for its own clients. What a
passive observer or a replaying prober sees of that handshake must be the target's answer to
the same ClientHello. The caller sends the target that very ClientHello, reads its answer up
to the end of its first flight, and hands it over as a :class:`MirrorShape`; this server then

- sends the target's ServerHello byte for byte except its random and its key share (a fresh
  one of the same group, so of the same length), hence the same fields and extension order;
- sends a change_cipher_spec record if the target did;
- sends its own first flight, EncryptedExtensions (the target's ALPN choice) and Finished, cut
  into as many encrypted records as the target's flight had, each padded (RFC 8446 §5.4) to
  the size of the target's record: the certificate's size shows as it does from the target;
- after the client's Finished, sends as many records as the target sent unprompted at that
  point (OpenSSL's NewSessionTickets, an HTTP/2 server's SETTINGS), each an empty
  application_data record padded to that record's size, which a TLS 1.3 client reads as
  nothing.

No certificate is sent: the server proves itself with the key schedule's PSK input, a secret
only it and the client share (derived from the client's sealed hello, ``hello.py``'s
:class:`~veil.transport.tls13.hello.HelloSealer`): without it no key of the handshake is
right, so the client's check of the server's Finished is the server's authentication, and the
(EC)DHE exchange still gives forward secrecy.

The interface is :class:`~veil.transport.tls13.client.TlsClient`'s (``connect`` queues the
first flight; ``receive_data``, ``next_event``, ``data_to_send``, ``send``, ``close``), so the
asyncio carrier of ``browser_tls.py`` drives either.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import os
from collections import deque
from dataclasses import dataclass
from typing import NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

with contextlib.suppress(ImportError):  # as in keys.py: ML-KEM arrived in cryptography 47
    from cryptography.hazmat.primitives.asymmetric import mlkem

from veil.transport.tls13.errors import TlsAlertReceived, TlsProtocolViolation, TlsUsageError
from veil.transport.tls13.events import ApplicationData, Event, HandshakeComplete, PeerClosed
from veil.transport.tls13.keys import (
    HAVE_MLKEM,
    SUITES,
    KeySchedule,
    SuiteInfo,
    Transcript,
    finished_verify_data,
    next_traffic_secret,
)
from veil.transport.tls13.record import (
    HEADER,
    MAX_CIPHERTEXT,
    TAG,
    BadRecordMac,
    EmptyRecord,
    RecordOpener,
    RecordOverflow,
    RecordSealer,
)
from veil.transport.tls13.wire import (
    HRR_RANDOM,
    AlertDescription,
    ContentType,
    DecodeError,
    ExtensionType,
    HandshakeType,
    NamedGroup,
    Reader,
    extension,
    extensions,
    handshake,
    p8,
    p16,
    u16,
)

A = AlertDescription
E = ExtensionType
H = HandshakeType

_CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"
# The smallest record that carries one byte of content: the byte, its content type, the tag.
_MIN_RECORD = 1 + 1 + TAG
_RECORD_ERRORS = (BadRecordMac, RecordOverflow, EmptyRecord)
# A client's second flight (change_cipher_spec, Finished) is under 1 KiB; a peer that sends
# more than this before its Finished is not a TLS client.
MAX_HANDSHAKE_BUFFER = 64 * 1024


def _alert_for(exc: Exception) -> int:
    """The alert a record that would not open calls for (RFC 8446 §5.2, §5.4)."""
    if isinstance(exc, RecordOverflow):
        return A.RECORD_OVERFLOW
    return A.UNEXPECTED_MESSAGE if isinstance(exc, EmptyRecord) else A.BAD_RECORD_MAC


class ShapeError(TlsUsageError):
    """The target's answer cannot be mirrored for this ClientHello (a HelloRetryRequest, a
    group or cipher suite this server cannot answer with, a flight too small to carry ours):
    the caller relays the connection instead."""


@dataclass(frozen=True, slots=True)
class MirrorShape:
    """What the target answered to the ClientHello, as this server must answer it."""

    server_hello: bytes
    """The target's ServerHello handshake message (its 4-byte header included)."""
    change_cipher_spec: bool
    """The target sent a change_cipher_spec record before its encrypted flight."""
    flight: tuple[int, ...]
    """The body lengths of the encrypted records of the target's first flight."""
    post_handshake: tuple[int, ...]
    """The body lengths of the records the target sends unprompted after the client's
    Finished (learned on a connection of the server's own to the target)."""
    alpn: bytes | None
    """The application protocol the target selects for this offer (learned likewise)."""


class State(enum.Enum):
    START = "start"
    WAIT_FINISHED = "wait_finished"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class _Hello:
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    key_shares: dict[int, bytes]
    alpn: tuple[bytes, ...]


def parse_client_hello(message: bytes) -> _Hello:
    """The parts of a ClientHello handshake message a server answers; DecodeError if it is
    not one."""
    r = Reader(message)
    if r.u8() != H.CLIENT_HELLO or r.u24() != len(message) - 4:
        raise DecodeError("not one ClientHello message")
    r.u16()
    random = r.raw(32)
    session_id = r.vec8()
    suites = r.vec16()
    r.vec8()  # compression methods
    exts = dict(extensions(r))
    r.done()
    shares: dict[int, bytes] = {}
    if E.KEY_SHARE in exts:
        kr = Reader(exts[E.KEY_SHARE]).sub16()
        while kr.remaining:
            group = kr.u16()
            shares.setdefault(group, kr.vec16())
    alpn: list[bytes] = []
    if E.ALPN in exts:
        ar = Reader(exts[E.ALPN]).sub16()
        while ar.remaining:
            alpn.append(ar.vec8())
    return _Hello(random, session_id,
                  tuple(int.from_bytes(suites[i:i + 2], "big") for i in range(0, len(suites), 2)),
                  shares, tuple(alpn))


def _key_exchange(group: int, client_share: bytes) -> tuple[bytes, bytes]:
    """(our key share, shared secret) for the client's share of ``group``."""
    try:
        if group == NamedGroup.X25519:
            key = x25519.X25519PrivateKey.generate()
            peer = x25519.X25519PublicKey.from_public_bytes(client_share)
            return key.public_key().public_bytes_raw(), key.exchange(peer)
        if group in (NamedGroup.SECP256R1, NamedGroup.SECP384R1):
            curve: ec.EllipticCurve = (ec.SECP256R1() if group == NamedGroup.SECP256R1
                                       else ec.SECP384R1())
            ec_key = ec.generate_private_key(curve)
            ec_peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, client_share)
            public = ec_key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            return public, ec_key.exchange(ec.ECDH(), ec_peer)
        if group == NamedGroup.X25519MLKEM768 and HAVE_MLKEM:
            kem_public, x_public = client_share[:1184], client_share[1184:]
            kem_secret, ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(
                kem_public).encapsulate()
            key = x25519.X25519PrivateKey.generate()
            x_secret = key.exchange(x25519.X25519PublicKey.from_public_bytes(x_public))
            return ciphertext + key.public_key().public_bytes_raw(), kem_secret + x_secret
    except ValueError as exc:
        raise ShapeError(f"bad client key share for group 0x{group:04x}: {exc}") from exc
    raise ShapeError(f"cannot answer key exchange group 0x{group:04x}")


def _split(data: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    """``data`` cut into one piece per record size, each at least one byte and at most what
    its record holds; ShapeError if it cannot be."""
    room = [size - 1 - TAG for size in sizes]
    if not sizes or len(data) < len(sizes) or sum(room) < len(data) or min(room) < 1:
        raise ShapeError(f"{len(data)} handshake bytes do not fit records of {list(sizes)}")
    pieces: list[bytes] = []
    pos = 0
    for index, capacity in enumerate(room):
        left_after = len(sizes) - index - 1  # each later record needs one byte
        take = max(1, min(capacity, len(data) - pos - left_after))
        if index == len(sizes) - 1:
            take = len(data) - pos
        if take > capacity:
            raise ShapeError(f"{len(data)} handshake bytes do not fit records of "
                             f"{list(sizes)}")
        pieces.append(data[pos:pos + take])
        pos += take
    return pieces


class TlsServer:
    """One TLS 1.3 server connection in a target's shape; see the module docstring.

    Raises :class:`ShapeError` when built if the target's answer cannot be mirrored.
    """

    def __init__(self, client_hello: bytes, shape: MirrorShape, psk: bytes) -> None:
        try:
            hello = parse_client_hello(client_hello)
            target = Reader(shape.server_hello)
            if target.u8() != H.SERVER_HELLO or target.u24() != len(shape.server_hello) - 4:
                raise ShapeError("the target's answer is not a ServerHello")
            legacy_version = target.u16()
            target_random = target.raw(32)
            target.vec8()  # the session id echo: ours is the client's
            suite = target.u16()
            compression = target.u8()
            target_exts = extensions(target)
            target.done()
        except DecodeError as exc:
            raise ShapeError(f"unreadable hello: {exc}") from exc
        if target_random == HRR_RANDOM:
            raise ShapeError("the target asked for another key share (HelloRetryRequest)")
        if suite not in SUITES or suite not in hello.cipher_suites:
            raise ShapeError(f"the target chose cipher suite 0x{suite:04x}")
        if shape.alpn is not None and shape.alpn not in hello.alpn:
            raise ShapeError("the target's protocol is not in this hello's ALPN offer")
        self._info: SuiteInfo = SUITES[suite]
        exts = b""
        self.group = 0
        shared = b""
        for ext_type, data in target_exts:
            if ext_type == E.KEY_SHARE:
                try:
                    group = Reader(data).u16()
                except DecodeError as exc:
                    raise ShapeError("the target's key share is unreadable") from exc
                if group not in hello.key_shares:
                    raise ShapeError(f"the target chose group 0x{group:04x}, not in the hello")
                public, shared = _key_exchange(group, hello.key_shares[group])
                if len(public) + 4 != len(data):
                    raise ShapeError("our key share would differ in length from the target's")
                self.group = group
                exts += extension(ext_type, u16(group) + p16(public))
            else:
                exts += extension(ext_type, data)
        if not shared:
            raise ShapeError("the target's ServerHello has no key share")
        self._server_hello = handshake(
            H.SERVER_HELLO, u16(legacy_version) + os.urandom(32) + p8(hello.session_id)
            + u16(suite) + bytes((compression,)) + p16(exts))
        self._shape = shape
        self.alpn: str | None = None if shape.alpn is None else shape.alpn.decode("ascii",
                                                                                 "replace")
        self._transcript = Transcript()
        self._transcript.start(self._info.hash_name)
        self._transcript.add(client_hello)
        self._transcript.add(self._server_hello)
        self._schedule = KeySchedule(self._info, psk)
        self._client_hs_secret, self._server_hs_secret = self._schedule.handshake_secrets(
            shared, self._transcript.digest())
        # The first flight, built now: its size is checked against the target's before any
        # byte is sent (ShapeError leaves the caller free to relay).
        ee_body = (extension(E.ALPN, p16(p8(shape.alpn))) if shape.alpn is not None else b"")
        ee = handshake(H.ENCRYPTED_EXTENSIONS, p16(ee_body))
        self._transcript.add(ee)
        finished = handshake(H.FINISHED, finished_verify_data(
            self._info, self._server_hs_secret, self._transcript.digest()))
        self._transcript.add(finished)
        self._pieces = _split(ee + finished, shape.flight)
        if any(size < 1 + TAG or size > MAX_CIPHERTEXT for size in shape.post_handshake):
            raise ShapeError(f"post-handshake records of {list(shape.post_handshake)}")
        self._client_ap_secret, self._server_ap_secret = self._schedule.application_secrets(
            self._transcript.digest())
        self.state = State.START
        self._opener = RecordOpener(self._info, self._client_hs_secret)
        self._hs_sealer = RecordSealer(self._info, self._server_hs_secret)
        self._sealer = RecordSealer(self._info, self._server_ap_secret)
        self._events: deque[Event] = deque()
        self._out = bytearray()
        self._in = bytearray()
        self._plain = bytearray(64 * 1024)
        self._hs = bytearray()
        self._ccs_seen = False
        self._peer_closed = False
        self.tls_unique = b""
        self.peer_certificate_der = b""

    @property
    def cipher_suite(self) -> int:
        return int(self._info.suite)

    # ------------------------------------------------------------------ API
    def connect(self) -> None:
        """Queue the ServerHello and the first flight."""
        if self.state is not State.START:
            raise TlsUsageError("connect() twice")
        self._out += (bytes((ContentType.HANDSHAKE, 3, 3)) + p16(self._server_hello))
        if self._shape.change_cipher_spec:
            self._out += _CCS_RECORD
        for piece, size in zip(self._pieces, self._shape.flight, strict=True):
            self._out += self._hs_sealer.seal_padded(piece, ContentType.HANDSHAKE, size)
        self.state = State.WAIT_FINISHED

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def send(self, data: bytes | bytearray | memoryview) -> bytearray:
        if self.state is not State.CONNECTED:
            raise TlsUsageError(f"cannot send application data in state {self.state.value}")
        sealed = self._sealer.seal(data)
        if self._out:
            sealed[:0] = self._out
            self._out.clear()
        return sealed

    def close(self) -> None:
        if self.state is State.CONNECTED:
            self._out += self._sealer.seal(bytes((1, A.CLOSE_NOTIFY)), ContentType.ALERT)
        self.state = State.CLOSED

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Process bytes from the client. Take the events before the next call: the data of
        :class:`ApplicationData` events lives in a buffer that the next call reuses."""
        if self.state in (State.CLOSED, State.START) or self._peer_closed:
            return
        self._in += data
        # Plaintext is never longer than its records: one buffer holds a call's worth.
        if len(self._plain) < len(self._in):
            self._plain = bytearray(len(self._in))
        try:
            self._process()
        except (TlsProtocolViolation, TlsAlertReceived):
            self._in.clear()
            self.state = State.CLOSED
            raise

    # ------------------------------------------------------------------ records
    def _process(self) -> None:
        """Handle every complete record of ``_in``; what is left is one incomplete record."""
        buf = self._in
        view = memoryview(buf)
        plain = memoryview(self._plain)
        pos = filled = 0
        try:
            while len(buf) - pos >= HEADER and not self._peer_closed:
                if self.state is State.CONNECTED and buf[pos] == ContentType.APPLICATION_DATA:
                    # The hot path: a run of application data, opened into one buffer.
                    batch = filled
                    try:
                        pos, filled, inner, size = self._opener.open_run(view, pos, plain,
                                                                         filled)
                    except _RECORD_ERRORS as exc:
                        self._violation(_alert_for(exc), str(exc))
                    if filled > batch:
                        self._events.append(ApplicationData(plain[batch:filled]))
                    if inner >= 0:
                        self._inner(inner, bytes(plain[filled:filled + size]))
                        continue
                    if len(buf) - pos < HEADER or len(buf) - pos - HEADER < (
                            (buf[pos + 3] << 8) | buf[pos + 4]):
                        break  # an incomplete record: wait for more
                    if buf[pos] == ContentType.APPLICATION_DATA:
                        continue
                ctype = buf[pos]
                length = (buf[pos + 3] << 8) | buf[pos + 4]
                if length > MAX_CIPHERTEXT:
                    self._violation(A.RECORD_OVERFLOW, f"record of {length} bytes")
                if len(buf) - pos - HEADER < length:
                    break
                # Handshake-time and rare records: copies, so no view of ``_in`` outlives
                # this loop (it is cut below).
                header = memoryview(bytes(buf[pos:pos + HEADER]))
                body = memoryview(bytes(buf[pos + HEADER:pos + HEADER + length]))
                pos += HEADER + length
                if ctype == ContentType.CHANGE_CIPHER_SPEC:
                    if (bytes(body) != b"\x01" or self._ccs_seen
                            or self.state is not State.WAIT_FINISHED):
                        self._violation(A.UNEXPECTED_MESSAGE, "change_cipher_spec out of place")
                    self._ccs_seen = True
                    continue
                if ctype == ContentType.ALERT and self.state is State.WAIT_FINISHED:
                    self._alert(bytes(body))
                    continue
                if ctype != ContentType.APPLICATION_DATA:
                    self._violation(A.UNEXPECTED_MESSAGE, f"record of type {ctype}")
                try:
                    inner, size = self._opener.open_into(header, body, plain[filled:])
                except _RECORD_ERRORS as exc:
                    self._violation(_alert_for(exc), str(exc))
                if inner == ContentType.APPLICATION_DATA:
                    self._violation(A.UNEXPECTED_MESSAGE, "application data before the "
                                    "client's Finished")
                self._inner(inner, bytes(plain[filled:filled + size]))
        finally:
            view.release()
            del buf[:pos]
        if len(buf) > MAX_HANDSHAKE_BUFFER and self.state is State.WAIT_FINISHED:
            self._violation(A.UNEXPECTED_MESSAGE, "too much before the client's Finished")

    def _inner(self, inner: int, content: bytes) -> None:
        """A decrypted record that is not application data."""
        if inner == ContentType.HANDSHAKE:
            self._handshake_bytes(content)
        elif inner == ContentType.ALERT:
            self._alert(content)
        else:
            self._violation(A.UNEXPECTED_MESSAGE, f"inner content type {inner}")

    def _alert(self, content: bytes) -> None:
        if len(content) != 2:
            self._violation(A.DECODE_ERROR, "alert of the wrong length")
        if content[1] == A.CLOSE_NOTIFY and self.state is State.CONNECTED:
            self._peer_closed = True
            self._events.append(PeerClosed())
            return
        if content[1] == A.USER_CANCELED:
            return
        self.state = State.CLOSED
        raise TlsAlertReceived(content[1])

    def _handshake_bytes(self, content: bytes) -> None:
        if not content:
            self._violation(A.UNEXPECTED_MESSAGE, "empty handshake record")
        hs = self._hs
        hs += content
        while len(hs) >= 4:
            size = int.from_bytes(hs[1:4], "big")
            if len(hs) < 4 + size:
                break
            message = bytes(hs[:4 + size])
            del hs[:4 + size]
            if message[0] == H.FINISHED and self.state is State.WAIT_FINISHED:
                self._finished(message)
            elif message[0] == H.KEY_UPDATE and self.state is State.CONNECTED and size == 1:
                self._key_update(message[4])
            else:
                self._violation(A.UNEXPECTED_MESSAGE, f"handshake message {message[0]} in "
                                f"state {self.state.value}")
        if len(hs) > MAX_HANDSHAKE_BUFFER:
            self._violation(A.DECODE_ERROR, "handshake message too long")

    def _finished(self, message: bytes) -> None:
        if self._hs:
            self._violation(A.UNEXPECTED_MESSAGE, "data after the Finished in its record")
        expected = finished_verify_data(self._info, self._client_hs_secret,
                                        self._transcript.digest())
        if not hmac.compare_digest(message[4:], expected):
            self._violation(A.DECRYPT_ERROR, "the client's Finished does not verify")
        self._transcript.add(message)
        self.tls_unique = expected
        self._opener = RecordOpener(self._info, self._client_ap_secret)
        for size in self._shape.post_handshake:
            self._out += self._sealer.seal_padded(b"", ContentType.APPLICATION_DATA, size)
        self.state = State.CONNECTED
        self._events.append(HandshakeComplete(
            cipher_suite=self.cipher_suite, group=self.group, alpn=self.alpn,
            peer_certificate_der=b"", tls_unique=expected, hello_retry=False))

    def _key_update(self, request: int) -> None:
        if request not in (0, 1):
            self._violation(A.ILLEGAL_PARAMETER, "KeyUpdate with a bad request value")
        self._client_ap_secret = next_traffic_secret(self._info, self._client_ap_secret)
        self._opener = RecordOpener(self._info, self._client_ap_secret)
        if request == 1:
            self._out += self._sealer.seal(handshake(H.KEY_UPDATE, b"\x00"),
                                           ContentType.HANDSHAKE)
            self._server_ap_secret = next_traffic_secret(self._info, self._server_ap_secret)
            self._sealer = RecordSealer(self._info, self._server_ap_secret)

    def _violation(self, alert: int, message: str) -> NoReturn:
        # The alert goes under the keys the client reads with now (RFC 8446 §6).
        sealer = self._sealer if self.state is State.CONNECTED else self._hs_sealer
        self._out += sealer.seal(bytes((2, alert)), ContentType.ALERT)
        self.state = State.CLOSED
        raise TlsProtocolViolation(alert, message)
