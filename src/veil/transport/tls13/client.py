"""A sans-IO TLS 1.3 client (RFC 8446) whose ClientHello is a browser's.

Bytes in (:meth:`TlsClient.receive_data`), events out (:meth:`TlsClient.next_event`), bytes to
send pulled out (:meth:`TlsClient.data_to_send`, :meth:`TlsClient.send`); the caller owns the
socket and the clock. The handshake is a table (``_TRANSITIONS``): a message that is not in
the table for the current state is unexpected, and the connection ends with an alert.

What it does: full (EC)DHE handshakes with X25519MLKEM768, X25519, secp256r1 and secp384r1
(a HelloRetryRequest for any of them), the three TLS 1.3 cipher suites, the server's
certificate (plain or brotli-compressed) and its CertificateVerify, both Finished, an empty
client Certificate when asked for one, ALPS, NewSessionTicket (read and dropped: veil does
not resume), KeyUpdate both ways, alerts and close_notify.

What it does not: TLS 1.2 (the hello offers TLS 1.2 suites because Chrome does; a server that
picks TLS 1.2 gets a protocol_version alert — every TLS 1.3 server picks 1.3), PSK
resumption and 0-RTT, web PKI validation (veil pins the server's key one layer up).

Errors: a server that breaks the protocol raises :class:`TlsProtocolViolation` from
``receive_data`` after the alert that says so was queued (flush ``data_to_send`` before
closing); a server that cannot prove its key raises :class:`TlsServerAuthFailure`; a fatal
alert from the server raises :class:`TlsAlertReceived`.
"""

from __future__ import annotations

import enum
import hmac
import random
from collections import deque
from collections.abc import Callable
from typing import NoReturn

from veil.transport.tls13.certs import (
    MAX_CERTIFICATE_MESSAGE,
    TLS13_SIGNATURE_SCHEMES,
    CertificateError,
    ServerCertificate,
    decompress_certificate,
    parse_certificate,
    verify_signature,
)
from veil.transport.tls13.errors import (
    TlsAlertReceived,
    TlsProtocolViolation,
    TlsServerAuthFailure,
    TlsUsageError,
)
from veil.transport.tls13.events import ApplicationData, Event, HandshakeComplete, PeerClosed
from veil.transport.tls13.hello import HelloContext, HelloSealer, new_hello, retry_hello
from veil.transport.tls13.keys import (
    SUITES,
    SUPPORTED_GROUPS,
    KeySchedule,
    SuiteInfo,
    Transcript,
    finished_verify_data,
    next_traffic_secret,
)
from veil.transport.tls13.profile import CHROME, GREASE, ClientHelloSpec
from veil.transport.tls13.record import (
    HEADER,
    MAX_CIPHERTEXT,
    BadRecordMac,
    EmptyRecord,
    RecordOpener,
    RecordOverflow,
    RecordSealer,
)
from veil.transport.tls13.wire import (
    DOWNGRADE_TLS11,
    DOWNGRADE_TLS12,
    HRR_RANDOM,
    TLS12,
    TLS13,
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
    p16,
    p24,
    u16,
)

A = AlertDescription
E = ExtensionType
H = HandshakeType

# One handshake message larger than this is refused (a certificate chain is the largest).
MAX_HANDSHAKE_MESSAGE = MAX_CERTIFICATE_MESSAGE
_CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"
# Why a record would not open, and the alert each reason calls for (RFC 8446, section 5.2;
# a record that is all padding is section 5.4's unexpected_message).
_RECORD_ERRORS = (BadRecordMac, RecordOverflow, EmptyRecord)
_RECORD_ALERTS: dict[type[Exception], int] = {
    BadRecordMac: A.BAD_RECORD_MAC,
    RecordOverflow: A.RECORD_OVERFLOW,
    EmptyRecord: A.UNEXPECTED_MESSAGE,
}
_USER_CANCELED = 90

# Extensions a server may put in EncryptedExtensions (RFC 8446 §4.2, and ALPS / ECH's
# retry_configs), provided the client offered them.
_EE_ALLOWED = frozenset({E.SERVER_NAME, E.SUPPORTED_GROUPS, E.ALPN, E.RECORD_SIZE_LIMIT,
                         E.APPLICATION_SETTINGS, E.APPLICATION_SETTINGS_OLD,
                         E.ENCRYPTED_CLIENT_HELLO, E.TRUST_ANCHORS})


class State(enum.Enum):
    START = "start"
    WAIT_SERVER_HELLO = "wait_server_hello"
    WAIT_ENCRYPTED_EXTENSIONS = "wait_encrypted_extensions"
    WAIT_CERTIFICATE_OR_REQUEST = "wait_certificate_or_request"
    WAIT_CERTIFICATE = "wait_certificate"
    WAIT_CERTIFICATE_VERIFY = "wait_certificate_verify"
    WAIT_FINISHED = "wait_finished"
    CONNECTED = "connected"
    CLOSED = "closed"


_HANDSHAKING = frozenset({State.WAIT_SERVER_HELLO, State.WAIT_ENCRYPTED_EXTENSIONS,
                          State.WAIT_CERTIFICATE_OR_REQUEST, State.WAIT_CERTIFICATE,
                          State.WAIT_CERTIFICATE_VERIFY, State.WAIT_FINISHED})
_Handler = Callable[["TlsClient", bytes, Reader], None]


class TlsClient:
    """One TLS 1.3 client connection; see the module docstring."""

    def __init__(self, host: str | None, *, spec: ClientHelloSpec = CHROME,
                 rng: random.Random | None = None,
                 sealer: HelloSealer | None = None) -> None:
        missing = [g for g in spec.key_share_groups if g != GREASE and g not in SUPPORTED_GROUPS]
        if missing:
            raise TlsUsageError(f"the {spec.name} profile sends key shares this cryptography "
                                f"cannot make ({', '.join(f'0x{g:04x}' for g in missing)}): "
                                "X25519MLKEM768 needs cryptography >= 47")
        self.spec = spec
        self._host = host
        self._sealer_of_hello = sealer
        self._psk: bytes | None = None
        self._rng = rng
        self.state = State.START
        self._events: deque[Event] = deque()
        self._out = bytearray()
        self._in = bytearray()
        self._hs = bytearray()  # handshake bytes not yet a whole message
        self._plain = bytearray(64 * 1024)
        self._filled = 0  # plaintext already reported in this receive_data call
        self._hello: HelloContext | None = None
        self._transcript = Transcript()
        self._info: SuiteInfo | None = None
        self._schedule: KeySchedule | None = None
        self._opener: RecordOpener | None = None
        self._sealer: RecordSealer | None = None
        self._client_hs_secret = b""
        self._server_hs_secret = b""
        self._client_ap_secret = b""
        self._server_ap_secret = b""
        self._retried = False
        self._retry_suite = 0
        self._ccs_sent = False
        self._peer_closed = False
        self._server_cert: ServerCertificate | None = None
        self._cert_request_context: bytes | None = None
        self._server_alps: bytes | None = None
        self.group = 0
        self.alpn: str | None = None
        self.tls_unique = b""
        self.peer_certificate_der = b""
        self.peer_certificate_chain_der: tuple[bytes, ...] = ()

    # ------------------------------------------------------------------ API
    @property
    def cipher_suite(self) -> int:
        return int(self._info.suite) if self._info else 0

    def connect(self) -> None:
        """Queue the ClientHello."""
        if self.state is not State.START:
            raise TlsUsageError("connect() twice")
        self._hello, message = new_hello(
            self.spec, self._host, self._rng,
            None if self._sealer_of_hello is None else self._seal_hello)
        self._transcript.add(message)
        self._out += _plain_record(ContentType.HANDSHAKE, message, self.spec.record_version)
        self.state = State.WAIT_SERVER_HELLO

    def _seal_hello(self, hello: HelloContext) -> bytes:
        sealer = self._sealer_of_hello
        share = hello.key_shares.get(NamedGroup.X25519)
        if sealer is None or share is None:
            raise TlsUsageError("a sealed ClientHello needs an X25519 key share")
        session_id, self._psk = sealer.seal(hello.client_random, share.public,
                                            share.shared_secret)
        return session_id

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def send(self, data: bytes | bytearray | memoryview) -> bytearray:
        """Encrypt application data; return everything to write now, in order."""
        if self.state is not State.CONNECTED or self._sealer is None:
            raise TlsUsageError(f"cannot send application data in state {self.state.value}")
        sealed = self._sealer.seal(data)
        if self._out:  # a KeyUpdate answer goes first: the records after it use the new key
            sealed[:0] = self._out
            self._out.clear()
        return sealed

    def close(self) -> None:
        """Queue close_notify (once connected) and stop; nothing more is sent or read."""
        if self.state is State.CONNECTED:
            self._send_alert(A.CLOSE_NOTIFY)
        self.state = State.CLOSED

    def update_keys(self, request_peer: bool = False) -> None:
        """Send a KeyUpdate (RFC 8446 §4.6.3) and switch our sending key."""
        if self.state is not State.CONNECTED:
            raise TlsUsageError("KeyUpdate before the handshake completed")
        self._send_key_update(request_peer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Process bytes from the server; events and replies are queued.

        Take the events (:meth:`next_event`) before the next call: the data of
        :class:`ApplicationData` events lives in a buffer that the next call reuses.
        """
        if self.state in (State.CLOSED, State.START) or self._peer_closed:
            return
        view = memoryview(data).cast("B")
        # Plaintext is never longer than its records: one buffer holds a call's worth.
        if len(self._plain) < len(view) + len(self._in):
            self._plain = bytearray(len(view) + len(self._in))
        self._filled = 0
        try:
            taken = 0
            if self._in:
                # A record began in an earlier read: complete it with just the bytes it needs
                # (most reads end inside a record, so copying whole reads would cost a copy
                # of everything), then read the rest where it lies.
                taken = self._complete_pending(view)
                if self._in:
                    return
            consumed = taken + self._process(view[taken:])
            if consumed < len(view):
                self._in += view[consumed:]
        except (TlsProtocolViolation, TlsServerAuthFailure, TlsAlertReceived):
            self._in.clear()
            self.state = State.CLOSED
            raise
        finally:
            view.release()

    def _complete_pending(self, view: memoryview) -> int:
        """Move bytes from ``view`` into the pending record until it is whole, process it;
        return how many bytes of ``view`` were taken."""
        pending = self._in
        taken = 0
        if len(pending) < HEADER:
            taken = min(HEADER - len(pending), len(view))
            pending += view[:taken]
            if len(pending) < HEADER:
                return taken
        length = (pending[3] << 8) | pending[4]
        if length > MAX_CIPHERTEXT:
            self._violation(A.RECORD_OVERFLOW, f"record of {length} bytes")
        more = min(HEADER + length - len(pending), len(view) - taken)
        pending += view[taken : taken + more]
        taken += more
        if len(pending) == HEADER + length:
            record = bytes(pending)
            pending.clear()
            self._process(memoryview(record))
        return taken

    # ------------------------------------------------------------------ records
    def _process(self, view: memoryview) -> int:
        """Handle every complete record in ``view``; return the bytes consumed."""
        end = len(view)
        plain = memoryview(self._plain)
        pos = 0
        # The run of application data not yet reported: plain[batch:filled].
        batch = filled = self._filled
        events = self._events
        while end - pos >= HEADER and not self._peer_closed:
            opener = self._opener
            if (opener is not None and view[pos] == ContentType.APPLICATION_DATA
                    and self.state is State.CONNECTED):
                try:
                    pos, filled, inner, size = opener.open_run(view, pos, plain, filled)
                except _RECORD_ERRORS as exc:
                    self._violation(_RECORD_ALERTS[type(exc)], str(exc))
                if inner < 0:
                    if end - pos < HEADER or end - pos - HEADER < (
                            (view[pos + 3] << 8) | view[pos + 4]):
                        break  # an incomplete record: wait for more
                    continue  # a record of another outer type: the general path below
                if filled > batch:
                    events.append(ApplicationData(plain[batch:filled]))
                    batch = filled
                self._inner_record(inner, bytes(plain[filled : filled + size]))
                continue
            ctype = view[pos]
            length = (view[pos + 3] << 8) | view[pos + 4]
            if length > MAX_CIPHERTEXT:
                self._violation(A.RECORD_OVERFLOW, f"record of {length} bytes")
            if end - pos - HEADER < length:
                break
            header = view[pos : pos + HEADER]
            body = view[pos + HEADER : pos + HEADER + length]
            pos += HEADER + length
            if ctype == ContentType.APPLICATION_DATA and opener is not None:
                try:
                    inner, size = opener.open_into(header, body, plain[filled:])
                except _RECORD_ERRORS as exc:
                    self._violation(_RECORD_ALERTS[type(exc)], str(exc))
                if inner == ContentType.APPLICATION_DATA:
                    self._violation(A.UNEXPECTED_MESSAGE,
                                    "application data before the handshake completed")
                self._inner_record(inner, bytes(plain[filled : filled + size]))
            elif ctype == ContentType.CHANGE_CIPHER_SPEC:
                self._change_cipher_spec(body)
            elif opener is None and ctype == ContentType.HANDSHAKE:
                self._handshake_bytes(bytes(body))
            elif ctype == ContentType.ALERT and (opener is None or self.state in _HANDSHAKING):
                # After ServerHello alerts are encrypted; a plaintext one from a server that
                # could not read our flight still says why the handshake ends.
                self._alert(bytes(body))
            else:
                self._violation(A.UNEXPECTED_MESSAGE,
                                f"record of type {ctype} in state {self.state.value}")
        if filled > batch:
            events.append(ApplicationData(plain[batch:filled]))
        self._filled = filled
        plain.release()
        return pos

    def _inner_record(self, inner: int, content: bytes) -> None:
        """A decrypted record that is not application data."""
        if inner == ContentType.HANDSHAKE:
            self._handshake_bytes(content)
        elif inner == ContentType.ALERT:
            self._alert(content)
        else:
            self._violation(A.UNEXPECTED_MESSAGE, f"inner content type {inner}")

    def _change_cipher_spec(self, body: memoryview) -> None:
        # RFC 8446 §5: a dummy 0x01 between our first ClientHello and the server's Finished
        # is dropped; anything else is unexpected.
        if bytes(body) != b"\x01" or self.state not in _HANDSHAKING:
            self._violation(A.UNEXPECTED_MESSAGE, "change_cipher_spec out of place")

    def _alert(self, content: bytes) -> None:
        if len(content) != 2:
            self._violation(A.DECODE_ERROR, "alert of the wrong length")
        description = content[1]
        if description == A.CLOSE_NOTIFY and self.state is State.CONNECTED:
            self._peer_closed = True
            self._events.append(PeerClosed())
            return
        if description == _USER_CANCELED:
            return  # a warning; the close_notify that follows ends the connection
        self.state = State.CLOSED
        if description == A.CLOSE_NOTIFY:
            raise TlsAlertReceived(description, "the server closed the connection during the "
                                   "TLS handshake (close_notify)")
        raise TlsAlertReceived(description)

    # ------------------------------------------------------------------ handshake
    def _handshake_bytes(self, content: bytes) -> None:
        if not content:
            self._violation(A.UNEXPECTED_MESSAGE, "empty handshake record")
        hs = self._hs
        hs += content
        while len(hs) >= 4:
            size = int.from_bytes(hs[1:4], "big")
            if size > MAX_HANDSHAKE_MESSAGE:
                self._violation(A.DECODE_ERROR, f"handshake message of {size} bytes")
            if len(hs) < 4 + size:
                break
            message = bytes(hs[: 4 + size])
            del hs[: 4 + size]
            handler = _TRANSITIONS.get(self.state, {}).get(message[0])
            if handler is None:
                self._violation(A.UNEXPECTED_MESSAGE, f"handshake message {message[0]} in "
                                f"state {self.state.value}")
            try:
                handler(self, message, Reader(message, 4))
            except DecodeError as exc:
                self._violation(A.DECODE_ERROR, f"malformed handshake message {message[0]}: "
                                f"{exc}")
        if len(hs) > MAX_HANDSHAKE_MESSAGE:
            self._violation(A.DECODE_ERROR, "handshake message too long")

    def _key_change_boundary(self) -> None:
        # Messages that change keys must end their record (RFC 8446 §5.1).
        if self._hs:
            self._violation(A.UNEXPECTED_MESSAGE, "handshake data after a key change "
                            "in the same record")

    def _server_hello(self, message: bytes, r: Reader) -> None:
        hello = self._hello
        assert hello is not None
        legacy_version = r.u16()
        server_random = r.raw(32)
        session_id = r.vec8()
        suite = r.u16()
        compression = r.u8()
        exts = dict(extensions(r))
        r.done()
        versions = exts.get(E.SUPPORTED_VERSIONS)
        if versions is None:
            downgrade = server_random[-8:] in (DOWNGRADE_TLS12, DOWNGRADE_TLS11)
            self._violation(A.PROTOCOL_VERSION, "the server does not speak TLS 1.3"
                            + (" (downgrade sentinel set)" if downgrade else ""))
        if versions != u16(TLS13) or legacy_version != TLS12:
            self._violation(A.ILLEGAL_PARAMETER, "the server chose a version that was not "
                            "offered")
        if session_id != hello.session_id:
            self._violation(A.ILLEGAL_PARAMETER, "legacy_session_id_echo differs")
        if suite not in SUITES or suite not in self.spec.cipher_suites:
            self._violation(A.ILLEGAL_PARAMETER, f"the server chose cipher suite 0x{suite:04x}")
        if compression != 0:
            self._violation(A.ILLEGAL_PARAMETER, "compression method other than null")
        is_retry = server_random == HRR_RANDOM
        for ext_type in exts:
            if ext_type == E.COOKIE and is_retry:
                continue
            if ext_type not in hello.offered_extensions or ext_type not in (
                    E.KEY_SHARE, E.SUPPORTED_VERSIONS):
                self._violation(A.UNSUPPORTED_EXTENSION, f"extension {ext_type} in a "
                                "ServerHello")
        if is_retry:
            self._hello_retry(message, suite, exts)
            return
        if self._retried and suite != self._retry_suite:
            self._violation(A.ILLEGAL_PARAMETER, "cipher suite changed after HelloRetryRequest")
        share = exts.get(E.KEY_SHARE)
        if share is None:
            self._violation(A.MISSING_EXTENSION, "ServerHello without key_share")
        kr = Reader(share)
        group = kr.u16()
        server_share = kr.vec16()
        kr.done()
        key_share = hello.key_shares.get(group)
        if key_share is None:
            self._violation(A.ILLEGAL_PARAMETER, f"key share for group 0x{group:04x}, which "
                            "the client did not send")
        try:
            shared = key_share.shared_secret(server_share)
        except ValueError as exc:
            self._violation(A.ILLEGAL_PARAMETER, f"bad server key share: {exc}")
        info = SUITES[suite]
        self._info = info
        self.group = group
        if not self._retried:
            self._transcript.start(info.hash_name)
        self._transcript.add(message)
        self._schedule = KeySchedule(info, self._psk)
        self._client_hs_secret, self._server_hs_secret = self._schedule.handshake_secrets(
            shared, self._transcript.digest())
        self._key_change_boundary()
        self._opener = RecordOpener(info, self._server_hs_secret)
        self._sealer = RecordSealer(info, self._client_hs_secret)
        hello.key_shares.clear()
        self.state = State.WAIT_ENCRYPTED_EXTENSIONS

    def _hello_retry(self, message: bytes, suite: int, exts: dict[int, bytes]) -> None:
        hello = self._hello
        assert hello is not None
        if self._retried:
            self._violation(A.UNEXPECTED_MESSAGE, "a second HelloRetryRequest")
        group: int | None = None
        if E.KEY_SHARE in exts:
            kr = Reader(exts[E.KEY_SHARE])
            group = kr.u16()
            kr.done()
            if (group not in self.spec.supported_groups or group == GREASE
                    or group not in SUPPORTED_GROUPS or group in hello.key_shares):
                self._violation(A.ILLEGAL_PARAMETER, f"HelloRetryRequest for group "
                                f"0x{group:04x}")
        cookie: bytes | None = None
        if E.COOKIE in exts:
            cr = Reader(exts[E.COOKIE])
            cookie = cr.vec16()
            cr.done()
            if not cookie:
                self._violation(A.DECODE_ERROR, "empty cookie")
        if group is None and cookie is None:
            self._violation(A.ILLEGAL_PARAMETER, "HelloRetryRequest that changes nothing")
        self._retried = True
        self._retry_suite = suite
        self._transcript.restart_after_retry(SUITES[suite].hash_name)
        self._transcript.add(message)
        self._key_change_boundary()
        second = retry_hello(hello, group, cookie)
        self._transcript.add(second)
        if self.spec.middlebox_ccs and not self._ccs_sent:
            self._out += _CCS_RECORD
            self._ccs_sent = True
        self._out += _plain_record(ContentType.HANDSHAKE, second, TLS12)

    def _encrypted_extensions(self, message: bytes, r: Reader) -> None:
        hello = self._hello
        assert hello is not None
        exts = extensions(r)
        r.done()
        for ext_type, data in exts:
            if ext_type not in hello.offered_extensions:
                self._violation(A.UNSUPPORTED_EXTENSION, f"extension {ext_type} in "
                                "EncryptedExtensions was not offered")
            if ext_type not in _EE_ALLOWED:
                self._violation(A.ILLEGAL_PARAMETER, f"extension {ext_type} is not allowed in "
                                "EncryptedExtensions")
            if ext_type == E.ALPN:
                ar = Reader(data)
                names = Reader(ar.vec16())
                ar.done()
                name = names.vec8()
                names.done()
                if name not in self.spec.alpn:
                    self._violation(A.ILLEGAL_PARAMETER, f"ALPN {name!r} was not offered")
                self.alpn = name.decode("ascii", "replace")
            elif ext_type == E.SERVER_NAME and data:
                self._violation(A.DECODE_ERROR, "non-empty server_name in EncryptedExtensions")
            elif ext_type in (E.APPLICATION_SETTINGS, E.APPLICATION_SETTINGS_OLD):
                self._server_alps = data
        if self._server_alps is not None and (
                self.alpn is None or self.alpn.encode() not in self.spec.alps_protocols):
            self._violation(A.ILLEGAL_PARAMETER, "ALPS without a matching ALPN protocol")
        self._transcript.add(message)
        self.state = State.WAIT_CERTIFICATE_OR_REQUEST

    def _certificate_request(self, message: bytes, r: Reader) -> None:
        context = r.vec8()
        exts = dict(extensions(r))
        r.done()
        if E.SIGNATURE_ALGORITHMS not in exts:
            self._violation(A.MISSING_EXTENSION, "CertificateRequest without "
                            "signature_algorithms")
        self._cert_request_context = context
        self._transcript.add(message)
        self.state = State.WAIT_CERTIFICATE

    def _certificate(self, message: bytes, r: Reader) -> None:
        self._take_certificate(message[4:])
        self._transcript.add(message)

    def _compressed_certificate(self, message: bytes, r: Reader) -> None:
        if not self.spec.cert_compression:
            self._violation(A.UNEXPECTED_MESSAGE, "CompressedCertificate was not offered")
        try:
            body = decompress_certificate(message[4:], self.spec.cert_compression)
        except CertificateError as exc:
            self._violation(exc.alert, str(exc))
        self._take_certificate(body)
        self._transcript.add(message)  # the transcript has the compressed form (RFC 8879)

    def _take_certificate(self, body: bytes) -> None:
        hello = self._hello
        assert hello is not None
        try:
            self._server_cert = parse_certificate(body, hello.offered_extensions)
        except CertificateError as exc:
            self._violation(exc.alert, str(exc))
        self.peer_certificate_der = self._server_cert.leaf_der
        # the whole chain, for callers that check it against the web PKI (transport/cdn)
        self.peer_certificate_chain_der = self._server_cert.chain_der
        self.state = State.WAIT_CERTIFICATE_VERIFY

    def _certificate_verify(self, message: bytes, r: Reader) -> None:
        scheme = r.u16()
        signature = r.vec16()
        r.done()
        if scheme not in self.spec.signature_algorithms or scheme not in TLS13_SIGNATURE_SCHEMES:
            self._violation(A.ILLEGAL_PARAMETER, f"CertificateVerify with scheme "
                            f"0x{scheme:04x}, which was not offered for TLS 1.3")
        assert self._server_cert is not None
        try:
            verify_signature(self._server_cert, scheme, signature, self._transcript.digest())
        except CertificateError as exc:
            self._fail_auth(exc.alert, str(exc))
        self._transcript.add(message)
        self.state = State.WAIT_FINISHED

    def _finished(self, message: bytes, r: Reader) -> None:
        info, schedule = self._info, self._schedule
        assert info is not None and schedule is not None
        expected = finished_verify_data(info, self._server_hs_secret, self._transcript.digest())
        if not hmac.compare_digest(message[4:], expected):
            self._fail_auth(A.DECRYPT_ERROR, "the server's Finished does not verify")
        self._transcript.add(message)
        self._key_change_boundary()
        self._client_ap_secret, self._server_ap_secret = schedule.application_secrets(
            self._transcript.digest())
        self._opener = RecordOpener(info, self._server_ap_secret)
        # Our second flight: [CCS] [EncryptedExtensions (ALPS)] [Certificate] Finished.
        flight = b""
        if self._server_alps is not None:
            body = extension(E.APPLICATION_SETTINGS if E.APPLICATION_SETTINGS in
                             self.spec.shuffled else E.APPLICATION_SETTINGS_OLD,
                             self.spec.alps_settings)
            ee = handshake(H.ENCRYPTED_EXTENSIONS, p16(body))
            self._transcript.add(ee)
            flight += ee
        if self._cert_request_context is not None:
            # We have no client certificate: an empty list (RFC 8446 §4.4.2.4), as a browser
            # without one answers.
            cert = handshake(H.CERTIFICATE, bytes((len(self._cert_request_context),))
                             + self._cert_request_context + p24(b""))
            self._transcript.add(cert)
            flight += cert
        verify_data = finished_verify_data(info, self._client_hs_secret,
                                           self._transcript.digest())
        finished = handshake(H.FINISHED, verify_data)
        self._transcript.add(finished)
        flight += finished
        if self.spec.middlebox_ccs and not self._ccs_sent:
            self._out += _CCS_RECORD
            self._ccs_sent = True
        assert self._sealer is not None
        self._out += self._sealer.seal(flight, ContentType.HANDSHAKE)
        self._sealer = RecordSealer(info, self._client_ap_secret)
        self.tls_unique = verify_data
        self.state = State.CONNECTED
        self._events.append(HandshakeComplete(
            cipher_suite=int(info.suite), group=self.group, alpn=self.alpn,
            peer_certificate_der=self.peer_certificate_der, tls_unique=verify_data,
            hello_retry=self._retried))

    def _finished_sealed(self, message: bytes, r: Reader) -> None:
        """A Finished with no certificate before it: only a server that shares the sealed
        hello's secret (the key schedule's PSK input) could make its keys, so it proved that
        secret; any other server must prove a certificate's key."""
        if self._psk is None:
            self._violation(A.UNEXPECTED_MESSAGE, "Finished without a certificate")
        self._finished(message, r)

    def _new_session_ticket(self, message: bytes, r: Reader) -> None:
        # Parsed for well-formedness, then dropped: veil never resumes a session.
        r.raw(8)  # ticket_lifetime, ticket_age_add
        r.vec8()  # ticket_nonce
        if not r.vec16():
            self._violation(A.DECODE_ERROR, "empty session ticket")
        extensions(r)
        r.done()

    def _key_update(self, message: bytes, r: Reader) -> None:
        request = r.u8()
        r.done()
        if request not in (0, 1):
            self._violation(A.ILLEGAL_PARAMETER, "KeyUpdate with a bad request value")
        self._key_change_boundary()
        info = self._info
        assert info is not None
        self._server_ap_secret = next_traffic_secret(info, self._server_ap_secret)
        self._opener = RecordOpener(info, self._server_ap_secret)
        if request == 1:
            self._send_key_update(False)

    def _send_key_update(self, request_peer: bool) -> None:
        info, sealer = self._info, self._sealer
        assert info is not None and sealer is not None
        self._out += sealer.seal(handshake(H.KEY_UPDATE, bytes((int(request_peer),))),
                                 ContentType.HANDSHAKE)
        self._client_ap_secret = next_traffic_secret(info, self._client_ap_secret)
        self._sealer = RecordSealer(info, self._client_ap_secret)

    # ------------------------------------------------------------------ failures
    def _send_alert(self, description: int) -> None:
        content = bytes((1 if description in (A.CLOSE_NOTIFY, _USER_CANCELED) else 2,
                         description))
        if self._sealer is not None:
            self._out += self._sealer.seal(content, ContentType.ALERT)
        else:
            self._out += _plain_record(ContentType.ALERT, content, TLS12)

    def _violation(self, alert: int, message: str) -> NoReturn:
        self._send_alert(alert)
        self.state = State.CLOSED
        raise TlsProtocolViolation(alert, message)

    def _fail_auth(self, alert: int, message: str) -> NoReturn:
        self._send_alert(alert)
        self.state = State.CLOSED
        raise TlsServerAuthFailure(alert, message)


def _plain_record(content_type: int, data: bytes, version: int) -> bytes:
    out = b""
    for start in range(0, len(data), 1 << 14):
        chunk = data[start : start + (1 << 14)]
        out += bytes((content_type,)) + u16(version) + p16(chunk)
    return out


_TRANSITIONS: dict[State, dict[int, _Handler]] = {
    State.WAIT_SERVER_HELLO: {H.SERVER_HELLO: TlsClient._server_hello},
    State.WAIT_ENCRYPTED_EXTENSIONS: {H.ENCRYPTED_EXTENSIONS: TlsClient._encrypted_extensions},
    State.WAIT_CERTIFICATE_OR_REQUEST: {
        H.CERTIFICATE_REQUEST: TlsClient._certificate_request,
        H.CERTIFICATE: TlsClient._certificate,
        H.COMPRESSED_CERTIFICATE: TlsClient._compressed_certificate,
        H.FINISHED: TlsClient._finished_sealed,
    },
    State.WAIT_CERTIFICATE: {
        H.CERTIFICATE: TlsClient._certificate,
        H.COMPRESSED_CERTIFICATE: TlsClient._compressed_certificate,
    },
    State.WAIT_CERTIFICATE_VERIFY: {H.CERTIFICATE_VERIFY: TlsClient._certificate_verify},
    State.WAIT_FINISHED: {H.FINISHED: TlsClient._finished},
    State.CONNECTED: {
        H.NEW_SESSION_TICKET: TlsClient._new_session_ticket,
        H.KEY_UPDATE: TlsClient._key_update,
    },
}
