"""Test support for veil's TLS 1.3 client: a ClientHello parser, JA4, and a small TLS 1.3
server whose every step can be bent (the wrong signing key, a HelloRetryRequest, a compressed
certificate, a KeyUpdate...) to show what the client does with it.

The server is test code only: it shares the key schedule and record layer with the client
(RFC 8448's vectors test those), and the interop tests run the client against OpenSSL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem, padding, rsa, x25519
from cryptography.x509.oid import NameOID

from veil.transport.tls13.keys import (
    SUITES,
    KeySchedule,
    Transcript,
    finished_verify_data,
    next_traffic_secret,
)
from veil.transport.tls13.record import HEADER, RecordOpener, RecordSealer
from veil.transport.tls13.wire import (
    HRR_RANDOM,
    ExtensionType,
    NamedGroup,
    Reader,
    extension,
    extensions,
    handshake,
    is_grease,
    p8,
    p16,
    p24,
    u16,
    u16_list,
)

E = ExtensionType


# ---------------------------------------------------------------------- ClientHello view
@dataclass
class ParsedHello:
    record_version: int
    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: list[int]
    compression: bytes
    extensions: list[tuple[int, bytes]]

    def ext(self, ext_type: int) -> bytes | None:
        return dict(self.extensions).get(ext_type)

    @property
    def extension_types(self) -> list[int]:
        return [t for t, _ in self.extensions]

    @property
    def server_name(self) -> str | None:
        data = self.ext(E.SERVER_NAME)
        if data is None:
            return None
        r = Reader(Reader(data).vec16())
        assert r.u8() == 0
        return r.vec16().decode()

    @property
    def supported_groups(self) -> list[int]:
        return u16_list(Reader(self.ext(E.SUPPORTED_GROUPS) or b"\0\0").vec16())

    @property
    def signature_algorithms(self) -> list[int]:
        return u16_list(Reader(self.ext(E.SIGNATURE_ALGORITHMS) or b"\0\0").vec16())

    @property
    def supported_versions(self) -> list[int]:
        return u16_list(Reader(self.ext(E.SUPPORTED_VERSIONS) or b"\0").vec8())

    @property
    def alpn(self) -> list[bytes]:
        data = self.ext(E.ALPN)
        if data is None:
            return []
        r = Reader(Reader(data).vec16())
        out = []
        while r.remaining:
            out.append(r.vec8())
        return out

    @property
    def key_shares(self) -> list[tuple[int, bytes]]:
        data = self.ext(E.KEY_SHARE)
        if data is None:
            return []
        r = Reader(Reader(data).vec16())
        out = []
        while r.remaining:
            out.append((r.u16(), r.vec16()))
        return out


def parse_client_hello(data: bytes) -> tuple[ParsedHello, int]:
    """The ClientHello at the start of ``data`` (TLS records); also the bytes it used."""
    pos, body = 0, b""
    record_version = int.from_bytes(data[1:3], "big")
    while True:
        assert data[pos] == 22, f"not a handshake record: {data[pos]}"
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        body += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(body) >= 4 and len(body) >= 4 + int.from_bytes(body[1:4], "big"):
            break
    assert body[0] == 1
    size = int.from_bytes(body[1:4], "big")
    r = Reader(body[: 4 + size], 4)
    hello = ParsedHello(record_version=record_version, legacy_version=r.u16(), random=r.raw(32),
                        session_id=r.vec8(), cipher_suites=u16_list(r.vec16()),
                        compression=r.vec8(), extensions=extensions(r))
    r.done()
    return hello, pos


def ja4(hello: ParsedHello, transport: str = "t") -> str:
    """JA4 (FoxIO's TLS client fingerprint, technical_details/JA4.md)."""
    versions = [v for v in hello.supported_versions if not is_grease(v)]
    version = max(versions) if versions else hello.legacy_version
    names = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3"}
    ciphers = [c for c in hello.cipher_suites if not is_grease(c)]
    exts = [t for t in hello.extension_types if not is_grease(t)]
    alpn = hello.alpn
    first = alpn[0] if alpn else b""
    if not first:
        alpn_code = "00"
    elif chr(first[0]).isalnum() and chr(first[-1]).isalnum() and first.isascii():
        alpn_code = chr(first[0]) + chr(first[-1])
    else:
        hexed = first.hex()
        alpn_code = hexed[0] + hexed[-1]
    part_a = (f"{transport}{names.get(version, '00')}{'d' if E.SERVER_NAME in exts else 'i'}"
              f"{min(len(ciphers), 99):02d}{min(len(exts), 99):02d}{alpn_code}")
    return f"{part_a}_{ja4_cipher_hash(ciphers)}_{ja4_extension_hash(exts, hello)}"


def _sha12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ja4_cipher_hash(ciphers: list[int]) -> str:
    if not ciphers:
        return "000000000000"
    return _sha12(",".join(f"{c:04x}" for c in sorted(ciphers)))


def ja4_extension_hash(exts: list[int], hello: ParsedHello | None = None,
                       sigalgs: list[int] | None = None) -> str:
    kept = sorted(t for t in exts if t not in (E.SERVER_NAME, E.ALPN))
    if not kept:
        return "000000000000"
    if sigalgs is None:
        sigalgs = hello.signature_algorithms if hello is not None else []
    sigalgs = [s for s in sigalgs if not is_grease(s)]  # "ignore GREASE values anywhere"
    text = ",".join(f"{t:04x}" for t in kept)
    if sigalgs:
        text += "_" + ",".join(f"{s:04x}" for s in sigalgs)
    return _sha12(text)


# ---------------------------------------------------------------------- certificates
MlDsaKey = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
ServerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | MlDsaKey
_MLDSA_SCHEMES = {mldsa.MLDSA44PrivateKey: 0x0904, mldsa.MLDSA65PrivateKey: 0x0905,
                  mldsa.MLDSA87PrivateKey: 0x0906}


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def _der_items(data: bytes) -> list[bytes]:
    """The TLV elements of a DER SEQUENCE's contents."""
    out, pos = [], 0
    while pos < len(data):
        first = data[pos + 1]
        if first < 0x80:
            head, length = 2, first
        else:
            head = 2 + (first & 0x7F)
            length = int.from_bytes(data[pos + 2 : pos + head], "big")
        out.append(data[pos : pos + head + length])
        pos += head + length
    return out


def _der_body(element: bytes) -> bytes:
    first = element[1]
    return element[2 if first < 0x80 else 2 + (first & 0x7F) :]


def with_public_key(cert_der: bytes, spki_der: bytes) -> bytes:
    """The certificate with its SubjectPublicKeyInfo replaced (signature left as it was:
    veil pins keys and never checks the certificate's own signature)."""
    (cert,) = _der_items(cert_der)
    tbs, algorithm, signature = _der_items(_der_body(cert))
    fields = _der_items(_der_body(tbs))
    fields[6] = spki_der
    return _der(0x30, _der(0x30, b"".join(fields)) + algorithm + signature)


def make_certificate(key: ServerKey, name: str = "example.test") -> bytes:
    if isinstance(key, MlDsaKey):  # the x509 builder cannot use ML-DSA keys yet
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        return with_public_key(make_certificate(ec.generate_private_key(ec.SECP256R1()), name),
                               spki)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def brotli_compress(data: bytes) -> bytes:
    path = ctypes.util.find_library("brotlienc")
    assert path, "libbrotlienc is needed to make a compressed certificate"
    lib = ctypes.CDLL(path)
    lib.BrotliEncoderCompress.restype = ctypes.c_int
    lib.BrotliEncoderCompress.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_size_t, ctypes.c_char_p,
                                          ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p]
    out = ctypes.create_string_buffer(len(data) + 1024)
    size = ctypes.c_size_t(len(out))
    assert lib.BrotliEncoderCompress(11, 22, 0, len(data), data, ctypes.byref(size), out) == 1
    return out.raw[: size.value]


# ---------------------------------------------------------------------- the server
@dataclass
class ServerConfig:
    suite: int = 0x1301
    group: int = NamedGroup.X25519  # if the client sent no share for it: HelloRetryRequest
    cookie: bytes | None = None  # sent in a HelloRetryRequest
    alpn: bytes | None = b"h2"
    key: ServerKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    signing_key: ServerKey | None = None  # forge if set
    scheme: int | None = None
    compress_certificate: bool = False
    request_certificate: bool = False
    tickets: int = 1
    bad_finished: bool = False
    ccs: bool = True  # a dummy change_cipher_spec after ServerHello, as OpenSSL sends
    extra_ee: bytes = b""  # raw extensions appended to EncryptedExtensions


_SCHEME_OF_CURVE = {"secp256r1": (0x0403, hashes.SHA256()), "secp384r1": (0x0503,
                                                                         hashes.SHA384())}


class MiniServer:
    """A TLS 1.3 server, sans-IO: ``receive(data)`` returns the bytes to send back."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.certificate = make_certificate(self.config.key)
        self._in = bytearray()
        self._transcript = Transcript()
        self._hs = bytearray()
        self.hello: ParsedHello | None = None
        self.hellos: list[ParsedHello] = []
        self.retried = False
        self.opener: RecordOpener | None = None
        self.sealer: RecordSealer | None = None
        self.connected = False
        self.received = bytearray()
        self.tls_unique = b""
        self.client_certificate: bytes | None = None
        self.peer_closed = False
        self.key_updates = 0
        self.alerts: list[int] = []
        self.ccs_seen = 0

    # records
    def receive(self, data: bytes) -> bytes:
        self._in += data
        out = b""
        while len(self._in) >= HEADER:
            length = int.from_bytes(self._in[3:5], "big")
            if len(self._in) < HEADER + length:
                break
            record = bytes(self._in[: HEADER + length])
            del self._in[: HEADER + length]
            out += self._record(record)
        return out

    def _record(self, record: bytes) -> bytes:
        ctype = record[0]
        if ctype == 20:
            self.ccs_seen += 1
            return b""
        if self.opener is None:
            assert ctype == 22, ctype
            return self._handshake(record[HEADER:])
        if ctype == 21:  # a plaintext alert after ServerHello: the client could not decrypt
            self.alerts.append(record[-1])
            return b""
        assert ctype == 23, ctype
        view = memoryview(record)
        out = memoryview(bytearray(len(record)))
        inner, size = self.opener.open_into(view[:5], view[5:], out)
        content = bytes(out[:size])
        if inner == 23:
            self.received += content
            return b""
        if inner == 21:
            self.alerts.append(content[1])
            if content[1] == 0:
                self.peer_closed = True
            return b""
        assert inner == 22
        return self._handshake(content)

    def _handshake(self, content: bytes) -> bytes:
        self._hs += content
        out = b""
        while len(self._hs) >= 4:
            size = int.from_bytes(self._hs[1:4], "big")
            if len(self._hs) < 4 + size:
                break
            message = bytes(self._hs[: 4 + size])
            del self._hs[: 4 + size]
            out += self._message(message)
        return out

    def _message(self, message: bytes) -> bytes:
        kind = message[0]
        if kind == 1:
            return self._client_hello(message)
        if kind == 8:  # client EncryptedExtensions (ALPS)
            self._transcript.add(message)
            return b""
        if kind == 11:
            self.client_certificate = message
            self._transcript.add(message)
            return b""
        if kind == 20:
            return self._client_finished(message)
        if kind == 24:
            return self._key_update(message)
        raise AssertionError(f"unexpected message {kind}")

    # handshake
    def _client_hello(self, message: bytes) -> bytes:
        config = self.config
        hello, _ = parse_client_hello(b"\x16\x03\x01" + p16(message))
        self.hellos.append(hello)
        self.hello = hello
        info = SUITES[config.suite]
        shares = dict(hello.key_shares)
        if config.group not in shares:
            assert not self.retried, "the second ClientHello lacks the requested share"
            self.retried = True
            self._transcript.add(message)
            self._transcript.restart_after_retry(info.hash_name)
            exts = extension(E.SUPPORTED_VERSIONS, u16(0x0304)) + extension(
                E.KEY_SHARE, u16(config.group))
            if config.cookie is not None:
                exts += extension(E.COOKIE, p16(config.cookie))
            hrr = handshake(2, u16(0x0303) + HRR_RANDOM + p8(hello.session_id)
                            + u16(config.suite) + b"\x00" + p16(exts))
            self._transcript.add(hrr)
            return _plain(22, hrr) + (b"\x14\x03\x03\x00\x01\x01" if config.ccs else b"")
        if self.retried:
            self._transcript.add(message)
        else:
            self._transcript.add(message)
            self._transcript.start(info.hash_name)
        share, secret = _server_share(config.group, shares[config.group])
        exts = extension(E.SUPPORTED_VERSIONS, u16(0x0304)) + extension(
            E.KEY_SHARE, u16(config.group) + p16(share))
        sh = handshake(2, u16(0x0303) + bytes(32) + p8(hello.session_id) + u16(config.suite)
                       + b"\x00" + p16(exts))
        self._transcript.add(sh)
        self.schedule = KeySchedule(info)
        self.info = info
        self.c_hs, self.s_hs = self.schedule.handshake_secrets(secret, self._transcript.digest())
        self.opener = RecordOpener(info, self.c_hs)
        hs_sealer = RecordSealer(info, self.s_hs)
        out = _plain(22, sh)
        if config.ccs and not self.retried:
            out += b"\x14\x03\x03\x00\x01\x01"
        flight = b""
        ee_body = b""
        if config.alpn is not None:
            ee_body += extension(E.ALPN, p16(p8(config.alpn)))
        ee = handshake(8, p16(ee_body + config.extra_ee))
        flight += ee
        self._transcript.add(ee)
        if config.request_certificate:
            cr = handshake(13, p8(b"") + p16(extension(E.SIGNATURE_ALGORITHMS,
                                                       p16(u16(0x0403)))))
            flight += cr
            self._transcript.add(cr)
        cert_body = p8(b"") + p24(p24(self.certificate) + p16(b""))
        if config.compress_certificate:
            compressed = brotli_compress(cert_body)
            cert_msg = handshake(25, u16(2) + len(cert_body).to_bytes(3, "big")
                                 + p24(compressed))
        else:
            cert_msg = handshake(11, cert_body)
        flight += cert_msg
        self._transcript.add(cert_msg)
        signer = config.signing_key or config.key
        content = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + self._transcript.digest()
        if isinstance(signer, MlDsaKey):
            scheme = next(v for k, v in _MLDSA_SCHEMES.items() if isinstance(signer, k))
            signature = signer.sign(content)
        elif isinstance(signer, ec.EllipticCurvePrivateKey):
            scheme, algorithm = _SCHEME_OF_CURVE[signer.curve.name]
            signature = signer.sign(content, ec.ECDSA(algorithm))
        else:
            scheme, algorithm = 0x0804, hashes.SHA256()
            signature = signer.sign(content, padding.PSS(mgf=padding.MGF1(algorithm),
                                                         salt_length=32), algorithm)
        cv = handshake(15, u16(config.scheme or scheme) + p16(signature))
        flight += cv
        self._transcript.add(cv)
        verify = finished_verify_data(info, self.s_hs, self._transcript.digest())
        if config.bad_finished:
            verify = bytes(len(verify))
        fin = handshake(20, verify)
        flight += fin
        self._transcript.add(fin)
        self.c_ap, self.s_ap = self.schedule.application_secrets(self._transcript.digest())
        out += bytes(hs_sealer.seal(flight, 22))
        self.sealer = RecordSealer(info, self.s_ap)
        return out

    def _client_finished(self, message: bytes) -> bytes:
        expected = finished_verify_data(self.info, self.c_hs, self._transcript.digest())
        assert hmac.compare_digest(message[4:], expected), "client Finished does not verify"
        self._transcript.add(message)
        self.tls_unique = message[4:]
        self.opener = RecordOpener(self.info, self.c_ap)
        self.connected = True
        out = b""
        assert self.sealer is not None
        for _ in range(self.config.tickets):
            ticket = handshake(4, struct.pack(">II", 7200, 12345) + p8(b"\x00")
                               + p16(b"T" * 64) + p16(b""))
            out += bytes(self.sealer.seal(ticket, 22))
        return out

    def _key_update(self, message: bytes) -> bytes:
        self.key_updates += 1
        self.c_ap = next_traffic_secret(self.info, self.c_ap)
        self.opener = RecordOpener(self.info, self.c_ap)
        if message[4] == 1:
            return self.key_update(request=False)
        return b""

    # server-initiated
    def send(self, data: bytes) -> bytes:
        assert self.sealer is not None
        return bytes(self.sealer.seal(data))

    def key_update(self, request: bool) -> bytes:
        assert self.sealer is not None
        out = bytes(self.sealer.seal(handshake(24, bytes((int(request),))), 22))
        self.s_ap = next_traffic_secret(self.info, self.s_ap)
        self.sealer = RecordSealer(self.info, self.s_ap)
        return out

    def alert(self, description: int) -> bytes:
        assert self.sealer is not None
        return bytes(self.sealer.seal(bytes((2, description)), 21))

    def close_notify(self) -> bytes:
        assert self.sealer is not None
        return bytes(self.sealer.seal(b"\x01\x00", 21))


def _plain(ctype: int, data: bytes) -> bytes:
    return bytes((ctype, 3, 3)) + p16(data)


def _server_share(group: int, client_share: bytes) -> tuple[bytes, bytes]:
    if group == NamedGroup.X25519:
        key = x25519.X25519PrivateKey.generate()
        peer = x25519.X25519PublicKey.from_public_bytes(client_share)
        return key.public_key().public_bytes_raw(), key.exchange(peer)
    if group == NamedGroup.X25519MLKEM768:
        kem_public = mlkem.MLKEM768PublicKey.from_public_bytes(client_share[:1184])
        kem_secret, ciphertext = kem_public.encapsulate()
        key = x25519.X25519PrivateKey.generate()
        peer = x25519.X25519PublicKey.from_public_bytes(client_share[1184:])
        return (ciphertext + key.public_key().public_bytes_raw(),
                kem_secret + key.exchange(peer))
    curve = {NamedGroup.SECP256R1: ec.SECP256R1(), NamedGroup.SECP384R1: ec.SECP384R1()}[group]
    ec_key = ec.generate_private_key(curve)
    ec_peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, client_share)
    public = ec_key.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
    return public, ec_key.exchange(ec.ECDH(), ec_peer)
